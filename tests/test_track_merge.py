"""TempCache's per-frame merge as fused kernels (``longroll.ops.track_merge``, ``plan_backend="triton"``)
against its torch twin (``plan_backend="torch"``): the same winners, overflow merges, slots, keys, counts and
frame stamps, values to float32 rounding, over odd shapes, full groups, the cap and NaN."""

import dataclasses

import pytest
import torch

from longroll.cache import CacheBuffers, TempCachePolicy
from longroll.cache.tempcache import Track, merge_frame
from longroll.ops.track_merge import fused_track_merge
from tests.device import KERNEL_DEVICE

KERNEL_DEVICE_AWARE = True  # the kernels' tensors live on KERNEL_DEVICE: CUDA in the GPU suite
DEV = KERNEL_DEVICE


def _setup(b, h, p, d, seed, *, fill, cap, follow=0.8, nan_token=None):
    """A cache holding ``fill`` entries, a previous frame at slots [0, p) and a new frame whose tokens follow
    it (so that most match above the threshold, several tokens the same previous token)."""
    g = torch.Generator().manual_seed(seed)
    buf = CacheBuffers.allocate(b, h, cap + 3, d, d, torch.float32, DEV)
    prev = torch.nn.functional.normalize(torch.randn(b, h, p, d, generator=g), dim=-1)
    buf.k[:, :, :fill] = torch.randn(b, h, fill, d, generator=g).to(DEV)
    buf.k[:, :, :p] = prev.to(DEV)
    buf.v[:, :, :fill] = torch.randn(b, h, fill, d, generator=g).to(DEV)
    buf.count[:, :, :fill] = torch.randint(1, 6, (b, h, fill), generator=g).float().to(DEV)
    buf.frame[:, :, :fill] = torch.randint(1, 4, (b, h, fill), generator=g).int().to(DEV)
    buf.lengths.fill_(fill)
    # Several tokens follow the same previous token (ties and many-to-one overflow merges).
    src = torch.randint(0, p, (b, h, p), generator=g)
    near = prev.gather(2, src[..., None].expand(b, h, p, d)) + 0.15 * torch.randn(b, h, p, d, generator=g)
    x = torch.where(torch.rand(b, h, p, 1, generator=g) < follow, near, torch.randn(b, h, p, d, generator=g))
    x = torch.nn.functional.normalize(x, dim=-1)
    sim = x @ prev.transpose(-1, -2)
    cos, idx = sim.max(-1)
    idx[..., : min(4, p)] = idx[..., :1]  # exact ties on the same match
    cos[..., : min(4, p)] = cos[..., :1]
    track = Track(
        slots=torch.arange(p).expand(b, h, p).contiguous().to(DEV), keys=prev.to(DEV),
        active=(torch.rand(b, h, p, generator=g) < 0.9).to(DEV),
    )  # fmt: skip
    k = (x * 2.0).to(DEV)
    v = torch.randn(b, h, p, d, generator=g).to(DEV)
    if nan_token is not None:
        v[0, 0, nan_token] = float("nan")
    return buf, track, k, v, x.to(DEV), (idx.to(DEV), cos.float().to(DEV))


def _clone(buf):
    return CacheBuffers(*(t.clone() for t in (buf.k, buf.v, buf.count, buf.frame, buf.lengths)))


def _policy(cap, backend, **kw):
    base = dict(threshold=0.9, max_entries=cap, sink_frames=1, overflow_threshold=0.75, max_group=4)
    return TempCachePolicy(**(base | kw), plan_backend=backend)


