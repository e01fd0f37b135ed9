"""Triton kernel: symmetric per-vector int8 codes in one pass (:mod:`longroll.ops.quantize` launches it).

In torch ops the codes of a (rows, D) tensor are eight kernels (abs, amax, clamp, divide, divide, round, clamp,
cast), each reading or writing the whole tensor; TempCache quantises two frames' matching keys per committed
frame and layer, AnnSA's buckets every chunk's keys. Here each program loads BLOCK rows once and writes their
codes and scales. The arithmetic is the twin's: IEEE round-to-nearest divisions (``div_rn``, not the
approximate ``/``), torch's product with the float32 reciprocal where it uses one (a CUDA tensor divided by a
host scalar), and round-half-to-even; so the codes and scales are the same bits.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _round_half_even(y):
    """torch.round of float32 ``y``: the nearest integer, halves to the even one (``y - floor(y)`` is exact)."""
    f = tl.math.floor(y)
    frac = y - f
    even = (f - 2.0 * tl.math.floor(f * 0.5)) == 0.0
    up = (frac > 0.5) | ((frac == 0.5) & ~even)
    return tl.where(up, f + 1.0, f)


@triton.jit
def quantize_kernel(
    x_ptr, codes_ptr, scale_ptr,
    rows, inv127,
    stride_xr, stride_cr,
    RECIPROCAL: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """BLOCK rows of x (rows, D) -> codes (rows, D) int8 = round(x / scale) clamped to [-127, 127] and scale
    (rows,) float32 = max(max |x|, 1e-12) / 127 (with RECIPROCAL: times inv127, as torch on CUDA). A row
    holding NaN gets scale NaN, one holding inf scale inf; their codes are meaningless (0 where the quotient
    is NaN)."""
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = r < rows
    dims = tl.arange(0, D)
    x = tl.load(x_ptr + r[:, None].to(tl.int64) * stride_xr + dims[None, :], mask=mask[:, None], other=0.0)
    x = x.to(tl.float32)
    nan = tl.sum((x != x).to(tl.int32), axis=1) > 0
    amax = tl.max(tl.abs(x), axis=1)
    floor = tl.maximum(amax, 1e-12)
    if RECIPROCAL:
        # torch divides a CUDA tensor by a host scalar as a product with its float32 reciprocal (inv127).
        scale = floor * inv127
    else:
        scale = tl.math.div_rn(floor, tl.full((BLOCK,), 127.0, tl.float32))
    scale = tl.where(nan, float("nan"), scale)
    q = _round_half_even(tl.math.div_rn(x, scale[:, None] + tl.zeros((BLOCK, D), tl.float32)))
    q = tl.minimum(tl.maximum(q, -127.0), 127.0)
    q = tl.where(q != q, 0.0, q)  # NaN rows, and inf / inf in a row holding inf
    tl.store(codes_ptr + r[:, None].to(tl.int64) * stride_cr + dims[None, :], q.to(tl.int8), mask=mask[:, None])
    tl.store(scale_ptr + r, scale, mask=mask)


__all__ = ["quantize_kernel"]
