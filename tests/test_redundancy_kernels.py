"""Redundancy eviction's fused merge plan (``longroll.ops.redundancy``) against its torch twin: the same merges,
victims, counts and values, over odd shapes, ties, many-to-one merges, protected rows and NaN; age keys order
entries as the eviction rule says; whole commits agree between the two backends."""

import math

import pytest
import torch

from longroll.cache import CacheBuffers, CacheConfig, LayerKVCache, TempCachePolicy
from longroll.cache.redundancy import SignatureConstants, min_agreement, victims
from longroll.ops.redundancy import MAX_ENTRIES, PROTECTED, age_keys, fused_victims
from tests.device import KERNEL_DEVICE

KERNEL_DEVICE_AWARE = True  # the kernels' tensors live on KERNEL_DEVICE: CUDA in the GPU suite
DEV = KERNEL_DEVICE


def _buffers(b, h, n, d, seed, *, dtype=torch.float32, device=DEV, groups=None, frames=6, length=None):
    """Buffers of n entries (plus 5 spare slots) whose keys cluster around ``groups`` centres (near-duplicates
    to merge), counts in [1, 4), frames in [0, frames)."""
    g = torch.Generator().manual_seed(seed)
    groups = groups or max(1, n // 3)
    base = torch.randn(b, h, groups, d, generator=g)
    k = base[:, :, torch.randint(0, groups, (n,), generator=g)] + 0.3 * torch.randn(b, h, n, d, generator=g)
    buf = CacheBuffers.allocate(b, h, n + 5, d, d, dtype, torch.device(device))
    buf.k[:, :, :n] = k.to(device, dtype)
    buf.v[:, :, :n] = torch.randn(b, h, n, d, generator=g).to(device, dtype)
    buf.count[:, :, :n] = torch.randint(1, 4, (b, h, n), generator=g).float().to(device)
    buf.frame[:, :, :n] = torch.randint(0, frames, (b, h, n), generator=g).int().to(device)
    buf.lengths.fill_(n - 3 if length is None else length)
    return buf


def _clone(buf):
    return CacheBuffers(*(t.clone() for t in (buf.k, buf.v, buf.count, buf.frame, buf.lengths)))


def _both(buf, prio, need, kk, threshold):
    a, c = _clone(buf), _clone(buf)
    ref = victims(a, prio, need, kk, threshold, backend="torch")
    out = victims(c, prio, need, kk, threshold, backend="triton")
    return a, ref, c, out


def _assert_same_plan(a, ref, c, out, *, v_atol=0.0):
    assert torch.equal(out[1], ref[1]), f"merged {out[1].tolist()} != {ref[1].tolist()}"
    assert torch.equal(out[0], ref[0])
    assert torch.equal(c.count, a.count)
    # The mean's last float32 rounding may differ by one ulp (a fused multiply-add on the GPU).
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(c.v.float(), a.v.float(), rtol=2 * eps, atol=v_atol + eps, equal_nan=True)
    torch.testing.assert_close(c.k, a.k, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(c.frame, a.frame)


@pytest.mark.parametrize(
    ("b", "h", "n", "d", "kk", "threshold"),
    [(1, 2, 97, 16, 20, 0.5), (2, 3, 131, 32, 40, 0.7), (1, 1, 300, 16, 64, 0.5), (1, 1, 1025, 16, 24, 0.6),
     (1, 2, 5, 16, 5, 0.5), (1, 1, 1, 16, 1, 0.5)],
)  # fmt: skip
def test_fused_plan_equals_the_torch_twin_on_odd_shapes(b, h, n, d, kk, threshold):
    buf = _buffers(b, h, n, d, seed=n)
    prio = age_keys(buf.frame, buf.count, buf.lengths, n, 5, 1)
    need = (torch.arange(b * h).reshape(b, h) * 7 % (kk + 3)).to(DEV)
    _assert_same_plan(*_both(buf, prio, need, kk, threshold))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32] + ([torch.bfloat16] if DEV.type == "cuda" else []))
def test_fused_plan_equals_the_twin_in_each_key_dtype(dtype):
    device = DEV
    buf = _buffers(2, 2, 150, 32, seed=3, dtype=dtype, device=device)
    prio = age_keys(buf.frame, buf.count, buf.lengths, 150, 5, 1)
    need = torch.tensor([[30, 12], [0, 45]], device=device)
    eps = torch.finfo(dtype).eps
    # Values: float32 means stored in the buffer dtype; a different last float32 rounding may move one ulp.
    _assert_same_plan(*_both(buf, prio, need, 45, 0.5), v_atol=4 * eps)


