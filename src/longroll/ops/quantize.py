"""Symmetric per-vector int8 codes: the fused Triton kernel and its torch reference twin.

``backend="triton"`` runs :mod:`longroll.kernels.quantize` (CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``, head dims a power of two from 16 to 1024); ``"torch"`` the reference; ``"auto"`` the
kernel on CUDA where it applies and the reference elsewhere. Both give the same codes and scales, bit for bit.
A row holding NaN gets a NaN scale, one holding inf an infinite one; the codes of a row that is not finite are
meaningless (the kernel writes 0 where the quotient is NaN; the twin's cast of NaN is undefined).
"""

from __future__ import annotations

import os
from typing import Literal

import torch

QuantizeBackend = Literal["auto", "torch", "triton"]
QUANTIZE_BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")
_BLOCK = 16
#: float32(1) / float32(127), the reciprocal torch multiplies by when a CUDA tensor is divided by 127.0.
_INV127 = float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(127.0, dtype=torch.float32))


def quantize_int8_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference twin: x (..., d) float -> codes (..., d) int8 with x ~= codes * scale, scale (...) float32."""
    scale = x.float().abs().amax(dim=-1).clamp_min(1e-12) / 127.0
    codes = torch.round(x.float() / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return codes, scale


def _why_not(x: torch.Tensor) -> str | None:
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return f"needs CUDA tensors (or TRITON_INTERPRET=1), got {x.device}"
    d = x.shape[-1]
    if d < 16 or d > 1024 or d & (d - 1):
        return f"needs a head dim that is a power of two in [16, 1024], got {d}"
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"takes float32, float16 or bfloat16, got {x.dtype}"
    return None


def quantize_int8(x: torch.Tensor, *, backend: QuantizeBackend = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-vector int8 codes.

    Args:
        x: (..., d) float, at least one dimension.
        backend: see the module docstring.

    Returns:
        codes: (..., d) int8 with x ~= codes * scale; scale: (...) float32.
    """
    if backend not in QUANTIZE_BACKENDS:
        raise ValueError(f"backend must be one of {QUANTIZE_BACKENDS}, got {backend!r}")
    if x.dim() < 1:
        raise ValueError(f"x must have at least one dimension, got shape {tuple(x.shape)}")
    why = _why_not(x)
    if backend == "triton" and why is not None:
        raise ValueError(f"backend='triton' {why}")
    if backend == "torch" or why is not None or (backend == "auto" and not x.is_cuda) or x.numel() == 0:
        return quantize_int8_reference(x)
    from longroll.kernels.quantize import quantize_kernel

    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    codes = torch.empty(rows, d, dtype=torch.int8, device=x.device)
    scale = torch.empty(rows, dtype=torch.float32, device=x.device)
    # The twin's ``/ 127.0`` is a true division on the CPU and a product with the float32 reciprocal on CUDA.
    quantize_kernel[((rows + _BLOCK - 1) // _BLOCK,)](
        x2, codes, scale, rows, _INV127, x2.stride(0), codes.stride(0),
        RECIPROCAL=x.is_cuda, D=d, BLOCK=_BLOCK,
    )  # fmt: skip
    return codes.view(x.shape), scale.view(x.shape[:-1])


__all__ = ["QUANTIZE_BACKENDS", "QuantizeBackend", "quantize_int8", "quantize_int8_reference"]
