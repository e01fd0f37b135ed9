"""The fused int8 quantisation kernel (``longroll.ops.quantize``) gives its torch twin's codes and scales, bit for
bit, over odd row counts, head dims, dtypes, zeros, huge values and NaN rows; bad arguments are refused."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longroll.ops.quantize import quantize_int8, quantize_int8_reference
from tests.device import KERNEL_DEVICE

KERNEL_DEVICE_AWARE = True  # the kernel's tensors live on KERNEL_DEVICE: CUDA in the GPU suite
DEV = KERNEL_DEVICE


def _same(x: torch.Tensor) -> None:
    c0, s0 = quantize_int8_reference(x)
    c1, s1 = quantize_int8(x, backend="triton")
    assert c1.shape == x.shape and c1.dtype == torch.int8
    assert s1.shape == x.shape[:-1] and s1.dtype == torch.float32
    assert torch.equal(s0.isnan(), s1.isnan())
    ok = ~s0.isnan()
    assert torch.equal(s1[ok], s0[ok])
    # The codes of a row that is not finite are meaningless (the twin's cast of NaN is undefined).
    finite = x.isfinite().all(-1)
    assert torch.equal(c1[finite], c0[finite])


@pytest.mark.parametrize("shape", [(1, 16), (97, 32), (1025, 128), (2, 3, 5, 64), (1, 1, 1, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_equals_twin(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 3).to(dtype).to(DEV)
    _same(x)


def test_edge_rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 32, generator=g)
    x[0] = 0.0  # an all-zero row: the scale's floor
    x[1, 3] = float("nan")  # a NaN row: NaN scale
    x[2] = 1e30  # huge values
    x[3] = 1e-30  # tiny values, below the floor
    x[4, :] = torch.linspace(-1, 1, 32)  # exact halves after scaling (round half to even)
    x[5, 7] = float("inf")
    x = x.to(DEV)
    _same(x)
    _, s = quantize_int8(x, backend="triton")
    assert s[1].isnan() and not s[0].isnan()


def test_non_contiguous_rows():
    x = torch.randn(4, 6, 64, generator=torch.Generator().manual_seed(1)).to(DEV).transpose(0, 1)
    _same(x)


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 300), logd=st.integers(4, 7), seed=st.integers(0, 2**16))
def test_random_shapes(rows, logd, seed):
    _same(torch.randn(rows, 1 << logd, generator=torch.Generator().manual_seed(seed)).to(DEV))


def test_bad_arguments():
    x = torch.randn(3, 16).to(DEV)
    with pytest.raises(ValueError, match="backend"):
        quantize_int8(x, backend="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="power of two"):
        quantize_int8(torch.randn(3, 24).to(DEV), backend="triton")
    with pytest.raises(ValueError, match="at least one dimension"):
        quantize_int8(torch.tensor(1.0))
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        quantize_int8(torch.ones(3, 16, dtype=torch.float64).to(DEV), backend="triton")
    # Where the kernel does not apply, "auto" takes the twin.
    c, s = quantize_int8(torch.randn(3, 24))
    assert c.shape == (3, 24) and s.shape == (3,)