def test_many_entries_merging_into_one_survivor():
    """Triples of one key whose middle slot is the newest: both older copies merge into the middle one (one
    survivor named by two ranks), counts add and the value is the count-weighted mean of the three."""
    b, h, n, d = 1, 1, 40, 16
    buf = _buffers(b, h, n, d, seed=5, length=n, frames=3)
    for t in range(4):
        lo = 3 * t
        buf.k[0, 0, lo : lo + 3] = buf.k[0, 0, lo + 1]
        buf.frame[0, 0, lo : lo + 3] = torch.tensor([3, 4, 3], dtype=torch.int32, device=DEV)
    prio = age_keys(buf.frame, buf.count, buf.lengths, n, 5, 0)
    a, ref, c, out = _both(buf, prio, torch.tensor([[8]], device=DEV), 16, 0.99)
    _assert_same_plan(a, ref, c, out, v_atol=1e-6)
    assert sorted(out[0][0, 0, :8].tolist()) == [0, 2, 3, 5, 6, 8, 9, 11]
    for t in range(4):
        group = slice(3 * t, 3 * t + 3)
        mid = 3 * t + 1
        assert float(c.count[0, 0, mid]) == float(buf.count[0, 0, group].sum())
        mean = (buf.v[0, 0, group] * buf.count[0, 0, group, None]).sum(0) / buf.count[0, 0, group].sum()
        torch.testing.assert_close(c.v[0, 0, mid], mean, rtol=1e-6, atol=1e-6)


def test_ties_protected_rows_and_nothing_needed():
    """One frame and one count for every entry (age ties everywhere: the slot decides); half the slots past the
    length; a row with no need and a row whose need exceeds what merges can free."""
    b, h, n, d = 1, 3, 64, 16
    buf = _buffers(b, h, n, d, seed=7, frames=1, length=40)
    buf.count.fill_(1.0)
    prio = age_keys(buf.frame, buf.count, buf.lengths, n, 5, 0)
    a, ref, c, out = _both(buf, prio, torch.tensor([[0, 8, 60]], device=DEV), 30, 0.5)
    _assert_same_plan(a, ref, c, out)
    assert int(out[1][0, 0]) == 0
    assert bool((out[0][0, 2] < 40).all() | (out[1][0, 2] < 30)), "victims come from the valid slots first"


def test_nan_key_neither_merges_nor_is_merged_and_nan_values_stay_nan():
    b, h, n, d = 1, 1, 50, 16
    buf = _buffers(b, h, n, d, seed=9, groups=4)
    buf.k[0, 0, 7] = float("nan")
    buf.v[0, 0, :] = torch.where(torch.arange(d, device=DEV) == 0, float("nan"), buf.v[0, 0, :])
    prio = age_keys(buf.frame, buf.count, buf.lengths, n, 5, 0)
    a, ref, c, out = _both(buf, prio, torch.tensor([[20]], device=DEV), 24, 0.5)
    _assert_same_plan(a, ref, c, out)
    merged = out[0][0, 0, : int(out[1][0, 0])]
    assert 7 not in merged.tolist()
    assert bool(c.v[0, 0, :n, 0].isnan().all()), "NaN values never turn finite"


def test_fused_plan_is_the_same_every_run():
    device = DEV
    buf = _buffers(2, 3, 200, 32, seed=11, device=device, groups=20)
    prio = age_keys(buf.frame, buf.count, buf.lengths, 200, 5, 1)
    need = torch.full((2, 3), 40, device=device)
    runs = []
    for _ in range(3):
        c = _clone(buf)
        runs.append((victims(c, prio, need, 50, 0.5, backend="triton"), c))
    for (s, m), c in runs[1:]:
        assert torch.equal(s, runs[0][0][0]) and torch.equal(m, runs[0][0][1])
        assert torch.equal(c.v, runs[0][1].v) and torch.equal(c.count, runs[0][1].count)


def test_age_keys_order_oldest_then_smallest_count_then_slot():
    frame = torch.tensor([[[3, 1, 1, 1, 0, 9, -1]]], dtype=torch.int32)
    count = torch.tensor([[[1.0, 2.0, 1.0, 1.0, 5.0, 1.0, 0.0]]])
    keys = age_keys(frame, count, torch.tensor([[6]]), 7, 5, 1)
    order = keys.argsort(-1)[0, 0].tolist()
    # Slot 4 is a sink (frame 0 < 1), slot 5 is newer than the committing frame 5, slot 6 is past the length.
    assert order[:4] == [2, 3, 1, 0]
    assert bool((keys[0, 0, 4:] >= PROTECTED).all()) and bool((keys[0, 0, :4] < PROTECTED).all())
    assert len(set(keys[0, 0].tolist())) == 7, "no two keys tie"


