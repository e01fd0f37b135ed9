"""A host tier under a bounded KV cache: what the cache evicts moves to host memory, and the evicted blocks most
relevant to a chunk's queries come back into a fixed device slot region, attended with their log-count bias.

Life cycle, per layer (driven by :class:`~longroll.cache.kv_cache.LayerKVCache`)::

    commit:  the cache's commit writes its victims (k, v, count, frame) into the device EvictionStage (static
             shape, inside the captured commit too), then absorb() compacts each head's victims to the front,
             writes the block index (mean key of every ``block_tokens`` entries, fp16, on the device) and copies
             the stage to host memory (pinned on CUDA, non-blocking): one record per commit that may evict, in a
             ring of records (the host budget; the oldest record goes first).
    commit:  select(q) scores every host block against the chunk's query blocks (max over query blocks of the
             mean query . mean key) per head, keeps the top ``top_blocks`` and copies them into the device slot
             region (:func:`~longroll.ops.host_gather.gather_blocks`: on CUDA a kernel that reads the pinned
             store itself, on the stream of the commit, after the record's copy).
    next chunk: retrieved() is what attention merges with the cache (by log-sum-exp).

The selection of chunk c is made from chunk c's committing queries and serves chunk c + 1. The block ids never
leave the device, so nothing on the host waits for them: no readback, no host gather, no synchronisation in the
per-layer path. Heads are independent throughout: each head evicts, indexes, selects and retrieves its own
entries.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from longroll.ops.host_gather import gather_blocks

_NEG = float("-inf")


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


@dataclass(frozen=True)
class HostTierConfig:
    """Where a bounded cache's evicted entries go, and how many of them come back per chunk.

    Args:
        host_budget_tokens: evicted entries per head kept in host memory (a multiple of the chunk's tokens is
            used: one record of ``chunk_tokens`` entries per commit that may evict; the oldest record goes
            first).
        block_tokens: entries per retrievable block (the unit of the index and of retrieval); must divide the
            chunk's tokens.
        top_blocks: blocks retrieved per head per chunk; the device slot region holds
            ``slot_tokens = top_blocks * block_tokens`` entries per head.
        query_block_tokens: queries averaged into one query block of the selection score (default
            ``block_tokens``); must divide the chunk's tokens.
    """

    host_budget_tokens: int
    block_tokens: int = 64
    top_blocks: int = 8
    query_block_tokens: int | None = None

    def __post_init__(self) -> None:
        _positive_int("host_budget_tokens", self.host_budget_tokens)
        _positive_int("block_tokens", self.block_tokens)
        _positive_int("top_blocks", self.top_blocks)
        if self.query_block_tokens is not None:
            _positive_int("query_block_tokens", self.query_block_tokens)
        if self.host_budget_tokens < self.slot_tokens:
            raise ValueError(
                f"host_budget_tokens={self.host_budget_tokens} must hold at least the {self.top_blocks} retrieved "
                f"blocks of {self.block_tokens} tokens ({self.slot_tokens})"
            )

    @property
    def slot_tokens(self) -> int:
        """Device slot region per head, in entries."""
        return self.top_blocks * self.block_tokens

    @property
    def q_block(self) -> int:
        return self.block_tokens if self.query_block_tokens is None else self.query_block_tokens

    def check_geometry(self, chunk_tokens: int) -> None:
        """Raise ValueError unless this tier fits a cache committing ``chunk_tokens`` tokens at a time."""
        if chunk_tokens % self.block_tokens:
            raise ValueError(f"block_tokens={self.block_tokens} must divide the chunk's {chunk_tokens} tokens")
        if chunk_tokens % self.q_block:
            raise ValueError(f"query_block_tokens={self.q_block} must divide the chunk's {chunk_tokens} tokens")
        if self.host_budget_tokens < chunk_tokens:
            raise ValueError(
                f"host_budget_tokens={self.host_budget_tokens} must hold at least one chunk ({chunk_tokens} tokens)"
            )

    def records(self, chunk_tokens: int) -> int:
        """Commits' worth of evictions the host holds."""
        return self.host_budget_tokens // chunk_tokens


