"""Random-projection sign LSH on GPU tensors, with no host round trips."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from longroll.ann.config import LSHConfig
from longroll.ann.slices import argmax_by_rows
from longroll.ops._checks import check_rank


def _head_seed(seed: int, layer: int, head: int) -> int:
    # A fixed mix of the three ids: distinct streams per (layer, head), independent of how heads are sharded.
    return (seed * 1_000_003 + layer * 10_007 + head * 101 + 17) % (2**63 - 1)


class SignLSH:
    """SimHash: bucket = the signs of ``tables x bits`` random projections.

    Args:
        config: :class:`LSHConfig`.
        head_dim: dimension of the hashed vectors.
        layer: layer id mixed into the seed.
        head_ids: global ids of the heads this instance serves (default ``range(heads)`` at first use is not
            allowed: pass them, so a shard of heads hashes exactly like the unsharded model).
        device: where the projections live.
    """

    def __init__(
        self,
        config: LSHConfig,
        head_dim: int,
        *,
        layer: int,
        head_ids: Sequence[int],
        device: torch.device | str = "cpu",
    ) -> None:
        if head_dim < 1:
            raise ValueError(f"head_dim must be positive, got {head_dim}")
        if len(head_ids) == 0:
            raise ValueError("head_ids must name at least one head, got an empty sequence")
        self.config = config
        self.head_dim = head_dim
        self.head_ids = tuple(int(h) for h in head_ids)
        nproj = config.tables * config.bits
        planes = []
        for h in self.head_ids:
            g = torch.Generator().manual_seed(_head_seed(config.seed, layer, h))
            planes.append(torch.randn(head_dim, nproj, generator=g))
        #: (heads, head_dim, tables * bits) float32 projections.
        self.planes = torch.stack(planes).to(device)
        self._weights = (2 ** torch.arange(config.bits, device=device)).to(torch.int64)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        check_rank("x", x, 4)
        if x.shape[1] != len(self.head_ids) or x.shape[-1] != self.head_dim:
            raise ValueError(
                f"x must have shape (batch, {len(self.head_ids)}, n, {self.head_dim}), got {tuple(x.shape)}"
            )
        planes = self.planes.to(device=x.device)
        dt = x.dtype if x.is_cuda else torch.float32
        return torch.matmul(x.to(dt), planes.to(dt)[None])

    def signs(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, heads, n, head_dim) -> (batch, heads, n, tables * bits) of +-1 in x's dtype (fp32 on CPU)."""
        p = self._project(x)
        return torch.where(p >= 0, 1.0, -1.0).to(p.dtype)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Bucket ids. x: (batch, heads, n, head_dim) -> (batch, heads, n, tables) int64 in [0, 2**bits)."""
        p = self._project(x)
        bits = (p >= 0).to(torch.int64).unflatten(-1, (self.config.tables, self.config.bits))
        return (bits * self._weights.to(x.device)).sum(-1)

    def top1(self, queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Nearest candidate by Hamming distance of the sign codes (ties: lowest index).

        Args:
            queries: (batch, heads, n, head_dim); candidates: (batch, heads, m, head_dim), m >= 1.

        Returns:
            (batch, heads, n) int64 indices into the candidates.
        """
        if candidates.shape[2] == 0:
            raise ValueError("candidates must hold at least one vector, got seqlen 0")
        # Agreement of +-1 codes = nbits - 2 * Hamming, so argmax of the product is the Hamming nearest.
        sq, sc = self.signs(queries), self.signs(candidates)
        b, h, n, _ = sq.shape
        return argmax_by_rows(lambda r: torch.matmul(sq[r], sc[r].transpose(-1, -2)), b, h * n * sc.shape[2])


class StackedSignLSH:
    """Several layers' :class:`SignLSH` over one batch that stacks the layers: rows ``[l * batch, (l + 1) *
    batch)`` of the stacked batch belong to layer ``l`` and hash with that layer's projections, so one call
    answers for every layer exactly as each layer's own searcher would on its rows.

    Args:
        searchers: one per layer, in stacking order, of one config, head dim and set of heads.
        batch: rows per layer.
    """

    def __init__(self, searchers: Sequence[SignLSH], batch: int) -> None:
        if not searchers:
            raise ValueError("searchers must hold at least one SignLSH, got none")
        first = searchers[0]
        for s in searchers:
            if not isinstance(s, SignLSH):
                raise ValueError(f"searchers must be SignLSH instances, got {type(s).__name__}")
            if (s.config, s.head_dim, s.head_ids) != (first.config, first.head_dim, first.head_ids):
                raise ValueError("searchers must share one config, head_dim and head_ids")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self.config, self.head_dim, self.head_ids, self.batch = first.config, first.head_dim, first.head_ids, batch
        #: (layers, heads, head_dim, tables * bits) float32 projections.
        self.planes = torch.stack([s.planes for s in searchers])

    @property
    def layers(self) -> int:
        return self.planes.shape[0]

    def signs(self, x: torch.Tensor) -> torch.Tensor:
        """x: (r * layers * batch, heads, n, head_dim), layer-major within each of the r repeats ->
        (same leading shape, n, tables * bits) of +-1 in x's dtype (fp32 on CPU)."""
        check_rank("x", x, 4)
        rows, h, n, d = x.shape
        lb = self.layers * self.batch
        if rows % lb or h != len(self.head_ids) or d != self.head_dim:
            raise ValueError(
                f"x must have shape (r * {lb}, {len(self.head_ids)}, n, {self.head_dim}), got {tuple(x.shape)}"
            )
        dt = x.dtype if x.is_cuda else torch.float32
        xs = x.to(dt).view(rows // lb, self.layers, self.batch, h, n, d)
        p = torch.matmul(xs, self.planes.to(device=x.device, dtype=dt)[None, :, None])
        return torch.where(p >= 0, 1.0, -1.0).to(p.dtype).view(rows, h, n, -1)

    def top1(self, queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """As :meth:`SignLSH.top1`, with the stacked rows of :meth:`signs`. Returns (rows, heads, n) int64."""
        if candidates.shape[2] == 0:
            raise ValueError("candidates must hold at least one vector, got seqlen 0")
        sq, sc = self.signs(queries), self.signs(candidates)
        b, h, n, _ = sq.shape
        return argmax_by_rows(lambda r: torch.matmul(sq[r], sc[r].transpose(-1, -2)), b, h * n * sc.shape[2])