def test_age_keys_clamp_old_frames_and_big_counts():
    frame = torch.tensor([[[2**20, 2**20 + 1, 5]]], dtype=torch.int32)
    count = torch.tensor([[[1.0, 1.0, 2.0**30]]])
    keys = age_keys(frame, count, torch.tensor([[3]]), 3, 2**21, 0)
    assert keys[0, 0, 2] < keys[0, 0, 0] < keys[0, 0, 1] < PROTECTED


def test_bad_arguments_raise_before_anything_changes():
    buf = _buffers(1, 1, 40, 16, seed=1)
    before = _clone(buf)
    signs = SignatureConstants.build(16, buf.k.dtype, buf.k.device).signs
    prio = age_keys(buf.frame, buf.count, buf.lengths, 40, 5, 0)
    need = torch.tensor([[4]], device=DEV)
    args = (buf.k, buf.v, buf.count)
    with pytest.raises(ValueError, match=r"prio must be torch\.int64"):
        fused_victims(*args, prio.double(), need, 8, 0.5, min_agreement(0.5), signs)
    with pytest.raises(ValueError, match="kk must be in"):
        fused_victims(*args, prio, need, 41, 0.5, min_agreement(0.5), signs)
    with pytest.raises(ValueError, match="need must have shape"):
        fused_victims(*args, prio, need.expand(1, 2), 8, 0.5, min_agreement(0.5), signs)
    with pytest.raises(ValueError, match="signs must be"):
        fused_victims(*args, prio, need, 8, 0.5, min_agreement(0.5), signs[:8])
    with pytest.raises(ValueError, match="n must be in"):
        age_keys(buf.frame, buf.count, buf.lengths, MAX_ENTRIES + 1, 5, 0)
    odd = CacheBuffers.allocate(1, 1, 40, 12, 12, torch.float32, DEV)
    with pytest.raises(ValueError, match="head_dim must be a power of two"):
        victims(odd, age_keys(odd.frame, odd.count, odd.lengths, 40, 5, 0), need, 8, 0.5, backend="triton")
    with pytest.raises(ValueError, match="plan_backend"):
        TempCachePolicy(plan_backend="cuda")  # type: ignore[arg-type]
    for name in ("k", "v", "count", "frame", "lengths"):
        assert torch.equal(getattr(buf, name), getattr(before, name))


def test_odd_head_dims_take_the_torch_path_under_auto():
    odd = _buffers(1, 1, 30, 16, seed=2)
    odd12 = CacheBuffers.allocate(1, 1, 30, 12, 12, torch.float32, DEV)
    odd12.k[:, :, :25] = odd.k[:, :, :25, :12]
    odd12.frame[:, :, :25] = odd.frame[:, :, :25]
    odd12.count[:, :, :25] = 1.0
    odd12.lengths.fill_(25)
    prio = age_keys(odd12.frame, odd12.count, odd12.lengths, 30, 5, 0)
    s, m = victims(odd12, prio, torch.tensor([[3]], device=DEV), 5, 0.5, backend="auto")
    assert s.shape == (1, 1, 5) and int(m) <= 3


# ------------------------------------------------------------------------------------------ whole commits
P, FPC, H, D, B = 24, 2, 2, 16, 1


def _cache(backend, mode="off"):
    policy = TempCachePolicy(
        threshold=0.9, max_entries=7 * P, sink_frames=1, recent_frames=2, evict_by="redundancy",
        compress_threshold=0.5, plan_backend=backend,
    )  # fmt: skip
    cfg = CacheConfig(tokens_per_frame=P, frames_per_chunk=FPC, policy=policy, commit_graphs=mode)
    return LayerKVCache(cfg, batch=B, heads=H, head_dim=D, device=DEV)


def test_commits_with_the_fused_plan_equal_the_torch_twin():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(B, H, P, D, generator=g)
    mode = "auto" if DEV.type == "cuda" else "emulate"
    caches = [_cache("torch"), _cache("triton"), _cache("triton", mode=mode)]
    for c in range(9):
        k = torch.cat([base + 0.5 * torch.randn(B, H, P, D, generator=g) for _ in range(FPC)], 2)
        v = torch.randn(B, H, FPC * P, D, generator=g)
        k, v = k.to(DEV), v.to(DEV)
        for cache in caches:
            cache.stage(k, v, frame_start=c * FPC, k_match=k)
            cache.commit()
    ref = caches[0].buffers
    assert int(((ref.count > 1) & (ref.frame < 10)).sum()) > 0, "old entries merged"
    n = ref.slots  # the trash slot (the last) takes masked writes in any order
    for cache in caches[1:]:
        for name in ("k", "count", "frame"):
            assert torch.equal(getattr(cache.buffers, name)[:, :, :n], getattr(ref, name)[:, :, :n]), name
        assert torch.equal(cache.buffers.lengths, ref.lengths)
        torch.testing.assert_close(
            cache.buffers.v[:, :, :n], ref.v[:, :, :n], rtol=0, atol=4 * torch.finfo(torch.float32).eps
        )
    assert caches[2].commit_capture.captured
    assert math.isfinite(float(caches[1].buffers.v.sum()))