@dataclass
class EvictionStage:
    """The entries one commit evicts, per head, on the cache's device (a fixed shape: E = the chunk's tokens).

    Frame ``i`` of the chunk writes its victims at ``[i * P, (i + 1) * P)``; count 0 marks an unused position.

    Fields: k (B, H, E, D) and v (B, H, E, Dv) in the cache dtype; count (B, H, E) float32; frame (B, H, E)
    int32 (-1 unused).
    """

    k: torch.Tensor
    v: torch.Tensor
    count: torch.Tensor
    frame: torch.Tensor

    def clear(self) -> None:
        self.k.zero_()
        self.v.zero_()
        self.count.zero_()
        self.frame.fill_(-1)

    def put(self, offset: int, k: torch.Tensor, v: torch.Tensor, count: torch.Tensor, frame: torch.Tensor) -> None:
        """Write one frame's victims at ``[offset, offset + n)``: k (B, H, n, D), v (B, H, n, Dv), count and frame
        (B, H, n); positions of count 0 (no victim) get zero keys and values.

        Their k and v would otherwise be whatever the gathered slot held (the cache's trash slot, written by
        colliding scatters in no fixed order on CUDA): the record and the saved state would not be reproducible.
        """
        n = k.shape[2]
        live = (count > 0)[..., None]
        self.k[:, :, offset : offset + n] = torch.where(live, k, k.new_zeros(()))
        self.v[:, :, offset : offset + n] = torch.where(live, v, v.new_zeros(()))
        self.count[:, :, offset : offset + n] = count
        self.frame[:, :, offset : offset + n] = frame


def _physical_memory_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def host_tier_bytes(
    config: HostTierConfig, *, batch: int, heads: int, head_dim: int, v_dim: int, chunk_tokens: int, itemsize: int
) -> int:
    """Host bytes of one layer's tier: keys, values, counts (float32) and frames (int32) of every record."""
    per_entry = (head_dim + v_dim) * itemsize + 8
    return config.records(chunk_tokens) * chunk_tokens * batch * heads * per_entry


