"""Triton kernel: the top-1 candidate of every query by int8 code products, without a score matrix.

TempCache's match asks, for each of a frame's P tokens, for the best of the previous frame's P entries. Done
as a matrix product followed by an arg-max it writes and reads back a P x P float32 score matrix per head and
frame (350 MB per layer and chunk at Wan2.1-1.3B shapes). Here each program keeps a block of queries in
registers, runs over the candidates block by block on the tensor cores, and keeps a running maximum and its
index, as flash attention keeps its running softmax.

Scores are ``(codes_q . codes_c) * scale_q * scale_c`` in float32, in that order, as the torch twin
(``longroll.ops.top1.int8_top1_reference``) computes them: the integer products are exact, on the int8 tensor
cores with int32 accumulation or in fp16 operands with float32 accumulation (|code| <= 127, head_dim <= 256),
so the kernel picks the same index, ties to the lowest.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def int8_top1_kernel(
    qc_ptr, qs_ptr, cc_ptr, cs_ptr, out_ptr,
    n, m,
    stride_qr, stride_qn, stride_qsr, stride_cr, stride_cm, stride_csr, stride_or,
    D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, INT8_DOT: tl.constexpr = False,
):  # fmt: skip
    """One program: BLOCK_N queries of one (batch, head) row against all m candidates of that row (INT8_DOT: the
    products on the int8 tensor cores with int32 accumulation, else fp16 operands with float32 accumulation;
    both exact)."""
    row = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    mask_n = offs_n < n
    q = tl.load(qc_ptr + row * stride_qr + offs_n[:, None] * stride_qn + offs_d[None, :],
                mask=mask_n[:, None], other=0)  # fmt: skip
    if not INT8_DOT:
        q = q.to(tl.float16)
    qs = tl.load(qs_ptr + row * stride_qsr + offs_n, mask=mask_n, other=0.0)
    best = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_N,), tl.int64)
    for start in range(0, m, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m
        c = tl.load(cc_ptr + row * stride_cr + offs_m[:, None] * stride_cm + offs_d[None, :],
                    mask=mask_m[:, None], other=0)  # fmt: skip
        cs = tl.load(cs_ptr + row * stride_csr + offs_m, mask=mask_m, other=0.0)
        if INT8_DOT:
            dots = tl.dot(q, tl.trans(c), out_dtype=tl.int32).to(tl.float32)
        else:
            dots = tl.dot(q, tl.trans(c.to(tl.float16)), out_dtype=tl.float32)
        s = (dots * qs[:, None]) * cs[None, :]
        s = tl.where(mask_m[None, :], s, float("-inf"))
        blk_max = tl.max(s, axis=1)
        blk_idx = tl.argmax(s, axis=1).to(tl.int64) + start
        better = blk_max > best
        best_idx = tl.where(better, blk_idx, best_idx)
        best = tl.where(better, blk_max, best)
    tl.store(out_ptr + row * stride_or + offs_n, best_idx, mask=mask_n)


__all__ = ["int8_top1_kernel"]
