"""AnnSA: approximate-nearest-neighbour self-attention over a KV cache, as block-sparse attention.

Plan/run, in the flashinfer style, one planner per layer:

- :meth:`AnnSAPlanner.plan` runs once per commit (after ``cache.commit()``, nothing staged). It hashes the
  committed keys past the cache's pinned slots (``cache.pinned_tokens``: sinks, TempCache's ring) and
  returns an :class:`AnnSAPlan`, a value: the slot order that makes every bucket (LSH table 0, or nearest int8
  anchor) one contiguous slot range, empty slots last, and what selection reads in that order. Planning only
  reads the cache; the layer then applies the order (:meth:`AnnSAPlan.apply_to`, one ``cache.reorder_``).
  Attention is order-invariant, so this changes no output, and history keys do not change across a chunk's
  denoising steps, so the cost is paid once per commit.
- :meth:`AnnSAPlanner.select` / :meth:`AnnSAPlanner.run` run at every denoising step. Queries are hashed and
  sorted by bucket (a spatially contiguous query block otherwise spreads over most buckets); each block of
  ``q_block_size`` sorted queries selects the key blocks that cover the buckets its queries land in (every
  table, plus Hamming-1 probes), or for the int8 family the top-k key blocks by the int8 score of its mean
  query against the key-block centroids; the key blocks of the sink frames ``[0, start)`` and of the staged
  chunk (the queries' own keys, the last ``staged_tokens`` of the view) are added. The step costs hashing,
  sorting and block-level arithmetic: nothing scales with a dense Q.K^T over the cache, and nothing reads
  back to the host.

Layout of the view the selection refers to (``L = view.k.shape[2]``)::

    [0, start)                   pinned slots, never moved: the sink frames and TempCache's verbatim ring
                                 (``cache.pinned_tokens``)
    [start, start + n_valid_h)   history of head h, bucket-sorted by the plan; empty slots after it
    [L - staged_tokens, L)       the staged chunk (its own keys), written by cache.stage() every step

Table 0 of the sorted history is scored by offset arithmetic: a bucket-to-key-block cover matrix built at plan
time (one groups x buckets x blocks matmul per step), or difference arrays over blocks when that matrix would
be large. Multiple LSH tables: only table 0 can be contiguous in the cache. A key block of the sorted history holds keys
of nearly every bucket of an independent table, so the other tables (and the sink or staged regions when they
are not attended unconditionally) score a block by the bucket of its mean key, hashed at plan time (a gather
of groups x blocks per step). ``max_density`` bounds the ANN-selected key blocks per query block (own-bucket
hits rank above probe hits), which bounds the worst-case kernel time.

The sink-window cache policy evicts by slot position (a ring buffer), so its cache must not be reordered;
:meth:`AnnSAPlanner.plan` refuses it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from longroll.ann.buckets import (
    GroupHits,
    Int8Codes,
    block_hits,
    block_means,
    bucket_block_cover,
    bucket_block_scores,
    bucket_sort,
    int8_block_topk,
    int8_encode,
    nearest_anchor,
    strided_sample,
)
from longroll.ann.config import AnnConfig, Int8Config, LSHConfig
from longroll.ann.lsh import SignLSH
from longroll.cache import CacheView, LayerKVCache, SinkWindowPolicy
from longroll.cache.graphs import KeyedCapture, StaticInputs
from longroll.ops._checks import check_bias, check_qkv, check_rank
from longroll.ops.attention import MASKED_BIAS
from longroll.ops.block_index import BlockSparseIndex
from longroll.ops.block_sparse import BACKENDS, BlockSparseBackend, block_sparse_attention
from longroll.ops.probes import attention_recall
from longroll.ops.reference import attention_ref, expand_kv_heads

logger = logging.getLogger(__name__)

#: Largest table-0 bucket-to-block cover matrix (elements) kept per plan; past it, difference arrays are used.
_COVER_LIMIT = 1 << 26


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _is_pow2(x: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0 and x & (x - 1) == 0


def _default_ann() -> AnnConfig:
    return LSHConfig(bits=6, tables=1, probes=1)


@dataclass(frozen=True)
class AnnSAConfig:
    """Configuration of ANN block-sparse self-attention.

    Args:
        ann: :class:`LSHConfig` (buckets by sign hashing) or :class:`Int8Config` (top-k blocks by int8 score).
            Default: 6 bits, 1 table, Hamming-1 probes (64 buckets).
        q_block_size: sorted queries per query block (power of two).
        kv_block_size: keys per key block (power of two).
        max_density: optional cap, in (0, 1], on the share of key blocks a query block selects through the
            ANN; sink and own-chunk blocks come on top. None: no cap (LSH), or ``top_k_blocks`` alone (int8).
        top_k_blocks: key blocks per query block for the int8 family.
        anchors: int8 family: anchor keys (strided sample of the history) whose nearest one orders keys and
            queries into buckets.
        attend_sinks: always attend the pinned key blocks (sinks, TempCache's verbatim ring; else they go through
            the ANN like history).
        attend_own_chunk: always attend the staged chunk's key blocks (else they are hashed every step).
        backend: block-sparse attention backend (``"auto"``, ``"triton"``, ``"torch"``).
    """

    ann: AnnConfig = field(default_factory=_default_ann)
    q_block_size: int = 128
    kv_block_size: int = 128
    max_density: float | None = None
    top_k_blocks: int = 16
    anchors: int = 64
    attend_sinks: bool = True
    attend_own_chunk: bool = True
    backend: BlockSparseBackend = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.ann, LSHConfig | Int8Config):
            raise ValueError(f"ann must be an LSHConfig or Int8Config, got {type(self.ann).__name__}")
        for name in ("q_block_size", "kv_block_size"):
            if not _is_pow2(getattr(self, name)):
                raise ValueError(f"{name} must be a positive power of two, got {getattr(self, name)!r}")
        if self.max_density is not None and not 0.0 < self.max_density <= 1.0:
            raise ValueError(f"max_density must be in (0, 1] or None, got {self.max_density!r}")
        if self.top_k_blocks < 1:
            raise ValueError(f"top_k_blocks must be >= 1, got {self.top_k_blocks!r}")
        if self.anchors < 1:
            raise ValueError(f"anchors must be >= 1, got {self.anchors!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")


@dataclass(frozen=True, eq=False)
class AnnSASelection:
    """The key blocks each query attends to at one step.

    Attributes:
        index: block-sparse index over the *bucket-sorted* queries and the view's keys: kv_num_blocks
            (B, H, nqb) int32, kv_indices (B, H, nqb, nkb) int32.
        q_order: (B, H, Lq) int64; sorted query row i is original query ``q_order[..., i]``.
        block_mask: (B, H, nqb, nkb) bool dense form of the index (rows in sorted query order).
    """

    index: BlockSparseIndex
    q_order: torch.Tensor
    block_mask: torch.Tensor

    @property
    def density(self) -> torch.Tensor:
        """(B, H) float32 device tensor: computed query-key pairs / (Lq * Lk), partial blocks counted exactly.

        Computed on access (no host sync), so steps that do not probe pay nothing for it.
        """
        ix = self.index
        return _density(self.block_mask, ix.q_block_size, ix.kv_block_size, ix.seqlen_q, ix.seqlen_k)

    def permute_queries(self, q: torch.Tensor) -> torch.Tensor:
        """q: (B, H, Lq, D) in original order -> (B, H, Lq, D) in bucket-sorted order."""
        return q.gather(2, self.q_order[..., None].expand(*self.q_order.shape, q.shape[-1]))

    def unpermute(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, Lq) or (B, H, Lq, D) in sorted order -> the same in original query order."""
        idx = self.q_order if x.dim() == 3 else self.q_order[..., None].expand_as(x)
        return torch.empty_like(x).scatter_(2, idx, x)

    def key_mask(self, queries: torch.Tensor | None = None) -> torch.Tensor:
        """Dense token mask in original query order: (B, H, n, Lk) bool, True where the pair is computed.

        Args:
            queries: optional 1-d int64 original query ids (n of them); default all Lq queries.
        """
        order = self.q_order
        inv = torch.empty_like(order).scatter_(
            2, order, torch.arange(order.shape[-1], device=order.device).expand_as(order)
        )
        if queries is not None:
            inv = inv[:, :, queries]
        dense = self.block_mask
        rows = dense.gather(2, (inv // self.index.q_block_size)[..., None].expand(*inv.shape, dense.shape[-1]))
        return rows.repeat_interleave(self.index.kv_block_size, dim=-1)[..., : self.index.seqlen_k]


class AnnSAOutput(NamedTuple):
    """out: (B, H, Lq, Dv) in original query order; lse: (B, H, Lq) float32 or None; selection: what ran."""

    out: torch.Tensor
    lse: torch.Tensor | None
    selection: AnnSASelection


@dataclass(frozen=True, eq=False)
class AnnSAPlan:
    """One commit's plan of a layer's cache. A value: making it changes nothing in the cache.

    It says how the cache's plannable slots are to be ordered so that every bucket is one contiguous slot
    range (:meth:`apply_to` does it), and holds what the per-step selection reads, computed for that order.
    Tensors are over the cache's (B, Hk) heads; the history's key blocks are ``[0, cdiv(bound, kv_block_size))``.

    Attributes:
        bound: committed slots per head when planned (``cache.bound``).
        start: first slot of the reordered range ``[start, bound)`` (``cache.pinned_tokens``); the pinned slots
            before it (sinks, TempCache's ring) keep their place and, with ``attend_sinks``, are attended at every
            step.
        batch, heads, head_dim: key geometry of the planned cache.
        order: (B, Hk, bound - start) int64 permutation: slot ``start + i`` of the planned layout receives slot
            ``start + order[..., i]`` of the cache as it was when planned (occupied slots first, by bucket).
        searcher: LSH family: the hash functions (None for int8).
        offsets: LSH: (B, Hk, nbuckets + 1) int64, first position of each table-0 bucket, relative to ``start``.
        cover: LSH: (B, Hk, nbuckets, nkb_hist) float32 0/1, table-0 bucket -> key blocks (None when too large:
            difference arrays over ``offsets`` are used instead).
        block_codes: LSH with several tables or hashed sinks: (B, Hk, nkb_hist, T) codes of the block
            centroids (``nbuckets`` where a block is not scored by its centroid in that table).
        anchors: int8: (B, Hk, anchors, D) anchor codes and (B, Hk, anchors) scales.
        centroids: int8: (B, Hk, nkb_hist, D) codes and (B, Hk, nkb_hist) scales of the key-block centroids.
        block_ok: int8: (B, Hk, nkb_hist) bool, key blocks holding an occupied slot.
    """

    bound: int
    start: int
    batch: int
    heads: int
    head_dim: int
    order: torch.Tensor
    searcher: SignLSH | None = None
    offsets: torch.Tensor | None = None
    cover: torch.Tensor | None = None
    block_codes: torch.Tensor | None = None
    anchors: Int8Codes | None = None
    centroids: Int8Codes | None = None
    block_ok: torch.Tensor | None = None

    def apply_to(self, cache: LayerKVCache) -> None:
        """Put ``cache``'s slots in this plan's order, once, right after planning (``cache.reorder_``).

        Attention over the cache does not change (it ignores slot order); selections with this plan refer to
        the reordered slots.

        Raises:
            ValueError naming ``cache`` when it is not the cache as planned (another geometry, bound or
            plannable range, or a chunk staged since).
        """
        if not isinstance(cache, LayerKVCache):
            raise ValueError(f"cache must be a LayerKVCache, got {type(cache).__name__}")
        geometry = (cache.batch, cache.heads, cache.head_dim)
        if geometry != (self.batch, self.heads, self.head_dim) or cache.staged_tokens:
            raise ValueError(
                f"cache holds (B, H, D) = {geometry} with {cache.staged_tokens} staged tokens; the plan is of "
                f"{(self.batch, self.heads, self.head_dim)} with nothing staged"
            )
        if (cache.pinned_tokens, cache.bound) != (self.start, self.bound):
            raise ValueError(
                f"cache's plannable slots are [{cache.pinned_tokens}, {cache.bound}), the plan's "
                f"[{self.start}, {self.bound}): "
                "plan it again after each commit"
            )
        if self.bound > self.start:
            cache.reorder_(self.order, start=self.start)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a plan of a restored cache needs besides the cache: for the int8 family, the anchors
        (``anchor_codes`` (B, Hk, anchors, D) float32 integer values, ``anchor_scale`` (B, Hk, anchors)
        float32); empty for LSH (a pure function of the keys)."""
        if self.anchors is None:
            return {}
        a = self.anchors
        return {"anchor_codes": a.codes.contiguous().clone(), "anchor_scale": a.scale.contiguous().clone()}


def _ordered_keys(
    cache: LayerKVCache, start: int, bound: int, order: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys ``[0, bound)`` (B, Hk, bound, D) and their occupancy (B, Hk, bound) bool as they will lie once
    ``order`` (B, Hk, bound - start) is applied from ``start``: the values ``reorder_`` will write, bit for bit."""
    buf = cache.buffers
    k, occupied = buf.k[:, :, :bound], buf.count[:, :, :bound] > 0
    if bound == start:
        return k, occupied
    moved = buf.k[:, :, start:bound].gather(2, order[..., None].expand(*order.shape, k.shape[-1]))
    keys = torch.cat([k[:, :, :start], moved], dim=2)
    return keys, torch.cat([occupied[:, :, :start], occupied[:, :, start:].gather(2, order)], dim=2)


class AnnSAPlanner:
    """Per-layer AnnSA planner: :meth:`plan` once per commit (a value its caller applies to the cache),
    :meth:`select` / :meth:`run` at every denoising step with that plan.

    Stateless across layers and heads: the LSH projections come from the cache's layer and global head ids, so
    a planner on a shard of heads behaves exactly like the matching slice of an unsharded one. Between calls it
    keeps only reusable machinery (hash functions, the captured selection), never a cache's layout.

    Example::

        planner = AnnSAPlanner(AnnSAConfig())
        cache.commit()
        plan = planner.plan(cache)
        plan.apply_to(cache)
        for step in steps:
            cache.stage(k, v, frame_start=f0)
            out = planner.run(q, cache.view(), plan).out
    """

    def __init__(
        self,
        config: AnnSAConfig,
        *,
        graphs: Literal["auto", "off", "emulate"] = "off",
        graph_inputs: StaticInputs | None = None,
    ) -> None:
        if not isinstance(config, AnnSAConfig):
            raise ValueError(f"config must be an AnnSAConfig, got {type(config).__name__}")
        if graphs not in ("auto", "off", "emulate"):
            raise ValueError(f"graphs must be 'auto', 'off' or 'emulate', got {graphs!r}")
        self.config = config
        self._graphs = graphs
        self._graph_inputs = graph_inputs if graph_inputs is not None else StaticInputs()
        self.select_capture = KeyedCapture("emulate" if graphs == "emulate" else "cuda")
        self._searcher: SignLSH | None = None
        self._searcher_key: tuple[object, ...] | None = None
        self._hits: tuple[tuple[object, ...], GroupHits] | None = None

    # ----------------------------------------------------------------- plan
    def plan(self, cache: LayerKVCache, *, anchors: Int8Codes | None = None) -> AnnSAPlan:
        """Bucket the committed keys past ``cache.pinned_tokens`` (once per commit); ``cache`` is only read.

        Args:
            cache: the layer's cache, right after ``commit()`` (nothing staged).
            anchors: int8 family only: the anchors to bucket with instead of sampling them from the cache
                (codes (B, Hk, anchors, D), scale (B, Hk, anchors)); a restored cache planned with the anchors
                of :meth:`AnnSAPlan.state_dict` gets the plan it was saved with (its slots already follow them,
                so the stable bucket sort keeps their order), where sampling would draw other anchors from the
                reordered slots.

        Returns:
            The :class:`AnnSAPlan`; apply it to ``cache`` (:meth:`AnnSAPlan.apply_to`) before selecting with it.

        Raises:
            ValueError naming ``cache`` for a staged chunk or a sink-window policy (whose ring buffer evicts
            by slot position and must not be reordered).
        """
        if not isinstance(cache, LayerKVCache):
            raise ValueError(f"cache must be a LayerKVCache, got {type(cache).__name__}")
        if isinstance(cache.policy, SinkWindowPolicy):
            raise ValueError(
                "cache has a SinkWindowPolicy, whose ring buffer evicts by slot position; AnnSA reorders "
                "slots, so use the full, budget or TempCache policy"
            )
        if cache.staged_tokens:
            raise ValueError("cache has a staged chunk; call plan() after commit(), before the next stage()")
        if anchors is not None:
            self._check_anchors(cache, anchors)
        # Sinks (and TempCache's verbatim ring) stay in place and are always attended.
        start, bound = cache.pinned_tokens, cache.bound
        if isinstance(self.config.ann, LSHConfig):
            plan = self._plan_lsh(cache, start, bound)
        else:
            plan = self._plan_int8(cache, start, bound, anchors)
        logger.debug("AnnSA plan: layer %d, slots [%d, %d)", cache.layer, start, bound)
        return plan

    def _lsh(self, cache: LayerKVCache) -> SignLSH:
        key = (cache.layer, cache.head_ids, cache.head_dim, str(cache.device))
        if self._searcher is None or self._searcher_key != key:
            ann = self.config.ann
            assert isinstance(ann, LSHConfig)
            self._searcher = SignLSH(
                ann, cache.head_dim, layer=cache.layer, head_ids=cache.head_ids, device=cache.device
            )
            self._searcher_key = key
        return self._searcher

    def _plan_lsh(self, cache: LayerKVCache, start: int, bound: int) -> AnnSAPlan:
        lsh = self._lsh(cache)
        nb, tables = 1 << lsh.config.bits, lsh.config.tables
        bk = self.config.kv_block_size
        buf = cache.buffers
        valid = buf.count[:, :, start:bound] > 0
        layout = bucket_sort(lsh.codes(buf.k[:, :, start:bound])[..., 0], nb, valid)
        nkb = _cdiv(bound, bk)
        cover = None
        if cache.batch * cache.heads * nb * nkb <= _COVER_LIMIT:
            cover = bucket_block_cover(layout.offsets, start, bk, nkb)
        hashed_sinks = not self.config.attend_sinks and start > 0
        block_codes = None
        if tables > 1 or hashed_sinks:
            # Table 0 of the sorted history is scored by offsets; blocks elsewhere by their centroid's codes.
            keys, occupied = _ordered_keys(cache, start, bound, layout.order)
            cent, ok = block_means(keys, occupied, bk)
            codes = torch.where(ok[..., None], lsh.codes(cent), nb)  # (B, Hk, nkb_hist, T)
            use = torch.ones(codes.shape[2:], dtype=torch.bool, device=codes.device)
            use[:, 0] = torch.arange(codes.shape[2], device=codes.device) < (_cdiv(start, bk) if hashed_sinks else 0)
            block_codes = torch.where(use, codes, nb)
        return AnnSAPlan(
            bound, start, cache.batch, cache.heads, cache.head_dim, layout.order,
            searcher=lsh, offsets=layout.offsets, cover=cover, block_codes=block_codes,
        )  # fmt: skip

    def _plan_int8(self, cache: LayerKVCache, start: int, bound: int, anchors: Int8Codes | None) -> AnnSAPlan:
        buf = cache.buffers
        c = self.config.anchors
        valid = buf.count[:, :, start:bound] > 0
        if anchors is not None:
            picked = Int8Codes(anchors.codes.to(cache.device), anchors.scale.to(cache.device))
        else:
            # Valid history entries are the first ones of the range (the cache keeps empty slots last).
            picked = int8_encode(strided_sample(buf.k[:, :, : max(bound, start + 1)], start, valid.sum(-1), c))
        if bound > start:
            order = bucket_sort(nearest_anchor(buf.k[:, :, start:bound], picked), c, valid).order
        else:
            order = torch.empty((cache.batch, cache.heads, 0), dtype=torch.int64, device=cache.device)
        keys, occupied = _ordered_keys(cache, start, bound, order)
        cent, block_ok = block_means(keys, occupied, self.config.kv_block_size)
        return AnnSAPlan(
            bound, start, cache.batch, cache.heads, cache.head_dim, order,
            anchors=picked, centroids=int8_encode(cent), block_ok=block_ok,
        )  # fmt: skip

    # ----------------------------------------------------------------- state
    def check_state(self, cache: LayerKVCache, state: dict[str, torch.Tensor]) -> Int8Codes | None:
        """Validate :meth:`AnnSAPlan.state_dict` output for ``cache`` (the cache it will plan), changing nothing.

        Returns the anchors to pass to :meth:`plan` (None for LSH). Raises ValueError naming the problem.
        """
        names = {"anchor_codes", "anchor_scale"}
        if isinstance(self.config.ann, LSHConfig):
            if state:
                raise ValueError(f"an LSH AnnSA plan has no state, got {sorted(state)}")
            return None
        if set(state) != names:
            raise ValueError(f"an int8 AnnSA plan needs {sorted(names)}, got {sorted(state)}")
        anchors = Int8Codes(state["anchor_codes"], state["anchor_scale"])
        self._check_anchors(cache, anchors)
        return anchors

    def _check_anchors(self, cache: LayerKVCache, anchors: Int8Codes) -> None:
        if not isinstance(self.config.ann, Int8Config):
            raise ValueError("anchors are for the int8 family; this planner uses LSH")
        c = self.config.anchors
        b, h = cache.batch, cache.heads
        shapes = {"anchor_codes": (b, h, c, cache.head_dim), "anchor_scale": (b, h, c)}
        for name, x in zip(shapes, anchors, strict=True):
            if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or tuple(x.shape) != shapes[name]:
                got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"{name} must be float32 of shape {shapes[name]}, got {got}")
            if x.device.type != "cpu" and x.device != cache.device:
                raise ValueError(f"{name} is on {x.device}; expected the CPU or {cache.device}")
        codes, scale = anchors
        if not bool(((codes == codes.round()) & (codes.abs() <= 127)).all()):
            raise ValueError("anchor_codes must hold integer values in [-127, 127]")
        if not bool((torch.isfinite(scale) & (scale > 0)).all()):
            raise ValueError("anchor_scale must be finite and positive")

    # ----------------------------------------------------------------- select / run
    def select(
        self, q: torch.Tensor, view: CacheView, plan: AnnSAPlan, *, staged_tokens: int | None = None
    ) -> AnnSASelection:
        """Build this step's block-sparse selection (no host synchronisation).

        Args:
            q: (B, H, Lq, D) queries, H a multiple of the cache's kv heads.
            view: ``cache.view()`` of the planned cache: k (B, Hk, L, D), v (B, Hk, L, Dv), bias (B, Hk, L)
                or None.
            plan: the cache's plan of its last commit (:meth:`plan`), applied to it (:meth:`AnnSAPlan.apply_to`).
            staged_tokens: keys at the end of the view that belong to the chunk being denoised; default Lq
                (the queries are the staged chunk's tokens).

        Returns:
            :class:`AnnSASelection`.
        """
        hist_end = self._check(q, view, plan, staged_tokens)
        cfg = self.config
        lq, seqlen_k = q.shape[2], view.k.shape[2]
        if self._graphs == "off" or (self._graphs == "auto" and q.device.type != "cuda") or self.select_capture.failed:
            num, idx, order, mask = self._select(q, view.k, plan, hist_end)
        else:
            num, idx, order, mask = self._select_captured(q, view.k, plan, hist_end)
        index = BlockSparseIndex(num, idx, cfg.q_block_size, cfg.kv_block_size, lq, seqlen_k)
        return AnnSASelection(index, order, mask)

    def _select(
        self, q: torch.Tensor, k: torch.Tensor, plan: AnnSAPlan, hist_end: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The selection as tensors: kv_num_blocks, kv_indices, q_order, block_mask (see AnnSASelection)."""
        cfg = self.config
        lq, seqlen_k = q.shape[2], k.shape[2]
        nkb = _cdiv(seqlen_k, cfg.kv_block_size)
        if isinstance(cfg.ann, LSHConfig):
            order, mask = self._select_lsh(q, k, plan, hist_end, nkb)
        else:
            order, mask = self._select_int8(q, k, plan, hist_end, nkb)
        self._fill_forced(mask, plan.start, hist_end, seqlen_k, True)
        index = BlockSparseIndex.from_dense(mask, cfg.q_block_size, cfg.kv_block_size, lq, seqlen_k)
        return index.kv_num_blocks, index.kv_indices, order, mask

    def run(
        self,
        q: torch.Tensor,
        view: CacheView,
        plan: AnnSAPlan,
        *,
        staged_tokens: int | None = None,
        scale: float | None = None,
        selection: AnnSASelection | None = None,
    ) -> AnnSAOutput:
        """Block-sparse attention of q over the view with this step's selection.

        Args:
            q: (B, H, Lq, D); view, plan, staged_tokens: as in :meth:`select`; scale: logit scale (1/sqrt(D)).
            selection: a :meth:`select` result for these q and view (computed here when None), so callers
                can time or inspect the selection apart from the attention.

        Returns:
            :class:`AnnSAOutput` with out (B, H, Lq, Dv) and lse (B, H, Lq) in the original query order.
        """
        sel = self.select(q, view, plan, staged_tokens=staged_tokens) if selection is None else selection
        res = block_sparse_attention(
            sel.permute_queries(q),
            view.k,
            view.v,
            sel.index,
            bias=view.bias,
            scale=scale,
            backend=self.config.backend,
        )
        lse = None if res.lse is None else sel.unpermute(res.lse)
        return AnnSAOutput(sel.unpermute(res.out), lse, sel)

    def _check(self, q: torch.Tensor, view: CacheView, plan: AnnSAPlan, staged_tokens: int | None) -> int:
        if not isinstance(plan, AnnSAPlan):
            raise ValueError(f"plan must be an AnnSAPlan (plan(cache) after each commit), got {type(plan).__name__}")
        if not isinstance(view, CacheView):
            raise ValueError(f"view must be a CacheView (cache.view()), got {type(view).__name__}")
        check_qkv(q, view.k, view.v)
        check_bias(view.bias, view.k)
        if view.k.shape[:2] != (plan.batch, plan.heads) or view.k.shape[-1] != plan.head_dim:
            raise ValueError(
                f"view.k has shape {tuple(view.k.shape)} but the planned cache holds "
                f"({plan.batch}, {plan.heads}, n, {plan.head_dim})"
            )
        seqlen_k = view.k.shape[2]
        staged = q.shape[2] if staged_tokens is None else staged_tokens
        if not 0 <= staged <= seqlen_k:
            raise ValueError(f"staged_tokens must be in [0, {seqlen_k}] (the view's length), got {staged}")
        hist_end = seqlen_k - staged
        if hist_end > plan.bound:
            raise ValueError(
                f"view holds {hist_end} committed slots but the plan covers {plan.bound}: call plan(cache) "
                f"after each commit (or pass the right staged_tokens)"
            )
        return hist_end

    def _select_captured(
        self, q: torch.Tensor, k: torch.Tensor, plan: AnnSAPlan, hist_end: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`_select` through a captured call: eager the first time a geometry is seen, captured the second,
        replayed afterwards. The queries and the plan's tensors are copied into static inputs (the queries into
        a buffer shared by every layer); the keys are read in place, so their storage is part of the key."""
        names, tensors = _plan_tensors(plan)
        key = (
            tuple(q.shape), q.dtype, tuple(k.shape), k.data_ptr(), hist_end, plan.bound, plan.start, names,
            tuple(t.shape for t in tensors),
        )  # fmt: skip

        def body(qs: torch.Tensor, *pt: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return self._select(qs, k, _with_tensors(plan, names, pt), hist_end)

        static = [self._graph_inputs.get("q", q), *([None] * len(tensors))]
        a, b, c, d = self.select_capture(key, body, [q, *tensors], static=static)
        return a, b, c, d

    def _select_lsh(
        self, q: torch.Tensor, k: torch.Tensor, plan: AnnSAPlan, hist_end: int, nkb: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, lsh = self.config, plan.searcher
        assert lsh is not None
        assert plan.offsets is not None
        b, h, lq, d = q.shape
        hk = k.shape[1]
        bits, tables = lsh.config.bits, lsh.config.tables
        # Query head h uses the projections of kv head h // (H / Hk): hash the heads of a group together.
        qc = lsh.codes(q.reshape(b, hk, -1, d)).view(b, h, lq, tables)
        order = torch.sort(qc[..., 0], dim=-1, stable=True).indices
        qc = qc.gather(2, order[..., None].expand_as(qc))
        hits = self._group_hits(lq, lsh.config, q.device)(qc)  # (B, H, nqb, T, nb)
        bk = cfg.kv_block_size
        nh = min(_cdiv(plan.bound, bk), nkb)
        if plan.cover is not None:
            hist = _grouped_matmul(hits[:, :, :, 0], plan.cover[..., :nh])
        else:
            hist = bucket_block_scores(hits[:, :, :, 0], expand_kv_heads(plan.offsets, h), plan.start, bk, nh)
        if plan.block_codes is not None:
            hist += block_hits(hits, expand_kv_heads(plan.block_codes[:, :, :nh], h))
        score = F.pad(hist, (0, nkb - nh))
        if not cfg.attend_own_chunk and k.shape[2] > hist_end:
            s0 = (hist_end // bk) * bk
            pos = torch.arange(s0, k.shape[2], device=q.device) >= hist_end
            cent, ok = block_means(k[:, :, s0:], pos.expand(b, hk, -1), bk)
            codes = torch.where(ok[..., None], lsh.codes(cent), 1 << bits)
            score[..., s0 // bk :] += block_hits(hits, expand_kv_heads(codes, h))
        return order, self._cap(score, plan.start, hist_end, k.shape[2])

    def _group_hits(self, lq: int, lsh: LSHConfig, device: torch.device) -> GroupHits:
        key = (lq, lsh.bits, lsh.probes, lsh.tables, self.config.q_block_size, str(device))
        if self._hits is None or self._hits[0] != key:
            self._hits = (key, GroupHits(lsh.bits, lsh.probes, self.config.q_block_size, lq, lsh.tables, device))
        return self._hits[1]

    def _cap(self, score: torch.Tensor, sink: int, hist_end: int, seqlen_k: int) -> torch.Tensor:
        """bool (B, H, nqb, nkb): blocks with a hit, at most ``max_density`` of them, best scores first."""
        nkb = score.shape[-1]
        if self.config.max_density is None:
            return score > 0
        # Forced blocks are added anyway: keep them out of the budget (score is this step's scratch tensor).
        self._fill_forced(score, sink, hist_end, seqlen_k, 0.0)
        cap = max(1, math.ceil(self.config.max_density * nkb))
        top = score.topk(min(cap, nkb), dim=-1)
        return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top.indices, top.values > 0)

    def _select_int8(
        self, q: torch.Tensor, k: torch.Tensor, plan: AnnSAPlan, hist_end: int, nkb: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        assert plan.anchors is not None
        assert plan.centroids is not None
        assert plan.block_ok is not None
        b, h, lq, d = q.shape
        hk, seqlen_k = k.shape[1], k.shape[2]
        bk = cfg.kv_block_size
        codes = nearest_anchor(q.reshape(b, hk, -1, d), plan.anchors).view(b, h, lq)
        order = torch.sort(codes, dim=-1, stable=True).indices
        qs = q.gather(2, order[..., None].expand_as(q))
        qmeans = block_means(qs, None, cfg.q_block_size)[0]  # (B, H, nqb, D)
        nh = min(plan.centroids.codes.shape[2], nkb)
        ok = plan.block_ok[:, :, :nh].clone()
        if cfg.attend_sinks:
            ok[..., : _cdiv(plan.start, bk)] = False
        parts = [(plan.centroids.codes[:, :, :nh], plan.centroids.scale[:, :, :nh], ok)]
        start = torch.arange(nh, device=q.device)
        if cfg.attend_own_chunk:
            ok[..., hist_end // bk :] = False
        elif seqlen_k > hist_end:
            s0 = (hist_end // bk) * bk
            pos = torch.arange(s0, seqlen_k, device=q.device) >= hist_end
            cent, ok_staged = block_means(k[:, :, s0:], pos.expand(b, hk, -1), bk)
            enc = int8_encode(cent)
            parts.append((enc.codes, enc.scale, ok_staged))
            start = torch.cat([start, torch.arange(cent.shape[2], device=q.device) + s0 // bk])
        codes, scales, oks = (expand_kv_heads(torch.cat(x, 2), h) for x in zip(*parts, strict=True))
        topk = cfg.top_k_blocks
        if cfg.max_density is not None:
            topk = min(topk, max(1, math.ceil(cfg.max_density * nkb)))
        picked = int8_block_topk(qmeans, Int8Codes(codes, scales), oks, topk)  # (B, H, nqb, n_cand)
        if len(parts) == 1:
            return order, F.pad(picked, (0, nkb - nh))
        # The boundary block may appear twice (history and staged parts): add, then test.
        hit = torch.zeros(b, h, picked.shape[2], nkb, device=q.device)
        hit.scatter_add_(-1, start.expand_as(picked), picked.float())
        return order, hit > 0

    def _fill_forced(self, x: torch.Tensor, sink: int, hist_end: int, seqlen_k: int, value: bool | float) -> None:
        """Set the sink blocks and the staged chunk's blocks (those attended unconditionally) of x[..., nkb]."""
        bk = self.config.kv_block_size
        if self.config.attend_sinks and sink > 0:
            x[..., : _cdiv(sink, bk)] = value
        if self.config.attend_own_chunk and seqlen_k > hist_end:
            x[..., hist_end // bk :] = value


_PLAN_FIELDS = ("offsets", "cover", "block_codes", "anchors", "centroids", "block_ok")


def _plan_tensors(plan: AnnSAPlan) -> tuple[tuple[str, ...], tuple[torch.Tensor, ...]]:
    """The plan's tensors, flattened (Int8Codes as codes then scale), with their field names."""
    names: list[str] = []
    tensors: list[torch.Tensor] = []
    for name in _PLAN_FIELDS:
        value = getattr(plan, name)
        if isinstance(value, Int8Codes):
            names += [f"{name}.codes", f"{name}.scale"]
            tensors += [value.codes, value.scale]
        elif value is not None:
            names.append(name)
            tensors.append(value)
    return tuple(names), tuple(tensors)


def _with_tensors(plan: AnnSAPlan, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> AnnSAPlan:
    """A copy of ``plan`` whose tensors are ``tensors`` (in :func:`_plan_tensors` order)."""
    given = dict(zip(names, tensors, strict=True))
    fields: dict[str, object] = {}
    for name in _PLAN_FIELDS:
        if f"{name}.codes" in given:
            fields[name] = Int8Codes(given[f"{name}.codes"], given[f"{name}.scale"])
        elif name in given:
            fields[name] = given[name]
    return dataclasses.replace(plan, **fields)  # type: ignore[arg-type]


def _grouped_matmul(hits: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
    """(B, H, G, nb) hits @ (B, Hk, nb, n) cover -> (B, H, G, n), the query heads of a kv head batched together."""
    b, h, g, nb = hits.shape
    hk = cover.shape[1]
    out = torch.matmul(hits.reshape(b, hk, (h // hk) * g, nb), cover)
    return out.view(b, h, g, cover.shape[-1])


def _density(mask: torch.Tensor, bq: int, bk: int, lq: int, seqlen_k: int) -> torch.Tensor:
    """(B, H) float32 share of the lq x seqlen_k pairs covered by a (B, H, nqb, nkb) block mask."""
    nqb, nkb = mask.shape[-2:]
    if lq == 0 or seqlen_k == 0:
        return torch.zeros(mask.shape[:2], device=mask.device)
    rows = (lq - torch.arange(nqb, device=mask.device) * bq).clamp(max=bq).float()
    cols = (seqlen_k - torch.arange(nkb, device=mask.device) * bk).clamp(max=bk).float()
    return torch.einsum("bhqk,q,k->bh", mask.float(), rows, cols) / (lq * seqlen_k)


def annsa_reference(
    q: torch.Tensor,
    view: CacheView,
    selection: AnnSASelection,
    *,
    scale: float | None = None,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The selection expanded to a dense (B, H, Lq, Lk) key mask and fed to ``attention_ref`` (small shapes).

    Args:
        q: (B, H, Lq, D) in original order; view: the view the selection was built on.
        upcast: float64 (True, the ground truth) or q's dtype (False, torch's own error at that dtype).

    Returns:
        out (B, H, Lq, Dv) in q.dtype and lse (B, H, Lq) float32.
    """
    bias = view.bias
    if bias is not None:
        bias = torch.where(bias <= MASKED_BIAS, float("-inf"), bias)
    return attention_ref(q, view.k, view.v, bias, scale=scale, upcast=upcast, key_mask=selection.key_mask())


def measure_layer(
    q: torch.Tensor,
    view: CacheView,
    planner: AnnSAPlanner,
    plan: AnnSAPlan,
    *,
    staged_tokens: int | None = None,
    query_sample: int = 256,
) -> tuple[float, float]:
    """Recall and density of the planner's selection on one layer (host sync: for calibration and reports).

    Args:
        q: (B, H, Lq, D) queries of a sample chunk; view: the planned cache's view.
        planner, plan: the layer's planner and its applied plan of the view's cache.
        query_sample: queries (strided) whose exact attention is materialised for the recall.

    Returns:
        (recall, density): mean exact attention mass on the selected keys over the sampled queries, and the
        mean share of computed query-key pairs.
    """
    check_rank("q", q, 4)
    if query_sample < 1:
        raise ValueError(f"query_sample must be >= 1, got {query_sample}")
    sel = planner.select(q, view, plan, staged_tokens=staged_tokens)
    lq = q.shape[2]
    ids = torch.unique(torch.linspace(0, lq - 1, min(query_sample, lq), device=q.device).round().long())
    recall = attention_recall(q[:, :, ids], view.k, sel.key_mask(ids), bias=view.bias)
    return recall, float(sel.density.mean())


__all__ = [
    "AnnSAConfig",
    "AnnSAOutput",
    "AnnSAPlan",
    "AnnSAPlanner",
    "AnnSASelection",
    "annsa_reference",
    "measure_layer",
]
