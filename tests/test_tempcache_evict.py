"""TempCache eviction by redundancy (``evict_by="redundancy"``): at the cap, near-duplicate old entries merge
into one another before anything old is evicted; the search is a sorted sign-LSH pass (linear-ish in the cap)
with a plain-loop twin."""

import math

import pytest
import torch
import torch.nn.functional as F

from longroll.ann import Int8Config, LSHConfig
from longroll.cache import CacheBuffers, CacheConfig, LayerKVCache, TempCachePolicy
from longroll.cache.group import CacheGroup
from longroll.cache.host_tier import HostTierConfig
from longroll.cache.redundancy import (
    BITS,
    TABLES,
    _sum_by_key,
    apply_merges,
    min_agreement,
    pair_candidates,
    pair_candidates_reference,
    plan_merges,
    plan_merges_reference,
    verify_merges,
    victims,
)
from longroll.cache.tempcache import _new_slots
from longroll.eval.memory import parse_layout
from longroll.ops.neighbours import popcount64
from longroll.policies.config import TempCacheLayout, preset

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

P, FPC, H, D, B = 24, 2, 3, 16, 2
INF = float("inf")


def _policy(evict_by="redundancy", compress=0.5, cap_frames=9, recent=2, sinks=1, **kw):
    return TempCachePolicy(
        threshold=0.9, max_entries=cap_frames * P, sink_frames=sinks, recent_frames=recent, evict_by=evict_by,
        compress_threshold=compress, **kw,
    )  # fmt: skip


def _cache(policy, mode="off", host=None, batch=B, layer=0):
    cfg = CacheConfig(tokens_per_frame=P, frames_per_chunk=FPC, policy=policy, commit_graphs=mode, host_tier=host)
    return LayerKVCache(cfg, batch=batch, heads=H, head_dim=D, layer=layer)


