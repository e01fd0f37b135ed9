"""TempCache's verbatim recent window (``recent_frames``): the newest frames stay exact in a ring after the
sinks, and a frame merges only when it leaves the ring, exactly as it would have merged on entry."""

import pytest
import torch

from longroll.ann import Int8Config, LSHConfig
from longroll.cache import CacheConfig, LayerKVCache, TempCachePolicy
from longroll.sparse.annsa import AnnSAConfig, AnnSAPlanner

P, FPC, H, D, B = 24, 2, 3, 16, 2
S = 1


def _cache(recent, cap_frames, mode="off", ann=None, sinks=S, check_finite=True):
    policy = TempCachePolicy(
        threshold=0.9, max_entries=cap_frames * P, ann=ann or Int8Config(), sink_frames=sinks, recent_frames=recent
    )
    cfg = CacheConfig(tokens_per_frame=P, frames_per_chunk=FPC, policy=policy, commit_graphs=mode,
                      check_finite=check_finite)  # fmt: skip
    return LayerKVCache(cfg, batch=B, heads=H, head_dim=D, layer=2)


def _chunks(n, seed=0):
    """Half the tokens drift slowly (they merge), half are new every frame."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, H, P, D, generator=g)
    for c in range(n):
        frames = []
        for _ in range(FPC):
            f = base + 0.05 * torch.randn(B, H, P, D, generator=g)
            f[:, :, P // 2 :] = torch.randn(B, H, P - P // 2, D, generator=g)
            frames.append(f)
        yield c, torch.cat(frames, 2), torch.randn(B, H, FPC * P, D, generator=g)


def _run(cache, chunks):
    for c, k, v in chunks:
        cache.stage(k, v, frame_start=c * FPC, k_match=k)
        cache.commit()


@pytest.mark.parametrize("recent", [1, 2, 3])
def test_newest_frames_stay_verbatim_in_the_ring(recent):
    cache = _cache(recent, cap_frames=8)
    frames = {}
    for c, k, v in _chunks(6):
        for i in range(FPC):
            frames[c * FPC + i] = (k[:, :, i * P : (i + 1) * P], v[:, :, i * P : (i + 1) * P])
        cache.stage(k, v, frame_start=c * FPC, k_match=k)
        cache.commit()
    buf, last = cache.buffers, cache.committed_frames - 1
    for f in range(last - recent + 1, last + 1):
        r = (f - S) % recent
        sl = slice((S + r) * P, (S + r + 1) * P)
        torch.testing.assert_close(buf.k[:, :, sl], frames[f][0], rtol=0, atol=0)
        torch.testing.assert_close(buf.v[:, :, sl], frames[f][1], rtol=0, atol=0)
        assert bool((buf.count[:, :, sl] == 1).all()) and bool((buf.frame[:, :, sl] == f).all())
    # the sinks are untouched too
    torch.testing.assert_close(buf.k[:, :, : S * P], frames[0][0], rtol=0, atol=0)
    assert cache.pinned_tokens == (S + recent) * P


@pytest.mark.parametrize("ann", [Int8Config(), LSHConfig(bits=6, tables=2)])
def test_older_region_equals_merging_on_entry_delayed_by_the_ring(ann):
    """Below the cap, the merged region of a ring cache after N frames holds exactly what a ring-less cache
    holds after N - W frames (the same merges, W frames later), shifted past the ring."""
    w, n_chunks = 2, 5
    ring = _cache(w, cap_frames=40, ann=ann)
    plain = _cache(0, cap_frames=40, ann=ann)
    chunks = list(_chunks(n_chunks))
    _run(ring, chunks)
    _run(plain, chunks[: n_chunks - w // FPC])
    rb, pb = ring.buffers, plain.buffers
    torch.testing.assert_close(rb.lengths, pb.lengths + w * P, rtol=0, atol=0)
    n_plain = int(pb.lengths.max())
    # slots past a head's length hold stale staged data, which differs (the chunks were staged elsewhere)
    valid = torch.arange(S * P, n_plain) < pb.lengths[..., None]
    for name in ("k", "v", "count", "frame"):
        got = getattr(rb, name)[:, :, (S + w) * P : n_plain + w * P]
        want = getattr(pb, name)[:, :, S * P : n_plain]
        mask = valid if got.dim() == 3 else valid[..., None]
        torch.testing.assert_close(got * mask, want * mask, rtol=0, atol=0)


def test_ring_at_the_cap_keeps_sinks_and_ring_and_respects_the_cap():
    w, cap = 2, 6
    cache = _cache(w, cap_frames=cap, check_finite=False)
    seen = {}
    for c, k, v in _chunks(12, seed=3):
        for i in range(FPC):
            seen[c * FPC + i] = k[:, :, i * P : (i + 1) * P]
        cache.stage(k, v, frame_start=c * FPC, k_match=k)
        cache.commit()
        assert int(cache.buffers.lengths.max()) <= cap * P
    buf, last = cache.buffers, cache.committed_frames - 1
    torch.testing.assert_close(buf.k[:, :, : S * P], seen[0], rtol=0, atol=0)
    for f in (last - 1, last):
        r = (f - S) % w
        torch.testing.assert_close(buf.k[:, :, (S + r) * P : (S + r + 1) * P], seen[f], rtol=0, atol=0)
    # the older region holds only frames that left the ring, and it is full at the cap
    older = buf.frame[:, :, (S + w) * P : cap * P]
    assert bool((older >= S).all()) and bool((older <= last - w).all())
    assert bool((buf.lengths == cap * P).all())


@pytest.mark.parametrize("ann", [Int8Config(), LSHConfig(bits=6, tables=2)])
def test_captured_ring_commit_equals_eager(ann):
    eager, graphed = _cache(2, 6, "off", ann), _cache(2, 6, "emulate", ann)
    for c, k, v in _chunks(10, seed=1):
        for cache in (eager, graphed):
            cache.stage(k, v, frame_start=c * FPC, k_match=k)
        torch.testing.assert_close(graphed.commit(), eager.commit(), rtol=0, atol=0)
        for name in ("k", "v", "count", "frame", "lengths"):
            torch.testing.assert_close(getattr(graphed.buffers, name)[:, :, :-1] if name != "lengths" else
                                       graphed.buffers.lengths, getattr(eager.buffers, name)[:, :, :-1]
                                       if name != "lengths" else eager.buffers.lengths, rtol=0, atol=0)  # fmt: skip
        assert graphed.recent is not None and eager.recent is not None
        torch.testing.assert_close(graphed.recent.idx, eager.recent.idx, rtol=0, atol=0)
        torch.testing.assert_close(graphed.recent.cos, eager.recent.cos, rtol=0, atol=0)
    assert graphed.commit_capture.captured


def test_resume_with_a_ring_is_bit_identical():
    chunks = list(_chunks(9, seed=2))
    whole = _cache(2, 6)
    _run(whole, chunks)
    first = _cache(2, 6)
    _run(first, chunks[:5])
    state = first.state_dict()
    assert state["recent_idx"].shape == (B, H, 2, P) and state["recent_cos"].dtype == torch.float32
    resumed = _cache(2, 6)
    resumed.load_state_dict(state)
    _run(resumed, chunks[5:])
    for name in ("k", "v", "count", "frame", "lengths"):
        torch.testing.assert_close(getattr(resumed.buffers, name), getattr(whole.buffers, name), rtol=0, atol=0)


def test_bad_ring_state_is_refused_and_changes_nothing():
    cache = _cache(2, 6)
    _run(cache, list(_chunks(4)))
    state = cache.state_dict()
    target = _cache(2, 6)
    before = target.state_dict()
    for key, bad in (
        ("recent_idx", state["recent_idx"].clone().fill_(P)),
        ("recent_cos", state["recent_cos"].clone().fill_(float("nan"))),
        ("recent_idx", state["recent_idx"].long()),
    ):
        with pytest.raises(ValueError, match=key):
            target.load_state_dict(state | {key: bad})
    with pytest.raises(ValueError, match="recent_cos"):
        target.load_state_dict({k: v for k, v in state.items() if k != "recent_cos"})
    after = target.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)


def test_annsa_plan_leaves_the_ring_in_place():
    cache = _cache(2, 8)
    _run(cache, list(_chunks(6)))
    pinned = cache.pinned_tokens
    before = cache.buffers.k[:, :, :pinned].clone()
    plan = AnnSAPlanner(AnnSAConfig(ann=Int8Config(), q_block_size=16, kv_block_size=16, anchors=4)).plan(cache)
    assert plan.start == pinned
    plan.apply_to(cache)
    torch.testing.assert_close(cache.buffers.k[:, :, :pinned], before, rtol=0, atol=0)


def test_recent_frames_is_validated():
    with pytest.raises(ValueError, match="recent_frames"):
        TempCachePolicy(recent_frames=-1)
    with pytest.raises(ValueError, match="recent_frames"):
        TempCachePolicy(recent_frames=True)
    with pytest.raises(ValueError, match="2 recent frame"):
        CacheConfig(tokens_per_frame=P, frames_per_chunk=FPC,
                    policy=TempCachePolicy(max_entries=4 * P, sink_frames=1, recent_frames=2))  # fmt: skip
