import pytest
import torch
from safetensors.torch import load_file, save_file

from longroll.ann import Int8Config, LSHConfig
from longroll.cache import (
    BudgetPolicy,
    CacheConfig,
    FullPolicy,
    LayerKVCache,
    SinkWindowPolicy,
    TempCachePolicy,
)
from longroll.eval.synthetic import SceneConfig, scene_chunks
from longroll.ops.attention import attention
from longroll.ops.probes import relative_l2

P, F, H, D = 64, 2, 2, 32


def make(policy, **kw):
    cfg = CacheConfig(tokens_per_frame=kw.pop("p", P), frames_per_chunk=kw.pop("f", F), policy=policy)
    return LayerKVCache(cfg, batch=1, heads=kw.pop("h", H), head_dim=kw.pop("d", D), **kw)


def roll(caches, chunks, gen, f=F):
    for c in range(chunks):
        k, v = next(gen)
        for cache in caches:
            cache.stage(k, v, frame_start=c * f)
            cache.commit()


def snapshot(cache):
    return {k: v.clone() for k, v in cache.buffers.__dict__.items()} | {
        "host": (cache.bound, cache.committed_frames, cache.staged_tokens)
    }


def same(a, b):
    return all((torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]) for k in a)


@pytest.mark.parametrize("ann", [Int8Config(), LSHConfig(bits=16, tables=2)])
def test_tempcache_compresses_video_like_scene_accurately(ann):
    scene = SceneConfig(tokens_per_frame=P, width=8, heads=H, head_dim=D, object_tokens=2, noise=0.01)
    tc = make(TempCachePolicy(max_entries=64 * P, ann=ann))
    full = make(FullPolicy())
    roll([tc, full], 20, scene_chunks(scene, F))
    k, v = next(scene_chunks(SceneConfig(**{**scene.__dict__, "seed": 1}), F))
    for cache in (tc, full):
        cache.stage(k, v, frame_start=40)
    q = k[:, :, :P] + 0.1 * torch.randn_like(k[:, :, :P])
    rel = relative_l2(attention(q, *tc.view()).out, attention(q, *full.view()).out)
    for cache in (tc, full):
        cache.commit()
    kept = tc.mean_entries() / full.mean_entries()
    assert kept <= 0.30, kept
    assert rel <= 0.05, rel


def test_cap_holds_exactly_on_novel_content_for_1000_commits():
    p, f, cap = 16, 1, 6 * 16
    scene = SceneConfig(tokens_per_frame=p, width=4, heads=2, head_dim=16, object_tokens=1, novel=True)
    tc = make(TempCachePolicy(max_entries=cap, sink_frames=1), p=p, f=f, d=16)
    nbytes = tc.nbytes()
    gen = scene_chunks(scene, f)
    for c in range(1000):
        k, v = next(gen)
        tc.stage(k, v, frame_start=c)
        tc.commit()
        if c % 97 == 0 or c == 999:
            lengths = tc.buffers.lengths
            assert int(lengths.max()) == min(cap, (c + 1) * p)
            assert tc.nbytes() == nbytes
            valid = tc.buffers.count[:, :, :cap] > 0
            assert torch.equal(valid.sum(-1), lengths)
    # sinks survive every eviction
    assert torch.all(tc.buffers.frame[:, :, :p] == 0)
    # the newest frame is present
    assert torch.all((tc.buffers.frame[:, :, :cap] == 999).sum(-1) == p)


def test_overflow_prefers_merging_at_the_lower_threshold():
    p = 16
    scene = SceneConfig(tokens_per_frame=p, width=4, heads=1, head_dim=16, object_tokens=1, drift=0.03, noise=0.05)
    strict = make(TempCachePolicy(max_entries=4 * p, threshold=1.0, overflow_threshold=0.5), p=p, f=1, h=1, d=16)
    roll([strict], 12, scene_chunks(scene, 1), f=1)
    # threshold 1.0 never merges, but under the cap the looser threshold absorbs the drifting background
    assert float(strict.buffers.count.max()) > 1
    assert int(strict.buffers.lengths.max()) <= 4 * p