def test_rows_too_long_for_32_bit_sort_keys_take_64_bit_keys():
    """Past 2**15 entries the table sort keys are int64: the plan is still the twin's."""
    n = (1 << 15) + 37
    buf = _buffers(1, 1, n, 16, seed=13, groups=n // 2)
    prio = age_keys(buf.frame, buf.count, buf.lengths, n, 5, 1)
    _assert_same_plan(*_both(buf, prio, torch.tensor([[12]], device=DEV), 16, 0.5))


def test_age_keys_made_in_the_first_kernel_equal_the_torch_keys():
    """An AgeOrder (the keys made from the buffers inside the fused plan) plans what the explicit keys plan."""
    from longroll.ops.redundancy import AgeOrder

    buf = _buffers(2, 2, 120, 16, seed=17, frames=8)
    need = torch.tensor([[10, 30], [0, 25]], device=DEV)
    prio = age_keys(buf.frame, buf.count, buf.lengths, 120, 6, 2)
    a, ref, c, out = _both(buf, prio, need, 30, 0.5)
    _assert_same_plan(a, ref, c, out)
    d = _clone(buf)
    got = victims(d, AgeOrder(120, torch.tensor(6, device=DEV), 2), need, 30, 0.5, backend="triton")
    _assert_same_plan(a, ref, d, got)
    e = _clone(buf)
    twin = victims(e, AgeOrder(120, 6, 2), need, 30, 0.5, backend="torch")
    _assert_same_plan(a, ref, e, twin)


@pytest.mark.parametrize("evict_by", ["redundancy", "age"])
def test_a_host_tier_under_the_fused_commit_keeps_what_the_torch_twin_keeps(evict_by):
    # The fused placement captures each frame's victims before it overwrites them (victim j of a head is lost
    # exactly when the merges freed fewer than j + 1 slots and the frame's new tokens reach it): the host records
    # must be the torch path's.
    from longroll.cache.host_tier import HostTierConfig

    def cache(backend, mode="off"):
        policy = TempCachePolicy(threshold=0.9, max_entries=7 * P, sink_frames=1, recent_frames=2, evict_by=evict_by,
                                 compress_threshold=0.5, plan_backend=backend)  # fmt: skip
        tier = HostTierConfig(host_budget_tokens=16 * FPC * P, block_tokens=8, top_blocks=3)
        cfg = CacheConfig(tokens_per_frame=P, frames_per_chunk=FPC, policy=policy, commit_graphs=mode,
                          host_tier=tier)  # fmt: skip
        return LayerKVCache(cfg, batch=B, heads=H, head_dim=D, device=DEV)

    g = torch.Generator().manual_seed(1)
    base = torch.randn(B, H, P, D, generator=g)
    mode = "auto" if DEV.type == "cuda" else "emulate"
    caches = [cache("torch"), cache("triton"), cache("triton", mode=mode)]
    for c in range(12):
        k = torch.cat([base + 0.5 * torch.randn(B, H, P, D, generator=g) for _ in range(FPC)], 2).to(DEV)
        v = torch.randn(B, H, FPC * P, D, generator=g).to(DEV)
        q = torch.randn(B, H, FPC * P, D, generator=g).to(DEV)
        for cc in caches:
            cc.stage(k, v, frame_start=c * FPC, k_match=k)
            cc.commit(queries=q)
    ref = caches[0].host
    assert ref is not None and ref.written > 3 and int((ref.host_count > 0).sum()) > 0, "entries were evicted"
    for cc in caches[1:]:
        tier = cc.host
        assert tier is not None and tier.written == ref.written
        for name in ("host_count", "host_frame", "host_k", "index_valid"):
            assert torch.equal(getattr(tier, name), getattr(ref, name)), name
        torch.testing.assert_close(tier.host_v, ref.host_v, rtol=0, atol=4 * torch.finfo(torch.float32).eps)
        assert torch.equal(tier.selected, ref.selected)
    assert caches[2].commit_capture.captured
