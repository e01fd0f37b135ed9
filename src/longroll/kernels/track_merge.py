"""Triton kernels of TempCache's per-frame merge into the previous frame's groups
(:mod:`longroll.ops.track_merge` launches them).

Each token of a committed frame has its top-1 match in the previous frame. In torch ops the merge is some forty
small kernels per frame: the open-group mask, the one-to-one resolution (two scatter-reduces and gathers), the
overflow merges, the count-weighted value means (scatters of the values and counts, gathers of the groups) and
the key writes. Here it is four:

1. ``claim``: each token whose match is open (active, group not full) and at least ``threshold`` similar bids
   for it with an integer ``atomic_max`` of ``(cosine bits << 32) | (2**31 - 1 - token)``: the most similar
   token wins, the lowest on ties, the same every run;
2. ``decide``: the winners, and the row's count of them;
3. ``merge``: under the cap, the tokens that lost but are ``overflow_threshold`` similar merge too; every
   merged token adds one to its group's count (integer atomics) and names the group's first merged token; a
   winner writes its key as the group's representative;
4. ``fold``: each group with merges takes the count-weighted mean of its value and its new members' values
   (summed in a fixed order), the new count and the frame stamp.

``place`` then puts the unmerged tokens in free slots and the victims' slots and writes them (a block of tokens
per program; each counts the new tokens of the blocks before it, so the row's placement is a prefix sum without
a second pass).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _bid(cm, t, elig):
    """A token's bid for its match: positive floats order as their bits, so the cosine first, then the lowest
    token."""
    return (tl.where(elig, cm, 0.0).to(tl.int32, bitcast=True).to(tl.int64) << 32) | (2147483647 - t).to(tl.int64)


@triton.jit
def claim_kernel(
    idx_ptr, cos_ptr, slots_ptr, active_ptr, count_ptr, best_ptr, cm_ptr,
    p, threshold, max_group, heads,
    stride_r, stride_cb, stride_ch,
    HAS_MAX_GROUP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """BLOCK tokens of one row (all (rows, P) tensors share ``stride_r``): cm = cos where the match is open,
    -inf elsewhere; best[match] = max over the eligible bids."""
    row = tl.program_id(1)
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = t < p
    j = tl.load(idx_ptr + row * stride_r + t, mask=mask, other=0)
    cos = tl.load(cos_ptr + row * stride_r + t, mask=mask, other=float("-inf"))
    open_ = tl.load(active_ptr + row * stride_r + j, mask=mask, other=0) != 0
    if HAS_MAX_GROUP:
        slot = tl.load(slots_ptr + row * stride_r + j, mask=mask, other=0)
        cnt = tl.load(count_ptr + (row // heads) * stride_cb + (row % heads) * stride_ch + slot, mask=mask, other=0.0)
        open_ = open_ & (cnt < max_group)
    cm = tl.where(open_, cos, float("-inf"))
    elig = mask & (cm >= threshold)
    bid = _bid(cm, t, elig)
    tl.atomic_max(best_ptr + row * stride_r + j, bid, mask=elig)
    tl.store(cm_ptr + row * stride_r + t, cm, mask=mask)


@triton.jit
def decide_kernel(
    idx_ptr, cm_ptr, best_ptr, win_ptr, nwin_ptr,
    p, threshold,
    stride_r,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """win (rows, P) uint8: the token's bid won its match; nwin (rows,) int32 += winners."""
    row = tl.program_id(1)
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = t < p
    j = tl.load(idx_ptr + row * stride_r + t, mask=mask, other=0)
    cm = tl.load(cm_ptr + row * stride_r + t, mask=mask, other=float("-inf"))
    elig = mask & (cm >= threshold)
    bid = _bid(cm, t, elig)
    best = tl.load(best_ptr + row * stride_r + j, mask=elig, other=0)
    win = elig & (best == bid)
    tl.store(win_ptr + row * stride_r + t, win.to(tl.uint8), mask=mask)
    tl.atomic_add(nwin_ptr + row, tl.sum(win.to(tl.int32), axis=0))


