"""One typed config that chooses, per layer and denoising step, how attention is computed during a rollout."""

from __future__ import annotations

from dataclasses import dataclass, field

from longroll.ann.config import Int8Config, LSHConfig
from longroll.cache.config import BudgetPolicy, CachePolicy, FullPolicy, SinkWindowPolicy, TempCachePolicy
from longroll.ops.attention import BACKENDS, Backend


@dataclass(frozen=True)
class PolicyConfig:
    """What a rollout does to attention.

    Args:
        name: label used in reports.
        cache: commit policy of every layer's KV cache.
        attention_backend: dense attention route (see :func:`longroll.ops.attention.attention`).
    """

    name: str = "dense"
    cache: CachePolicy = field(default_factory=FullPolicy)
    attention_backend: Backend = "auto"

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name must be a non-empty string")
        if self.attention_backend not in BACKENDS:
            raise ValueError(f"attention_backend must be one of {BACKENDS}, got {self.attention_backend!r}")


#: Cache budgets of the presets, in latent frames. The sink-window baseline is LongLive's (sink 3 + window 12);
#: the budget and TempCache presets get the same memory (15 frames) so that quality compares at equal memory.
SINK_FRAMES = 3
WINDOW_FRAMES = 12
EQUAL_MEMORY_FRAMES = SINK_FRAMES + WINDOW_FRAMES


def preset(
    name: str, *, tokens_per_frame: int, frames_per_chunk: int, memory_frames: int = EQUAL_MEMORY_FRAMES
) -> PolicyConfig:
    """A named policy at a model's geometry.

    Names: ``dense`` (unbounded cache), ``sink_window`` (LongLive), ``budget`` (importance budget),
    ``tempcache`` and ``tempcache_lsh`` (temporal-correspondence merging, int8 or LSH matching).
    ``memory_frames`` sets the budget/cap of the bounded policies, in latent frames.
    """
    if memory_frames < frames_per_chunk + 1:
        raise ValueError(f"memory_frames must exceed frames_per_chunk={frames_per_chunk}, got {memory_frames}")
    budget = memory_frames * tokens_per_frame
    sink = 1
    window_sink = min(SINK_FRAMES, memory_frames - frames_per_chunk)
    table: dict[str, PolicyConfig] = {
        "dense": PolicyConfig("dense", FullPolicy()),
        "sink_window": PolicyConfig("sink_window", SinkWindowPolicy(window_sink, memory_frames - window_sink)),
        "budget": PolicyConfig("budget", BudgetPolicy(budget_tokens=budget, sink_frames=sink)),
        "tempcache": PolicyConfig("tempcache", TempCachePolicy(max_entries=budget, sink_frames=sink, ann=Int8Config())),
        "tempcache_lsh": PolicyConfig(
            "tempcache_lsh", TempCachePolicy(max_entries=budget, sink_frames=sink, ann=LSHConfig(bits=16, tables=2))
        ),
    }
    if name not in table:
        raise ValueError(f"policy must be one of {sorted(table)}, got {name!r}")
    return table[name]


PRESET_NAMES: tuple[str, ...] = ("dense", "sink_window", "budget", "tempcache", "tempcache_lsh")

__all__ = ["EQUAL_MEMORY_FRAMES", "PRESET_NAMES", "PolicyConfig", "preset"]
