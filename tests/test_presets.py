"""The policy presets compare at equal memory: equal sinks, equal bytes; TempCache's layout is typed config."""

import pytest
import torch

from longroll.cache.config import BudgetPolicy, CacheConfig, SinkWindowPolicy, TempCachePolicy
from longroll.cache.kv_cache import LayerKVCache
from longroll.policies.config import PRESET_NAMES, SINK_FRAMES, TempCacheLayout, preset

BOUNDED = ("sink_window", "budget", "tempcache", "tempcache_lsh", "all", "all_int8")


def _sinks(policy):
    return policy.cache.sink_frames


@pytest.mark.parametrize(("tpf", "fpc", "memory"), [(64, 3, 15), (1560, 3, 21), (16, 2, 4), (7, 1, 2)])
def test_bounded_presets_hold_equal_sinks_and_equal_bytes(tpf, fpc, memory):
    pols = {n: preset(n, tokens_per_frame=tpf, frames_per_chunk=fpc, memory_frames=memory) for n in BOUNDED}
    sinks = {n: _sinks(p) for n, p in pols.items()}
    assert set(sinks.values()) == {min(SINK_FRAMES, memory - fpc)}, sinks
    nbytes = {}
    for name, p in pols.items():
        cache = LayerKVCache(CacheConfig(tpf, fpc, p.cache), batch=1, heads=2, head_dim=8, dtype=torch.float16)
        assert cache.capacity == memory * tpf, name
        nbytes[name] = cache.buffers.nbytes()
        # TempCache's ring correspondences come on top of the equal KV storage: 8 bytes per ring token
        ring = 0 if cache.recent is None else 8 * cache.recent.idx.numel()
        assert cache.nbytes() == nbytes[name] + ring, name
    assert len(set(nbytes.values())) == 1, nbytes
    assert {type(pols[n].cache) for n in BOUNDED} == {SinkWindowPolicy, BudgetPolicy, TempCachePolicy}


def test_every_preset_name_builds():
    for name in PRESET_NAMES:
        assert preset(name, tokens_per_frame=64, frames_per_chunk=3).name == name


def test_tempcache_layout_sets_the_tempcache_presets():
    layout = TempCacheLayout(sink_frames=5, threshold=0.95, overflow_threshold=0.8, max_group=4)
    for name in ("tempcache", "tempcache_lsh", "all", "all_int8"):
        tc = preset(name, tokens_per_frame=64, frames_per_chunk=3, layout=layout).cache
        assert isinstance(tc, TempCachePolicy)
        assert (tc.sink_frames, tc.threshold, tc.overflow_threshold, tc.max_group) == (5, 0.95, 0.8, 4)
        assert tc.max_entries == 15 * 64
    # The layout never touches the other presets, and its sinks are clamped like theirs.
    assert preset("sink_window", tokens_per_frame=64, frames_per_chunk=3, layout=layout).cache.sink_frames == 3
    small = preset("tempcache", tokens_per_frame=64, frames_per_chunk=3, memory_frames=6, layout=layout)
    assert small.cache.sink_frames == 3
    default = preset("tempcache", tokens_per_frame=64, frames_per_chunk=3).cache
    assert (default.sink_frames, default.threshold, default.max_group, default.recent_frames) == (
        SINK_FRAMES, 0.9, 16, 3
    )


def test_tempcache_layout_validation():
    bad = [
        {"sink_frames": -1}, {"sink_frames": 1.5}, {"threshold": 0.0}, {"threshold": 1.2},
        {"overflow_threshold": 0.95}, {"overflow_threshold": 0.0}, {"max_group": 0},
    ]  # fmt: skip
    for kwargs in bad:
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            TempCacheLayout(**kwargs)
    with pytest.raises(ValueError, match="layout"):
        preset("tempcache", tokens_per_frame=64, frames_per_chunk=3, layout="wide")  # type: ignore[arg-type]