class HostTier:
    """One layer's host tier: the host store of evicted entries, its device index, selection and slot region.

    Args:
        config: the tier's :class:`HostTierConfig`.
        batch, heads, head_dim, v_dim: the cache's K/V geometry.
        chunk_tokens: tokens per commit (E, the size of one record).
        dtype, device: the cache's storage.

    Raises:
        ValueError: the geometry does not fit the config, or the host store would exceed this machine's
            physical memory (before anything is allocated). A failing allocation of a size that fits is not a
            usage error and propagates as is.
    """

    def __init__(
        self,
        config: HostTierConfig,
        *,
        batch: int,
        heads: int,
        head_dim: int,
        v_dim: int,
        chunk_tokens: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if not isinstance(config, HostTierConfig):
            raise ValueError(f"config must be a HostTierConfig, got {type(config).__name__}")
        config.check_geometry(chunk_tokens)
        self.config = config
        self.batch, self.heads, self.head_dim, self.v_dim = batch, heads, head_dim, v_dim
        self.record_tokens = e = chunk_tokens
        self.records = r = config.records(chunk_tokens)
        self.blocks_per_record = e // config.block_tokens
        self.num_blocks = r * self.blocks_per_record
        if self.num_blocks < config.top_blocks:
            raise ValueError(
                f"host_budget_tokens={config.host_budget_tokens} holds {self.num_blocks} blocks, fewer than "
                f"top_blocks={config.top_blocks}"
            )
        self.dtype, self.device = dtype, device
        itemsize = torch.empty((), dtype=dtype).element_size()
        need = host_tier_bytes(
            config, batch=batch, heads=heads, head_dim=head_dim, v_dim=v_dim, chunk_tokens=e, itemsize=itemsize
        )
        phys = _physical_memory_bytes()
        if phys is not None and need > phys:
            raise ValueError(
                f"host_budget_tokens={config.host_budget_tokens} needs {need / 2**30:.1f} GiB of host memory per "
                f"layer, more than this machine's {phys / 2**30:.1f} GiB"
            )
        pin = device.type == "cuda"
        b, h, d, dv = batch, heads, head_dim, v_dim

        def host(*shape: int, dt: torch.dtype, fill: float = 0.0) -> torch.Tensor:
            return torch.full(shape, fill, dtype=dt, pin_memory=pin)

        # Host store: record-major, so that one commit's record is one contiguous copy.
        self.host_k = host(r, b, h, e, d, dt=dtype)
        self.host_v = host(r, b, h, e, dv, dt=dtype)
        self.host_count = host(r, b, h, e, dt=torch.float32)
        self.host_frame = host(r, b, h, e, dt=torch.int32, fill=-1)
        dev = device
        self.stage = EvictionStage(
            k=torch.zeros(b, h, e, d, dtype=dtype, device=dev),
            v=torch.zeros(b, h, e, dv, dtype=dtype, device=dev),
            count=torch.zeros(b, h, e, dtype=torch.float32, device=dev),
            frame=torch.full((b, h, e), -1, dtype=torch.int32, device=dev),
        )
        nb, t, bt = self.num_blocks, config.top_blocks, config.block_tokens
        #: Device index: mean key of each host block (fp16) and whether it holds any entry.
        self.index_keys = torch.zeros(b, h, nb, d, dtype=torch.float16, device=dev)
        self.index_valid = torch.zeros(b, h, nb, dtype=torch.bool, device=dev)
        #: Records written so far (host int: one per commit that may evict, known on the host).
        self.written = 0
        #: The last selection: block ids (B, H, T) int64 and whether each names a non-empty block.
        self.selected: torch.Tensor | None = None
        self.selected_ok: torch.Tensor | None = None
        # Device slot region (static): the retrieved blocks, their log-count bias (-inf on empty slots).
        self.slot_k = torch.zeros(b, h, t * bt, d, dtype=dtype, device=dev)
        self.slot_v = torch.zeros(b, h, t * bt, dv, dtype=dtype, device=dev)
        self.slot_bias = torch.full((b, h, t * bt), _NEG, dtype=torch.float32, device=dev)
        self._has_slots = False

    # ------------------------------------------------------------------ sizes
    def host_nbytes(self) -> int:
        """Bytes of host memory held (the store)."""
        ts = (self.host_k, self.host_v, self.host_count, self.host_frame)
        return sum(x.numel() * x.element_size() for x in ts)

    def device_nbytes(self) -> int:
        """Bytes of device memory held (stage, index and slot region: fixed)."""
        st = self.stage
        ts = (st.k, st.v, st.count, st.frame, self.index_keys, self.index_valid, self.slot_k, self.slot_v,
              self.slot_bias)  # fmt: skip
        return sum(x.numel() * x.element_size() for x in ts)

    # ------------------------------------------------------------------ eviction
    def absorb(self) -> None:
        """Move the stage's victims into the next record (the oldest record is overwritten when all are used).

        Each head's victims are compacted to the front of the record (stable), so that blocks fill up before
        new ones start; the block index of the record is rewritten on the device; the record is copied to
        host memory (non-blocking on CUDA, ordered after the commit that filled the stage).
        """
        st, cfg = self.stage, self.config
        order = torch.sort((st.count == 0).to(torch.uint8), dim=-1, stable=True).indices
        k = st.k.gather(2, order[..., None].expand_as(st.k))
        v = st.v.gather(2, order[..., None].expand_as(st.v))
        count = st.count.gather(2, order)
        frame = st.frame.gather(2, order)
        b, h, _, d = k.shape
        bt, bpr = cfg.block_tokens, self.blocks_per_record
        occupied = (count > 0).view(b, h, bpr, bt)
        n = occupied.sum(-1)
        ksum = (k.float().view(b, h, bpr, bt, d) * occupied[..., None]).sum(3)
        mean = ksum / n.clamp_min(1)[..., None]
        r = self.written % self.records
        blocks = slice(r * bpr, (r + 1) * bpr)
        self.index_keys[:, :, blocks] = mean.to(torch.float16)
        self.index_valid[:, :, blocks] = n > 0
        # On the commit's stream: the selection's gather, later on the same stream, reads the record after it.
        nb = self.device.type == "cuda"
        self.host_k[r].copy_(k, non_blocking=nb)
        self.host_v[r].copy_(v, non_blocking=nb)
        self.host_count[r].copy_(count, non_blocking=nb)
        self.host_frame[r].copy_(frame, non_blocking=nb)
        self.written += 1

    # ------------------------------------------------------------------ selection and retrieval
    def select(self, queries: torch.Tensor) -> None:
        """Choose, per head, the ``top_blocks`` host blocks most relevant to ``queries``.

        Args:
            queries: (B, Hq, n, D) the committing chunk's queries, Hq a multiple of the heads (a group of query
                heads scores for its key head), n a multiple of ``query_block_tokens``.

        The score of a block is the largest, over query blocks, of the mean query's dot product with the block's
        mean key (the block's mean logit for that query block); empty blocks score -inf and are never retrieved
        while a non-empty one is left.
        """
        if self.written == 0:
            return
        b, hq, n, d = queries.shape
        # A partial chunk (fewer staged tokens) falls back to query blocks that divide it.
        g, qb = hq // self.heads, math.gcd(self.config.q_block, n)
        qm = queries.float().reshape(b, self.heads, g, n // qb, qb, d).mean(4).reshape(b, self.heads, -1, d)
        # (B, H, NB, D) @ (B, H, D, nq): the long dimension as the rows of the product.
        scores = torch.matmul(self.index_keys.float(), qm.transpose(-1, -2)).amax(-1)
        scores = scores.masked_fill(~self.index_valid, _NEG)
        top = scores.topk(self.config.top_blocks, dim=-1)
        self.selected, self.selected_ok = top.indices, torch.isfinite(top.values)
        self._gather()

    def _gather(self) -> None:
        """Copy the selected blocks into the slot region, on the current stream (no host synchronisation)."""
        assert self.selected is not None and self.selected_ok is not None
        gather_blocks(self.host_k, self.host_v, self.host_count, self.selected, self.selected_ok, self.slot_k,
                      self.slot_v, self.slot_bias, block_tokens=self.config.block_tokens)  # fmt: skip
        self._has_slots = True

    def retrieved(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The slot region once a selection was gathered: k (B, H, S, D), v (B, H, S, Dv), bias (B, H, S)
        float32 log-count (-inf on empty slots), S = ``slot_tokens``; None before the first selection."""
        if not self._has_slots:
            return None
        return self.slot_k, self.slot_v, self.slot_bias

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Keys (prefixed ``host.`` by the cache; R = records, NB = blocks, T = top_blocks): ``meta`` (2,) int64
        [records written, whether a selection is held]; ``k`` (R, B, H, E, D), ``v`` (R, B, H, E, Dv),
        ``count`` (R, B, H, E) float32, ``frame`` (R, B, H, E) int32; ``index_keys`` (B, H, NB, D) float16;
        ``index_valid`` (B, H, NB) bool; with a selection, ``selected`` (B, H, T) int64 and ``selected_ok``
        (B, H, T) bool. The slot region is not saved: it is gathered again from the selection."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        state = {
            "meta": torch.tensor([self.written, int(self.selected is not None)], dtype=torch.int64),
            "k": self.host_k.clone(),
            "v": self.host_v.clone(),
            "count": self.host_count.clone(),
            "frame": self.host_frame.clone(),
            "index_keys": self.index_keys.cpu(),
            "index_valid": self.index_valid.cpu(),
        }
        if self.selected is not None and self.selected_ok is not None:
            state |= {"selected": self.selected.cpu(), "selected_ok": self.selected_ok.cpu()}
        return state

    def check_state(self, state: Mapping[str, torch.Tensor], committed_frames: int) -> dict[str, torch.Tensor]:
        """Validate :meth:`state_dict` output (without the ``host.`` prefix) against this tier; returns it as
        CPU tensors. Raises ValueError naming the first problem."""
        keys = {"meta", "k", "v", "count", "frame", "index_keys", "index_valid"}
        sel = {"selected", "selected_ok"}
        missing = sorted(keys - set(state))
        if missing:
            raise ValueError(f"state is missing host tier entries {['host.' + m for m in missing]}")
        unknown = sorted(set(state) - keys - sel)
        if unknown:
            raise ValueError(f"state has unknown host tier entries {['host.' + u for u in unknown]}")
        r, b, h, e = self.records, self.batch, self.heads, self.record_tokens
        nb, t = self.num_blocks, self.config.top_blocks
        want = {
            "meta": ((2,), torch.int64),
            "k": ((r, b, h, e, self.head_dim), self.dtype),
            "v": ((r, b, h, e, self.v_dim), self.dtype),
            "count": ((r, b, h, e), torch.float32),
            "frame": ((r, b, h, e), torch.int32),
            "index_keys": ((b, h, nb, self.head_dim), torch.float16),
            "index_valid": ((b, h, nb), torch.bool),
            "selected": ((b, h, t), torch.int64),
            "selected_ok": ((b, h, t), torch.bool),
        }
        out: dict[str, torch.Tensor] = {}
        for name, x in state.items():
            shape, dtype = want[name]
            if not isinstance(x, torch.Tensor):
                raise ValueError(f"state['host.{name}'] must be a tensor, got {type(x).__name__}")
            if x.dtype != dtype or tuple(x.shape) != shape:
                raise ValueError(
                    f"state['host.{name}'] must be {dtype} of shape {shape}, got {x.dtype} of {tuple(x.shape)}"
                )
            out[name] = x.detach().cpu()
        written, has_sel = (int(v) for v in out["meta"].tolist())
        if written < 0 or has_sel not in (0, 1):
            raise ValueError(f"state['host.meta'] must be [records written >= 0, 0 or 1], got {[written, has_sel]}")
        if bool(has_sel) != ("selected" in out) or ("selected" in out) != ("selected_ok" in out):
            raise ValueError("state['host.meta'] and the host.selected / host.selected_ok entries disagree")
        if has_sel and written == 0:
            raise ValueError("state holds a host tier selection but no record")
        for name in ("k", "v"):
            if not bool(torch.isfinite(out[name]).all()):
                raise ValueError(f"state['host.{name}'] holds NaN or Inf values")
        count, frame = out["count"], out["frame"]
        if not bool(torch.isfinite(count).all()) or bool((count < 0).any()):
            raise ValueError("state['host.count'] must be finite and >= 0")
        occupied = count > 0
        if not bool(torch.where(occupied, count >= 1.0, True).all()):
            raise ValueError("state['host.count'] must be 0 (empty) or >= 1")
        ok = torch.where(occupied, (frame >= 0) & (frame < committed_frames), frame == -1)
        if not bool(ok.all()):
            raise ValueError(
                f"state['host.frame'] must lie in [0, {committed_frames}) on occupied entries and be -1 elsewhere"
            )
        used = min(written, r)
        if bool(occupied[used:].any()):
            raise ValueError(f"state['host.count'] has entries past the {used} records written")
        if not bool(torch.isfinite(out["index_keys"]).all()):
            raise ValueError("state['host.index_keys'] holds NaN or Inf values")
        # The index must describe the store: recompute it (fp16 rounding and summation order aside).
        bt, bpr = self.config.block_tokens, self.blocks_per_record
        occ = occupied.view(r, b, h, bpr, bt)
        n = occ.sum(-1)
        mean = (out["k"].float().view(r, b, h, bpr, bt, self.head_dim) * occ[..., None]).sum(4)
        mean = (mean / n.clamp_min(1)[..., None]).permute(1, 2, 0, 3, 4).reshape(b, h, nb, self.head_dim)
        valid = (n > 0).permute(1, 2, 0, 3).reshape(b, h, nb)
        if not bool((valid == out["index_valid"]).all()) or not torch.allclose(
            mean, out["index_keys"].float(), rtol=2e-3, atol=2e-3
        ):
            raise ValueError("state['host.index_keys'] / state['host.index_valid'] do not match the host store")
        if "selected" in out and (bool((out["selected"] < 0).any()) or bool((out["selected"] >= nb).any())):
            raise ValueError(f"state['host.selected'] must lie in [0, {nb})")
        return out

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        """Apply a :meth:`check_state` result."""
        if self.device.type == "cuda":
            # Copies to the store still in flight must land before it is overwritten.
            torch.cuda.current_stream(self.device).synchronize()
        self.host_k.copy_(state["k"])
        self.host_v.copy_(state["v"])
        self.host_count.copy_(state["count"])
        self.host_frame.copy_(state["frame"])
        self.index_keys.copy_(state["index_keys"])
        self.index_valid.copy_(state["index_valid"])
        self.written = int(state["meta"][0])
        self._has_slots = False
        self.slot_bias.fill_(_NEG)
        if "selected" in state:
            self.selected = state["selected"].to(self.device, copy=True)
            self.selected_ok = state["selected_ok"].to(self.device, copy=True)
            self._gather()
        else:
            self.selected = self.selected_ok = None

    def __repr__(self) -> str:
        return (
            f"HostTier(records={self.records}x{self.record_tokens}, written={self.written}, "
            f"blocks={self.num_blocks}x{self.config.block_tokens}, top={self.config.top_blocks}, "
            f"host_MiB={self.host_nbytes() / 2**20:.1f})"
        )


__all__ = ["EvictionStage", "HostTier", "HostTierConfig", "host_tier_bytes"]
