"""Triton kernel: every entry's best neighbour in several sorted LSH orders, by signature bits shared.

Redundancy eviction sorts a capped cache's entries by each table's LSH code and takes, for every entry, its
left and right neighbours in each sorted order as merge candidates, scored by how many bits of their 64-bit
signatures agree. Written with torch ops that is a gather, a popcount, masks, concatenations and scatters per
table and side (about 45 kernels per frame for four tables, each reading and writing (B, H, N) temporaries).
Here one program takes a block of entries, finds each one's position in every order through the inverse
permutation, reads its neighbours' signatures and keeps the best candidate in registers: one pass, no
temporaries.

Candidates are visited in the order (table 0 left, table 0 right, table 1 left, ...) and the first wins ties,
as in the torch twin (``longroll.ops.neighbours.sorted_neighbours_reference``); the arithmetic is integer, so
both give the same scores and partners.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _popcount64(x):
    # SWAR bit count; every shift is masked, so the arithmetic shift of negative values and the wrapping
    # product are harmless (the count, at most 64, sits in the top byte).
    x = x - ((x >> 1) & 0x5555555555555555)
    x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
    return (x * 0x0101010101010101) >> 56


@triton.jit
def lsh_neighbours_kernel(
    order_ptr, inv_ptr, sig_ptr, bad_ptr, score_ptr, nn_ptr,
    n,
    stride_or, stride_ot, stride_ir, stride_it, stride_sr, stride_br, stride_scr, stride_nr,
    TABLES: tl.constexpr, NBITS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK entries of one (batch, head) row, their 2 * TABLES candidates each."""
    row = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    sig = tl.load(sig_ptr + row * stride_sr + offs, mask=mask, other=0)
    bad = tl.load(bad_ptr + row * stride_br + offs, mask=mask, other=1) != 0
    best = tl.full((BLOCK,), float("-inf"), tl.float32)
    part = tl.zeros((BLOCK,), tl.int64)
    for t in tl.static_range(TABLES):
        r = tl.load(inv_ptr + row * stride_ir + t * stride_it + offs, mask=mask, other=0)
        for side in tl.static_range(2):
            q = r - 1 + 2 * side
            inside = (q >= 0) & (q < n)
            # Off either end the candidate is the entry itself (order[r]), scored -inf.
            qc = tl.where(inside, q, r)
            j = tl.load(order_ptr + row * stride_or + t * stride_ot + qc, mask=mask, other=0)
            sig_j = tl.load(sig_ptr + row * stride_sr + j, mask=mask, other=0)
            bad_j = tl.load(bad_ptr + row * stride_br + j, mask=mask, other=1) != 0
            agree = (NBITS - _popcount64(sig ^ sig_j)).to(tl.float32)
            sc = tl.where(inside & ~bad & ~bad_j, agree, float("-inf"))
            if t == 0 and side == 0:
                best, part = sc, j
            else:
                better = sc > best
                part = tl.where(better, j, part)
                best = tl.where(better, sc, best)
    tl.store(score_ptr + row * stride_scr + offs, best, mask=mask)
    tl.store(nn_ptr + row * stride_nr + offs, part, mask=mask)


__all__ = ["lsh_neighbours_kernel"]
