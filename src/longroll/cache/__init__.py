"""Typed per-layer KV caches with stage/commit semantics and commit policies (full, sink-window, budget,
TempCache)."""

from longroll.cache.buffers import CacheBuffers
from longroll.cache.config import (
    BudgetPolicy,
    CacheConfig,
    CachePolicy,
    FullPolicy,
    SinkWindowPolicy,
    TempCachePolicy,
)
from longroll.cache.kv_cache import STATE_FORMAT, CacheView, LayerKVCache, LoadedState

__all__ = [
    "STATE_FORMAT",
    "BudgetPolicy",
    "CacheBuffers",
    "CacheConfig",
    "CachePolicy",
    "CacheView",
    "FullPolicy",
    "LayerKVCache",
    "LoadedState",
    "SinkWindowPolicy",
    "TempCachePolicy",
]
