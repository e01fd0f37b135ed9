"""Typed configs of the KV-cache policies applied at commit time."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from longroll.ann.config import AnnConfig, Int8Config
from longroll.cache.host_tier import HostTierConfig


@dataclass(frozen=True)
class FullPolicy:
    """Keep every committed token: the dense, unbounded baseline (buffers grow geometrically)."""

    initial_frames: int = 16

    def __post_init__(self) -> None:
        if self.initial_frames < 1:
            raise ValueError(f"initial_frames must be >= 1, got {self.initial_frames}")


@dataclass(frozen=True)
class SinkWindowPolicy:
    """The first ``sink_frames`` latent frames forever plus a rolling window of the last ``window_frames``.

    This is the LongLive / StreamingLLM baseline (LongLive: sink 3, window 12).
    """

    sink_frames: int = 3
    window_frames: int = 12

    def __post_init__(self) -> None:
        if self.sink_frames < 0:
            raise ValueError(f"sink_frames must be >= 0, got {self.sink_frames}")
        if self.window_frames < 1:
            raise ValueError(f"window_frames must be >= 1, got {self.window_frames}")


@dataclass(frozen=True)
class BudgetPolicy:
    """A fixed token budget per head filled by importance (the FlowCache / SnapKV-style peer baseline).

    At each commit the sink frames and the newest chunk are kept; the rest of the budget goes to the older
    entries that receive the most attention from a strided sample of the committing chunk's queries.

    Args:
        budget_tokens: entries per head, sinks and the newest chunk included.
        sink_frames: latent frames kept forever.
        query_sample: queries sampled from the committing chunk to score importance.
    """

    budget_tokens: int = 32_768
    sink_frames: int = 1
    query_sample: int = 256

    def __post_init__(self) -> None:
        if self.budget_tokens < 1:
            raise ValueError(f"budget_tokens must be >= 1, got {self.budget_tokens}")
        if self.sink_frames < 0:
            raise ValueError(f"sink_frames must be >= 0, got {self.sink_frames}")
        if self.query_sample < 1:
            raise ValueError(f"query_sample must be >= 1, got {self.query_sample}")


def check_eviction(evict_by: object, compress_threshold: object) -> None:
    """Validate TempCache's eviction fields (shared by the policy and the presets' layout)."""
    if evict_by not in ("age", "redundancy"):
        raise ValueError(f"evict_by must be 'age' or 'redundancy', got {evict_by!r}")
    if (
        isinstance(compress_threshold, bool)
        or not isinstance(compress_threshold, int | float)
        or not 0.0 < compress_threshold <= 1.0
    ):
        raise ValueError(f"compress_threshold must be in (0, 1], got {compress_threshold!r}")


@dataclass(frozen=True)
class TempCachePolicy:
    """Temporal-correspondence compression with a hard cap.

    For each committed frame, every token looks up its top-1 neighbour among the previous frame's entries with
    an ANN (never a dense product over the cache). A pair whose key cosine similarity is at least
    ``threshold`` merges: the newest key becomes the group's representative, values are averaged with the
    counts and the count grows, so attention adds ``log(count)`` to the key's logit (exact for identical keys).
    Matching is one-to-one: a previous entry absorbs at most one token per frame (the most similar), which
    keeps each group a single temporal track. Sink frames never merge and are never evicted.

    Hard cap: a head never holds more than ``max_entries`` committed entries. When a frame's unmatched tokens
    do not fit, (1) tokens whose top-1 similarity is at least ``overflow_threshold`` merge into their match
    anyway (values and count only), then (2) the oldest groups go first, the smallest count first among equally
    old ones. Memory is therefore fixed by construction. With ``evict_by="redundancy"``, step (2) first frees
    slots by merging redundant old entries into one another (pairs of unprotected entries whose stored keys have
    cosine similarity at least ``compress_threshold``, the most similar first; see
    :mod:`longroll.cache.redundancy`) and evicts the oldest groups only for what is still missing.

    Args:
        threshold: cosine similarity needed to merge, in (0, 1].
        max_entries: hard cap on committed entries per head; must hold the sinks plus one chunk.
        sink_frames: latent frames kept verbatim.
        overflow_threshold: looser similarity used only when the cap would be exceeded, in (0, threshold].
        ann: the ANN family used for the top-1 lookup.
        match_keys: ``"pre_rope"`` compares keys before RoPE (identical content at different times matches;
            the representative is still stored post-RoPE at its newest position), ``"post_rope"`` compares the
            stored keys themselves (the alternative, measured in the benchmarks).
        max_group: most frames one group may span; a full group stops absorbing and the track starts a new
            group. With temporal RoPE, members of a group have different logits for the same query (the
            rotation differs per frame) while the group is scored at its newest member's position, so an
            unbounded group over-weights long static tracks. Measured on the RoPE'd synthetic scene
            (``scripts/bench_cache_cpu.py``, 62 frames, cap 12 frames): rel-L2 vs the full cache 0.45 unbounded,
            0.11 at 4 (at the cap), 0.063 at 8 (sink-window at the same memory: 0.30). None = unbounded, exact
            only without RoPE.
        recent_frames: the newest committed frames kept verbatim, in a ring of slots right after the sinks,
            like a sink-window's window; a frame merges into the older, compressed entries only when it leaves
            the ring (its correspondence with the frame before it is found on entry and kept, 8 bytes per
            token). 0 merges every frame as it is committed.
        evict_by: how slots are freed at the cap: ``"age"`` evicts the oldest groups; ``"redundancy"`` first
            merges an old entry into a very similar other old entry (count-weighted mean value, counts add, the
            newer entry's key and frame stamp kept) and evicts by age only when no such pair is left. Sinks,
            the ring and entries of the committing frame are never merged away nor absorb a merge.
        compress_threshold: cosine similarity of two stored (post-RoPE) keys needed to merge them by
            redundancy, in (0, 1] (only read with ``evict_by="redundancy"``).
        plan_backend: how redundancy eviction's merge plan runs: ``"auto"`` as fused Triton kernels on CUDA
            (head dims powers of two) and as torch ops elsewhere, ``"triton"`` always fused, ``"torch"`` always
            torch ops (the reference twin; same merges and victims).
    """

    threshold: float = 0.9
    max_entries: int = 65_536
    sink_frames: int = 1
    overflow_threshold: float = 0.75
    ann: AnnConfig = field(default_factory=Int8Config)
    match_keys: Literal["pre_rope", "post_rope"] = "pre_rope"
    max_group: int | None = 8
    recent_frames: int = 0
    evict_by: Literal["age", "redundancy"] = "age"
    compress_threshold: float = 0.5
    plan_backend: Literal["auto", "torch", "triton"] = "auto"

    def __post_init__(self) -> None:
        check_eviction(self.evict_by, self.compress_threshold)
        if self.plan_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"plan_backend must be 'auto', 'torch' or 'triton', got {self.plan_backend!r}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if not 0.0 < self.overflow_threshold <= self.threshold:
            raise ValueError(
                f"overflow_threshold must be in (0, threshold={self.threshold}], got {self.overflow_threshold}"
            )
        if self.max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {self.max_entries}")
        if self.sink_frames < 0:
            raise ValueError(f"sink_frames must be >= 0, got {self.sink_frames}")
        if self.max_group is not None and self.max_group < 1:
            raise ValueError(f"max_group must be None or >= 1, got {self.max_group}")
        if not isinstance(self.recent_frames, int) or isinstance(self.recent_frames, bool) or self.recent_frames < 0:
            raise ValueError(f"recent_frames must be an int >= 0, got {self.recent_frames!r}")
        if self.match_keys not in ("pre_rope", "post_rope"):
            raise ValueError(f"match_keys must be 'pre_rope' or 'post_rope', got {self.match_keys!r}")


CachePolicy = FullPolicy | SinkWindowPolicy | BudgetPolicy | TempCachePolicy


@dataclass(frozen=True)
class CacheConfig:
    """Geometry and policy of a per-layer KV cache.

    Args:
        tokens_per_frame: tokens of one latent frame (1,560 for Wan2.1 at 480x832).
        frames_per_chunk: latent frames staged and committed together.
        policy: what a commit keeps.
        check_finite: reject NaN/Inf keys and values at stage time (costs one host sync per stage; turn it off
            in timed runs).
        commit_graphs: how TempCache runs its steady-state commit (cache at its cap, no sink frame in the
            chunk), a few hundred small kernels per layer that are launch-bound when issued one by one:
            ``"auto"`` captures it once in a CUDA graph on CUDA devices and replays it (eager elsewhere),
            ``"off"`` always runs eagerly, ``"emulate"`` runs the capture machinery without a graph (static
            inputs and outputs, replay by calling the function; for tests on any device).
        host_tier: where the entries a TempCache or sink-window commit evicts go (host memory), and how many
            blocks of them come back per chunk (:class:`~longroll.cache.host_tier.HostTierConfig`); None drops
            them.
    """

    tokens_per_frame: int
    frames_per_chunk: int
    policy: CachePolicy = field(default_factory=FullPolicy)
    check_finite: bool = True
    commit_graphs: Literal["auto", "off", "emulate"] = "auto"
    host_tier: HostTierConfig | None = None

    def __post_init__(self) -> None:
        if self.tokens_per_frame < 1:
            raise ValueError(f"tokens_per_frame must be >= 1, got {self.tokens_per_frame}")
        if self.frames_per_chunk < 1:
            raise ValueError(f"frames_per_chunk must be >= 1, got {self.frames_per_chunk}")
        if self.commit_graphs not in ("auto", "off", "emulate"):
            raise ValueError(f"commit_graphs must be 'auto', 'off' or 'emulate', got {self.commit_graphs!r}")
        if not isinstance(self.policy, FullPolicy | SinkWindowPolicy | BudgetPolicy | TempCachePolicy):
            raise ValueError(f"policy must be a cache policy config, got {type(self.policy).__name__}")
        chunk = self.chunk_tokens
        p = self.policy
        if self.host_tier is not None:
            if not isinstance(self.host_tier, HostTierConfig):
                raise ValueError(f"host_tier must be a HostTierConfig or None, got {type(self.host_tier).__name__}")
            if not isinstance(p, TempCachePolicy | SinkWindowPolicy):
                raise ValueError(
                    f"host_tier needs a TempCachePolicy or SinkWindowPolicy cache (what they evict moves to the "
                    f"host), got {type(p).__name__}"
                )
            self.host_tier.check_geometry(chunk)
        if (
            isinstance(p, TempCachePolicy)
            and p.max_entries < (p.sink_frames + p.recent_frames + self.frames_per_chunk) * self.tokens_per_frame
        ):
            recent = f", {p.recent_frames} recent frame(s)" if p.recent_frames else ""
            raise ValueError(
                f"max_entries={p.max_entries} cannot hold the {p.sink_frames} sink frame(s){recent} plus one chunk "
                f"({chunk} tokens) of {self.tokens_per_frame} tokens per frame"
            )
        if (
            isinstance(p, BudgetPolicy)
            and p.budget_tokens < (p.sink_frames + self.frames_per_chunk) * self.tokens_per_frame
        ):
            raise ValueError(
                f"budget_tokens={p.budget_tokens} cannot hold the {p.sink_frames} sink frame(s) plus one chunk "
                f"({chunk} tokens)"
            )
        if isinstance(p, SinkWindowPolicy) and p.window_frames < self.frames_per_chunk:
            raise ValueError(
                f"window_frames={p.window_frames} must hold at least one chunk ({self.frames_per_chunk} frames)"
            )

    @property
    def chunk_tokens(self) -> int:
        return self.tokens_per_frame * self.frames_per_chunk