@pytest.mark.parametrize(
    "policy",
    [FullPolicy(), SinkWindowPolicy(1, 4), BudgetPolicy(budget_tokens=8 * P), TempCachePolicy(max_entries=12 * P)],
)
def test_stage_stage_commit_equals_single_commit(policy):
    gen = scene_chunks(SceneConfig(tokens_per_frame=P, width=8, heads=H, head_dim=D), F)
    a, b = make(policy), make(policy)
    for c in range(8):
        k, v = next(gen)
        junk = torch.randn_like(k)
        a.stage(junk, junk * 2, frame_start=c * F)
        a.stage(k, v, frame_start=c * F)
        b.stage(k, v, frame_start=c * F)
        a.commit()
        b.commit()
    assert same(snapshot(a), snapshot(b))


def test_sink_window_keeps_sinks_and_lengths_never_drift():
    p, f = 8, 2
    cache = make(SinkWindowPolicy(sink_frames=2, window_frames=4), p=p, f=f)
    for c in range(25):
        k = torch.full((1, H, f * p, D), float(c))
        cache.stage(k, k, frame_start=c * f)
        cache.commit()
        expect = min(c * f + f, 6) * p
        assert cache.bound == expect and torch.all(cache.buffers.lengths == expect)
    frames = cache.buffers.frame[0, 0, : 6 * p].view(6, p)[:, 0].tolist()
    assert sorted(frames) == [0, 1, 46, 47, 48, 49]
    assert torch.all(cache.buffers.k[:, :, : 2 * p] == 0.0)


def test_budget_keeps_sinks_newest_chunk_and_budget():
    gen = scene_chunks(SceneConfig(tokens_per_frame=P, width=8, heads=H, head_dim=D), F)
    cache = make(BudgetPolicy(budget_tokens=6 * P, sink_frames=1))
    roll([cache], 10, gen)
    fr = cache.buffers.frame[:, :, : 6 * P]
    assert cache.bound == 6 * P
    assert torch.all((fr == 0).sum(-1) == P)
    assert torch.all((fr >= 18).sum(-1) == 2 * P)


def test_full_policy_grows_and_keeps_everything():
    gen = scene_chunks(SceneConfig(tokens_per_frame=P, width=8, heads=H, head_dim=D), F)
    cache = make(FullPolicy(initial_frames=2))
    roll([cache], 10, gen)
    assert cache.bound == 20 * P and cache.buffers.slots >= 20 * P


def test_state_round_trips_through_safetensors(tmp_path):
    gen = scene_chunks(SceneConfig(tokens_per_frame=P, width=8, heads=H, head_dim=D), F)
    pol = TempCachePolicy(max_entries=12 * P, ann=LSHConfig(bits=12, seed=3))
    a = make(pol, layer=5)
    roll([a], 7, gen)
    save_file(a.state_dict(), tmp_path / "layer5.safetensors")
    b = make(pol, layer=5)
    b.load_state_dict(load_file(tmp_path / "layer5.safetensors"))
    for c in range(7, 10):
        k, v = next(gen)
        for cache in (a, b):
            cache.stage(k, v, frame_start=c * F)
            cache.commit()
    q = torch.randn(1, H, 10, D)
    assert torch.equal(attention(q, *a.view()).out, attention(q, *b.view()).out)


def test_head_subset_behaves_like_the_slice_of_all_heads():
    gen = scene_chunks(SceneConfig(tokens_per_frame=P, width=8, heads=4, head_dim=D), F)
    pol = TempCachePolicy(max_entries=8 * P, ann=LSHConfig(bits=10, tables=2))
    whole = make(pol, h=4, layer=2)
    shard = make(pol, h=2, layer=2, head_ids=(2, 3))
    for c in range(6):
        k, v = next(gen)
        whole.stage(k, v, frame_start=c * F)
        shard.stage(k[:, 2:].contiguous(), v[:, 2:].contiguous(), frame_start=c * F)
        whole.commit()
        shard.commit()
    assert torch.equal(whole.buffers.lengths[:, 2:], shard.buffers.lengths)
    n = shard.bound
    assert torch.equal(whole.buffers.count[:, 2:, :n], shard.buffers.count[:, :, :n])


