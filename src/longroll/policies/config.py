"""One typed config that chooses, per layer and denoising step, how attention is computed during a rollout."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from longroll.ann.config import AnnConfig, Int8Config, LSHConfig
from longroll.cache.config import (
    BudgetPolicy,
    CachePolicy,
    FullPolicy,
    SinkWindowPolicy,
    TempCachePolicy,
    check_eviction,
)
from longroll.cache.host_tier import HostTierConfig
from longroll.ops.attention import BACKENDS, Backend
from longroll.policies.schedule import SparseSchedule
from longroll.sparse.annca import AnnCAConfig
from longroll.sparse.annsa import AnnSAConfig
from longroll.sparse.radial import RadialConfig


@dataclass(frozen=True)
class AttentionPolicy:
    """What a rollout does to attention.

    Args:
        name: label used in reports.
        cache: commit policy of every layer's KV cache.
        attention_backend: dense attention route (see :func:`longroll.ops.attention.attention`).
        annsa: ANN block-sparse self-attention over the cache, or None for dense self-attention.
        annca: ANN prompt-token selection in cross-attention, or None for dense cross-attention.
        schedule: which denoising steps and layers use the sparse paths (the first ~30 % of steps stay dense).
        radial: a static Radial-Attention-style mask over the time-ordered full cache (peer baseline), or None.
        host_tier: entries the cache evicts move to host memory and the most relevant blocks of them are
            attended again each chunk (:class:`~longroll.cache.host_tier.HostTierConfig`); needs a TempCache or
            sink-window cache. With AnnSA, sparse passes attend the cache block-sparse and the retrieved blocks
            densely (they are few, and already selected for the chunk), merged by log-sum-exp. None: evicted is
            gone.
    """

    name: str = "dense"
    cache: CachePolicy = field(default_factory=FullPolicy)
    attention_backend: Backend = "auto"
    annsa: AnnSAConfig | None = None
    annca: AnnCAConfig | None = None
    schedule: SparseSchedule = field(default_factory=SparseSchedule)
    radial: RadialConfig | None = None
    host_tier: HostTierConfig | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name must be a non-empty string")
        if self.annsa is not None and isinstance(self.cache, SinkWindowPolicy):
            raise ValueError("annsa cannot run over a SinkWindowPolicy cache (its ring buffer must not be reordered)")
        if self.radial is not None and (self.annsa is not None or not isinstance(self.cache, FullPolicy)):
            raise ValueError("radial needs the full cache (slots in time order) and excludes annsa")
        if self.host_tier is not None:
            if not isinstance(self.host_tier, HostTierConfig):
                raise ValueError(f"host_tier must be a HostTierConfig or None, got {type(self.host_tier).__name__}")
            if not isinstance(self.cache, TempCachePolicy | SinkWindowPolicy):
                raise ValueError(f"host_tier needs a TempCache or sink-window cache, got {type(self.cache).__name__}")
        if self.attention_backend not in BACKENDS:
            raise ValueError(f"attention_backend must be one of {BACKENDS}, got {self.attention_backend!r}")


#: Cache budgets of the presets, in latent frames. The sink-window baseline is LongLive's (sink 3 + window 12);
#: every bounded preset gets the same memory (15 frames) and the same sink frames, so that quality compares at
#: equal memory: with 1 sink instead of 3, on recently seen tiles of the world model's memory test, a sink-window
#: loses 12.9 dB and TempCache 6.9 dB (pooled over 32 episodes, results/world_eval/memory/sweeps/memory/).
SINK_FRAMES = 3
WINDOW_FRAMES = 12
EQUAL_MEMORY_FRAMES = SINK_FRAMES + WINDOW_FRAMES


#: Every preset name, in the order reports list them; :func:`preset` builds exactly these.
PRESET_NAMES: tuple[str, ...] = (
    "dense",
    "sink_window",
    "budget",
    "tempcache",
    "tempcache_lsh",
    "annsa",
    "annsa_int8",
    "annca",
    "radial",
    "all",
    "all_int8",
    "retrieval",
)

#: The ``retrieval`` preset's host tier, in multiples of its device memory: evicted history held on the host,
#: and the device slot region the retrieved blocks fill each chunk (one latent frame per block).
RETRIEVAL_HOST_MEMORIES = 4
RETRIEVAL_SLOT_MEMORIES = 1


@dataclass(frozen=True)
class TempCacheLayout:
    """How the TempCache presets (``tempcache``, ``tempcache_lsh``, ``all``, ``all_int8``) spend their memory.

    The cap is the preset's memory (``memory_frames`` frames of tokens, the sink-window's bytes); within it the
    first ``sink_frames`` frames stay verbatim, the newest ``recent_frames`` stay verbatim too (a ring, as a
    sink-window's window), and every older frame merges into the entries of the frame before it by temporal
    correspondence (see :class:`~longroll.cache.config.TempCachePolicy`, whose fields these are).

    Defaults, measured on the world model's memory test (``scripts/eval_memory.py``, 32 held-out revisit
    episodes, 15 frames of memory, H200, ``results/world_eval/memory/``): 3 sinks as the sink-window; a 3-frame
    ring (recently seen tiles 33.39 dB against the sink-window's 33.54 and 31.94 without a ring; 6 and 9 frames
    leave less room for the older frames: revisited tiles 17.2 and 15.0 against 20.4 at 3); groups of at most
    16 frames (revisited 20.4 against 19.1 at 8 and 21.3 unbounded, which the RoPE'd synthetic scene of
    :class:`~longroll.cache.config.TempCachePolicy` penalises). Eviction by redundancy at a key cosine of 0.5
    (CPU, 32 episodes, ``results/world_eval/memory_cpu/evict/``): revisited tiles 32.52 dB against 20.22 with
    age eviction and the sink-window's 14.66 (93 % of the gap to dense recovered, against 29 %), recently seen
    tiles 33.86 against the sink-window's 33.72; 0.7 scores the same within 0.01 dB. On the H200, same 32
    episodes (``results/world_eval/memory/``): 32.49 against 14.75 (93 %), recent 33.75 against 33.54; with
    age eviction 20.34 (``results/world_eval/memory/full_key_layouts/``).
    Its price at Wan2.1-1.3B shapes was x2.05 the sink-window's chunk (x1.37 with age eviction) with the first,
    full-key candidate search; ``evict_by="age"`` where speed matters more than old places.

    Args:
        sink_frames: frames kept verbatim forever (at most ``memory_frames - frames_per_chunk``; fewer are
            kept when the memory is smaller, as for the sink-window).
        threshold: cosine similarity needed to merge.
        overflow_threshold: looser similarity used only at the cap.
        max_group: most frames one merged group may span (None: unbounded).
        recent_frames: newest frames kept verbatim before they merge (at most what the memory holds besides
            the sinks and a chunk; fewer are kept when it is smaller).
        evict_by: how slots are freed at the cap, ``"age"`` (oldest groups) or ``"redundancy"`` (merge
            near-duplicate old entries first, age for the rest).
        compress_threshold: key cosine needed for a redundancy merge, in (0, 1].
    """

    sink_frames: int = SINK_FRAMES
    threshold: float = 0.9
    overflow_threshold: float = 0.75
    max_group: int | None = 16
    recent_frames: int = 3
    evict_by: Literal["age", "redundancy"] = "redundancy"
    compress_threshold: float = 0.5

    def __post_init__(self) -> None:
        check_eviction(self.evict_by, self.compress_threshold)
        if not isinstance(self.recent_frames, int) or isinstance(self.recent_frames, bool) or self.recent_frames < 0:
            raise ValueError(f"recent_frames must be an int >= 0, got {self.recent_frames!r}")
        if not isinstance(self.sink_frames, int) or isinstance(self.sink_frames, bool) or self.sink_frames < 0:
            raise ValueError(f"sink_frames must be an int >= 0, got {self.sink_frames!r}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold!r}")
        if not 0.0 < self.overflow_threshold <= self.threshold:
            raise ValueError(f"overflow_threshold must be in (0, threshold={self.threshold}], got "
                             f"{self.overflow_threshold!r}")  # fmt: skip
        if self.max_group is not None and (not isinstance(self.max_group, int) or self.max_group < 1):
            raise ValueError(f"max_group must be None or an int >= 1, got {self.max_group!r}")

    def policy(self, max_entries: int, sink_frames: int, ann: AnnConfig, recent_frames: int = 0) -> TempCachePolicy:
        """The cache policy of this layout at a cap of ``max_entries`` tokens, ``sink_frames`` and
        ``recent_frames`` (both already clamped to the memory)."""
        return TempCachePolicy(
            threshold=self.threshold, max_entries=max_entries, sink_frames=sink_frames,
            overflow_threshold=self.overflow_threshold, ann=ann, max_group=self.max_group,
            recent_frames=recent_frames, evict_by=self.evict_by, compress_threshold=self.compress_threshold,
        )  # fmt: skip


#: ``retrieval``'s cache: merges only identical keys (cosine 1 for a match, at the cap and for a redundancy
#: merge), and evicts by age, so that what leaves the device is exact and the host tier can bring it back.
RETRIEVAL_LAYOUT = TempCacheLayout(threshold=1.0, overflow_threshold=1.0, evict_by="age", compress_threshold=1.0)


def preset(
    name: str,
    *,
    tokens_per_frame: int,
    frames_per_chunk: int,
    memory_frames: int = EQUAL_MEMORY_FRAMES,
    layout: TempCacheLayout | None = None,
) -> AttentionPolicy:
    """A named policy at a model's geometry.

    Names: ``dense`` (unbounded cache), ``sink_window`` (LongLive), ``budget`` (importance budget),
    ``tempcache`` and ``tempcache_lsh`` (temporal-correspondence merging, int8 or LSH matching), ``annsa`` and
    ``annsa_int8`` (ANN block-sparse self-attention over the unbounded cache), ``annca`` (ANN prompt-token
    selection), ``radial`` (static Radial-Attention-style mask, peer baseline), ``all`` and ``all_int8``
    (TempCache + AnnSA + AnnCA), ``retrieval`` (TempCache merging only identical keys, :data:`RETRIEVAL_LAYOUT`,
    over a host tier of ``RETRIEVAL_HOST_MEMORIES`` times the memory, retrieving ``RETRIEVAL_SLOT_MEMORIES``
    times the memory per chunk in blocks of one frame: device memory is the cache's plus as much again for
    the slot region, and host memory holds that many more frames of keys and values).
    ``memory_frames`` sets the budget/cap of the bounded policies, in latent frames; every bounded policy holds
    exactly that many frames of tokens and the same ``SINK_FRAMES`` sinks (fewer when the memory is too small to
    hold them and a chunk). ``layout`` replaces the TempCache presets' default :class:`TempCacheLayout`
    (``retrieval``'s too).
    """
    if name not in PRESET_NAMES:
        raise ValueError(f"policy must be one of {sorted(PRESET_NAMES)}, got {name!r}")
    if memory_frames < frames_per_chunk + 1:
        raise ValueError(f"memory_frames must exceed frames_per_chunk={frames_per_chunk}, got {memory_frames}")
    if layout is not None and not isinstance(layout, TempCacheLayout):
        raise ValueError(f"layout must be a TempCacheLayout or None, got {type(layout).__name__}")
    retrieval = RETRIEVAL_LAYOUT if layout is None else layout
    layout = TempCacheLayout() if layout is None else layout
    budget = memory_frames * tokens_per_frame
    sink = min(SINK_FRAMES, memory_frames - frames_per_chunk)
    tc_sink = min(layout.sink_frames, memory_frames - frames_per_chunk)
    tc_recent = min(layout.recent_frames, memory_frames - frames_per_chunk - tc_sink)
    r_sink = min(retrieval.sink_frames, memory_frames - frames_per_chunk)
    r_recent = min(retrieval.recent_frames, memory_frames - frames_per_chunk - r_sink)
    r_tier = HostTierConfig(
        RETRIEVAL_HOST_MEMORIES * budget,
        block_tokens=tokens_per_frame,
        top_blocks=RETRIEVAL_SLOT_MEMORIES * memory_frames,
    )
    table: dict[str, AttentionPolicy] = {
        "dense": AttentionPolicy("dense", FullPolicy()),
        "sink_window": AttentionPolicy("sink_window", SinkWindowPolicy(sink, memory_frames - sink)),
        "budget": AttentionPolicy("budget", BudgetPolicy(budget_tokens=budget, sink_frames=sink)),
        "tempcache": AttentionPolicy("tempcache", layout.policy(budget, tc_sink, Int8Config(), tc_recent)),
        "tempcache_lsh": AttentionPolicy(
            "tempcache_lsh", layout.policy(budget, tc_sink, LSHConfig(bits=16, tables=2), tc_recent)
        ),
    }
    tc_int8 = table["tempcache"].cache
    blk = sparse_block_size(tokens_per_frame)
    sa_lsh = AnnSAConfig(ann=LSHConfig(bits=6, probes=1), q_block_size=blk, kv_block_size=blk)
    sa_int8 = AnnSAConfig(ann=Int8Config(), q_block_size=blk, kv_block_size=blk)
    # A fixed pack width keeps AnnCA free of host syncs; 256 exceeds any real prompt once Wan's 512 zero pads
    # have collapsed into one key, so nothing is truncated in practice.
    # Both families select prompt tokens by LSH: the int8 selection (4 tokens per frame) cost the world model
    # 1.5 dB on recently seen tiles in all_int8 (33.39 -> 31.86), the LSH one nothing measurable.
    ca_lsh = AnnCAConfig(ann=LSHConfig(bits=8), max_kept=256)
    table |= {
        "annsa": AttentionPolicy("annsa", FullPolicy(), annsa=sa_lsh),
        "annsa_int8": AttentionPolicy("annsa_int8", FullPolicy(), annsa=sa_int8),
        "annca": AttentionPolicy("annca", FullPolicy(), annca=ca_lsh),
        "radial": AttentionPolicy("radial", FullPolicy(), radial=RadialConfig()),
        # TempCache matches by int8 in both: the LSH match cost the world model 1.7 dB on recently seen tiles
        # (tempcache_lsh 33.09 against the sink-window's 34.82, 8 CPU episodes; `all` 33.10), the int8 one
        # nothing (35.00 in `all`), at the same commit time on the GPU with the fused top-1 kernel.
        "all": AttentionPolicy("all", tc_int8, annsa=sa_lsh, annca=ca_lsh),
        "all_int8": AttentionPolicy("all_int8", tc_int8, annsa=sa_int8, annca=ca_lsh),
        # Redundancy merging averages what it keeps, and a host tier under it brings back nothing better; a
        # cache that merges only identical keys evicts everything else exactly, and retrieval brings it back
        # (the world model's revisits, 32 CPU episodes: README, "Memory past the cap").
        "retrieval": AttentionPolicy(
            "retrieval", retrieval.policy(budget, r_sink, Int8Config(), r_recent), host_tier=r_tier
        ),
    }
    if tuple(table) != PRESET_NAMES:  # one list of names: the table may not drift from it
        raise RuntimeError(f"preset table {tuple(table)} differs from PRESET_NAMES {PRESET_NAMES}")
    if name not in table:
        raise ValueError(f"policy must be one of {sorted(table)}, got {name!r}")
    return table[name]


def sparse_block_size(tokens_per_frame: int) -> int:
    """AnnSA's query and key block size for a frame size: 128 (the kernel's fastest tile on the H100) from 256
    tokens per frame, else the largest power of two <= half a frame (at least 16).

    With 128-key blocks a 64-token frame (the world model) fits two frames in one block and selection ends up
    near-dense (measured: density 0.89 of the history); 32-key blocks gave density 0.62 at recall 0.82.
    """
    if tokens_per_frame < 1:
        raise ValueError(f"tokens_per_frame must be >= 1, got {tokens_per_frame}")
    if tokens_per_frame >= 256:
        return 128
    return max(16, 1 << ((tokens_per_frame // 2).bit_length() - 1)) if tokens_per_frame >= 2 else 16


__all__ = [
    "EQUAL_MEMORY_FRAMES",
    "PRESET_NAMES",
    "RETRIEVAL_HOST_MEMORIES",
    "RETRIEVAL_LAYOUT",
    "RETRIEVAL_SLOT_MEMORIES",
    "AttentionPolicy",
    "TempCacheLayout",
    "preset",
]
