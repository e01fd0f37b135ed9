"""Triton kernel: a committed frame into TempCache's verbatim ring, the frame it displaces read out, in one pass
(:mod:`longroll.ops.ring` launches it).

With torch ops the swap is some fifteen kernels per frame and layer (the ring position, the slot range, index
selects of the leaving frame's keys, values and correspondences, index copies and fills of the new frame's
keys, values, counts, frame stamps and correspondences), each a few microseconds inside a captured commit.
Here one program moves a block of the frame's tokens: it reads the leaving entries at the ring position of the
committing frame (from its 0-d device tensor, so that a captured commit replays any frame) and writes the new
ones in their place.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def ring_swap_kernel(
    k_ptr, v_ptr, count_ptr, frame_ptr, ridx_ptr, rcos_ptr, now_ptr,
    knew_ptr, vnew_ptr, inew_ptr, cnew_ptr, kold_ptr, vold_ptr, iold_ptr, cold_ptr, slots_ptr,
    p, heads, sink_frames, ring,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_cb, stride_ch, stride_fb, stride_fh,
    stride_rb, stride_rh, stride_rw, stride_sb, stride_sh, stride_sw,
    stride_nb, stride_nh, stride_np, stride_wb, stride_wh, stride_wp, stride_r,
    D: tl.constexpr, DV: tl.constexpr, FULL: tl.constexpr, HAS_TRACK: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """BLOCK tokens of one (batch, head) row of the frame ``now``, ring position ``(now - sink_frames) % ring``.

    With FULL the entries there are first copied out: keys to kold (rows, P, D), values to vold (rows, P, Dv),
    their correspondences to iold (rows, P) int64 and cold (rows, P) float32. Then the frame's keys knew
    (B, H, P, D), values vnew (B, H, P, Dv), count 1, frame stamp ``now`` and correspondences inew (rows, P)
    int64 / cnew (rows, P) float32 (-inf without HAS_TRACK) are written there; slots (rows, P) int64 = their
    slots."""
    row = tl.program_id(1)
    rb, rh = row // heads, row % heads
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = t < p
    now = tl.load(now_ptr).to(tl.int64)
    pos = (now - sink_frames) % ring
    slot = sink_frames * p + pos * p + t
    dims, vdims = tl.arange(0, D), tl.arange(0, DV)
    kaddr = k_ptr + rb * stride_kb + rh * stride_kh + slot[:, None] * stride_kn + dims[None, :]
    vaddr = v_ptr + rb * stride_vb + rh * stride_vh + slot[:, None] * stride_vn + vdims[None, :]
    raddr = ridx_ptr + rb * stride_rb + rh * stride_rh + pos * stride_rw + t
    caddr = rcos_ptr + rb * stride_sb + rh * stride_sh + pos * stride_sw + t
    if FULL:
        tl.store(kold_ptr + row * p * D + t[:, None] * D + dims[None, :], tl.load(kaddr, mask=mask[:, None]),
                 mask=mask[:, None])  # fmt: skip
        tl.store(vold_ptr + row * p * DV + t[:, None] * DV + vdims[None, :], tl.load(vaddr, mask=mask[:, None]),
                 mask=mask[:, None])  # fmt: skip
        tl.store(iold_ptr + row * stride_r + t, tl.load(raddr, mask=mask).to(tl.int64), mask=mask)
        tl.store(cold_ptr + row * stride_r + t, tl.load(caddr, mask=mask), mask=mask)
    kn = tl.load(knew_ptr + rb * stride_nb + rh * stride_nh + t[:, None] * stride_np + dims[None, :],
                 mask=mask[:, None])  # fmt: skip
    tl.store(kaddr, kn.to(k_ptr.dtype.element_ty), mask=mask[:, None])
    vn = tl.load(vnew_ptr + rb * stride_wb + rh * stride_wh + t[:, None] * stride_wp + vdims[None, :],
                 mask=mask[:, None])  # fmt: skip
    tl.store(vaddr, vn.to(v_ptr.dtype.element_ty), mask=mask[:, None])
    tl.store(count_ptr + rb * stride_cb + rh * stride_ch + slot, tl.full((BLOCK,), 1.0, tl.float32), mask=mask)
    tl.store(frame_ptr + rb * stride_fb + rh * stride_fh + slot, tl.full((BLOCK,), 0, tl.int32) + now.to(tl.int32),
             mask=mask)  # fmt: skip
    tl.store(raddr, tl.load(inew_ptr + row * stride_r + t, mask=mask).to(tl.int32), mask=mask)
    if HAS_TRACK:
        c = tl.load(cnew_ptr + row * stride_r + t, mask=mask)
    else:
        c = tl.full((BLOCK,), float("-inf"), tl.float32)
    tl.store(caddr, c, mask=mask)
    tl.store(slots_ptr + row * stride_r + t, slot, mask=mask)


__all__ = ["ring_swap_kernel"]
