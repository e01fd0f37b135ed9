"""Triton block-sparse flash-attention forward with a per-key additive logit bias.

One program handles BLOCK_M query rows of one (batch, head, index row) and walks only the key blocks that row
of the index lists, in the order listed, BLOCK_N keys at a time. The kernel tile (BLOCK_M, BLOCK_N) divides the
index blocks (Q_BLOCK, KV_BLOCK) and is autotuned apart from them: a 128-row index block may be served by two
64-row programs. Softmax is computed online in float32 in base 2: the logit scale and the bias are folded with
log2(e) so that every score costs one FMA and one ``exp2``.

Schedules: "grid" (above; the default) or "persistent" (a fixed set of programs sharing every row's steps, see
:func:`block_sparse_fwd_persistent_kernel`). After the autotuner's first pick for a launch key, later launches
call the kernel with that configuration directly: the autotuner's dispatch is host time a short call cannot
hide.

Split-K: with ``split_k`` S > 1, the programs of a row (at most S, each with at least ``split_min`` blocks of
its list) take contiguous shares of the list and write float32 partials (normalised output and base-2
log-sum-exp) to a workspace; :func:`block_sparse_merge_kernel` combines them by their log-sum-exp. A row that
ends up with one share writes its output directly, so rows too short to split cost nothing extra.

Tensor layouts (all strides are passed, so (B, H, L, D) and (B, L, H, D) views both work without copies):

- q: (B, H, Lq, D); k, v: (B, Hkv, Lk, D), Hkv divides H (grouped-query attention: kv head = h // (H // Hkv)).
- bias: (B, Hkv, Lk) float32, added to the scaled logit; a value <= ``MASKED_BIAS`` removes the key.
- kv_num_blocks: (B, H, n_q_blocks) int32; kv_indices: (B, H, n_q_blocks, max_blocks) int32. Batch or head
  strides of 0 broadcast one index over batches or heads.
- out: (B, H, Lq, D) in q's dtype; lse: (B, H, Lq) float32 natural-log log-sum-exp, -inf for empty rows.

This module imports triton at import time; ``longroll.ops.block_sparse`` imports it lazily.
"""

from __future__ import annotations

import math
import os

import triton
import triton.language as tl

#: Head dims the kernel is compiled for (``tl.arange`` needs a power of two; ``tl.dot`` needs >= 16).
SUPPORTED_HEAD_DIMS: tuple[int, ...] = (16, 32, 64, 128, 256)
#: Index block sizes the kernel accepts on either axis (they are its tile sizes).
SUPPORTED_BLOCK_SIZES: tuple[int, ...] = (16, 32, 64, 128, 256)

#: A bias at or below this removes the key (same value as ``longroll.ops.attention.MASKED_BIAS``).
MASKED_BIAS: tl.constexpr = tl.constexpr(-30000.0)
_LOG2E = 1.4426950408889634
_LN2: tl.constexpr = tl.constexpr(0.6931471805599453)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# Device code keeps its compact argument lists (one line per stride group) out of the formatter's reach.
# fmt: off
@triton.jit
def _load_bias(bias_base, start_n, seqlen_k, stride_bn, offs_n, EVEN_K: tl.constexpr):
    b_ptrs = bias_base + start_n * stride_bn + offs_n * stride_bn
    if EVEN_K:
        return tl.load(b_ptrs)
    # -inf past seqlen_k masks the tail of a partial block through the bias add the scores need anyway.
    return tl.load(b_ptrs, mask=offs_n < seqlen_k - start_n, other=float("-inf"))


