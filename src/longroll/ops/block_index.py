"""Typed block-sparse index: which key blocks each query block attends to.

The fields mirror FlexAttention's ``BlockMask`` (``kv_num_blocks``, ``kv_indices``), so an index converts to
one with :meth:`BlockSparseIndex.to_flex_block_mask`. Query rows are cut in blocks of ``q_block_size`` and keys
in blocks of ``kv_block_size``; the last block on either axis may be partial.

Shapes (B = batch, H = heads, nqb = ceil(seqlen_q / q_block_size), nkb = ceil(seqlen_k / kv_block_size)):

- ``kv_num_blocks``: (B, H, nqb) int32, how many entries of the row are used.
- ``kv_indices``: (B, H, nqb, max_blocks) int32, key-block ids in [0, nkb); entries past the count are ignored.

B or H may be 1 to share one index over every batch element or head (as FlexAttention broadcasts).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

_INDEX_DTYPE = torch.int32


def _is_pow2(x: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0 and (x & (x - 1)) == 0


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


#: Cells of :meth:`BlockSparseIndex.to_string`: no pair computed, some, all (FlexAttention's characters).
_SHADES = (" ", "░", "█")


def _shade(share: float) -> int:
    return 2 if share >= 1.0 else 1 if share > 0.0 else 0


@dataclasses.dataclass(frozen=True, eq=False)
class BlockSparseIndex:
    """Per (batch, head, query block) lists of key blocks.

    Attributes:
        kv_num_blocks: (B, H, n_q_blocks) int32; entries used in each row of ``kv_indices``.
        kv_indices: (B, H, n_q_blocks, max_blocks) int32 key-block ids; entries past the count are ignored.
        q_block_size: query rows per block (power of two).
        kv_block_size: keys per block (power of two).
        seqlen_q: number of queries; n_q_blocks == ceil(seqlen_q / q_block_size).
        seqlen_k: number of keys; ids lie in [0, ceil(seqlen_k / kv_block_size)).

    A key block id must not repeat within a row (a repeated block would be counted twice by the kernels);
    :meth:`validate_ids` checks ids and counts, at the price of a host synchronisation.
    """

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    q_block_size: int
    kv_block_size: int
    seqlen_q: int
    seqlen_k: int

    def __post_init__(self) -> None:
        for name in ("q_block_size", "kv_block_size"):
            value = getattr(self, name)
            if not _is_pow2(value):
                raise ValueError(f"{name} must be a positive power of two, got {value!r}")
        for name in ("seqlen_q", "seqlen_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        num, idx = self.kv_num_blocks, self.kv_indices
        for name, x, rank in (("kv_num_blocks", num, 3), ("kv_indices", idx, 4)):
            if not isinstance(x, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            if x.dim() != rank:
                raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(x.shape)}")
            if x.dtype != _INDEX_DTYPE:
                raise ValueError(f"{name} must have dtype torch.int32, got {x.dtype}")
        if idx.shape[:3] != num.shape:
            raise ValueError(
                f"kv_indices must have shape {tuple(num.shape)} + (max_blocks,) to match kv_num_blocks, "
                f"got {tuple(idx.shape)}"
            )
        if idx.device != num.device:
            raise ValueError(f"kv_indices is on {idx.device} but kv_num_blocks is on {num.device}")
        nqb = _cdiv(self.seqlen_q, self.q_block_size)
        if num.shape[2] != nqb:
            raise ValueError(
                f"kv_num_blocks has {num.shape[2]} query blocks (shape {tuple(num.shape)}), but seqlen_q="
                f"{self.seqlen_q} with q_block_size={self.q_block_size} needs {nqb}"
            )

    # ------------------------------------------------------------------ properties
    @property
    def batch(self) -> int:
        return int(self.kv_num_blocks.shape[0])

    @property
    def num_heads(self) -> int:
        return int(self.kv_num_blocks.shape[1])

    @property
    def n_q_blocks(self) -> int:
        return int(self.kv_num_blocks.shape[2])

    @property
    def n_kv_blocks(self) -> int:
        return _cdiv(self.seqlen_k, self.kv_block_size)

    @property
    def max_blocks(self) -> int:
        return int(self.kv_indices.shape[3])

    @property
    def device(self) -> torch.device:
        return self.kv_num_blocks.device

    # ------------------------------------------------------------------ constructors
    @classmethod
    def full(
        cls,
        batch: int,
        heads: int,
        seqlen_q: int,
        seqlen_k: int,
        q_block_size: int = 128,
        kv_block_size: int = 128,
        device: torch.device | str | None = None,
    ) -> BlockSparseIndex:
        """Every query block attends to every key block, in ascending order.

        Returns an index with kv_num_blocks (batch, heads, nqb) = nkb and kv_indices (batch, heads, nqb, nkb).
        """
        for name, value in (("batch", batch), ("heads", heads)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, value in (("q_block_size", q_block_size), ("kv_block_size", kv_block_size)):
            if not _is_pow2(value):
                raise ValueError(f"{name} must be a positive power of two, got {value!r}")
        nqb, nkb = _cdiv(seqlen_q, q_block_size), _cdiv(seqlen_k, kv_block_size)
        num = torch.full((batch, heads, nqb), nkb, dtype=_INDEX_DTYPE, device=device)
        idx = torch.arange(nkb, dtype=_INDEX_DTYPE, device=device).expand(batch, heads, nqb, nkb).contiguous()
        return cls(num, idx, q_block_size, kv_block_size, seqlen_q, seqlen_k)

    @classmethod
    def from_dense(
        cls,
        mask: torch.Tensor,
        q_block_size: int,
        kv_block_size: int,
        seqlen_q: int | None = None,
        seqlen_k: int | None = None,
    ) -> BlockSparseIndex:
        """Index from a dense block mask.

        Args:
            mask: bool (B, H, nqb, nkb); True keeps the (query block, key block) pair.
            q_block_size, kv_block_size: block sizes (powers of two).
            seqlen_q, seqlen_k: true lengths; default nqb * q_block_size and nkb * kv_block_size.

        Returns:
            An index with ids sorted ascending in each row and kv_indices of width nkb.
        """
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a 4-d (B, H, nqb, nkb) tensor, got {shape}")
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must have dtype torch.bool, got {mask.dtype}")
        nqb, nkb = int(mask.shape[2]), int(mask.shape[3])
        seqlen_q = nqb * q_block_size if seqlen_q is None else seqlen_q
        seqlen_k = nkb * kv_block_size if seqlen_k is None else seqlen_k
        if _is_pow2(kv_block_size) and isinstance(seqlen_k, int) and _cdiv(seqlen_k, kv_block_size) != nkb:
            raise ValueError(
                f"mask has {nkb} key blocks (shape {tuple(mask.shape)}), but seqlen_k={seqlen_k} with "
                f"kv_block_size={kv_block_size} needs {_cdiv(seqlen_k, kv_block_size)}"
            )
        num = mask.sum(dim=-1, dtype=_INDEX_DTYPE)
        # A stable descending sort of the 0/1 mask lists the kept ids first, in ascending order.
        idx = torch.sort(mask.to(torch.int8), dim=-1, descending=True, stable=True).indices.to(_INDEX_DTYPE)
        return cls(num, idx.contiguous(), q_block_size, kv_block_size, seqlen_q, seqlen_k)

    # ------------------------------------------------------------------ checks
    def validate_ids(self) -> None:
        """Check counts in [0, max_blocks] and used ids in [0, nkb) without repeats (synchronises the host).

        Raises:
            ValueError naming ``kv_num_blocks`` or ``kv_indices`` and the first offending position.
        """
        num, idx = self.kv_num_blocks, self.kv_indices
        bad = (num < 0) | (num > self.max_blocks)
        if bool(bad.any()):
            pos = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"kv_num_blocks{list(pos)} = {int(num[pos])} is outside [0, max_blocks={self.max_blocks}]"
            )
        used = self._used()
        nkb = self.n_kv_blocks
        bad = used & ((idx < 0) | (idx >= nkb))
        if bool(bad.any()):
            pos = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(f"kv_indices{list(pos)} = {int(idx[pos])} is outside [0, n_kv_blocks={nkb})")
        if self.max_blocks > 1:
            # Unused slots get distinct out-of-range sentinels so that only used ids can collide.
            sentinel = nkb + torch.arange(self.max_blocks, device=idx.device, dtype=torch.int64)
            keyed = torch.where(used, idx.to(torch.int64), sentinel)
            srt = torch.sort(keyed, dim=-1).values
            dup = srt[..., 1:] == srt[..., :-1]
            if bool(dup.any()):
                pos = tuple(int(i) for i in dup.nonzero()[0])
                raise ValueError(
                    f"kv_indices{list(pos[:3])} repeats key block {int(srt[pos])}; each id may appear once"
                )

    def _used(self) -> torch.Tensor:
        """bool (B, H, nqb, max_blocks): True for the entries within each row's count."""
        j = torch.arange(self.max_blocks, device=self.device, dtype=_INDEX_DTYPE)
        return j < self.kv_num_blocks[..., None]

    # ------------------------------------------------------------------ views and conversions
    def to_dense(self) -> torch.Tensor:
        """bool (B, H, nqb, nkb): True where the query block attends to the key block.

        Unused entries and out-of-range ids are dropped (see :meth:`validate_ids`).
        """
        nkb = self.n_kv_blocks
        idx = self.kv_indices.to(torch.int64)
        valid = self._used() & (idx >= 0) & (idx < nkb)
        # Invalid entries are scattered into a spare column that is then cut off.
        target = torch.where(valid, idx, nkb)
        dense = torch.zeros(*self.kv_num_blocks.shape, nkb + 1, dtype=torch.bool, device=self.device)
        dense.scatter_(-1, target, True)
        return dense[..., :nkb]

    def key_mask(self) -> torch.Tensor:
        """bool (B, H, seqlen_q, seqlen_k): the dense per-(query, key) mask the index stands for."""
        dense = self.to_dense()
        rows = dense.repeat_interleave(self.q_block_size, dim=2)[:, :, : self.seqlen_q]
        return rows.repeat_interleave(self.kv_block_size, dim=3)[..., : self.seqlen_k]

    def _block_extents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float64 (nqb,) query rows and (nkb,) keys of each block; the last block on either axis may be partial."""
        rows = torch.full((self.n_q_blocks,), float(self.q_block_size), dtype=torch.float64, device=self.device)
        cols = torch.full((self.n_kv_blocks,), float(self.kv_block_size), dtype=torch.float64, device=self.device)
        if self.n_q_blocks:
            rows[-1] = self.seqlen_q - (self.n_q_blocks - 1) * self.q_block_size
        if self.n_kv_blocks:
            cols[-1] = self.seqlen_k - (self.n_kv_blocks - 1) * self.kv_block_size
        return rows, cols

    def density(self) -> float:
        """Fraction of the B*H*seqlen_q*seqlen_k query-key pairs computed, partial last blocks counted exactly."""
        total = self.batch * self.num_heads * self.seqlen_q * self.seqlen_k
        if total == 0:
            return 0.0
        rows, cols = self._block_extents()
        pairs = torch.einsum("bhqk,q,k->", self.to_dense().to(torch.float64), rows, cols)
        return float(pairs) / total

    # ------------------------------------------------------------------ printing
    def __repr__(self) -> str:
        """Shapes, block sizes and density (a host synchronisation: for printing, not the hot path)."""
        return (
            f"BlockSparseIndex(shape=({self.batch}, {self.num_heads}, {self.seqlen_q}, {self.seqlen_k}), "
            f"block_size=({self.q_block_size}, {self.kv_block_size}), "
            f"blocks=({self.n_q_blocks}, {self.n_kv_blocks}), max_blocks={self.max_blocks}, "
            f"density={self.density():.2%}, device={self.device})"
        )

    def to_string(self, grid_size: int | tuple[int, int] = (20, 20), limit: int = 4) -> str:
        """A drawing of which key blocks each query block attends to, one grid per (batch, head).

        Rows are query blocks, columns key blocks (two characters per cell): ``█`` every pair of the cell is
        computed, ``░`` some are, blank none. Grids larger than ``grid_size`` (rows, columns) are drawn
        with one cell per group of blocks, shaded by the share of the group's query-key pairs computed
        (partial last blocks counted exactly, as in :meth:`density`); ``grid_size=-1`` draws every block.
        An axis of size 1 shared by every batch element or head is labelled ``*``.

        Args:
            grid_size: most cells per grid, an int for both axes or (rows, columns); -1 for no limit.
            limit: most (batch, head) grids drawn.

        Returns:
            The :func:`repr` line, then per (batch, head) a label with that grid's density and the grid.
        """
        if isinstance(grid_size, bool) or not isinstance(grid_size, int | tuple):
            raise ValueError(f"grid_size must be an int or a (rows, columns) pair, got {grid_size!r}")
        if grid_size == -1:
            max_rows, max_cols = max(1, self.n_q_blocks), max(1, self.n_kv_blocks)
        elif isinstance(grid_size, int):
            max_rows = max_cols = grid_size
        else:
            if len(grid_size) != 2:
                raise ValueError(f"grid_size must be an int or a (rows, columns) pair, got {grid_size!r}")
            max_rows, max_cols = grid_size
        for name, value in (("grid_size", max_rows), ("grid_size", max_cols), ("limit", limit)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be positive (or -1 for grid_size), got {value!r}")
        row_step = max(1, _cdiv(self.n_q_blocks, max_rows))
        col_step = max(1, _cdiv(self.n_kv_blocks, max_cols))
        rows, cols = self._block_extents()
        # Computed pairs per cell over all pairs of the cell, for every (batch, head): (B, H, R, C).
        pairs = self.to_dense().to(torch.float64) * rows[:, None] * cols[None, :]
        area = rows[:, None] * cols[None, :]
        n_r, n_c = _cdiv(self.n_q_blocks, row_step), _cdiv(self.n_kv_blocks, col_step)
        pad = (0, n_c * col_step - self.n_kv_blocks, 0, n_r * row_step - self.n_q_blocks)
        b, h = self.batch, self.num_heads
        cell = torch.nn.functional.pad(pairs, pad).reshape(b, h, n_r, row_step, n_c, col_step).sum((3, 5))
        cell_area = torch.nn.functional.pad(area, pad).reshape(n_r, row_step, n_c, col_step).sum((1, 3))
        share = (cell / cell_area.clamp_min(1.0)).cpu()
        per_grid = (pairs.sum((2, 3)) / max(1.0, float(area.sum()))).cpu()
        lines = [repr(self)]
        for n, (bi, hi) in enumerate((bi, hi) for bi in range(b) for hi in range(h)):
            if n == limit:
                lines.append(f"... {b * h - limit} more; raise limit= to draw them, or select heads with .heads()")
                break
            label = (bi if b > 1 else "*", hi if h > 1 else "*")
            lines.append(f"({label[0]}, {label[1]}) density {float(per_grid[bi, hi]):.2%}")
            for r in range(n_r):
                row = "".join(_SHADES[_shade(float(x))] * 2 for x in share[bi, hi, r])
                lines.append(row.rstrip() if row.strip() else "")
        return "\n".join(lines)

    def heads(self, sel: slice | int | torch.Tensor | list[int]) -> BlockSparseIndex:
        """The index for a subset of heads (e.g. one GPU's shard).

        Args:
            sel: a slice, an int, a list of ints or a 1-d integer tensor over the H axis. An index with H == 1
                (shared by every head) is returned unchanged.

        Returns:
            An index with kv_num_blocks (B, H', nqb) and kv_indices (B, H', nqb, max_blocks).
        """
        if self.num_heads == 1:
            return self
        num, idx = self.kv_num_blocks, self.kv_indices
        if isinstance(sel, slice):
            num, idx = num[:, sel], idx[:, sel]
        elif isinstance(sel, int):
            if not -self.num_heads <= sel < self.num_heads:
                raise ValueError(f"sel={sel} is out of range for an index with {self.num_heads} heads")
            num, idx = num[:, sel].unsqueeze(1), idx[:, sel].unsqueeze(1)
        else:
            t = torch.as_tensor(sel, device=self.device)
            if t.dim() != 1 or t.dtype in (torch.bool, torch.float16, torch.float32, torch.float64):
                raise ValueError(f"sel must be a slice, an int or a 1-d integer tensor/list, got {sel!r}")
            num, idx = num.index_select(1, t), idx.index_select(1, t)
        if num.shape[1] == 0:
            raise ValueError(f"sel={sel!r} selects no heads")
        return dataclasses.replace(self, kv_num_blocks=num.contiguous(), kv_indices=idx.contiguous())

    def to(self, device: torch.device | str) -> BlockSparseIndex:
        """The same index with its tensors on ``device``."""
        return dataclasses.replace(
            self, kv_num_blocks=self.kv_num_blocks.to(device), kv_indices=self.kv_indices.to(device)
        )

    def to_flex_block_mask(self) -> Any:
        """A ``torch.nn.attention.flex_attention.BlockMask`` selecting the same (query, key) pairs.

        FlexAttention accepts different block sizes on the two axes (``BLOCK_SIZE=(q, kv)``) and bounds partial
        last blocks through ``seq_lengths``. Its eager path ignores the block lists and applies only
        ``mask_mod``, so ``mask_mod`` looks the pair up in the dense block mask; the compiled kernels read the
        lists, where every kept block is marked *full* so they skip ``mask_mod`` (no per-score gather). The
        width of ``kv_indices`` is read as the number of key blocks, so the lists are rebuilt from
        :meth:`to_dense` with width nkb (sorted, duplicates dropped).
        """
        from torch.nn.attention.flex_attention import BlockMask

        dense = self.to_dense()
        canon = BlockSparseIndex.from_dense(dense, self.q_block_size, self.kv_block_size, self.seqlen_q, self.seqlen_k)
        qbs, kbs = self.q_block_size, self.kv_block_size
        # A shared (size-1) batch or head axis is indexed at 0 whatever the query's batch or head.
        b_on, h_on = int(self.batch > 1), int(self.num_heads > 1)

        def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            return dense[b * b_on, h * h_on, q_idx // qbs, kv_idx // kbs]

        return BlockMask.from_kv_blocks(
            torch.zeros_like(canon.kv_num_blocks),
            torch.zeros_like(canon.kv_indices),
            canon.kv_num_blocks,
            canon.kv_indices,
            BLOCK_SIZE=(qbs, kbs),
            mask_mod=mask_mod,
            seq_lengths=(self.seqlen_q, self.seqlen_k),
        )
