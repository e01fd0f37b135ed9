"""Triton kernel: rows widened for the head-dim augmentation of a per-key bias, in one pass.

The augmented routes fold TempCache's per-key bias into the dot product: every key row ``k`` becomes
``[k, b_hi, b_lo, 0, ...]`` (the bias split into a high and a low half in the keys' dtype) and every query row
``[q, c, c, 0, ...]``. Built with torch (a concatenation of the rows, the two halves and an expanded zero
tensor) that costs ~0.36 ms at 28k keys x 12 heads x 128 on an H200, a fifth of the attention it feeds, issued
for every layer and pass. Here one program copies a block of rows into the wider layout and writes the extra
columns from registers: one read of the rows, one write.

The arithmetic is the torch twin's (``longroll.ops.attention.augment_qk``): the float32 bias is clamped
from below with NaN kept (``tl.where`` on ``<``, as ``clamp_min`` does), ``hi`` is its round-to-nearest cast,
``lo`` the cast of the remainder, so both give the same bits.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def augment_rows_kernel(
    x_ptr, b_ptr, out_ptr,
    rows_per_head, d, width, fill, floor,
    stride_xb, stride_xh, stride_xr, stride_bb, stride_bh, stride_ob, stride_oh, stride_or,
    HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_R rows of one (batch, head), written ``width`` wide.

    Columns ``[0, d)`` copy x; columns ``d`` and ``d + 1`` hold the bias's high and low halves (``HAS_BIAS``)
    or ``fill`` twice; the rest are zero.
    """
    head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    x_ptr += batch * stride_xb
    b_ptr += batch * stride_bb
    out_ptr += batch * stride_ob
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_W)
    rmask = rows < rows_per_head
    x = tl.load(
        x_ptr + head * stride_xh + rows[:, None] * stride_xr + cols[None, :],
        mask=rmask[:, None] & (cols[None, :] < d),
        other=0.0,
    )
    dtype = out_ptr.dtype.element_ty
    if HAS_BIAS:
        b = tl.load(b_ptr + head * stride_bh + rows, mask=rmask, other=0.0).to(tl.float32)
        b = tl.where(b < floor, floor, b)  # clamp_min that keeps NaN
        hi = b.to(dtype)
        lo = (b - hi.to(tl.float32)).to(dtype)
    else:
        hi = tl.full((BLOCK_R,), fill, tl.float32).to(dtype)
        lo = hi
    c = cols[None, :]
    out = tl.where(c < d, x.to(dtype), tl.where(c == d, hi[:, None], tl.where(c == d + 1, lo[:, None], 0.0)))
    tl.store(
        out_ptr + head * stride_oh + rows[:, None] * stride_or + c,
        out.to(dtype),
        mask=rmask[:, None] & (c < width),
    )