def _chunks(n, seed=0, spread=0.5, batch=B):
    """Frames around a fixed scene (old frames stay similar to one another: redundant), values random."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, H, P, D, generator=g)
    for c in range(n):
        k = torch.cat([base + spread * torch.randn(batch, H, P, D, generator=g) for _ in range(FPC)], 2)
        yield c, k, torch.randn(batch, H, FPC * P, D, generator=g)


def _run(cache, chunks):
    for c, k, v in chunks:
        cache.stage(k, v, frame_start=c * FPC, k_match=k)
        cache.commit()
    return cache


def _state(cache):
    buf, n = cache.buffers, cache.capacity
    valid = torch.arange(n) < buf.lengths[..., None]
    return {
        "k": buf.k[:, :, :n] * valid[..., None],
        "v": buf.v[:, :, :n] * valid[..., None],
        "count": buf.count[:, :, :n] * valid,
        "frame": torch.where(valid, buf.frame[:, :, :n], -1),
        "lengths": buf.lengths,
    }


def _assert_same(a, b):
    for name, x in _state(a).items():
        torch.testing.assert_close(x, _state(b)[name], rtol=0, atol=0, msg=name)


def _keys(b, h, n, d, seed, protect=0.2, nan=False):
    g = torch.Generator().manual_seed(seed)
    groups = max(1, n // 3)
    base = torch.randn(b, h, groups, d, generator=g)
    x = base[:, :, torch.randint(0, groups, (n,), generator=g)] + 0.3 * torch.randn(b, h, n, d, generator=g)
    if nan:
        x[0, 0, n // 2] = float("nan")
    x = F.normalize(x, dim=-1)
    prot = torch.rand(b, h, n, generator=g) < protect
    return x, prot


# ------------------------------------------------------------------------------------------ fast == reference
@pytest.mark.parametrize(("b", "h", "n", "d"), [(2, 3, 97, 16), (1, 2, 7, 5), (1, 1, 1, 4), (2, 1, 155, 9)])
def test_pair_candidates_equal_the_reference_on_odd_shapes(b, h, n, d):
    x, prot = _keys(b, h, n, d, seed=n, nan=n > 10)
    score, nn = pair_candidates(x, prot)
    ref_score, ref_nn = pair_candidates_reference(x, prot)
    torch.testing.assert_close(score, ref_score, rtol=0, atol=0)
    found = score > -INF
    torch.testing.assert_close(nn[found], ref_nn[found], rtol=0, atol=0)
    assert not bool(found[prot].any()), "protected entries must not propose"
    if n > 10:
        assert bool(found.any()), "clustered keys must find candidates (the test must be able to fail)"
        assert not bool(found[0, 0, n // 2]), "a NaN key has no candidate"
        assert not bool((nn[0, 0][found[0, 0]] == n // 2).any()), "nor is it anyone's candidate"


@pytest.mark.parametrize(("b", "h", "n", "k"), [(2, 3, 97, 7), (1, 2, 7, 7), (2, 2, 155, 97), (1, 1, 31, 40)])
def test_plan_merges_equals_the_reference(b, h, n, k):
    x, prot = _keys(b, h, n, 8, seed=k + n)
    score, nn = pair_candidates(x, prot)
    g = torch.Generator().manual_seed(n)
    # Few distinct priorities: ties between old entries are the common case (same frame, count 1).
    prio = (torch.randint(0, 4, (b, h, n), generator=g).double() * 2**24 + 1).masked_fill(prot, INF)
    need = torch.randint(-1, min(k, n // 3) + 2, (b, h), generator=g)  # beyond half the pool: merges limited
    freed, into, sel = plan_merges(score, nn, prio, need, k, min_agreement(0.5))
    ref = plan_merges_reference(score, nn, prio, need, k, min_agreement(0.5))
    total = 0
    for bi in range(b):
        for hi in range(h):
            got = [(int(f), int(s)) for f, s, ok in zip(freed[bi, hi], into[bi, hi], sel[bi, hi], strict=True) if ok]
            assert got == ref[bi][hi]
            total += len(got)
            # a prefix of ranks; merged-away entries are distinct and never survivors; nothing protected
            assert bool(sel[bi, hi].long().diff().le(0).all()) if sel.shape[-1] > 1 else True
            fs, ss = {f for f, _ in got}, {s for _, s in got}
            assert len(fs) == len(got) and not fs & ss
            assert not any(bool(prot[bi, hi, i]) for i in fs | ss)
    if n > 10:
        assert total > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("b", "h", "k", "c"), [(2, 3, 97, 5), (1, 2, 1025, 64), (1, 1, 1, 3)])
def test_sums_by_key_are_exact_to_fixed_point_and_the_same_every_run(device, b, h, k, c):
    """Many rows into few keys: the sums are the exact (float64) ones to within the fixed point's resolution,
    and the same on every run (CUDA's float scatter_add adds colliding rows in thread order)."""
    g = torch.Generator().manual_seed(k)
    key = torch.randint(0, max(1, k // 8), (b, h, k), generator=g)
    x = torch.randn(b, h, k, c, generator=g) * torch.logspace(-3, 3, c)
    ref = torch.zeros(b, h, k, c, dtype=torch.float64).scatter_add_(2, key[..., None].expand(b, h, k, c), x.double())
    got = _sum_by_key(key.to(device), x.to(device))
    assert got.dtype == torch.float64
    resolution = k * float(x.abs().max()) * 2.0**-61
    assert float((got.cpu() - ref).abs().max()) <= resolution
    for _ in range(5):
        assert torch.equal(_sum_by_key(key.to(device), x.to(device)), got)


@pytest.mark.parametrize("device", DEVICES)
def test_sums_by_key_keep_nan_and_inf(device):
    key = torch.tensor([[[0, 0, 1, 1, 2, 2]]], device=device)
    x = torch.tensor([1.0, float("nan"), float("inf"), 2.0, 3.0, 4.0], device=device).view(1, 1, 6, 1)
    got = _sum_by_key(key, x)[0, 0, :3, 0].cpu()
    assert got[0].isnan() and got[1] == float("inf") and got[2] == 7.0
    zeros = _sum_by_key(key, torch.zeros_like(x))
    assert torch.equal(zeros, torch.zeros_like(zeros))


@pytest.mark.parametrize("device", DEVICES)
def test_many_merges_into_one_survivor_are_the_same_every_run(device):
    """apply_merges with every selected rank folding into one of two survivors: count-weighted means and summed
    counts, and one result run after run."""
    b, h, n, k, dv = 1, 2, 300, 200, 16
    v = torch.randn(b, h, n, dv, generator=torch.Generator().manual_seed(1))
    count = torch.randint(1, 5, (b, h, n), generator=torch.Generator().manual_seed(2)).float()
    freed = torch.arange(2, 2 + k).expand(b, h, k)  # ranks alternate between survivors 0 and 1
    into = (torch.arange(k) % 2).expand(b, h, k)

    def merged() -> tuple[torch.Tensor, torch.Tensor]:
        buf = CacheBuffers.allocate(b, h, n, 8, dv, torch.float32, torch.device(device))
        buf.v[:, :, :n], buf.count[:, :, :n] = v, count
        sel = torch.ones(b, h, k, dtype=torch.bool, device=device)
        apply_merges(buf, freed.to(device), into.to(device), sel)
        return buf.v[:, :, :2].cpu(), buf.count[:, :, :2].cpu()

    v0, c0 = merged()
    for s in range(2):
        members = [s, *range(2 + s, 2 + k, 2)]
        w = count[:, :, members]
        torch.testing.assert_close(c0[:, :, s], w.sum(-1), rtol=0, atol=0)
        torch.testing.assert_close(v0[:, :, s], (v[:, :, members] * w[..., None]).sum(2) / w.sum(-1)[..., None])
    for _ in range(5):
        again = merged()
        assert torch.equal(again[0], v0) and torch.equal(again[1], c0)


def test_popcount_of_any_int64_including_the_sign_bit():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.tensor([0, -1, 1, -(2**63), 2**63 - 1, 0x0101010101010101]),
                   torch.randint(-(2**63), 2**63 - 1, (500,), generator=g)])  # fmt: skip
    want = [bin(v & (2**64 - 1)).count("1") for v in x.tolist()]
    assert popcount64(x).tolist() == want


def test_signature_agreement_ranks_and_the_exact_cosine_decides():
    assert min_agreement(1.0) == TABLES * BITS and min_agreement(0.0) == TABLES * BITS / 2
    assert min_agreement(-1.0) == 0.0
    g = torch.Generator().manual_seed(3)
    base = F.normalize(torch.randn(1, 1, 4, 32, generator=g), dim=-1)
    # Entries 0/1: a near-duplicate pair; 2/3: a pair at cosine ~0.6 (shares bits, fails a 0.9 threshold).
    keys = torch.cat([base[:, :, :1], base[:, :, :1] + 0.01 * base[:, :, 1:2], base[:, :, 2:3],
                      0.6 * base[:, :, 2:3] + 0.8 * base[:, :, 3:4]], 2)  # fmt: skip
    score, nn = pair_candidates(keys, torch.zeros(1, 1, 4, dtype=torch.bool))
    assert score[0, 0, 0] >= score[0, 0, 2] and nn[0, 0, 0] == 1
    freed = torch.tensor([[[2, 0, 1]]])
    into = torch.tensor([[[3, 1, 0]]])
    sel = torch.tensor([[[True, True, False]]])
    f2, i2, s2 = verify_merges(keys, freed, into, sel, 0.9)
    # The 2 -> 3 merge is rejected by its exact cosine; the accepted 0 -> 1 moves to the front (a prefix).
    assert f2.tolist() == [[[0, 2, 1]]] and i2.tolist() == [[[1, 3, 0]]] and s2.tolist() == [[[True, False, False]]]
    f3, _, s3 = verify_merges(keys, freed, into, sel, 0.5)
    assert f3.tolist() == freed.tolist() and s3.tolist() == sel.tolist()


# ------------------------------------------------------------------------------------------ function level
def _buffers(k, v, count, frame):
    b, h, n, d = k.shape
    buf = CacheBuffers.allocate(b, h, n, d, v.shape[-1], torch.float32, torch.device("cpu"))
    buf.k[:, :, :n], buf.v[:, :, :n], buf.count[:, :, :n], buf.frame[:, :, :n] = k, v, count, frame
    buf.lengths.fill_(n)
    return buf


def _attend(q, buf, n):
    logits = q @ buf.k[:, :, :n].transpose(-1, -2) + torch.log(buf.count[:, :, :n])[:, :, None]
    return torch.softmax(logits, -1) @ buf.v[:, :, :n]


def test_merging_identical_keys_leaves_attention_unchanged():
    """Lemma 5.1: entries with identical keys merged with counts and count-weighted values attend exactly as the
    separate entries (the freed slot removed)."""
    b, h, n, d = 2, 3, 41, 8
    g = torch.Generator().manual_seed(1)
    distinct = torch.randn(b, h, (n + 1) // 2, d, generator=g)
    k = distinct[:, :, torch.arange(n) // 2]  # pairs of identical keys (and one single)
    v = torch.randn(b, h, n, d, generator=g)
    count = torch.randint(1, 4, (b, h, n), generator=g).float()
    frame = torch.randint(1, 5, (b, h, n), generator=g).int()
    buf = _buffers(k, v, count, frame)
    q = torch.randn(b, h, 5, d, generator=g)
    before = _attend(q, buf, n)
    prio = frame.double() * 2**24 + count.double()
    need = torch.full((b, h), 7)
    slots, merged = victims(buf, prio, need, 11, 0.99)
    assert bool((merged == 7).all()), "identical pairs must serve every needed slot"
    freed = slots[:, :, :7]
    buf.count.scatter_(2, freed, 0.0)  # the freed slots leave the cache
    after = _attend(q, buf, n)
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)
    assert float(buf.count[:, :, :n].sum()) == float(count.sum())


def test_nothing_similar_enough_falls_back_to_age_and_nan_stays_nan():
    b, h, n, d = 1, 2, 30, 6
    g = torch.Generator().manual_seed(2)
    k, v = torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g)
    k[0, 1, 3] = k[0, 1, 4] * 2.0  # one exact pair (cosine 1) in head 1
    v[0, 1, 3] = float("nan")
    count, frame = torch.ones(b, h, n), torch.arange(n, dtype=torch.int32).expand(b, h, n).contiguous()
    buf = _buffers(k, v, count, frame)
    prio = (frame.double() * 2**24 + 1).masked_fill(frame < 2, INF)
    slots, merged = victims(buf, prio, torch.full((b, h), 5), 5, 0.999)
    assert merged.tolist() == [[0, 1]]
    # head 0: pure age eviction (the oldest unprotected frames, 2..6); head 1: slot 3 merged into 4, then age
    assert slots[0, 0].tolist() == [2, 3, 4, 5, 6]
    assert slots[0, 1].tolist() == [3, 2, 5, 6, 7]
    assert bool(torch.isnan(buf.v[0, 1, 4]).all()), "a NaN value merged into its survivor stays NaN"
    assert float(buf.count[0, 1, 4]) == 2.0


# ------------------------------------------------------------------------------------------ commits
def test_nothing_qualifies_is_exactly_age_eviction():
    # compress_threshold 1.0: random keys never reach cosine 1, so no pair merges
    age = _run(_cache(_policy("age")), _chunks(10, spread=2.0))
    red = _run(_cache(_policy("redundancy", compress=1.0)), _chunks(10, spread=2.0))
    _assert_same(red, age)


def test_redundancy_keeps_sinks_ring_and_cap_and_conserves_counts():
    tier = HostTierConfig(host_budget_tokens=64 * FPC * P, block_tokens=P, top_blocks=2)
    cache = _cache(_policy(), host=tier)
    frames = {}
    for c, k, v in _chunks(12):
        for i in range(FPC):
            frames[c * FPC + i] = (k[:, :, i * P : (i + 1) * P], v[:, :, i * P : (i + 1) * P])
        cache.stage(k, v, frame_start=c * FPC, k_match=k)
        cache.commit()
    buf, cap, last = cache.buffers, cache.capacity, cache.committed_frames - 1
    assert bool((buf.lengths <= cap).all())
    torch.testing.assert_close(buf.k[:, :, :P], frames[0][0], rtol=0, atol=0)
    torch.testing.assert_close(buf.v[:, :, :P], frames[0][1], rtol=0, atol=0)
    for f in (last - 1, last):
        sl = slice((1 + (f - 1) % 2) * P, (2 + (f - 1) % 2) * P)
        torch.testing.assert_close(buf.v[:, :, sl], frames[f][1], rtol=0, atol=0)
        assert bool((buf.count[:, :, sl] == 1).all())
    valid = torch.arange(cap) < buf.lengths[..., None]
    assert cache.host is not None
    kept = (buf.count[:, :, :cap] * valid).sum(-1)
    evicted = cache.host.host_count.sum((0, -1))
    committed = cache.committed_frames * P
    torch.testing.assert_close(kept + evicted, torch.full_like(kept, committed), rtol=0, atol=0)
    # Age alone evicts more of the history (the test must be able to fail).
    age = _cache(_policy("age"), host=tier)
    _run(age, _chunks(12))
    assert age.host is not None and float(evicted.sum()) < float(age.host.host_count.sum())


def test_slots_freed_by_merges_are_not_evictions():
    """What a merge frees is not handed to the host tier (``evict`` False there); the age fallback's victims
    are, exactly as with ``evict_by="age"``."""
    b, h, n, d = 1, 1, 12, 6
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g)
    k[0, 0, 8] = k[0, 0, 5]  # one exact pair among the old entries
    frame = torch.tensor([[[0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9]]], dtype=torch.int32)
    new = torch.tensor([[[True, False, True, True]]])

    def run(compress):
        buf = _buffers(k, v, torch.ones(b, h, n), frame)
        return _new_slots(buf, new, n, 9, 1, True, compress)

    slots, evict = run(0.99)
    age_slots, age_evict = run(None)
    assert slots[0, 0].tolist() == [5, n, 2, 3] and evict[0, 0].tolist() == [False, False, True, True]
    assert age_slots[0, 0].tolist() == [2, n, 3, 4] and age_evict[0, 0].tolist() == [True, False, True, True]


