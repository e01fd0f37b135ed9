"""The fused int8 top-1 kernel (compiled on CUDA in the GPU suite, the Triton interpreter on CPU) picks exactly
the reference twin's index, with int8 (head dim >= 32) and fp16 (16) tensor-core products."""

import pytest
import torch

from longroll.ann import Int8Config, Int8Searcher
from longroll.ann.int8 import quantize_int8
from longroll.ops.top1 import int8_top1, int8_top1_reference
from tests.device import KERNEL_DEVICE

KERNEL_DEVICE_AWARE = True  # the kernel's tensors live on KERNEL_DEVICE: CUDA in the GPU suite
DEV = KERNEL_DEVICE


def _codes(b, h, n, d, seed):
    x = torch.randn(b, h, n, d, generator=torch.Generator().manual_seed(seed))
    return quantize_int8(x.to(DEV))


@pytest.mark.parametrize(("n", "m", "d"), [(97, 1025, 16), (64, 64, 32), (1, 130, 128), (65, 3, 16), (131, 257, 64)])
def test_kernel_equals_reference(n, m, d):
    qc, qs = _codes(2, 3, n, d, 0)
    cc, cs = _codes(2, 3, m, d, 1)
    want = int8_top1_reference(qc, qs, cc, cs)
    got = int8_top1(qc, qs, cc, cs, backend="triton")
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_ties_go_to_the_lowest_index_across_blocks():
    qc, qs = _codes(1, 2, 70, 16, 2)
    cc, cs = _codes(1, 2, 40, 16, 3)
    # the same candidates again, further on (second key block and beyond): their scores tie with the first ones
    cc2, cs2 = torch.cat([cc, cc, cc], 2), torch.cat([cs, cs, cs], 2)
    got = int8_top1(qc, qs, cc2, cs2, backend="triton")
    assert int(got.max()) < 40
    torch.testing.assert_close(got, int8_top1_reference(qc, qs, cc2, cs2), rtol=0, atol=0)


def test_searcher_backends_agree_and_inputs_are_checked():
    x = torch.randn(2, 2, 33, 16, generator=torch.Generator().manual_seed(4)).to(DEV)
    c = torch.randn(2, 2, 50, 16, generator=torch.Generator().manual_seed(5)).to(DEV)
    fused = Int8Searcher(Int8Config(top1_backend="triton")).top1(x, c)
    torch.testing.assert_close(fused, Int8Searcher(Int8Config()).top1(x, c), rtol=0, atol=0)
    qc, qs = _codes(1, 1, 4, 16, 6)
    with pytest.raises(ValueError, match="backend"):
        int8_top1(qc, qs, qc, qs, backend="fast")
    with pytest.raises(ValueError, match="qc must be int8"):
        int8_top1(qc.float(), qs, qc, qs)
    with pytest.raises(ValueError, match="cc must have shape"):
        int8_top1(qc, qs, qc[..., :8], qs)
    q24, s24 = _codes(1, 1, 4, 24, 7)
    with pytest.raises(ValueError, match="head_dim"):
        int8_top1(q24, s24, q24, s24, backend="triton")
    with pytest.raises(ValueError, match="top1_backend"):
        Int8Config(top1_backend="cuda")
