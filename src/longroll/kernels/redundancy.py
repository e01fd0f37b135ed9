"""Triton kernels of redundancy eviction's merge plan (:mod:`longroll.ops.redundancy` launches them).

Written with torch ops, one redundancy search over a capped cache's N entries is some 250 small kernels per
committed frame (masks, gathers, scatters, reductions over (B, H, N) temporaries), each a few microseconds on
the GPU at Wan shapes. Here the plan is seven kernels over the row's entries or ranks (plus the projection
and three sorts):

1. ``pack``: the sign bits of each entry's projections -> every table's sort key (32 bits where the row is
   short enough: half the radix passes of the sort), the 64-bit signature, the entry's age key (copied: marked
   later) and the row's count of unprotected entries; after the sort, ``invert`` gives each table's order and
   each entry's position in it;
2. ``propose``: each entry's edge to its best neighbour names the older entry of the pair as the one to free;
   the best proposal for each freed entry (most bits shared, lowest proposer) is kept with an integer
   ``atomic_max`` (order-independent, so the same winner every run);
3. ``claim``: the winning proposer records the survivor of its freed entry;
4. ``rank``: each freed entry whose survivor is not itself freed gets a sort key (most bits first, lowest slot
   on ties) for the rank order;
5. ``cosine`` (each rank) and ``verify`` (one program per row, ranks in order): the ranks within the frame's
   need whose two stored keys reach the cosine threshold are accepted, in rank order; both entries are marked
   out of the age order, and each survivor learns its first accepted rank and how many ranks merge into it;
6. ``apply`` (one program per accepted rank): the first rank of each survivor folds every accepted rank naming
   that survivor, in rank order, into its count-weighted mean value and count.

Integer keys and integer atomics make every decision independent of thread order; the value sums run in
rank order in float64, so a run gives the same bits every time.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def pack_kernel(
    proj_ptr, prio_ptr, frame_ptr, count_ptr, lengths_ptr, now_ptr, keys_ptr, bad_ptr, sig_ptr, age_ptr, unprot_ptr,
    n, sink_frames,
    stride_pr, stride_pn, stride_qr, stride_fr, stride_cr, stride_kr, stride_kt, stride_br, stride_sr, stride_ar,
    PROTECTED: tl.constexpr, TABLES: tl.constexpr, BITS: tl.constexpr, KEY32: tl.constexpr,
    FROM_BUFFERS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """BLOCK entries of one row: proj (rows, N, TABLES * BITS) -> keys (rows, TABLES, N) ordered as
    ``(code, slot)`` (code ``2**BITS`` for bad entries: protected or NaN): int64 ``(code << 32) | slot``, or
    with KEY32 (N <= 2**15) int32 ``((code << 15) | slot) - 2**31``; bad (rows, N) uint8; sig (rows, N) int64;
    age (rows, N) int64 age keys: read from prio, or with FROM_BUFFERS made from frame (rows, S) int32,
    count (rows, S) float32, lengths (rows,) int64 and the committing frame now (one int64) as
    ``longroll.ops.redundancy.age_keys`` makes them; unprot (rows,) int32 += unprotected entries."""
    row = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if FROM_BUFFERS:
        fr = tl.load(frame_ptr + row * stride_fr + offs, mask=mask, other=-1).to(tl.int64)
        cnt = tl.load(count_ptr + row * stride_cr + offs, mask=mask, other=0.0)
        length = tl.load(lengths_ptr + row)
        now = tl.load(now_ptr)
        slot = offs.to(tl.int64)
        prot = (fr < sink_frames) | (fr >= now) | (slot >= length)
        c = tl.minimum(tl.maximum(cnt, 0.0), 16777215.0).to(tl.int64)
        key = (tl.minimum(tl.maximum(fr, 0), 262143) << 44) | (c << 20) | slot
        prio = tl.where(prot | ~mask, PROTECTED | slot, key)
    else:
        prio = tl.load(prio_ptr + row * stride_qr + offs, mask=mask, other=PROTECTED)
    protected = prio >= PROTECTED
    cols = tl.arange(0, TABLES * BITS)
    p = tl.load(
        proj_ptr + row * stride_pr + offs[:, None] * stride_pn + cols[None, :], mask=mask[:, None], other=0.0
    ).to(tl.float32)
    # A NaN key has NaN projections (as the torch twin, column 0 decides).
    bad = protected | (tl.sum(tl.where(cols[None, :] == 0, (p != p).to(tl.int32), 0), axis=1) > 0)
    bits = (p > 0).to(tl.int64)
    sig = tl.sum(bits << cols[None, :].to(tl.int64), axis=1)
    within = (bits << (cols[None, :] % BITS).to(tl.int64)).reshape(BLOCK, TABLES, BITS)
    codes = tl.sum(within, axis=2)  # (BLOCK, TABLES)
    codes = tl.where(bad[:, None], 1 << BITS, codes)
    tables = tl.arange(0, TABLES)
    if KEY32:
        keys = (((codes << 15) | offs[:, None].to(tl.int64)) - 2147483648).to(tl.int32)
    else:
        keys = (codes << 32) | offs[:, None].to(tl.int64)
    tl.store(keys_ptr + row * stride_kr + tables[None, :] * stride_kt + offs[:, None], keys, mask=mask[:, None])
    tl.store(bad_ptr + row * stride_br + offs, bad.to(tl.uint8), mask=mask)
    tl.store(sig_ptr + row * stride_sr + offs, sig, mask=mask)
    tl.store(age_ptr + row * stride_ar + offs, prio, mask=mask)
    tl.atomic_add(unprot_ptr + row, tl.sum((mask & ~protected).to(tl.int32), axis=0))


@triton.jit
def invert_kernel(
    sorted_ptr, order_ptr, inv_ptr,
    n,
    stride_sr, stride_st, stride_or, stride_ot, stride_ir, stride_it,
    SLOT_MASK: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """BLOCK sorted positions of one (row, table): order[r] = the slot in sorted key r, inv[slot] = r."""
    row = tl.program_id(1)
    t = tl.program_id(2)
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = r < n
    key = tl.load(sorted_ptr + row * stride_sr + t * stride_st + r, mask=mask, other=0)
    slot = (key & SLOT_MASK).to(tl.int64)
    tl.store(order_ptr + row * stride_or + t * stride_ot + r, slot, mask=mask)
    tl.store(inv_ptr + row * stride_ir + t * stride_it + slot, r.to(tl.int64), mask=mask)


@triton.jit
def _proposals(score_ptr, nn_ptr, age_ptr, row, offs, mask, threshold, stride_sr, stride_nr, stride_ar):
    """Each entry's proposal: eligible (enough bits shared), the older of the pair (freed), the other (the
    survivor) and its bid ``(bits << 32) | (2**31 - 1 - proposer)``."""
    score = tl.load(score_ptr + row * stride_sr + offs, mask=mask, other=float("-inf"))
    nn = tl.load(nn_ptr + row * stride_nr + offs, mask=mask, other=0)
    elig = mask & (score >= threshold)
    a_i = tl.load(age_ptr + row * stride_ar + offs, mask=mask, other=0)
    a_j = tl.load(age_ptr + row * stride_ar + nn, mask=elig, other=0)
    older = a_i < a_j
    freed = tl.where(older, offs.to(tl.int64), nn)
    surv = tl.where(older, nn, offs.to(tl.int64))
    bid = (tl.where(elig, score, 0.0).to(tl.int64) << 32) | (2147483647 - offs).to(tl.int64)
    return elig, freed, surv, bid


@triton.jit
def propose_kernel(
    score_ptr, nn_ptr, age_ptr, best_ptr,
    n, threshold,
    stride_sr, stride_nr, stride_ar, stride_br,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """best (rows, N) int64 (zeros before) = max over the proposals freeing each entry of their bids."""
    row = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    elig, freed, _, bid = _proposals(
        score_ptr, nn_ptr, age_ptr, row, offs, mask, threshold, stride_sr, stride_nr, stride_ar
    )
    tl.atomic_max(best_ptr + row * stride_br + freed, bid, mask=elig)


@triton.jit
def claim_kernel(
    score_ptr, nn_ptr, age_ptr, best_ptr, into_ptr,
    n, threshold,
    stride_sr, stride_nr, stride_ar, stride_br, stride_ir,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """into[freed] = survivor, written by the winning proposal of each freed entry alone."""
    row = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    elig, freed, surv, bid = _proposals(
        score_ptr, nn_ptr, age_ptr, row, offs, mask, threshold, stride_sr, stride_nr, stride_ar
    )
    best = tl.load(best_ptr + row * stride_br + freed, mask=elig, other=0)
    tl.store(into_ptr + row * stride_ir + freed, surv, mask=elig & (best == bid))


@triton.jit
def rank_kernel(
    best_ptr, into_ptr, rank_ptr,
    n,
    stride_br, stride_ir, stride_rr,
    NBITS: tl.constexpr, KEPT_SHIFT: tl.constexpr, NOT_KEPT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """rank (rows, N) sort key of each slot: ``((NBITS - bits) << KEPT_SHIFT) | slot`` where a kept merge frees
    it (its survivor is not itself freed), ``NOT_KEPT | slot`` elsewhere (int32 or int64, as rank)."""
    row = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    best = tl.load(best_ptr + row * stride_br + offs, mask=mask, other=0)
    has = best > 0
    surv = tl.load(into_ptr + row * stride_ir + offs, mask=mask & has, other=0)
    surv_freed = tl.load(best_ptr + row * stride_br + surv, mask=mask & has, other=0) > 0
    keep = has & ~surv_freed
    slot = offs.to(tl.int64)
    key = tl.where(keep, ((NBITS - (best >> 32)) << KEPT_SHIFT) | slot, NOT_KEPT | slot)
    tl.store(rank_ptr + row * stride_rr + offs, key.to(rank_ptr.dtype.element_ty), mask=mask)


@triton.jit
def cosine_kernel(
    ranked_ptr, into_ptr, need_ptr, unprot_ptr, k_ptr, ok_ptr,
    kk, threshold, heads,
    stride_rr, stride_ir, stride_kb, stride_kh, stride_kn, stride_okr,
    D: tl.constexpr, SLOT_MASK: tl.constexpr, NOT_KEPT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """BLOCK ranks of one row: ok (rows, kk) int8 = the rank is within the frame's limit
    ``min(need, unprotected - need)``, holds a kept merge, and its two stored keys reach the cosine threshold."""
    row = tl.program_id(1)
    rb, rh = row // heads, row % heads
    need = tl.load(need_ptr + row)
    unprot = tl.load(unprot_ptr + row).to(tl.int64)
    limit = tl.minimum(need, unprot - need)
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    key = tl.load(ranked_ptr + row * stride_rr + r, mask=r < kk, other=NOT_KEPT).to(tl.int64)
    sel = (r < kk) & (key < NOT_KEPT) & (r < limit)
    freed = key & SLOT_MASK
    surv = tl.load(into_ptr + row * stride_ir + freed, mask=sel, other=0)
    dims = tl.arange(0, D)
    kbase = k_ptr + rb * stride_kb + rh * stride_kh
    xf = tl.load(kbase + freed[:, None] * stride_kn + dims[None, :], mask=sel[:, None], other=0.0).to(tl.float32)
    xs = tl.load(kbase + surv[:, None] * stride_kn + dims[None, :], mask=sel[:, None], other=0.0).to(tl.float32)
    nf = tl.maximum(tl.sqrt(tl.sum(xf * xf, axis=1)), 1e-12)
    ns = tl.maximum(tl.sqrt(tl.sum(xs * xs, axis=1)), 1e-12)
    cos = tl.sum((xf / nf[:, None]) * (xs / ns[:, None]), axis=1)
    tl.store(ok_ptr + row * stride_okr + r, (sel & (cos >= threshold)).to(tl.int8), mask=r < kk)


@triton.jit
def verify_kernel(
    ranked_ptr, into_ptr, ok_ptr, age_ptr, first_ptr, members_ptr, freed_out_ptr, into_out_ptr, merged_ptr,
    kk,
    stride_rr, stride_ir, stride_okr, stride_ar, stride_fr, stride_mr, stride_or,
    PROTECTED: tl.constexpr, SLOT_MASK: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One row, its first kk ranks in order: the accepted merges' (freed, into) at the front of freed_out /
    into_out (rows, kk), their count in merged (rows,); age[freed] and age[into] marked PROTECTED | slot;
    first[into] (rows, N) int32 = the first accepted rank naming it, members[into] += 1."""
    row = tl.program_id(0)
    done = tl.zeros((), tl.int32)
    for start in range(0, kk, BLOCK):
        r = start + tl.arange(0, BLOCK)
        ok = tl.load(ok_ptr + row * stride_okr + r, mask=r < kk, other=0) != 0
        freed = tl.load(ranked_ptr + row * stride_rr + r, mask=ok, other=0).to(tl.int64) & SLOT_MASK
        surv = tl.load(into_ptr + row * stride_ir + freed, mask=ok, other=0)
        pos = done + tl.cumsum(ok.to(tl.int32), axis=0) - 1
        tl.store(freed_out_ptr + row * stride_or + pos, freed, mask=ok)
        tl.store(into_out_ptr + row * stride_or + pos, surv, mask=ok)
        tl.store(age_ptr + row * stride_ar + freed, PROTECTED | freed, mask=ok)
        tl.store(age_ptr + row * stride_ar + surv, PROTECTED | surv, mask=ok)
        tl.atomic_min(first_ptr + row * stride_fr + surv, pos, mask=ok)
        tl.atomic_add(members_ptr + row * stride_mr + surv, 1, mask=ok)
        done += tl.sum(ok.to(tl.int32), axis=0)
    tl.store(merged_ptr + row, done.to(tl.int64))


