"""The ring swap (``longroll.ops.ring``): the fused kernel copies the same bits as its torch twin (the leaving
frame read out, the new frame written with count 1, its frame stamp and its correspondences) over odd frame
sizes, ring lengths, dtypes, host and device frame indices; bad arguments are refused before anything changes."""

import pytest
import torch

from longroll.ops.ring import ring_swap
from tests.device import KERNEL_DEVICE

KERNEL_DEVICE_AWARE = True  # the kernel's tensors live on KERNEL_DEVICE: CUDA in the GPU suite
DEV = KERNEL_DEVICE


def _state(b, h, p, d, sinks, w, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    s = (sinks + w + 2) * p + 1
    bufs = {
        "k": torch.randn(b, h, s, d, generator=g).to(dtype),
        "v": torch.randn(b, h, s, d, generator=g).to(dtype),
        "count": torch.randint(1, 9, (b, h, s), generator=g).float(),
        "frame": torch.randint(0, 50, (b, h, s), generator=g).int(),
        "ridx": torch.randint(0, p, (b, h, w, p), generator=g).int(),
        "rcos": torch.rand(b, h, w, p, generator=g),
    }
    new = {
        "k_new": torch.randn(b, h, p, d, generator=g).to(dtype),
        "v_new": torch.randn(b, h, p, d, generator=g).to(dtype),
        "idx_new": torch.randint(0, p, (b, h, p), generator=g),
        "cos_new": torch.rand(b, h, p, generator=g),
    }
    return {n: x.to(DEV) for n, x in bufs.items()}, {n: x.to(DEV) for n, x in new.items()}


def _swap(bufs, new, backend, **kw):
    return ring_swap(*bufs.values(), *new.values(), backend=backend, **kw)


@pytest.mark.parametrize(("b", "h", "p", "d", "sinks", "w"), [(1, 1, 1, 16, 0, 1), (2, 3, 97, 32, 1, 3),
                                                             (1, 2, 131, 16, 2, 2), (1, 1, 5, 64, 1, 4)])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("full", "has_track"), [(True, True), (False, True), (False, False)])
@pytest.mark.parametrize("device_frame", [False, True])
def test_kernel_equals_twin(b, h, p, d, sinks, w, dtype, full, has_track, device_frame):
    frame = sinks + 7
    now = torch.tensor(frame, device=DEV) if device_frame else frame
    runs = []
    for backend in ("torch", "triton"):
        bufs, new = _state(b, h, p, d, sinks, w, dtype, seed=p + w)
        old, slots = _swap(bufs, new, backend, frame_now=now, sink_frames=sinks, full=full, has_track=has_track)
        runs.append((bufs, old, slots))
    (b0, o0, s0), (b1, o1, s1) = runs
    for name in b0:
        assert torch.equal(b0[name], b1[name]), name
    assert torch.equal(s0, s1)
    pos = (frame - sinks) % w
    assert int(s1[0, 0, 0]) == (sinks + pos) * p
    assert bool((b1["frame"].gather(2, s1) == frame).all()) and bool((b1["count"].gather(2, s1) == 1).all())
    assert bool(torch.isinf(b1["rcos"][:, :, pos]).all()) != has_track
    assert (o0 is None) == (o1 is None) == (not full)
    if full:
        ref_bufs, _ = _state(b, h, p, d, sinks, w, dtype, seed=p + w)
        sl = slice((sinks + pos) * p, (sinks + pos + 1) * p)
        assert torch.equal(o1[0], ref_bufs["k"][:, :, sl]) and torch.equal(o1[1], ref_bufs["v"][:, :, sl])
        assert torch.equal(o1[2], ref_bufs["ridx"][:, :, pos].long())
        assert torch.equal(o1[3], ref_bufs["rcos"][:, :, pos])
        for a, c in zip(o0, o1, strict=True):
            assert torch.equal(a, c)


def test_bad_arguments_raise_before_anything_changes():
    bufs, new = _state(1, 2, 8, 16, 1, 2, torch.float32, seed=0)
    before = {n: x.clone() for n, x in bufs.items()}
    kw = {"frame_now": 3, "full": True, "has_track": True}
    with pytest.raises(ValueError, match="backend"):
        _swap(bufs, new, "cuda", sink_frames=1, **kw)
    with pytest.raises(ValueError, match="sink_frames"):
        _swap(bufs, new, "torch", sink_frames=9, **kw)
    bad = dict(new, idx_new=new["idx_new"].int())
    with pytest.raises(ValueError, match=r"idx_new must be torch\.int64"):
        _swap(bufs, bad, "triton", sink_frames=1, **kw)
    bad = dict(new, k_new=new["k_new"][:, :, :5])
    with pytest.raises(ValueError, match="k_new and v_new"):
        _swap(bufs, bad, "triton", sink_frames=1, **kw)
    odd = dict(bufs, k=torch.zeros(1, 2, 33, 24, device=DEV), v=torch.zeros(1, 2, 33, 24, device=DEV))
    odd_new = dict(new, k_new=torch.zeros(1, 2, 8, 24, device=DEV), v_new=torch.zeros(1, 2, 8, 24, device=DEV))
    with pytest.raises(ValueError, match="power of two"):
        _swap(odd, odd_new, "triton", sink_frames=1, **kw)
    for n, x in bufs.items():
        assert torch.equal(x, before[n]), n