@pytest.mark.parametrize("ann", [Int8Config(), LSHConfig(bits=6, tables=2)])
def test_captured_redundancy_commit_equals_eager(ann):
    eager = _run(_cache(_policy(ann=ann)), _chunks(10))
    captured = _run(_cache(_policy(ann=ann), mode="emulate"), _chunks(10))
    assert captured.commit_capture.captured
    _assert_same(captured, eager)


def test_resume_with_redundancy_is_bit_identical():
    chunks = list(_chunks(10))
    straight = _run(_cache(_policy()), chunks)
    first = _run(_cache(_policy()), chunks[:6])
    resumed = _cache(_policy())
    resumed.load_state_dict(first.state_dict())
    _run(resumed, chunks[6:])
    _assert_same(resumed, straight)


def test_group_commit_with_redundancy_equals_each_layer_alone():
    layers = 2
    cfg = CacheConfig(tokens_per_frame=P, frames_per_chunk=FPC, policy=_policy(), commit_graphs="off")
    group = CacheGroup(cfg, layers=layers, batch=B, heads=H, head_dim=D)
    alone = [_cache(_policy(), layer=i) for i in range(layers)]
    for c, k, v in _chunks(9, batch=layers * B):
        group.begin()
        for i in range(layers):
            rows = slice(i * B, (i + 1) * B)
            group.caches[i].stage(k[rows], v[rows], frame_start=c * FPC, k_match=k[rows])
            group.stage_match(i, k[rows])
            alone[i].stage(k[rows], v[rows], frame_start=c * FPC, k_match=k[rows])
            alone[i].commit()
        group.commit()
    for gc, a in zip(group.caches, alone, strict=True):
        _assert_same(gc, a)


# ------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize(
    ("kwargs", "word"),
    [({"evict_by": "size"}, "evict_by"), ({"compress_threshold": 0.0}, "compress_threshold"),
     ({"compress_threshold": 1.5}, "compress_threshold"), ({"compress_threshold": math.nan}, "compress_threshold"),
     ({"compress_threshold": True}, "compress_threshold")],
)  # fmt: skip
def test_eviction_fields_are_validated(kwargs, word):
    with pytest.raises(ValueError, match=word):
        TempCachePolicy(**kwargs)
    with pytest.raises(ValueError, match=word):
        TempCacheLayout(**kwargs)


def test_layout_keys_reach_the_preset_policy():
    cand = parse_layout("tc_red=tempcache:evict=redundancy,compress=0.7")
    assert cand.layout.evict_by == "redundancy" and cand.layout.compress_threshold == 0.7
    pol = preset("tempcache", tokens_per_frame=P, frames_per_chunk=FPC, layout=cand.layout).cache
    assert isinstance(pol, TempCachePolicy) and pol.evict_by == "redundancy" and pol.compress_threshold == 0.7
    with pytest.raises(ValueError, match="evict"):
        parse_layout("x=tempcache:evict=newest")