@triton.jit
def apply_kernel(
    freed_ptr, into_ptr, merged_ptr, first_ptr, members_ptr, v_ptr, count_ptr,
    heads,
    stride_or, stride_fr, stride_mr, stride_vb, stride_vh, stride_vn, stride_cb, stride_ch,
    DV: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One accepted rank ``pos`` of one row: when it is its survivor's first, the survivor's value becomes the
    count-weighted mean of itself and every accepted rank naming it (in rank order) and its count their sum."""
    row = tl.program_id(1)
    pos = tl.program_id(0)
    merged = tl.load(merged_ptr + row)
    if pos < merged:
        rb, rh = row // heads, row % heads
        s = tl.load(into_ptr + row * stride_or + pos)
        if tl.load(first_ptr + row * stride_fr + s) == pos:
            dims = tl.arange(0, DV)
            vbase = v_ptr + rb * stride_vb + rh * stride_vh
            cbase = count_ptr + rb * stride_cb + rh * stride_ch
            c_s = tl.load(cbase + s)
            v_s = tl.load(vbase + s * stride_vn + dims).to(tl.float32)
            members = tl.load(members_ptr + row * stride_mr + s)
            f = tl.load(freed_ptr + row * stride_or + pos)
            c_f = tl.load(cbase + f)
            c_add = c_f.to(tl.float64)
            # Products in float32 (as the torch twin), sums in float64: a few such terms add exactly.
            v_add = (tl.load(vbase + f * stride_vn + dims).to(tl.float32) * c_f).to(tl.float64)
            left = members - 1
            start = pos + 1
            # Further ranks merging into s (rare): scanned in rank order, BLOCK at a time.
            while left > 0:
                q = start + tl.arange(0, BLOCK)
                hit = (q < merged) & (tl.load(into_ptr + row * stride_or + q, mask=q < merged, other=-1) == s)
                for i in range(BLOCK):
                    is_hit = tl.sum(tl.where(tl.arange(0, BLOCK) == i, hit.to(tl.int32), 0), axis=0) > 0
                    if is_hit:
                        g = tl.load(freed_ptr + row * stride_or + start + i)
                        c_g = tl.load(cbase + g)
                        v_add += (tl.load(vbase + g * stride_vn + dims).to(tl.float32) * c_g).to(tl.float64)
                        c_add += c_g.to(tl.float64)
                left -= tl.sum(hit.to(tl.int32), axis=0)
                start += BLOCK
            c_new = c_s + c_add.to(tl.float32)
            v_new = (v_s * c_s + v_add.to(tl.float32)) / tl.maximum(c_new, 1.0)
            tl.store(vbase + s * stride_vn + dims, v_new.to(v_ptr.dtype.element_ty))
            tl.store(cbase + s, c_new)


__all__ = [
    "apply_kernel", "claim_kernel", "cosine_kernel", "invert_kernel", "pack_kernel", "propose_kernel", "rank_kernel",
    "verify_kernel",
]