@triton.jit
def _attend_block(
    q, acc, m_i, l_i, k_src, v_src, b_raw, start_n, seqlen_k, qk_scale,
    stride_kn, stride_kd, stride_vn, stride_vd,
    offs_n, offs_d,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, USE_TMA: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    n_left = seqlen_k - start_n
    if USE_TMA:
        # The copy engine zero-fills rows past seqlen_k, so the tail block needs no load mask.
        k = tl.trans(k_src.load([start_n.to(tl.int32), 0]))
    else:
        # 64-bit math stays on the scalar block base; per-element offsets are 32-bit unless WIDE.
        k_ptrs = k_src + start_n * stride_kn + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
        if EVEN_K:
            # Every block is full: unmasked loads keep the copy path straight.
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=offs_n[None, :] < n_left, other=0.0)
    if DOT_FP32:
        # The interpreter multiplies bf16 bit patterns as integers; fp32 operands sidestep that.
        k = k.to(tl.float32)
    s = tl.dot(q, k, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        b = tl.where(b_raw <= MASKED_BIAS, float("-inf"), b_raw * 1.4426950408889634)
        s = s * qk_scale + b[None, :]
    else:
        s = s * qk_scale
        if not EVEN_K:
            s = tl.where(offs_n[None, :] < n_left, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen only masked keys keeps m = -inf; subtracting 0 instead avoids inf - inf = nan.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if USE_TMA:
        v = v_src.load([start_n.to(tl.int32), 0])
    else:
        v_ptrs = v_src + start_n * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
        if EVEN_K:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=offs_n[:, None] < n_left, other=0.0)
    if DOT_FP32:
        v = v.to(tl.float32)
        acc = tl.dot(p, v, acc, input_precision=DOT_PRECISION)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _step_start(idx_base, j, j_end, stride_ij, SUB: tl.constexpr, KV_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr):
    """First key of step j of a row: index entry j // SUB, tile j % SUB of it; 0 for steps past j_end."""
    kb = tl.load(idx_base + (j // SUB) * stride_ij, mask=j < j_end, other=0).to(tl.int64)
    return kb * KV_BLOCK + (j % SUB) * BLOCK_N


@triton.jit
def _num_splits(n_blocks, num_splits, split_min):
    """Programs that share a row of n_blocks: at most num_splits, each with at least split_min blocks."""
    ns = (n_blocks + split_min - 1) // split_min
    return tl.minimum(tl.maximum(ns, 1), num_splits)


@triton.jit
def _attend_steps(
    q_base, k_base, v_base, bias_base, idx_base, start_m, j0, j1, seqlen_q, seqlen_k, qk_scale,
    stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_bn, stride_ij,
    HEAD_DIM: tl.constexpr, KV_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, USE_TMA: tl.constexpr, WIDE: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online-softmax state (acc, m, l) of BLOCK_M query rows from start_m over steps [j0, j1) of their row.

    The bases point at one (batch, head) of q and one (batch, kv head) of k, v and the bias, and at the row of
    kv_indices; step j is tile j % SUB of the row's entry j // SUB (SUB = KV_BLOCK // BLOCK_N).
    """
    SUB: tl.constexpr = KV_BLOCK // BLOCK_N
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if WIDE:
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
        offs_d = offs_d.to(tl.int64)
    row_ok = offs_m < seqlen_q - start_m
    q_ptrs = q_base + start_m * stride_qm + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    k_src = k_base
    v_src = v_base
    if USE_TMA:
        # One (seqlen_k, HEAD_DIM) descriptor per (batch, kv head): any outer layout works, and rows past
        # seqlen_k read as zeros instead of the next head's keys.
        k_src = tl.make_tensor_descriptor(k_base, shape=[seqlen_k, HEAD_DIM], strides=[stride_kn, 1],
                                          block_shape=[BLOCK_N, HEAD_DIM])
        v_src = tl.make_tensor_descriptor(v_base, shape=[seqlen_k, HEAD_DIM], strides=[stride_vn, 1],
                                          block_shape=[BLOCK_N, HEAD_DIM])

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # The bias is fetched one step ahead (and its key offset two ahead) by hand: the pipeliner does not
    # stage such a small load, and waiting on it every block cost 12-16 % of the throughput on an H100.
    b_next = tl.zeros([BLOCK_N], dtype=tl.float32)
    st_ahead = tl.zeros([], dtype=tl.int64)
    if HAS_BIAS:
        st0 = _step_start(idx_base, j0, j1, stride_ij, SUB, KV_BLOCK, BLOCK_N)
        b_next = _load_bias(bias_base, st0, seqlen_k, stride_bn, offs_n, EVEN_K)
        st_ahead = _step_start(idx_base, j0 + 1, j1, stride_ij, SUB, KV_BLOCK, BLOCK_N)
    for j in range(j0, j1):
        start_n = _step_start(idx_base, j, j1, stride_ij, SUB, KV_BLOCK, BLOCK_N)
        b_cur = b_next
        if HAS_BIAS:
            # Issued now, consumed next step: the load latency hides behind this step's two matmuls.
            b_next = _load_bias(bias_base, st_ahead, seqlen_k, stride_bn, offs_n, EVEN_K)
            st_ahead = _step_start(idx_base, j + 2, j1, stride_ij, SUB, KV_BLOCK, BLOCK_N)
        acc, m_i, l_i = _attend_block(
            q, acc, m_i, l_i, k_src, v_src, b_cur, start_n, seqlen_k, qk_scale,
            stride_kn, stride_kd, stride_vn, stride_vd, offs_n, offs_d,
            HAS_BIAS, EVEN_K, USE_TMA, DOT_FP32, DOT_PRECISION,
        )
    return acc, m_i, l_i


@triton.jit
def _normalise(acc, m_i, l_i):
    """Output rows acc / l and their base-2 log-sum-exp; -inf (and 0 out) for a row that saw no key."""
    nonempty = l_i > 0.0
    l_safe = tl.where(nonempty, l_i, 1.0)
    return acc / l_safe[:, None], tl.where(nonempty, m_i + tl.math.log2(l_safe), float("-inf"))


# Lengths, counts and the outer strides of the bias, index and lse only feed scalar address arithmetic: not
# specialising on their divisibility keeps one compiled kernel per tile across cache lengths (Lk = 4,680 and
# 131,040 used to compile apart because 131,040 divides by 16).
@triton.jit(
    do_not_specialize=[
        "seqlen_q", "seqlen_k", "num_heads", "kv_group", "max_blocks", "num_splits", "split_min", "work_bucket",
        "grid_bucket", "stride_bb", "stride_bh", "stride_nb", "stride_nh", "stride_nm", "stride_ib", "stride_ih",
        "stride_im", "stride_lb", "stride_lh",
    ]
)
def block_sparse_fwd_kernel(
    Q, K, V, Bias, KVNum, KVIdx, Out, Lse, OPart, LPart,
    seqlen_q, seqlen_k, num_heads, kv_group, max_blocks, qk_scale,
    num_splits, split_min, work_bucket, grid_bucket,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_bb, stride_bh, stride_bn,
    stride_nb, stride_nh, stride_nm,
    stride_ib, stride_ih, stride_im, stride_ij,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    HEAD_DIM: tl.constexpr, Q_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, USE_TMA: tl.constexpr, WIDE: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT: tl.constexpr,
):
    # int64 from the start: batch * stride and block * KV_BLOCK * stride overflow int32 at long caches.
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    hk = h // kv_group

    # A program covers BLOCK_M rows of one index row (BLOCK_M divides Q_BLOCK) and walks that row's key blocks
    # in tiles of BLOCK_N keys (BLOCK_N divides KV_BLOCK, SUB tiles per block).
    SUB: tl.constexpr = KV_BLOCK // BLOCK_N
    start_m = pid_m * BLOCK_M
    row = start_m // Q_BLOCK
    n_blocks = tl.load(KVNum + b * stride_nb + h * stride_nh + row * stride_nm)
    # A count past the row's width would read beyond kv_indices; clamping costs nothing.
    n_blocks = tl.maximum(tl.minimum(n_blocks, max_blocks), 0)
    # Split-K: program pid_s of the row's n_split takes one contiguous share of its list (n_split is 1 unless
    # the launch asked for splits and the row is long enough; programs past it have nothing to do).
    n_split = _num_splits(n_blocks, num_splits, split_min)
    if pid_s < n_split:
        per = (n_blocks + n_split - 1) // n_split
        lo = tl.minimum(pid_s * per, n_blocks)
        hi = tl.minimum(lo + per, n_blocks)
        acc, m_i, l_i = _attend_steps(
            Q + b * stride_qb + h * stride_qh, K + b * stride_kb + hk * stride_kh,
            V + b * stride_vb + hk * stride_vh, Bias + b * stride_bb + hk * stride_bh,
            KVIdx + b * stride_ib + h * stride_ih + row * stride_im,
            start_m, lo * SUB, hi * SUB, seqlen_q, seqlen_k, qk_scale,
            stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_bn, stride_ij,
            HEAD_DIM, KV_BLOCK, BLOCK_M, BLOCK_N, HAS_BIAS, EVEN_K, USE_TMA, WIDE, DOT_FP32, DOT_PRECISION,
        )

        out, lse2 = _normalise(acc, m_i, l_i)
        # Fresh row and column ranges (not the q load's): reusing those would keep its offset and mask tiles
        # alive across the loop, which spilled ~100 registers of the 128x128 tile on sm_90a.
        rows_e = start_m + tl.arange(0, BLOCK_M)
        cols_e = tl.arange(0, HEAD_DIM).to(tl.int64)
        ok_e = rows_e < seqlen_q
        if SPLIT and n_split > 1:
            # Partial result of this share, in float32: (n_split, B * H, seqlen_q, HEAD_DIM) and
            # (n_split, B * H, seqlen_q), contiguous. The merge kernel combines the shares.
            part_row = (pid_s.to(tl.int64) * tl.num_programs(1) + pid_bh) * seqlen_q + rows_e
            tl.store(OPart + part_row[:, None] * HEAD_DIM + cols_e[None, :], out, mask=ok_e[:, None])
            tl.store(LPart + part_row, lse2, mask=ok_e)
        else:
            o_ptrs = Out + b * stride_ob + h * stride_oh + rows_e[:, None] * stride_om + cols_e[None, :] * stride_od
            tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=ok_e[:, None])
            tl.store(Lse + b * stride_lb + h * stride_lh + rows_e * stride_lm, lse2 * _LN2, mask=ok_e)


@triton.jit(
    do_not_specialize=[
        "seqlen_q", "num_heads", "max_blocks", "num_splits", "split_min", "stride_nb", "stride_nh", "stride_nm",
        "stride_lb", "stride_lh",
    ]
)
def block_sparse_merge_kernel(
    OPart, LPart, KVNum, Out, Lse,
    seqlen_q, num_heads, max_blocks, num_splits, split_min,
    stride_nb, stride_nh, stride_nm,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    HEAD_DIM: tl.constexpr, Q_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Combine the split-K shares of the rows that were split (weights exp(lse_s - lse)); others are done."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    start_m = pid_m * BLOCK_M
    row = start_m // Q_BLOCK
    n_blocks = tl.load(KVNum + b * stride_nb + h * stride_nh + row * stride_nm)
    n_blocks = tl.maximum(tl.minimum(n_blocks, max_blocks), 0)
    n_split = _num_splits(n_blocks, num_splits, split_min)
    if n_split > 1:
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < seqlen_q - start_m
        plane = tl.num_programs(1).to(tl.int64) * seqlen_q
        first = pid_bh * seqlen_q + start_m
        m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        for s in range(0, n_split):
            ls = tl.load(LPart + s * plane + first + offs_m, mask=row_ok, other=float("-inf"))
            m = tl.maximum(m, ls)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        den = tl.zeros([BLOCK_M], dtype=tl.float32)
        for s in range(0, n_split):
            ls = tl.load(LPart + s * plane + first + offs_m, mask=row_ok, other=float("-inf"))
            w = tl.math.exp2(ls - m_safe)
            o = tl.load(OPart + (s * plane + first) * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
                        mask=row_ok[:, None], other=0.0)
            acc += w[:, None] * o
            den += w
        nonempty = den > 0.0
        den_safe = tl.where(nonempty, den, 1.0)
        out = acc / den_safe[:, None]
        lse = tl.where(nonempty, (m_safe + tl.math.log2(den_safe)) * _LN2, float("-inf"))
        o_ptrs = Out + b * stride_ob + h * stride_oh + start_m * stride_om
        o_ptrs += offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
        tl.store(Lse + b * stride_lb + h * stride_lh + (start_m + offs_m) * stride_lm, lse, mask=row_ok)


@triton.jit
def _row_steps(KVNum, first, num_rows, m_tiles, num_heads, max_blocks, stride_nb, stride_nh, stride_nm,
               Q_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, SUB: tl.constexpr, CHUNK: tl.constexpr):
    """Steps (BLOCK_N-key tiles) of work rows first .. first + CHUNK - 1 (int64; 0 past num_rows), and which
    of them exist. Work row r is the BLOCK_M query rows of tile r % m_tiles of (batch, head) r // m_tiles."""
    r = first + tl.arange(0, CHUNK)
    ok = r < num_rows
    bh = r // m_tiles
    qrow = ((r % m_tiles) * BLOCK_M) // Q_BLOCK
    ptrs = KVNum + (bh // num_heads).to(tl.int64) * stride_nb + (bh % num_heads) * stride_nh + qrow * stride_nm
    n = tl.load(ptrs, mask=ok, other=0)
    return (tl.maximum(tl.minimum(n, max_blocks), 0) * SUB).to(tl.int64), ok


@triton.jit
def _total_steps(KVNum, num_rows, m_tiles, num_heads, max_blocks, stride_nb, stride_nh, stride_nm,
                 Q_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, SUB: tl.constexpr, CHUNK: tl.constexpr):
    total = tl.zeros([], dtype=tl.int64)
    for first in range(0, num_rows, CHUNK):
        steps, _ = _row_steps(KVNum, first, num_rows, m_tiles, num_heads, max_blocks, stride_nb, stride_nh,
                              stride_nm, Q_BLOCK, BLOCK_M, SUB, CHUNK)
        total += tl.sum(steps)
    return total


@triton.jit
def _rows_ending_before(KVNum, pos, num_rows, m_tiles, num_heads, max_blocks, stride_nb, stride_nh, stride_nm,
                        Q_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, SUB: tl.constexpr, CHUNK: tl.constexpr):
    """Over the rows laid end to end: how many begin before ``pos``, and the largest begin and end among them
    (0 if none). Begins and ends never decrease along the rows, so these name the last row begun before pos."""
    count = tl.zeros([], dtype=tl.int64)
    last_begin = tl.zeros([], dtype=tl.int64)
    last_end = tl.zeros([], dtype=tl.int64)
    run = tl.zeros([], dtype=tl.int64)
    for first in range(0, num_rows, CHUNK):
        steps, ok = _row_steps(KVNum, first, num_rows, m_tiles, num_heads, max_blocks, stride_nb, stride_nh,
                               stride_nm, Q_BLOCK, BLOCK_M, SUB, CHUNK)
        ends = run + tl.cumsum(steps, 0)
        begins = ends - steps
        before = ok & (begins < pos)
        count += tl.sum(before.to(tl.int64))
        last_begin = tl.maximum(last_begin, tl.max(tl.where(before, begins, 0)))
        last_end = tl.maximum(last_end, tl.max(tl.where(before, ends, 0)))
        run += tl.sum(steps)
    return count, last_begin, last_end


@triton.jit
def _program_share(KVNum, seqlen_q, num_bh, num_heads, max_blocks, stride_nb, stride_nh, stride_nm,
                   Q_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, SUB: tl.constexpr, CHUNK: tl.constexpr):
    """This persistent program's share of the work: (pid, programs, m_tiles, rows, total steps, first step,
    end step), the steps of every row laid end to end and cut into equal contiguous ranges."""
    pid = tl.program_id(0).to(tl.int64)
    n_prog = tl.num_programs(0).to(tl.int64)
    m_tiles = tl.cdiv(seqlen_q, BLOCK_M).to(tl.int64)
    num_rows = num_bh * m_tiles
    total = _total_steps(KVNum, num_rows, m_tiles, num_heads, max_blocks, stride_nb, stride_nh, stride_nm,
                         Q_BLOCK, BLOCK_M, SUB, CHUNK)
    return pid, n_prog, m_tiles, num_rows, total, pid * total // n_prog, (pid + 1) * total // n_prog


# The persistent schedule: the grid is a fixed number of programs (about one per multiprocessor slot), and
# the work, every row's steps laid end to end in row order, is cut into equal contiguous ranges, one per
# program. A program walks the rows its range meets: a row it covers whole is written directly; a row cut by
# a range boundary leaves float32 partials (a program has at most two: the row it starts inside and the row
# it stops inside), which block_sparse_persistent_merge_kernel combines. No wave runs partly empty and long rows
# share programs with short ones: what the grid schedule loses when a few waves of uneven rows fill the GPU.
# Measured on an H100 (triton 3.6) it is nevertheless slower at every shape: the key loop nested in the row
# loop runs ~30 % below the grid kernel's (results/gpu/kernels_schedules_h100.json). It is kept opt-in.
@triton.jit(
    do_not_specialize=[
        "seqlen_q", "seqlen_k", "num_heads", "kv_group", "max_blocks", "num_bh", "work_bucket", "grid_bucket",
        "stride_bb", "stride_bh", "stride_nb", "stride_nh", "stride_nm", "stride_ib", "stride_ih",
        "stride_im", "stride_lb", "stride_lh",
    ]
)
def block_sparse_fwd_persistent_kernel(
    Q, K, V, Bias, KVNum, KVIdx, Out, Lse, OPart, LPart,
    seqlen_q, seqlen_k, num_heads, kv_group, max_blocks, qk_scale,
    num_bh, work_bucket, grid_bucket,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_bb, stride_bh, stride_bn,
    stride_nb, stride_nh, stride_nm,
    stride_ib, stride_ih, stride_im, stride_ij,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    HEAD_DIM: tl.constexpr, Q_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, USE_TMA: tl.constexpr, WIDE: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, CHUNK: tl.constexpr,
):
    SUB: tl.constexpr = KV_BLOCK // BLOCK_N
    pid, n_prog, m_tiles, num_rows, total, start, end = _program_share(
        KVNum, seqlen_q, num_bh, num_heads, max_blocks, stride_nb, stride_nh, stride_nm, Q_BLOCK, BLOCK_M, SUB, CHUNK,
    )
    # First row: the one cut by `start` if any, else the first that begins at or after it. Empty rows belong
    # to the program whose range holds their position (the last program takes those at the very end).
    r_first, prev_begin, prev_end = _rows_ending_before(
        KVNum, start, num_rows, m_tiles, num_heads, max_blocks, stride_nb, stride_nh, stride_nm,
        Q_BLOCK, BLOCK_M, SUB, CHUNK,
    )
    straddle = (r_first > 0) & (prev_end > start)
    r = tl.where(straddle, r_first - 1, r_first)
    c0 = tl.where(straddle, prev_begin, prev_end)
    last = pid == n_prog - 1
    go = (r < num_rows) & ((c0 < end) | (last & (c0 == total)))
    while go:
        bh = r // m_tiles
        b = bh // num_heads
        h = bh % num_heads
        hk = h // kv_group
        start_m = (r % m_tiles) * BLOCK_M
        qrow = start_m // Q_BLOCK
        n_blocks = tl.load(KVNum + b * stride_nb + h * stride_nh + qrow * stride_nm)
        c1 = c0 + tl.maximum(tl.minimum(n_blocks, max_blocks), 0).to(tl.int64) * SUB
        lo = tl.maximum(c0, start)
        hi = tl.minimum(c1, end)
        acc, m_i, l_i = _attend_steps(
            Q + b * stride_qb + h * stride_qh, K + b * stride_kb + hk * stride_kh,
            V + b * stride_vb + hk * stride_vh, Bias + b * stride_bb + hk * stride_bh,
            KVIdx + b * stride_ib + h * stride_ih + qrow * stride_im,
            start_m, lo - c0, hi - c0, seqlen_q, seqlen_k, qk_scale,
            stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_bn, stride_ij,
            HEAD_DIM, KV_BLOCK, BLOCK_M, BLOCK_N, HAS_BIAS, EVEN_K, USE_TMA, WIDE, DOT_FP32, DOT_PRECISION,
        )
        out, lse2 = _normalise(acc, m_i, l_i)
        rows_e = start_m + tl.arange(0, BLOCK_M)
        cols_e = tl.arange(0, HEAD_DIM).to(tl.int64)
        ok_e = rows_e < seqlen_q
        if (lo == c0) & (hi == c1):
            o_ptrs = Out + b * stride_ob + h * stride_oh + rows_e[:, None] * stride_om + cols_e[None, :] * stride_od
            tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=ok_e[:, None])
            tl.store(Lse + b * stride_lb + h * stride_lh + rows_e * stride_lm, lse2 * _LN2, mask=ok_e)
        else:
            # Partials: (n_prog, 2, BLOCK_M, HEAD_DIM) and (n_prog, 2, BLOCK_M) float32, contiguous. Slot 0
            # holds a row begun before this program's range, slot 1 one begun in it (at most one of each).
            part = (pid * 2 + tl.where(lo > c0, 0, 1)) * BLOCK_M + tl.arange(0, BLOCK_M)
            tl.store(OPart + part[:, None] * HEAD_DIM + cols_e[None, :], out)
            tl.store(LPart + part, lse2)
        r += 1
        c0 = c1
        go = (r < num_rows) & ((c0 < end) | (last & (c0 == total)))


@triton.jit(
    do_not_specialize=[
        "seqlen_q", "num_heads", "max_blocks", "num_bh", "stride_nb", "stride_nh", "stride_nm", "stride_lb",
        "stride_lh",
    ]
)
def block_sparse_persistent_merge_kernel(
    OPart, LPart, KVNum, Out, Lse,
    seqlen_q, num_heads, max_blocks, num_bh,
    stride_nb, stride_nh, stride_nm,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    HEAD_DIM: tl.constexpr, Q_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    """Combine the partials of the row that program pid of the persistent launch began and could not finish
    (the row holding the last step of its range, when that row runs on past the range); one grid program per
    persistent program, most with nothing to do."""
    SUB: tl.constexpr = KV_BLOCK // BLOCK_N
    pid, n_prog, m_tiles, num_rows, total, start, end = _program_share(
        KVNum, seqlen_q, num_bh, num_heads, max_blocks, stride_nb, stride_nh, stride_nm, Q_BLOCK, BLOCK_M, SUB, CHUNK,
    )
    # The row holding step end - 1 is the last one begun before `end`.
    r, c0, c1 = _rows_ending_before(
        KVNum, end, num_rows, m_tiles, num_heads, max_blocks, stride_nb, stride_nh, stride_nm,
        Q_BLOCK, BLOCK_M, SUB, CHUNK,
    )
    r -= 1
    if (end > start) & (c0 >= start) & (c1 > end):
        # Programs pid .. owner of the row's last step hold its shares: pid's in slot 1 (begun in its range),
        # the others' in slot 0.
        p_last = (c1 * n_prog - 1) // total
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        for p in range(pid, p_last + 1):
            slot = tl.where(p == pid, 1, 0)
            m = tl.maximum(m, tl.load(LPart + (p * 2 + slot) * BLOCK_M + offs_m))
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        den = tl.zeros([BLOCK_M], dtype=tl.float32)
        for p in range(pid, p_last + 1):
            slot = tl.where(p == pid, 1, 0)
            part = (p * 2 + slot) * BLOCK_M + offs_m
            w = tl.math.exp2(tl.load(LPart + part) - m_safe)
            acc += w[:, None] * tl.load(OPart + part[:, None] * HEAD_DIM + offs_d[None, :])
            den += w
        nonempty = den > 0.0
        den_safe = tl.where(nonempty, den, 1.0)
        out = acc / den_safe[:, None]
        lse = tl.where(nonempty, (m_safe + tl.math.log2(den_safe)) * _LN2, float("-inf"))
        bh = r // m_tiles
        b = bh // num_heads
        h = bh % num_heads
        rows_e = (r % m_tiles) * BLOCK_M + offs_m
        ok_e = rows_e < seqlen_q
        o_ptrs = Out + b * stride_ob + h * stride_oh + rows_e[:, None] * stride_om + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=ok_e[:, None])
        tl.store(Lse + b * stride_lb + h * stride_lh + rows_e * stride_lm, lse, mask=ok_e)


# fmt: on


#: Kernel tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) the autotuner tries, each cut to the index's blocks.
#: Compiled offline for sm_90a (bf16, head_dim 128, bias, copy engine, triton 3.7.1): 128x128 with 8 warps
#: takes 160 KiB of shared memory and 255 registers (no spills), one program per multiprocessor; 64x64 with 4
#: warps takes 80 KiB and 198-241 registers, so two programs share a multiprocessor and one's prologue, softmax
#: and epilogue can overlap the other's matmuls, which is what short rows (few key blocks per program) lack.
#: 128x64 (96 KiB, 192-210 registers) and 64x128 (144 KiB) run one program per multiprocessor.
TILES: tuple[tuple[int, int, int, int], ...] = (
    (128, 128, 8, 2),
    (128, 128, 8, 3),
    (128, 64, 8, 2),
    (128, 64, 8, 3),
    (64, 64, 4, 2),
    (64, 64, 4, 3),
    (64, 128, 4, 2),
)
#: The search space before kernel tiles were decoupled from the index blocks (0: tile = index block).
LEGACY_TILES: tuple[tuple[int, int, int, int], ...] = tuple((0, 0, w, st) for w in (8, 4) for st in (2, 3, 4))
#: Keys a forced configuration (``launch(config=...)``) may set.
CONFIG_KEYS: tuple[str, ...] = (
    "BLOCK_M",
    "BLOCK_N",
    "num_warps",
    "num_stages",
    "USE_TMA",
    "split_min_blocks",
    "num_programs",
)
#: Most programs one row may be split over.
MAX_SPLIT_K = 16
#: Automatic split-K: at most this many shares per row, each of at least SPLIT_MIN_KEYS keys.
AUTO_MAX_SPLIT_K = 4
SPLIT_MIN_KEYS = 4096
#: Work rows a persistent program reads per pass when it locates its share of the rows.
_CHUNK = 1024
#: Launch schedules: one program per row tile ("grid"), or a fixed set of programs sharing all rows' steps.
SCHEDULES: tuple[str, ...] = ("grid", "persistent")
#: Shared memory a program may use on an H100 (bytes).
_SMEM_LIMIT = 227 * 1024


def _fit_configs(configs, named_args, **kwargs):
    """Cut each config's tile to the index blocks (0 means the block itself), drop duplicates and tiles whose
    q tile plus double-buffered k and v tiles would not fit in shared memory; keep at least one."""
    qb, kb, d = kwargs["Q_BLOCK"], kwargs["KV_BLOCK"], kwargs["HEAD_DIM"]
    elt = named_args["Q"].element_size()
    kept, seen = [], set()
    for c in configs:
        bm = min(c.kwargs["BLOCK_M"] or qb, qb)
        bn = min(c.kwargs["BLOCK_N"] or kb, kb)
        key = (bm, bn, c.num_warps, c.num_stages)
        if key in seen or (bm + 4 * bn) * d * elt > _SMEM_LIMIT:
            continue
        seen.add(key)
        kept.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=c.num_warps, num_stages=c.num_stages))
    if not kept:
        kept.append(triton.Config({"BLOCK_M": min(qb, 64), "BLOCK_N": min(kb, 64)}, num_warps=4, num_stages=2))
    return kept


def _autotuner(tiles, kernel=None):
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in tiles]
    persistent = kernel is block_sparse_fwd_persistent_kernel
    return triton.autotune(
        configs=configs,
        # work_bucket (bit length of the row width) retunes when the loop length changes by 2x, not per length:
        # a cache that grows chunk by chunk should not retune every chunk. grid_bucket (bit length of the
        # number of index rows) and num_splits change how the programs fill the multiprocessors.
        key=[
            "HEAD_DIM",
            "Q_BLOCK",
            "KV_BLOCK",
            "HAS_BIAS",
            "EVEN_K",
            "USE_TMA",
            "WIDE",
            "DOT_PRECISION",
            *([] if persistent else ["SPLIT", "num_splits"]),
            "work_bucket",
            "grid_bucket",
        ],
        prune_configs_by={"early_config_prune": _fit_configs},
    )(kernel or block_sparse_fwd_kernel)


block_sparse_fwd_tuned = _autotuner(TILES)
block_sparse_fwd_legacy = _autotuner(LEGACY_TILES)
block_sparse_fwd_persistent_tuned = _autotuner(TILES, block_sparse_fwd_persistent_kernel)

#: Autotuned picks by launch key: (launch keyword arguments, description).
_TUNED: dict[tuple, tuple[dict, str]] = {}

#: What the last launch ran: tuning, split_k, and the kernel config (the autotuner's pick, or the forced one).
LAST_LAUNCH: dict[str, object] = {}


def auto_split_k(programs, width, n_sm, kv_block):
    """Split-K factor for ``programs`` (batch * heads * index rows) on ``n_sm`` multiprocessors.

    Splitting pays when the programs fill the multiprocessors in few waves, the last one partly (444 programs
    on 132 multiprocessors: 3.4 waves, 84 % of the slots used; split in 2: 6.7 waves, 96 %), and the rows are
    long enough for each share to keep SPLIT_MIN_KEYS keys (``width``, the index row width, bounds the blocks a
    row can have; the kernel re-decides per row from its real count). Each extra share costs a float32 partial
    written and read back, charged here at 3 % per share.
    """
    min_blocks = max(1, SPLIT_MIN_KEYS // kv_block)
    if n_sm < 1 or programs < 1 or width < 2 * min_blocks or programs >= 6 * n_sm:
        return 1

    def score(s):
        x = programs * s / n_sm
        return x / math.ceil(x) - 0.03 * (s - 1)

    best = 1
    for s in range(2, AUTO_MAX_SPLIT_K + 1):
        if width < s * min_blocks:
            break
        if score(s) > score(best):
            best = s
    return best


def _tma_ok(x):
    """Whether x (B, H, L, D) meets the copy engine's rules: unit last stride, 16-byte aligned rows and bases."""
    e = x.element_size()
    return x.stride(3) == 1 and x.data_ptr() % 16 == 0 and all((st * e) % 16 == 0 for st in x.stride()[:3])


def _torch_allocator(size, alignment, stream):
    import torch

    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator():
    # In-kernel descriptors need a small global scratch; keep a caller's allocator if one is set.
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_torch_allocator)


def persistent_programs(n_sm, block_m):
    """Programs of a persistent launch: one per multiprocessor at 128-row tiles, more for smaller tiles (two
    64-row programs share a multiprocessor)."""
    return max(1, n_sm) * max(1, 128 // block_m)


def launch(
    q,
    k,
    v,
    bias,
    kv_num_blocks,
    kv_indices,
    out,
    lse,
    scale,
    block_m,
    block_n,
    config=None,
    split_k=1,
    tuning="auto",
    schedule="grid",
):
    """Launch the forward on already-validated tensors.

    Args:
        q: (B, H, Lq, D); k, v: (B, Hkv, Lk, D); bias: (B, Hkv, Lk) float32 or None.
        kv_num_blocks: (B, H, n_q_blocks) int32; kv_indices: (B, H, n_q_blocks, max_blocks) int32 (both may be
            expanded views with stride 0 on batch or heads).
        out: (B, H, Lq, D) in q.dtype, written; lse: (B, H, Lq) float32, written.
        scale: logit scale; block_m, block_n: the index's q and kv block sizes.
        config: None to autotune, or a dict of CONFIG_KEYS: ``BLOCK_M``/``BLOCK_N`` (kernel tile, a power of two
            dividing the index block; default the block), ``num_warps``, ``num_stages``, ``USE_TMA``,
            ``split_min_blocks`` (fewest blocks per split-K share), ``num_programs`` (persistent schedule:
            programs launched). A tile or warp key forces one configuration.
        split_k: grid schedule: split each row's key blocks over up to this many programs (partials merged by
            their log-sum-exp); None picks a factor with :func:`auto_split_k`, keeping shares >= SPLIT_MIN_KEYS
            keys.
        tuning: "auto" (kernel tiles independent of the index blocks) or "legacy" (tile = index block, the
            search space before), when autotuning.
        schedule: "grid" (one program per kernel tile of rows, optionally split-K) or "persistent" (a fixed
            number of programs share all rows' steps evenly; rows cut by a share boundary are merged).
    """
    import torch

    config = {} if config is None else dict(config)
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"config keys {unknown} are not among {CONFIG_KEYS}")
    if tuning not in ("auto", "legacy"):
        raise ValueError(f"tuning must be 'auto' or 'legacy', got {tuning!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    batch, heads, seqlen_q, head_dim = q.shape
    heads_kv, seqlen_k = k.shape[1], k.shape[2]
    width = int(kv_indices.shape[-1])
    rows = batch * heads * triton.cdiv(seqlen_q, block_m)
    n_sm = _sm_count(q.device) if q.is_cuda and not INTERPRET else 0
    persistent = schedule == "persistent"
    if persistent:
        split_k, split_min = 1, 1
    elif split_k is None:
        split_k = auto_split_k(rows, width, n_sm, block_n)
        split_min = max(1, SPLIT_MIN_KEYS // block_n)
    else:
        split_min = 1
    split_min = max(1, int(config.pop("split_min_blocks", split_min)))
    num_programs = config.pop("num_programs", None)
    split_k = max(1, min(int(split_k), width))
    if bias is None:
        bias_arg, bias_strides, has_bias = q, (0, 0, 0), False
    else:
        bias_arg, bias_strides, has_bias = bias, bias.stride(), True
    # On an H100 the copy-engine path measured 18-30 % faster than pointer loads (bf16, head_dim 128).
    if "USE_TMA" in config:
        use_tma = bool(config.pop("USE_TMA"))
    else:
        use_tma = q.is_cuda and not INTERPRET and _hopper_or_newer(q.device) and _tma_ok(k) and _tma_ok(v)
    if use_tma and not INTERPRET:
        _ensure_allocator()
    dot_fp32 = INTERPRET and str(q.dtype) == "torch.bfloat16"
    # fp32 inputs ask for fp32 products: the GPU default (tf32) would be 1e-3 off the reference.
    precision = "ieee" if str(q.dtype) == "torch.float32" else "tf32"
    # The interpreter has no multiprocessors: two stand-ins keep several programs and cut rows under test.
    slots = n_sm if n_sm else 2
    if persistent:
        # Float32 partials, two per program: (programs, 2, BLOCK_M, D) and (programs, 2, BLOCK_M); sized for
        # the most programs * BLOCK_M any tile may launch (persistent_programs keeps it at slots * 128 rows).
        most = int(num_programs) * block_m if num_programs else slots * max(block_m, 128)
        o_part = torch.empty((2 * most, head_dim), dtype=torch.float32, device=q.device)
        l_part = torch.empty((2 * most,), dtype=torch.float32, device=q.device)
    elif split_k > 1:
        # Float32 partials of every share: (split_k, B * H, Lq, D) and (split_k, B * H, Lq).
        o_part = torch.empty((split_k, batch * heads, seqlen_q, head_dim), dtype=torch.float32, device=q.device)
        l_part = torch.empty((split_k, batch * heads, seqlen_q), dtype=torch.float32, device=q.device)
    else:
        o_part = l_part = lse  # never touched
    # fmt: off
    strides = (
        *q.stride(), *k.stride(), *v.stride(), *bias_strides,
        *kv_num_blocks.stride(), *kv_indices.stride(), *out.stride(), *lse.stride(),
    )
    head = (
        q, k, v, bias_arg, kv_num_blocks, kv_indices, out, lse, o_part, l_part,
        seqlen_q, seqlen_k, heads, heads // heads_kv, width, scale * _LOG2E,
    )
    # In-tile offsets are 32-bit unless a tile could span 2**31 elements (huge row or feature strides).
    inner = [abs(st) for t in (q, k, v, out) for st in t.stride()[2:]] + [abs(st) for st in bias_strides[2:]]
    wide = 2 * max(block_m, block_n, head_dim) * max(inner) >= 2**31
    meta = dict(
        HEAD_DIM=head_dim, Q_BLOCK=block_m, KV_BLOCK=block_n, HAS_BIAS=has_bias,
        EVEN_K=seqlen_k % block_n == 0, USE_TMA=use_tma, WIDE=wide,
        DOT_FP32=dot_fp32, DOT_PRECISION=precision,
    )
    # fmt: on

    def programs(m):
        return int(num_programs) if num_programs else persistent_programs(slots, m["BLOCK_M"])

    if persistent:
        meta["CHUNK"] = _CHUNK
        tail = (batch * heads, width.bit_length(), rows.bit_length(), *strides)

        def grid(m):
            return (programs(m),)

    else:
        meta["SPLIT"] = split_k > 1
        tail = (split_k, split_min, width.bit_length(), rows.bit_length(), *strides)

        def grid(m):
            return (triton.cdiv(seqlen_q, m["BLOCK_M"]), batch * heads, split_k)

    forced = INTERPRET or any(key in config for key in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"))
    if forced:
        tile_m = _tile(config.get("BLOCK_M", block_m), block_m, "BLOCK_M")
        tile_n = _tile(config.get("BLOCK_N", block_n), block_n, "BLOCK_N")
        warps, stages = config.get("num_warps", 4), config.get("num_stages", 2)
        kernel = block_sparse_fwd_persistent_kernel if persistent else block_sparse_fwd_kernel
        kernel[grid({"BLOCK_M": tile_m})](
            *head, *tail, **meta, BLOCK_M=tile_m, BLOCK_N=tile_n, num_warps=warps, num_stages=stages
        )
        picked = f"BLOCK_M: {tile_m}, BLOCK_N: {tile_n}, num_warps: {warps}, num_stages: {stages}"
    else:
        if persistent:
            tuner = block_sparse_fwd_persistent_tuned
        else:
            tuner = block_sparse_fwd_legacy if tuning == "legacy" else block_sparse_fwd_tuned
        # The autotuner's own dispatch costs ~75 us of host time per call on the H100 machine, more than the
        # kernel at short caches (65 us at 4,680 keys, density 0.1): after its first pick for a key, the
        # kernel is launched directly with that configuration (same compiled binary).
        key = (id(tuner), str(q.dtype), q.device.index, width.bit_length(), rows.bit_length(), split_k, *meta.items())
        tuned = _TUNED.get(key)
        if tuned is None:
            tuner[grid](*head, *tail, **meta)
            best = tuner.best_config
            tuned = _TUNED[key] = (best.all_kwargs(), str(best))
        else:
            kernel = block_sparse_fwd_persistent_kernel if persistent else block_sparse_fwd_kernel
            kernel[grid(tuned[0])](*head, *tail, **meta, **tuned[0])
        tile_m, tile_n = tuned[0]["BLOCK_M"], tuned[0]["BLOCK_N"]
        picked = tuned[1]
    if persistent:
        # fmt: off
        block_sparse_persistent_merge_kernel[grid({"BLOCK_M": tile_m})](
            o_part, l_part, kv_num_blocks, out, lse,
            seqlen_q, heads, width, batch * heads,
            *kv_num_blocks.stride(), *out.stride(), *lse.stride(),
            HEAD_DIM=head_dim, Q_BLOCK=block_m, KV_BLOCK=block_n, BLOCK_M=tile_m, BLOCK_N=tile_n, CHUNK=_CHUNK,
            num_warps=4,
        )
        # fmt: on
    if split_k > 1:
        merge_m = min(32, block_m)
        # fmt: off
        block_sparse_merge_kernel[(triton.cdiv(seqlen_q, merge_m), batch * heads)](
            o_part, l_part, kv_num_blocks, out, lse,
            seqlen_q, heads, width, split_k, split_min,
            *kv_num_blocks.stride(), *out.stride(), *lse.stride(),
            HEAD_DIM=head_dim, Q_BLOCK=block_m, BLOCK_M=merge_m, num_warps=4,
        )
        # fmt: on
    LAST_LAUNCH.clear()
    LAST_LAUNCH.update(
        tuning="forced" if forced else tuning,
        schedule=schedule,
        split_k=split_k,
        split_min_blocks=split_min,
        config=picked,
    )


def _tile(value, block, name):
    if isinstance(value, bool) or not isinstance(value, int) or not 16 <= value <= block or block % value:
        raise ValueError(f"{name}={value!r} must be a power of two in [16, {block}] (dividing the index block)")
    return value


_SM_COUNT: dict[int, int] = {}


def _sm_count(device):
    import torch

    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SM_COUNT:
        _SM_COUNT[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SM_COUNT[key]


_CAPABILITY: dict[int, bool] = {}


def _hopper_or_newer(device):
    import torch

    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _CAPABILITY:
        _CAPABILITY[key] = torch.cuda.get_device_capability(key)[0] >= 9
    return _CAPABILITY[key]
