"""The one-pass augmentation kernel (compiled on CUDA in the GPU suite, the Triton interpreter on CPU) writes
exactly the bits of its torch twin, ``augment_qk(backend="torch")``, over odd shapes, strided inputs, masked,
NaN and tiny biases."""

import math
import os

import pytest
import torch

from longroll.ops.attention import MASKED_BIAS, attention, augment_qk
from tests.device import KERNEL_DEVICE

KERNEL_DEVICE_AWARE = True  # the kernel's tensors live on KERNEL_DEVICE: CUDA in the GPU suite
DEV = KERNEL_DEVICE
needs_kernel = pytest.mark.skipif(
    DEV.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1", reason="needs CUDA or the Triton interpreter"
)
# bf16 casts are exact only on the GPU (the interpreter's are not the device's); fp16 and fp32 everywhere.
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if DEV.type == "cuda" else [])


def _inputs(b, h, hk, lq, lk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g).to(DEV, dtype)
    k = torch.randn(b, hk, lk, d, generator=g).to(DEV, dtype)
    bias = torch.log(torch.randint(1, 300, (b, hk, lk), generator=g).double()).float().to(DEV)
    return q, k, bias


@needs_kernel
@pytest.mark.parametrize(("lq", "lk"), [(1, 1), (97, 1025), (200, 97), (5, 257)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("d", "multiple"), [(64, 64), (128, 16), (128, 64), (40, 8)])
def test_kernel_gives_the_twins_bits(lq, lk, dtype, d, multiple):
    q, k, bias = _inputs(2, 4, 2, lq, lk, d, dtype)
    bias[0, 0, :3] = float("-inf")
    bias[1, 1, -1] = MASKED_BIAS * 4
    bias[0, 1, 0] = 1e-7  # its low half is nearly all of it
    qa, ka = augment_qk(q, k, bias, 1 / math.sqrt(d), multiple, backend="triton")
    qt, kt = augment_qk(q, k, bias, 1 / math.sqrt(d), multiple, backend="torch")
    assert qa.shape == qt.shape and ka.shape == kt.shape and qa.is_contiguous() and ka.is_contiguous()
    assert torch.equal(qa, qt) and torch.equal(ka, kt)


@needs_kernel
def test_strided_views_and_nan_are_kept():
    q, k, bias = _inputs(1, 4, 4, 33, 300, 64, torch.float16)
    big = torch.zeros(1, 4, 512, 64, dtype=torch.float16, device=DEV)
    big[:, :, :300] = k
    view = big[:, :, :300]  # a cache view: rows strided by the capacity
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, L, H, D) storage seen as (B, H, L, D)
    bias[0, 2, 7] = float("nan")
    qa, ka = augment_qk(qt, view, bias, 0.125, backend="triton")
    qr, kr = augment_qk(q, k, bias, 0.125, backend="torch")
    assert torch.equal(qa, qr)
    assert torch.equal(ka.nan_to_num(nan=123.0), kr.nan_to_num(nan=123.0))
    assert torch.isnan(ka[0, 2, 7, 64]) and not torch.isnan(ka[0, 2, 6]).any()


@needs_kernel
def test_a_bias_strided_along_its_keys_is_read_right():
    q, k, bias = _inputs(1, 2, 2, 9, 97, 16, torch.float32)
    wide = torch.zeros(1, 2, 97, 3, device=DEV)
    wide[..., 1] = bias
    strided = wide[..., 1]  # stride 3 along the keys
    assert strided.stride(-1) != 1
    kernel = augment_qk(q, k, strided, 0.25, backend="triton")[1]
    assert torch.equal(kernel, augment_qk(q, k, bias, 0.25, backend="torch")[1])


def test_bad_backend_and_device_are_named():
    q, k, bias = (t.cpu() for t in _inputs(1, 2, 2, 3, 5, 16, torch.float32))
    with pytest.raises(ValueError, match="backend must be"):
        augment_qk(q, k, bias, 0.25, backend="cuda")  # type: ignore[arg-type]
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="backend='triton' needs CUDA"):
            augment_qk(q, k, bias, 0.25, backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augmented_route_on_cuda_uses_the_kernel_and_matches_the_mask_route():
    q, k, bias = _inputs(1, 4, 2, 97, 1025, 128, torch.bfloat16)
    q, k, bias = q.cuda(), k.cuda(), bias.cuda()
    v = torch.randn_like(k)
    a = attention(q, k, v, bias, backend="sdpa_augmented").out.float()
    m = attention(q, k, v, bias, backend="chunked").out.float()
    assert (a - m).abs().max() < 2e-2