def test_post_rope_matching_is_available():
    gen = scene_chunks(SceneConfig(tokens_per_frame=P, width=8, heads=H, head_dim=D), F)
    cache = make(TempCachePolicy(max_entries=12 * P, match_keys="post_rope"))
    roll([cache], 4, gen)
    assert cache.mean_entries() < 8 * P


# ---------------------------------------------------------------- bad input leaves the cache unchanged
@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda k, v: (k[:, :1], v[:, :1]), "k must have shape"),
        (lambda k, v: (k, v[..., :5]), "v must have shape"),
        (lambda k, v: (k.double(), v.double()), "float32"),
        (lambda k, v: (k.to("meta"), v.to("meta")), "cpu"),
        (lambda k, v: (k.index_fill(2, torch.tensor([3]), float("nan")), v), "NaN or Inf"),
        (lambda k, v: (k, v.index_fill(2, torch.tensor([3]), float("inf"))), "NaN or Inf"),
        (lambda k, v: (k[:, :, :5], v[:, :, :5]), "multiple of tokens_per_frame"),
    ],
)
def test_bad_stage_is_rejected_without_changing_state(mutate, match):
    gen = scene_chunks(SceneConfig(tokens_per_frame=P, width=8, heads=H, head_dim=D), F)
    cache = make(TempCachePolicy(max_entries=12 * P))
    roll([cache], 3, gen)
    before = snapshot(cache)
    k, v = next(gen)
    k2, v2 = mutate(k, v)
    with pytest.raises(ValueError, match=match):
        cache.stage(k2, v2, frame_start=6)
    assert same(before, snapshot(cache))


def test_wrong_frame_start_and_empty_commit():
    cache = make(FullPolicy())
    with pytest.raises(RuntimeError, match="nothing staged"):
        cache.commit()
    k = torch.randn(1, H, P, D)
    with pytest.raises(ValueError, match="frame_start must be 0"):
        cache.stage(k, k, frame_start=3)
    assert cache.staged_tokens == 0 and cache.bound == 0


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: TempCachePolicy(threshold=0.0), "threshold must be in"),
        (lambda: TempCachePolicy(threshold=1.5), "threshold must be in"),
        (lambda: TempCachePolicy(overflow_threshold=0.95), "overflow_threshold"),
        (
            lambda: CacheConfig(tokens_per_frame=P, frames_per_chunk=F, policy=TempCachePolicy(max_entries=P)),
            "max_entries",
        ),
        (
            lambda: CacheConfig(tokens_per_frame=P, frames_per_chunk=F, policy=BudgetPolicy(budget_tokens=P)),
            "budget_tokens",
        ),
        (lambda: CacheConfig(tokens_per_frame=P, frames_per_chunk=4, policy=SinkWindowPolicy(1, 2)), "window_frames"),
        (lambda: CacheConfig(tokens_per_frame=0, frames_per_chunk=F), "tokens_per_frame"),
        (lambda: LSHConfig(bits=0), "bits"),
    ],
)
def test_bad_config_is_rejected(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_commit_queries_leave_the_stage_in_place():
    cache = make(BudgetPolicy(budget_tokens=8 * P))
    k = torch.randn(1, H, F * P, D)
    cache.stage(k, k, frame_start=0)
    with pytest.raises(ValueError, match="queries must have shape"):
        cache.commit(queries=torch.randn(1, 3, 4, D))
    assert cache.staged_tokens == F * P
    cache.commit(queries=torch.randn(1, 2 * H, F * P, D))
    assert cache.bound == F * P


def test_groups_never_span_more_than_max_group_frames():
    p, f = 16, 2
    base = torch.randn(1, H, p, D)
    cache = make(TempCachePolicy(max_entries=40 * p, sink_frames=1, max_group=3), p=p, f=f)
    for c in range(10):
        k = base.repeat(1, 1, f, 1)
        cache.stage(k, torch.randn_like(k), frame_start=c * f)
        cache.commit()
    counts = cache.buffers.count[:, :, : cache.bound]
    assert counts.max() == 3
    # 20 frames: 1 sink frame verbatim, then 19 identical frames in tracks of at most 3 frames each
    assert cache.mean_entries() == p * (1 + -(-19 // 3))
