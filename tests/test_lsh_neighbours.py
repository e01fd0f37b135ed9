"""The fused sorted-neighbours kernel (compiled on CUDA in the GPU suite, the Triton interpreter on CPU) returns
exactly the torch twin's scores and partners, and the twin exactly the plain-loop rule."""

import os

import pytest
import torch

from longroll.ops.neighbours import popcount64, sorted_neighbours, sorted_neighbours_reference
from tests.device import KERNEL_DEVICE

KERNEL_DEVICE_AWARE = True  # the kernel's tensors live on KERNEL_DEVICE: CUDA in the GPU suite
DEV = KERNEL_DEVICE
needs_kernel = pytest.mark.skipif(
    DEV.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1", reason="needs CUDA or the Triton interpreter"
)
NEG = float("-inf")


def _inputs(b, h, t, n, seed, distinct=1 << 62, bad_share=0.1):
    g = torch.Generator().manual_seed(seed)
    # Few distinct signatures (distinct small) make ties the common case.
    sig = torch.randint(-distinct, distinct, (b, h, n), generator=g, dtype=torch.int64)
    bad = torch.rand(b, h, n, generator=g) < bad_share
    codes = torch.randint(0, 8, (b, h, t, n), generator=g)
    order = torch.sort(codes, dim=-1, stable=True).indices
    return order, sig, bad


def _loop(order, sig, bad):
    b, h, t, n = order.shape
    score = torch.full((b, h, n), NEG)
    nn = torch.zeros(b, h, n, dtype=torch.int64)
    for bi in range(b):
        for hi in range(h):
            best: dict[int, tuple[float, int]] = {}
            for ti in range(t):
                o = order[bi, hi, ti].tolist()
                for r, i in enumerate(o):
                    for q in (r - 1, r + 1):
                        j = o[q] if 0 <= q < n else i
                        ok = 0 <= q < n and not bad[bi, hi, i] and not bad[bi, hi, j]
                        x = int(sig[bi, hi, i]) ^ int(sig[bi, hi, j])
                        s = float(64 - bin(x & (2**64 - 1)).count("1")) if ok else NEG
                        if i not in best or s > best[i][0]:
                            best[i] = (s, j)
            for i, (s, j) in best.items():
                score[bi, hi, i], nn[bi, hi, i] = s, j
    return score, nn


def test_popcount_counts_every_bit_of_int64():
    x = torch.tensor([0, 1, -1, -(2**63), 2**63 - 1, 0x5555555555555555, -2, 2**40 + 7], dtype=torch.int64)
    assert popcount64(x).tolist() == [bin(v & (2**64 - 1)).count("1") for v in x.tolist()]


@pytest.mark.parametrize(("b", "h", "t", "n", "distinct"), [(2, 3, 4, 97, 1 << 62), (1, 2, 2, 50, 3), (1, 1, 1, 7, 1)])
def test_reference_follows_the_candidate_rule(b, h, t, n, distinct):
    order, sig, bad = _inputs(b, h, t, n, seed=n, distinct=distinct)
    score, nn = sorted_neighbours_reference(order, sig, bad)
    want_s, want_nn = _loop(order, sig, bad)
    torch.testing.assert_close(score, want_s, rtol=0, atol=0)
    assert torch.equal(nn, want_nn)


@needs_kernel
@pytest.mark.parametrize(
    ("b", "h", "t", "n", "distinct", "bad_share"),
    [(2, 3, 4, 97, 1 << 62, 0.1), (1, 2, 4, 1025, 4, 0.2), (1, 1, 1, 1, 1 << 62, 0.0), (2, 1, 3, 257, 2, 0.5),
     (1, 2, 4, 300, 1 << 62, 1.0)],
)  # fmt: skip
def test_kernel_equals_the_reference(b, h, t, n, distinct, bad_share):
    order, sig, bad = (x.to(DEV) for x in _inputs(b, h, t, n, seed=n + t, distinct=distinct, bad_share=bad_share))
    want = sorted_neighbours_reference(order, sig, bad)
    got = sorted_neighbours(order, sig, bad, backend="triton")
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    assert torch.equal(got[1], want[1])


def test_bad_arguments_are_named():
    order, sig, bad = _inputs(1, 2, 4, 9, seed=0)
    with pytest.raises(ValueError, match="backend"):
        sorted_neighbours(order, sig, bad, backend="cuda")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"sig and bad must have shape \(1, 2, 9\)"):
        sorted_neighbours(order, sig[..., :8], bad)
    with pytest.raises(ValueError, match=r"sig must be torch\.int64"):
        sorted_neighbours(order, sig.int(), bad)
    with pytest.raises(ValueError, match=r"bad must be torch\.bool"):
        sorted_neighbours(order, sig, bad.long())
    with pytest.raises(ValueError, match="order"):
        sorted_neighbours(order[0], sig, bad)
    with pytest.raises(ValueError, match="order must hold at least one table"):
        sorted_neighbours(order[:, :, :0], sig, bad)
