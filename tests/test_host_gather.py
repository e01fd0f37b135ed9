"""The host tier's retrieval copy (``longroll.ops.host_gather``): the kernel writes the same bits as its torch
twin (keys, values and log-counts of the selected blocks, -inf where a selection is not ok or an entry is empty)
over odd block sizes, head dims and dtypes; on CUDA it reads a pinned host store directly; bad arguments are
refused before anything is written."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longroll.ops.host_gather import gather_blocks
from tests.device import GPU_SUITE, KERNEL_DEVICE

KERNEL_DEVICE_AWARE = True  # the outputs live on KERNEL_DEVICE: CUDA in the GPU suite (the store pinned)
DEV = KERNEL_DEVICE


def _case(r, b, h, e, d, dv, bt, t, dtype, seed, pinned=GPU_SUITE):
    g = torch.Generator().manual_seed(seed)
    store = {
        "store_k": torch.randn(r, b, h, e, d, generator=g).to(dtype),
        "store_v": torch.randn(r, b, h, e, dv, generator=g).to(dtype),
        "store_count": torch.randint(0, 9, (r, b, h, e), generator=g).float(),
    }
    if pinned:
        store = {n: x.pin_memory() for n, x in store.items()}
    nb = r * e // bt
    sel = {
        "ids": torch.randint(0, nb, (b, h, t), generator=g).to(DEV),
        "ok": (torch.rand(b, h, t, generator=g) < 0.8).to(DEV),
    }
    return store, sel


def _outs(b, h, n, d, dv, dtype):
    return {
        "out_k": torch.full((b, h, n, d), 7.0, dtype=dtype, device=DEV),
        "out_v": torch.full((b, h, n, dv), 7.0, dtype=dtype, device=DEV),
        "out_bias": torch.full((b, h, n), 7.0, device=DEV),
    }


def _run(store, sel, outs, bt, backend):
    gather_blocks(*store.values(), *sel.values(), *outs.values(), block_tokens=bt, backend=backend)
    return outs


@pytest.mark.parametrize(("r", "b", "h", "e", "d", "dv", "bt", "t"), [
    (1, 1, 1, 1, 16, 16, 1, 1), (3, 2, 3, 97, 20, 16, 97, 4), (2, 1, 2, 1025, 64, 128, 41, 5),
    (4, 1, 1, 120, 128, 128, 40, 7), (2, 2, 1, 6, 16, 24, 2, 6),
])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_writes_the_twins_bits(r, b, h, e, d, dv, bt, t, dtype):
    store, sel = _case(r, b, h, e, d, dv, bt, t, dtype, seed=r * 7 + e)
    want = _run(store, sel, _outs(b, h, t * bt, d, dv, dtype), bt, "torch")
    got = _run(store, sel, _outs(b, h, t * bt, d, dv, dtype), bt, "triton")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, equal_nan=True, msg=name)


def test_twin_is_what_the_blocks_hold():
    r, b, h, e, d, bt, t = 2, 1, 2, 8, 16, 4, 3
    store, sel = _case(r, b, h, e, d, d, bt, t, torch.float32, seed=3)
    sel["ids"] = torch.tensor([[[0, 3, 9], [2, 1, 1]]], device=DEV)  # 9 is past the 4 blocks: clamped to 3
    sel["ok"] = torch.tensor([[[True, True, False], [True, False, True]]], device=DEV)
    out = _run(store, sel, _outs(b, h, t * bt, d, d, torch.float32), bt, "auto")
    sk, sc = store["store_k"], store["store_count"]
    for hh, ids in enumerate(([0, 3, 3], [2, 1, 1])):
        for j, i in enumerate(ids):
            rec, blk = i // 2, i % 2
            rows = slice(blk * bt, (blk + 1) * bt)
            torch.testing.assert_close(out["out_k"][0, hh, j * bt : (j + 1) * bt].cpu(), sk[rec, 0, hh, rows])
            ok = bool(sel["ok"][0, hh, j])
            want = torch.log(sc[rec, 0, hh, rows]) if ok else torch.full((bt,), float("-inf"))
            torch.testing.assert_close(out["out_bias"][0, hh, j * bt : (j + 1) * bt].cpu(), want)


@settings(max_examples=12, deadline=None)
@given(e_blocks=st.integers(1, 5), bt=st.integers(1, 19), t=st.integers(1, 6), seed=st.integers(0, 99))
def test_any_geometry_matches(e_blocks, bt, t, seed):
    store, sel = _case(2, 1, 2, e_blocks * bt, 16, 16, bt, t, torch.float16, seed)
    want = _run(store, sel, _outs(1, 2, t * bt, 16, 16, torch.float16), bt, "torch")
    got = _run(store, sel, _outs(1, 2, t * bt, 16, 16, torch.float16), bt, "triton")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(("change", "match"), [
    (lambda s, x, o: s.update(store_count=s["store_count"].double()), "store_count must be torch.float32"),
    (lambda s, x, o: x.update(ids=x["ids"].int()), "ids must be torch.int64"),
    (lambda s, x, o: x.update(ok=x["ok"][..., :1]), r"ids and ok must be \(1, 2, T\)"),
    (lambda s, x, o: o.update(out_k=o["out_k"][:, :, :3]), r"out_k must be \(1, 2, 12, 16\)"),
    (lambda s, x, o: s.update(store_v=s["store_v"][..., :5, :]), "store_v and store_count must lead with"),
])  # fmt: skip
def test_bad_arguments_are_refused_and_write_nothing(change, match):
    store, sel = _case(2, 1, 2, 8, 16, 16, 4, 3, torch.float32, seed=0)
    outs = _outs(1, 2, 12, 16, 16, torch.float32)
    change(store, sel, outs)
    before = {n: x.clone() for n, x in outs.items()}
    with pytest.raises(ValueError, match=match):
        _run(store, sel, outs, 4, "auto")
    for name, x in outs.items():
        assert torch.equal(x, before[name]), name
    with pytest.raises(ValueError, match="block_tokens must be an int >= 1 dividing"):
        _run(*_case(2, 1, 2, 8, 16, 16, 4, 3, torch.float32, seed=0), _outs(1, 2, 9, 16, 16, torch.float32), 3,
             "auto")  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_reads_a_pinned_store_and_refuses_a_pageable_one():
    store, sel = _case(3, 1, 2, 120, 128, 128, 40, 5, torch.bfloat16, seed=1, pinned=True)
    sel = {n: x.cuda() for n, x in sel.items()}
    outs = {n: x.cuda() for n, x in _outs(1, 2, 200, 128, 128, torch.bfloat16).items()}
    got = _run(store, sel, outs, 40, "triton")
    dev_store = {n: x.cuda() for n, x in store.items()}
    want = _run(dev_store, sel, {n: x.clone() for n, x in outs.items()}, 40, "torch")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="pinned host memory"):
        _run({n: x.clone() for n, x in store.items()}, sel, outs, 40, "triton")
