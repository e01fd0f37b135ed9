"""Top-1 search by int8 code products: the fused Triton kernel and its torch reference twin.

``backend="triton"`` runs :mod:`longroll.kernels.int8_top1` (CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``); ``"torch"`` the reference: the full score matrix, then its arg-max; ``"auto"`` the kernel
for CUDA tensors it supports and the reference otherwise. Both give the same index (ties: the lowest).
"""

from __future__ import annotations

import os
from typing import Literal

import torch

from longroll.ops._checks import check_rank

Top1Backend = Literal["auto", "torch", "triton"]
TOP1_BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")
#: Head dims the kernel supports (tensor-core tiles).
TOP1_HEAD_DIMS: tuple[int, ...] = (16, 32, 64, 128, 256)
# Measured on an H200 at Wan shapes (scripts/gpu_bench_commit_parts.py): int8 products on 64 x 128 tiles take
# 37 us per frame and layer against 61 us for fp16 products on 64 x 64 tiles. The int8 MMA's k-step is 32:
# head dim 16 keeps the fp16 products.
_BLOCK_N, _BLOCK_M = 64, 128


def int8_top1_reference(qc: torch.Tensor, qs: torch.Tensor, cc: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:
    """The reference twin: ``argmax_j (qc_i . cc_j) * qs_i * cs_j``; shapes as :func:`int8_top1`."""
    dots = torch.matmul(qc.float(), cc.float().transpose(-1, -2))
    return (dots * qs[..., :, None] * cs[..., None, :]).argmax(dim=-1)


def _check(qc: torch.Tensor, qs: torch.Tensor, cc: torch.Tensor, cs: torch.Tensor) -> None:
    for name, x, rank in (("qc", qc, 4), ("qs", qs, 3), ("cc", cc, 4), ("cs", cs, 3)):
        check_rank(name, x, rank)
    b, h, n, d = qc.shape
    m = cc.shape[2]
    if cc.shape[:2] != (b, h) or cc.shape[3] != d:
        raise ValueError(f"cc must have shape ({b}, {h}, m, {d}), got {tuple(cc.shape)}")
    if m == 0:
        raise ValueError("cc must hold at least one candidate, got m = 0")
    if tuple(qs.shape) != (b, h, n) or tuple(cs.shape) != (b, h, m):
        raise ValueError(f"qs must be {(b, h, n)} and cs {(b, h, m)}, got {tuple(qs.shape)} and {tuple(cs.shape)}")
    for name, x in (("qc", qc), ("cc", cc)):
        if x.dtype != torch.int8:
            raise ValueError(f"{name} must be int8 codes, got {x.dtype}")
    for name, x in (("qs", qs), ("cs", cs)):
        if x.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 scales, got {x.dtype}")
    if len({t.device for t in (qc, qs, cc, cs)}) != 1:
        raise ValueError("qc, qs, cc and cs must be on one device")


def _kernel_ok(qc: torch.Tensor) -> bool:
    on_device = qc.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return on_device and qc.shape[-1] in TOP1_HEAD_DIMS


def int8_top1(
    qc: torch.Tensor, qs: torch.Tensor, cc: torch.Tensor, cs: torch.Tensor, *, backend: Top1Backend = "auto"
) -> torch.Tensor:
    """Index of each query's best candidate by quantised dot product.

    Args:
        qc: (batch, heads, n, d) int8 query codes; qs: (batch, heads, n) float32 scales.
        cc: (batch, heads, m, d) int8 candidate codes, m >= 1; cs: (batch, heads, m) float32 scales.
        backend: see the module docstring.

    Returns:
        (batch, heads, n) int64.
    """
    if backend not in TOP1_BACKENDS:
        raise ValueError(f"backend must be one of {TOP1_BACKENDS}, got {backend!r}")
    _check(qc, qs, cc, cs)
    if backend == "auto":
        backend = "triton" if qc.is_cuda and _kernel_ok(qc) else "torch"
    if backend == "torch":
        return int8_top1_reference(qc, qs, cc, cs)
    if not _kernel_ok(qc):
        raise ValueError(
            f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1) and head_dim in {TOP1_HEAD_DIMS}, got "
            f"{qc.device} and head_dim {qc.shape[-1]}"
        )
    from longroll.kernels.int8_top1 import int8_top1_kernel

    b, h, n, d = qc.shape
    m = cc.shape[2]
    q2 = qc.reshape(b * h, n, d).contiguous()
    c2 = cc.reshape(b * h, m, d).contiguous()
    qs2 = qs.reshape(b * h, n).contiguous()
    cs2 = cs.reshape(b * h, m).contiguous()
    out = torch.empty(b * h, n, dtype=torch.int64, device=qc.device)
    grid = ((n + _BLOCK_N - 1) // _BLOCK_N, b * h)
    int8_top1_kernel[grid](
        q2, qs2, c2, cs2, out, n, m,
        q2.stride(0), q2.stride(1), qs2.stride(0), c2.stride(0), c2.stride(1), cs2.stride(0), out.stride(0),
        D=d, BLOCK_N=_BLOCK_N, BLOCK_M=_BLOCK_M, INT8_DOT=d >= 32,
    )  # fmt: skip
    return out.view(b, h, n)


__all__ = ["TOP1_BACKENDS", "TOP1_HEAD_DIMS", "Top1Backend", "int8_top1", "int8_top1_reference"]