@triton.jit
def merge_kernel(
    idx_ptr, cm_ptr, slots_ptr, win_ptr, nwin_ptr, lengths_ptr, knew_ptr, k_ptr,
    soft_ptr, target_ptr, nadd_ptr, first_ptr,
    p, cap, overflow_threshold, heads,
    stride_r, stride_nb, stride_nh, stride_np, stride_kb, stride_kh, stride_kn,
    D: tl.constexpr, MAY_OVERFLOW: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """soft (rows, P) uint8 overflow merges; target (rows, P) int64 = the match's slot; nadd (rows, P) int32 +=
    merged tokens per match, first (rows, P) int32 = min merged token per match; winners' keys (knew
    (B, H, P, D)) written to their targets in k (B, H, S, D)."""
    row = tl.program_id(1)
    rb, rh = row // heads, row % heads
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = t < p
    j = tl.load(idx_ptr + row * stride_r + t, mask=mask, other=0)
    cm = tl.load(cm_ptr + row * stride_r + t, mask=mask, other=float("-inf"))
    win = tl.load(win_ptr + row * stride_r + t, mask=mask, other=0) != 0
    soft = tl.zeros((BLOCK,), tl.int1)
    if MAY_OVERFLOW:
        over = tl.load(lengths_ptr + row) + (p - tl.load(nwin_ptr + row)) > cap
        soft = mask & ~win & (cm >= overflow_threshold) & over
    merged = win | soft
    target = tl.load(slots_ptr + row * stride_r + j, mask=mask, other=0)
    tl.store(soft_ptr + row * stride_r + t, soft.to(tl.uint8), mask=mask)
    tl.store(target_ptr + row * stride_r + t, target, mask=mask)
    tl.atomic_add(nadd_ptr + row * stride_r + j, 1, mask=merged)
    tl.atomic_min(first_ptr + row * stride_r + j, t, mask=merged)
    dims = tl.arange(0, D)
    kn = tl.load(knew_ptr + rb * stride_nb + rh * stride_nh + t[:, None] * stride_np + dims[None, :],
                 mask=win[:, None], other=0.0)  # fmt: skip
    tl.store(k_ptr + rb * stride_kb + rh * stride_kh + target[:, None] * stride_kn + dims[None, :],
             kn.to(k_ptr.dtype.element_ty), mask=win[:, None])  # fmt: skip


@triton.jit
def fold_kernel(
    idx_ptr, win_ptr, soft_ptr, slots_ptr, nadd_ptr, first_ptr, vnew_ptr, v_ptr, count_ptr, frame_ptr, now_ptr,
    p, heads,
    stride_r, stride_nb, stride_nh, stride_np, stride_vb, stride_vh, stride_vn, stride_cb, stride_ch, stride_fb,
    stride_fh,
    DV: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One previous position ``j`` of one row: when tokens merged into it, its group (slot slots[j]) takes the
    count-weighted mean of its value and theirs (vnew (B, H, P, Dv)), the new count and the frame stamp."""
    row = tl.program_id(1)
    j = tl.program_id(0)
    na = tl.load(nadd_ptr + row * stride_r + j)
    if na > 0:
        rb, rh = row // heads, row % heads
        s = tl.load(slots_ptr + row * stride_r + j)
        dims = tl.arange(0, DV)
        nbase = vnew_ptr + rb * stride_nb + rh * stride_nh
        t0 = tl.load(first_ptr + row * stride_r + j)
        if na == 1:
            vsum = tl.load(nbase + t0 * stride_np + dims).to(tl.float32)
        else:
            # Several tokens merge into this group (overflow merges): summed block by block, a fixed order.
            vsum = tl.zeros((DV,), tl.float32)
            for start in range(t0, p, BLOCK):
                t = start + tl.arange(0, BLOCK)
                tm = t < p
                hit = tm & (tl.load(idx_ptr + row * stride_r + t, mask=tm, other=-1) == j)
                hit = hit & ((tl.load(win_ptr + row * stride_r + t, mask=hit, other=0)
                              | tl.load(soft_ptr + row * stride_r + t, mask=hit, other=0)) != 0)  # fmt: skip
                x = tl.load(nbase + t[:, None] * stride_np + dims[None, :], mask=hit[:, None], other=0.0)
                vsum += tl.sum(x.to(tl.float32), axis=0)
        cbase = count_ptr + rb * stride_cb + rh * stride_ch
        vbase = v_ptr + rb * stride_vb + rh * stride_vh
        c_old = tl.load(cbase + s)
        v_old = tl.load(vbase + s * stride_vn + dims).to(tl.float32)
        c_new = c_old + na.to(tl.float32)
        v_new = (v_old * c_old + vsum) / tl.maximum(c_new, 1.0)
        tl.store(vbase + s * stride_vn + dims, v_new.to(v_ptr.dtype.element_ty))
        tl.store(cbase + s, c_new)
        tl.store(frame_ptr + rb * stride_fb + rh * stride_fh + s, tl.load(now_ptr).to(tl.int32))




@triton.jit
def place_kernel(
    merged_ptr, target_ptr, victims_ptr, length_in_ptr, lengths_ptr, knew_ptr, vnew_ptr, k_ptr, v_ptr, count_ptr,
    frame_ptr, now_ptr, slots_ptr,
    p, cap, nvict, heads,
    stride_r, stride_vr, stride_nb, stride_nh, stride_np, stride_wb, stride_wh, stride_wp, stride_kb, stride_kh,
    stride_kn, stride_vb, stride_vh, stride_vn, stride_cb, stride_ch, stride_fb, stride_fh,
    D: tl.constexpr, DV: tl.constexpr, MAY_OVERFLOW: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """BLOCK tokens of one row: the frame's unmerged tokens take the free slots after the row's entries
    (length_in (rows,), read only), in token order, then (MAY_OVERFLOW) the victims (rows, nvict) in order;
    their keys, values, count 1 and frame stamp are written there; slots (rows, P) int64 = each token's slot
    (its target where it merged); lengths (rows,) += the free slots this block takes (an integer atomic: the
    row's length grows by its new tokens, at most to the cap)."""
    row = tl.program_id(1)
    start = tl.program_id(0) * BLOCK
    rb, rh = row // heads, row % heads
    length = tl.load(length_in_ptr + row)
    now = tl.load(now_ptr).to(tl.int32)
    dims, vdims = tl.arange(0, D), tl.arange(0, DV)
    # New tokens before this block: the flags of the blocks before it (P bytes at most).
    before = tl.zeros((), tl.int64)
    for s0 in range(0, start, BLOCK):
        tb = s0 + tl.arange(0, BLOCK)
        before += tl.sum((tl.load(merged_ptr + row * stride_r + tb, mask=tb < p, other=1) == 0).to(tl.int64), axis=0)
    t = start + tl.arange(0, BLOCK)
    tm = t < p
    new = tm & (tl.load(merged_ptr + row * stride_r + t, mask=tm, other=1) == 0)
    rank = before + tl.cumsum(new.to(tl.int64), axis=0) - 1
    slot = length + rank
    free = new & (rank < cap - length)
    if MAY_OVERFLOW:
        over = rank - (cap - length)
        ev = tl.load(victims_ptr + row * stride_vr + tl.minimum(tl.maximum(over, 0), nvict - 1), mask=new,
                     other=0)  # fmt: skip
        slot = tl.where(over >= 0, ev, slot)
    target = tl.load(target_ptr + row * stride_r + t, mask=tm & ~new, other=0)
    tl.store(slots_ptr + row * stride_r + t, tl.where(new, slot, target), mask=tm)
    kn = tl.load(knew_ptr + rb * stride_nb + rh * stride_nh + t[:, None] * stride_np + dims[None, :],
                 mask=new[:, None], other=0.0)  # fmt: skip
    tl.store(k_ptr + rb * stride_kb + rh * stride_kh + slot[:, None] * stride_kn + dims[None, :],
             kn.to(k_ptr.dtype.element_ty), mask=new[:, None])  # fmt: skip
    vn = tl.load(vnew_ptr + rb * stride_wb + rh * stride_wh + t[:, None] * stride_wp + vdims[None, :],
                 mask=new[:, None], other=0.0)  # fmt: skip
    tl.store(v_ptr + rb * stride_vb + rh * stride_vh + slot[:, None] * stride_vn + vdims[None, :],
             vn.to(v_ptr.dtype.element_ty), mask=new[:, None])  # fmt: skip
    tl.store(count_ptr + rb * stride_cb + rh * stride_ch + slot, tl.full((BLOCK,), 1.0, tl.float32), mask=new)
    tl.store(frame_ptr + rb * stride_fb + rh * stride_fh + slot, tl.full((BLOCK,), 0, tl.int32) + now, mask=new)
    tl.atomic_add(lengths_ptr + row, tl.sum(free.to(tl.int64), axis=0))


__all__ = ["claim_kernel", "decide_kernel", "fold_kernel", "merge_kernel", "place_kernel"]
