"""A group of layers' TempCaches over one stacked storage commits all layers in one batched call, with the same
result as every layer committing on its own (each layer hashes with its own projections)."""

import pytest
import torch

from longroll.ann import Int8Config, LSHConfig, SignLSH, StackedSignLSH
from longroll.cache import CacheConfig, LayerKVCache, TempCachePolicy
from longroll.cache.group import CacheGroup
from longroll.sparse.annsa import AnnSAConfig, AnnSAPlanner

P, FPC, H, D, B, L = 24, 2, 3, 16, 2, 3


def _config(ann, recent, mode):
    policy = TempCachePolicy(threshold=0.9, max_entries=7 * P, ann=ann, sink_frames=1, recent_frames=recent)
    return CacheConfig(tokens_per_frame=P, frames_per_chunk=FPC, policy=policy, commit_graphs=mode)


def _chunks(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(L, B, H, P, D, generator=g)
    for c in range(n):
        frames = []
        for _ in range(FPC):
            f = base + 0.05 * torch.randn(L, B, H, P, D, generator=g)
            f[..., P // 2 :, :] = torch.randn(L, B, H, P - P // 2, D, generator=g)
            frames.append(f)
        yield c, torch.cat(frames, 3), torch.randn(L, B, H, FPC * P, D, generator=g)


def _run_group(group, chunks, planners=None):
    for c, k, v in chunks:
        group.begin()
        for i, cache in enumerate(group.caches):
            cache.stage(k[i], v[i], frame_start=c * FPC, k_match=k[i] * 2.0)
            group.stage_match(i, k[i] * 2.0)
        group.commit()
        for i, cache in enumerate(group.caches):
            if planners is not None:
                planners[i].plan(cache)


def _run_alone(caches, chunks, planners=None):
    for c, k, v in chunks:
        for i, cache in enumerate(caches):
            cache.stage(k[i], v[i], frame_start=c * FPC, k_match=k[i] * 2.0)
            cache.commit()
            if planners is not None:
                planners[i].plan(cache)


def _assert_same(group, caches):
    for gc, alone in zip(group.caches, caches, strict=True):
        valid = torch.arange(gc.buffers.slots) < alone.buffers.lengths[..., None]
        for name in ("k", "v", "count", "frame"):
            got, want = getattr(gc.buffers, name)[:, :, :-1], getattr(alone.buffers, name)[:, :, :-1]
            mask = valid if got.dim() == 3 else valid[..., None]
            torch.testing.assert_close(got * mask, want * mask, rtol=0, atol=0)
        torch.testing.assert_close(gc.buffers.lengths, alone.buffers.lengths, rtol=0, atol=0)
        assert gc.committed_frames == alone.committed_frames
        for a, b in zip((gc.track.slots, gc.track.keys, gc.track.active),
                        (alone.track.slots, alone.track.keys, alone.track.active), strict=True):  # fmt: skip
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        if alone.recent is not None:
            torch.testing.assert_close(gc.recent.idx, alone.recent.idx, rtol=0, atol=0)
            torch.testing.assert_close(gc.recent.cos, alone.recent.cos, rtol=0, atol=0)


@pytest.mark.parametrize("ann", [Int8Config(), LSHConfig(bits=6, tables=2)])
@pytest.mark.parametrize(("recent", "mode"), [(0, "off"), (2, "off"), (2, "emulate")])
def test_group_commit_equals_each_layer_committing_alone(ann, recent, mode):
    cfg = _config(ann, recent, mode)
    group = CacheGroup(cfg, layers=L, batch=B, heads=H, head_dim=D)
    alone = [LayerKVCache(cfg, batch=B, heads=H, head_dim=D, layer=i) for i in range(L)]
    chunks = list(_chunks(8))
    _run_group(group, chunks)
    _run_alone(alone, chunks)
    _assert_same(group, alone)
    if mode == "emulate":
        assert group.stacked.commit_capture.captured
    # one storage: the layers' buffers are views of the stacked one
    assert group.caches[1].buffers.k.data_ptr() == group.stacked.buffers.k[B].data_ptr()


@pytest.mark.parametrize("ann", [Int8Config(), LSHConfig(bits=6, tables=2)])
def test_group_of_later_layers_hashes_as_those_layers(ann):
    """A group that starts at model layer 5 commits like layers 5.. committing alone (its projections are
    theirs, not layers 0..'s), and refuses a bad first layer."""
    cfg = _config(ann, 2, "emulate")
    group = CacheGroup(cfg, layers=L, batch=B, heads=H, head_dim=D, first_layer=5)
    assert [c.layer for c in group.caches] == [5, 6, 7] and group.first_layer == 5
    alone = [LayerKVCache(cfg, batch=B, heads=H, head_dim=D, layer=5 + i) for i in range(L)]
    chunks = list(_chunks(8, seed=3))
    _run_group(group, chunks)
    _run_alone(alone, chunks)
    _assert_same(group, alone)
    for bad in (-1, True, 1.0):
        with pytest.raises(ValueError, match="first_layer"):
            CacheGroup(cfg, layers=L, batch=B, heads=H, head_dim=D, first_layer=bad)


def test_group_with_annsa_plans_and_resume_matches_alone():
    cfg = _config(Int8Config(), 2, "emulate")
    sa = AnnSAConfig(ann=Int8Config(), q_block_size=16, kv_block_size=16, anchors=4)
    group = CacheGroup(cfg, layers=L, batch=B, heads=H, head_dim=D)
    alone = [LayerKVCache(cfg, batch=B, heads=H, head_dim=D, layer=i) for i in range(L)]
    chunks = list(_chunks(9, seed=4))
    _run_group(group, chunks[:5], [AnnSAPlanner(sa) for _ in range(L)])
    states = [c.state_dict() for c in group.caches]
    resumed = CacheGroup(cfg, layers=L, batch=B, heads=H, head_dim=D)
    for c, s in zip(resumed.caches, states, strict=True):
        c.load_state_dict(s)
    planners = [AnnSAPlanner(sa) for _ in range(L)]
    _run_group(resumed, chunks[5:], planners)
    _run_alone(alone, chunks[:5], [AnnSAPlanner(sa) for _ in range(L)])
    _run_alone(alone, chunks[5:], [AnnSAPlanner(sa) for _ in range(L)])
    _assert_same(resumed, alone)


def test_stacked_lsh_hashes_each_layer_with_its_own_projections():
    cfg = LSHConfig(bits=6, tables=2)
    own = [SignLSH(cfg, D, layer=i, head_ids=range(H)) for i in range(L)]
    stacked = StackedSignLSH(own, B)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2 * L * B, H, 5, D, generator=g)
    c = torch.randn(2 * L * B, H, 7, D, generator=g)
    got = stacked.top1(q, c).view(2, L, B, H, 5)
    for r in range(2):
        for i in range(L):
            rows = slice((r * L + i) * B, (r * L + i + 1) * B)
            torch.testing.assert_close(got[r, i], own[i].top1(q[rows], c[rows]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="x must have shape"):
        stacked.top1(q[:1], c[:1])
    with pytest.raises(ValueError, match="share one config"):
        StackedSignLSH([own[0], SignLSH(LSHConfig(bits=4), D, layer=1, head_ids=range(H))], B)


def test_group_refuses_layers_out_of_step():
    cfg = _config(Int8Config(), 0, "off")
    group = CacheGroup(cfg, layers=L, batch=B, heads=H, head_dim=D)
    _, k, v = next(_chunks(1))
    group.begin()
    group.caches[0].stage(k[0], v[0], frame_start=0)
    with pytest.raises(RuntimeError, match="same staged chunk"):
        group.commit()
    with pytest.raises(ValueError, match="k_match must have shape"):
        group.stage_match(1, k[1])
    with pytest.raises(ValueError, match="TempCachePolicy"):
        CacheGroup(CacheConfig(P, FPC), layers=L, batch=B, heads=H, head_dim=D)


@pytest.mark.parametrize(("rows", "budget"), [(7, 1), (7, 97), (5, 10**9)])
def test_argmax_by_rows_equals_one_argmax(rows, budget):
    from longroll.ann.slices import argmax_by_rows

    s = torch.randn(rows, 2, 3, 11, generator=torch.Generator().manual_seed(rows))
    got = argmax_by_rows(lambda r: s[r], rows, 2 * 3 * 11, budget=budget)
    torch.testing.assert_close(got, s.argmax(-1), rtol=0, atol=0)
