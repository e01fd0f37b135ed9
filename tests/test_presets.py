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


@pytest.mark.parametrize(("tpf", "fpc", "memory"), [(64, 3, 15), (1560, 3, 15), (16, 2, 4)])
def test_retrieval_preset_keeps_the_equal_cache_and_adds_its_slot_region_and_host_store(tpf, fpc, memory):
    from longroll.cache.host_tier import HostTierConfig
    from longroll.policies.config import RETRIEVAL_HOST_MEMORIES, RETRIEVAL_LAYOUT, RETRIEVAL_SLOT_MEMORIES

    ret = preset("retrieval", tokens_per_frame=tpf, frames_per_chunk=fpc, memory_frames=memory)
    tc = preset("tempcache", tokens_per_frame=tpf, frames_per_chunk=fpc, memory_frames=memory)
    exact = preset("tempcache", tokens_per_frame=tpf, frames_per_chunk=fpc, memory_frames=memory,
                   layout=RETRIEVAL_LAYOUT)  # fmt: skip
    assert ret.cache == exact.cache and ret.cache != tc.cache
    assert (ret.cache.threshold, ret.cache.overflow_threshold, ret.cache.evict_by) == (1.0, 1.0, "age")
    assert ret.host_tier == HostTierConfig(
        RETRIEVAL_HOST_MEMORIES * memory * tpf, block_tokens=tpf, top_blocks=RETRIEVAL_SLOT_MEMORIES * memory
    )
    # The device cache is the other presets'; the slot region, the stage and the index come on top of it.
    caches = {}
    for name, p in (("retrieval", ret), ("tempcache", exact)):
        cfg = CacheConfig(tpf, fpc, p.cache, host_tier=p.host_tier)
        caches[name] = LayerKVCache(cfg, batch=1, heads=2, head_dim=8, dtype=torch.float16)
    assert caches["retrieval"].capacity == caches["tempcache"].capacity == memory * tpf
    slots = caches["retrieval"].host.device_nbytes()
    assert caches["retrieval"].nbytes() == caches["tempcache"].nbytes() + slots
    assert slots >= memory * tpf * 2 * 8 * 2 * 2  # K and V of the slot region alone: entries x heads x D x 2 B
    assert caches["retrieval"].host_nbytes() >= RETRIEVAL_HOST_MEMORIES * memory * tpf * 2 * 8 * 2 * 2
    # A layout replaces retrieval's cache layout too.
    layout = TempCacheLayout(sink_frames=1, threshold=0.95, overflow_threshold=0.95, evict_by="age")
    other = preset("retrieval", tokens_per_frame=tpf, frames_per_chunk=fpc, memory_frames=memory, layout=layout)
    assert (other.cache.sink_frames, other.cache.threshold) == (1, 0.95) and other.host_tier == ret.host_tier