@pytest.mark.parametrize(
    ("b", "h", "p", "d", "fill", "cap"),
    [(1, 2, 97, 16, 300, 320), (2, 1, 33, 32, 180, 200), (1, 1, 1025, 16, 1500, 1600), (1, 1, 1, 16, 3, 10)],
)
@pytest.mark.parametrize("may_overflow", [True, False])
@pytest.mark.parametrize("max_group", [4, None])
def test_fused_merge_equals_the_torch_twin(b, h, p, d, fill, cap, may_overflow, max_group):
    if not may_overflow:
        if 2 * p > cap:
            pytest.skip("the previous frame and this one cannot both fit under the cap")
        fill = max(p, min(fill, cap - p))  # the promise may_overflow=False makes: the frame fits
    buf, track, k, v, x, match = _setup(b, h, p, d, seed=p + fill, fill=fill, cap=cap)
    out = {}
    for backend in ("torch", "triton"):
        c = _clone(buf)
        pol = _policy(cap, backend, max_group=max_group)
        t, slots = merge_frame(c, track, k, v, x, match, 5, pol, may_overflow)
        out[backend] = (c, t, slots)
    (a, ta, sa), (c, tc, sc) = out["torch"], out["triton"]
    assert torch.equal(sa, sc) and torch.equal(ta.active, tc.active)
    n = a.slots  # the trash slot takes masked writes in any order
    for name in ("k", "count", "frame", "lengths"):
        x_, y_ = getattr(a, name), getattr(c, name)
        if x_.dim() > 2:
            x_, y_ = x_[:, :, :n], y_[:, :, :n]
        assert torch.equal(x_, y_), name
    torch.testing.assert_close(c.v[:, :, :n], a.v[:, :, :n], rtol=0, atol=8 * torch.finfo(torch.float32).eps)
    if may_overflow and p > 8 and fill + p > cap:
        assert int((~ta.active).sum()) > 0, "overflow merges happened"


def test_nan_values_stay_in_their_group_and_nowhere_else():
    buf, track, k, v, x, match = _setup(1, 1, 64, 16, seed=3, fill=100, cap=110, nan_token=5)
    out = {}
    for backend in ("torch", "triton"):
        c = _clone(buf)
        _, slots = merge_frame(c, track, k, v, x, match, 5, _policy(110, backend), True)
        out[backend] = (c, slots)
    (a, sa), (c, sc) = out["torch"], out["triton"]
    assert torch.equal(sa, sc)
    bad_slot = int(sc[0, 0, 5])
    for buf_ in (a, c):
        nan_rows = buf_.v[0, 0, :110].isnan().any(-1).nonzero().flatten().tolist()
        assert nan_rows == [bad_slot], "the NaN value lands in its own slot or group only"


def test_the_same_bits_every_run():
    buf, track, k, v, x, match = _setup(1, 2, 200, 32, seed=4, fill=500, cap=520)
    runs = []
    for _ in range(3):
        c = _clone(buf)
        merge_frame(c, track, k, v, x, match, 5, _policy(520, "triton"), True)
        runs.append(c)
    for c in runs[1:]:
        assert torch.equal(c.v, runs[0].v) and torch.equal(c.count, runs[0].count)


def test_bad_arguments_raise_before_anything_changes():
    buf, track, k, v, x, match = _setup(1, 1, 20, 16, seed=5, fill=30, cap=40)
    before = _clone(buf)
    now = torch.tensor(5, device=DEV)
    args = (buf.k, buf.v, buf.count, buf.frame, buf.lengths)
    kw = dict(frame_now=now, cap=40, threshold=0.9, overflow_threshold=0.75, max_group=4, may_overflow=True)
    with pytest.raises(ValueError, match="cos must have"):
        fused_track_merge(*args, match[0], match[1][..., :3], track.slots, track.active, k, v, **kw)
    with pytest.raises(ValueError, match="idx must be"):
        fused_track_merge(*args, match[0].int(), match[1], track.slots, track.active, k, v, **kw)
    with pytest.raises(ValueError, match="k_new and v_new"):
        fused_track_merge(*args, *match, track.slots, track.active, k[..., :8], v, **kw)
    odd = CacheBuffers.allocate(1, 1, 40, 12, 12, torch.float32, DEV)
    with pytest.raises(ValueError, match="plan_backend='triton'"):
        merge_frame(odd, track, k[..., :12], v[..., :12], x[..., :12], match, 5, _policy(40, "triton"), True)
    for name in ("k", "v", "count", "frame", "lengths"):
        assert torch.equal(getattr(buf, name), getattr(before, name))


def test_policy_field_reaches_replace():
    pol = dataclasses.replace(_policy(40, "torch"), plan_backend="triton")
    assert pol.plan_backend == "triton"
