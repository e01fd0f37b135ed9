"""Exact int8 code products: the CUDA fp16 route and the float32 route agree with integer arithmetic."""

from __future__ import annotations

import pytest
import torch

from longroll.ann.buckets import int8_dot, int8_encode
from longroll.ann.int8 import code_dots, int8_scores, quantize_int8


def _codes(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)


@pytest.mark.parametrize(("n", "m", "d"), [(97, 33, 128), (5, 1025, 64), (1, 1, 1024)])
def test_code_dots_exact(n: int, m: int, d: int) -> None:
    qc, cc = _codes(2, 3, n, d, seed=n), _codes(2, 3, m, d, seed=m)
    exact = torch.matmul(qc.long(), cc.long().transpose(-1, -2))
    out = code_dots(qc, cc)
    assert out.dtype == torch.float32 and out.shape == (2, 3, n, m)
    assert torch.equal(out.long(), exact)
    # float-held codes (as the int8 bucket codes store them) give the same products
    assert torch.equal(code_dots(qc.float(), cc.float()), out)


def test_int8_scores_and_bucket_dots_agree() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 2, 97, 64, generator=g), torch.randn(1, 2, 50, 64, generator=g)
    ref = int8_scores(a, b)
    assert torch.allclose(int8_dot(int8_encode(a), int8_encode(b)), ref, rtol=0, atol=0)
    qa, sa = quantize_int8(a)
    assert torch.equal(code_dots(qa, quantize_int8(b)[0]) * sa[..., None] * quantize_int8(b)[1][..., None, :], ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_code_dots_cuda_matches_cpu() -> None:
    qc, cc = _codes(1, 12, 1560, 128, seed=1), _codes(1, 12, 1560, 128, seed=2)
    out = code_dots(qc.cuda(), cc.cuda()).cpu()
    assert torch.equal(out, code_dots(qc, cc))
