"""Triton kernel: the host tier's selected blocks copied from its store into the device slot region, read by the
GPU itself (:mod:`longroll.ops.host_gather` launches it).

The store is pinned host memory, which a CUDA device addresses directly (unified virtual addressing), so the
selection never has to reach the host: the block ids stay on the device and the copy is one kernel on the
stream that made them, ordered after the records' copies to host memory. One program moves a block of one
selected block's entries (keys, values and the log of their counts) of one (batch, head) row.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gather_blocks_kernel(
    sk_ptr, sv_ptr, sc_ptr, ids_ptr, ok_ptr, ok_k_ptr, ok_v_ptr, ob_ptr,
    batch, heads, record_tokens, blocks_per_record, num_blocks, top, block_tokens,
    stride_ib, stride_ih, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_bb, stride_bh,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """Entries ``[r0, r0 + BLOCK_R)`` of the ``t``-th selected block of row (b, h).

    The store (contiguous): keys sk (R, B, H, E, D), values sv (R, B, H, E, DV), counts sc (R, B, H, E) float32;
    block ``i`` is record ``i // blocks_per_record``, entries ``(i % blocks_per_record) * block_tokens`` on.
    ids (B, H, T) int64 (clamped to the store), ok (B, H, T) bool; out keys ok_k (B, H, T * bt, D), values ok_v
    (B, H, T * bt, DV), ob (B, H, T * bt) float32 = count, 0 where not ok (the launcher takes the log with torch,
    so that the bias has torch's bits)."""
    row = tl.program_id(1)
    b, h = row // heads, row % heads
    nrb = tl.cdiv(block_tokens, BLOCK_R)
    t, r0 = tl.program_id(0) // nrb, (tl.program_id(0) % nrb) * BLOCK_R
    i = tl.load(ids_ptr + b * stride_ib + h * stride_ih + t).to(tl.int64)
    i = tl.minimum(tl.maximum(i, 0), num_blocks - 1)
    ok = tl.load(ok_ptr + b * stride_ib + h * stride_ih + t).to(tl.int1)
    rec, blk = i // blocks_per_record, i % blocks_per_record
    r = r0 + tl.arange(0, BLOCK_R)
    rmask = r < block_tokens
    src = ((rec * batch + b) * heads + h) * record_tokens + blk * block_tokens + r.to(tl.int64)
    dst = t * block_tokens + r
    dk, dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    mk = rmask[:, None] & (dk[None, :] < D)
    kx = tl.load(sk_ptr + src[:, None] * D + dk[None, :], mask=mk)
    tl.store(ok_k_ptr + b * stride_kb + h * stride_kh + dst[:, None] * stride_kn + dk[None, :], kx, mask=mk)
    mv = rmask[:, None] & (dv[None, :] < DV)
    vx = tl.load(sv_ptr + src[:, None] * DV + dv[None, :], mask=mv)
    tl.store(ok_v_ptr + b * stride_vb + h * stride_vh + dst[:, None] * stride_vn + dv[None, :], vx, mask=mv)
    c = tl.load(sc_ptr + src, mask=rmask, other=0.0)
    c = tl.where(ok, c, 0.0)
    tl.store(ob_ptr + b * stride_bb + h * stride_bh + dst, c, mask=rmask)


__all__ = ["gather_blocks_kernel"]
