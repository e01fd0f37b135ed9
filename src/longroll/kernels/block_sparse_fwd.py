"""Triton block-sparse flash-attention forward with a per-key additive logit bias.

One program handles one (batch, head, query block) and walks only the key blocks its row of the index lists,
in the order listed. Softmax is computed online in float32 in base 2: the logit scale and the bias are folded
with log2(e) so that every score costs one FMA and one ``exp2``.

Tensor layouts (all strides are passed, so (B, H, L, D) and (B, L, H, D) views both work without copies):

- q: (B, H, Lq, D); k, v: (B, Hkv, Lk, D), Hkv divides H (grouped-query attention: kv head = h // (H // Hkv)).
- bias: (B, Hkv, Lk) float32, added to the scaled logit; a value <= ``MASKED_BIAS`` removes the key.
- kv_num_blocks: (B, H, n_q_blocks) int32; kv_indices: (B, H, n_q_blocks, max_blocks) int32. Batch or head
  strides of 0 broadcast one index over batches or heads.
- out: (B, H, Lq, D) in q's dtype; lse: (B, H, Lq) float32 natural-log log-sum-exp, -inf for empty rows.

This module imports triton at import time; ``longroll.ops.block_sparse`` imports it lazily.
"""

from __future__ import annotations

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

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


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
def block_sparse_fwd_kernel(
    Q, K, V, Bias, KVNum, KVIdx, Out, Lse,
    seqlen_q, seqlen_k, num_heads, kv_group, max_blocks, qk_scale, work_bucket,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_bb, stride_bh, stride_bn,
    stride_nb, stride_nh, stride_nm,
    stride_ib, stride_ih, stride_im, stride_ij,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, USE_TMA: tl.constexpr, WIDE: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # int64 from the start: batch * stride and block * BLOCK_N * stride overflow int32 at long caches.
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    hk = h // kv_group

    start_m = pid_m * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if WIDE:
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
        offs_d = offs_d.to(tl.int64)
    row_ok = offs_m < seqlen_q - start_m
    q_ptrs = Q + b * stride_qb + h * stride_qh + start_m * stride_qm
    q = tl.load(q_ptrs + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    k_src = K + b * stride_kb + hk * stride_kh
    v_src = V + b * stride_vb + hk * stride_vh
    if USE_TMA:
        # One (seqlen_k, HEAD_DIM) descriptor per (batch, kv head): any outer layout works, and rows past
        # seqlen_k read as zeros instead of the next head's keys.
        k_src = tl.make_tensor_descriptor(k_src, shape=[seqlen_k, HEAD_DIM], strides=[stride_kn, 1],
                                          block_shape=[BLOCK_N, HEAD_DIM])
        v_src = tl.make_tensor_descriptor(v_src, shape=[seqlen_k, HEAD_DIM], strides=[stride_vn, 1],
                                          block_shape=[BLOCK_N, HEAD_DIM])
    bias_base = Bias + b * stride_bb + hk * stride_bh
    idx_base = KVIdx + b * stride_ib + h * stride_ih + pid_m * stride_im
    n_blocks = tl.load(KVNum + b * stride_nb + h * stride_nh + pid_m * stride_nm)
    # A count past the row's width would read beyond kv_indices; clamping costs nothing.
    n_blocks = tl.minimum(n_blocks, max_blocks)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # The bias is fetched one block ahead (and its block id two ahead) by hand: the pipeliner does not stage
    # such a small load, and waiting on it every block cost 12-16 % of the throughput on an H100.
    b_next = tl.zeros([BLOCK_N], dtype=tl.float32)
    kb_ahead = tl.zeros([], dtype=tl.int64)
    if HAS_BIAS:
        kb0 = tl.load(idx_base, mask=n_blocks > 0, other=0).to(tl.int64)
        b_next = _load_bias(bias_base, kb0 * BLOCK_N, seqlen_k, stride_bn, offs_n, EVEN_K)
        kb_ahead = tl.load(idx_base + stride_ij, mask=n_blocks > 1, other=0).to(tl.int64)
    for j in range(0, n_blocks):
        kb = tl.load(idx_base + j * stride_ij).to(tl.int64)
        b_cur = b_next
        if HAS_BIAS:
            # Issued now, consumed next block: the load latency hides behind this block's two matmuls.
            b_next = _load_bias(bias_base, kb_ahead * BLOCK_N, seqlen_k, stride_bn, offs_n, EVEN_K)
            kb_ahead = tl.load(idx_base + (j + 2) * stride_ij, mask=j + 2 < n_blocks, other=0).to(tl.int64)
        acc, m_i, l_i = _attend_block(
            q, acc, m_i, l_i, k_src, v_src, b_cur, kb * BLOCK_N, seqlen_k, qk_scale,
            stride_kn, stride_kd, stride_vn, stride_vd, offs_n, offs_d,
            HAS_BIAS, EVEN_K, USE_TMA, DOT_FP32, DOT_PRECISION,
        )

    nonempty = l_i > 0.0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    lse = tl.where(nonempty, (m_i + tl.math.log2(tl.where(nonempty, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    o_ptrs = Out + b * stride_ob + h * stride_oh + start_m * stride_om
    o_ptrs += offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    tl.store(Lse + b * stride_lb + h * stride_lh + (start_m + offs_m) * stride_lm, lse, mask=row_ok)


def _configs() -> list[triton.Config]:
    if INTERPRET:
        # The interpreter cannot benchmark (no driver), and multi-config autotune fails at launch there.
        return [triton.Config({}, num_warps=4, num_stages=1)]
    # On an H100, 128-row query blocks want 8 warps (two warpgroups); 64-row ones may prefer 4.
    return [triton.Config({}, num_warps=w, num_stages=st) for w in (8, 4) for st in (2, 3, 4)]


block_sparse_fwd_tuned = triton.autotune(
    configs=_configs(),
    # work_bucket (bit length of the row width) retunes when the loop length changes by 2x, not per length:
    # short loops favour fewer stages, and a cache that grows chunk by chunk should not retune every chunk.
    key=["HEAD_DIM", "BLOCK_M", "BLOCK_N", "HAS_BIAS", "EVEN_K", "USE_TMA", "WIDE", "DOT_PRECISION", "work_bucket"],
)(block_sparse_fwd_kernel)


def _tma_ok(x):
    """Whether x (B, H, L, D) meets the copy engine's rules: unit last stride, 16-byte aligned rows and bases."""
    e = x.element_size()
    return (
        x.stride(3) == 1
        and x.data_ptr() % 16 == 0
        and all((st * e) % 16 == 0 for st in x.stride()[:3])
    )


def _torch_allocator(size, alignment, stream):
    import torch

    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator():
    # In-kernel descriptors need a small global scratch; keep a caller's allocator if one is set.
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_torch_allocator)


def launch(q, k, v, bias, kv_num_blocks, kv_indices, out, lse, scale, block_m, block_n, config=None):
    """Launch the forward on already-validated tensors.

    Args:
        q: (B, H, Lq, D); k, v: (B, Hkv, Lk, D); bias: (B, Hkv, Lk) float32 or None.
        kv_num_blocks: (B, H, n_q_blocks) int32; kv_indices: (B, H, n_q_blocks, max_blocks) int32 (both may be
            expanded views with stride 0 on batch or heads).
        out: (B, H, Lq, D) in q.dtype, written; lse: (B, H, Lq) float32, written.
        scale: logit scale; block_m, block_n: the index's q and kv block sizes.
        config: None to autotune, or a dict with any of ``num_warps``, ``num_stages``, ``USE_TMA`` to force one
            configuration (tests, tuning sweeps).
    """
    config = {} if config is None else dict(config)
    batch, heads, seqlen_q, head_dim = q.shape
    heads_kv, seqlen_k = k.shape[1], k.shape[2]
    n_q_blocks = triton.cdiv(seqlen_q, block_m)
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
    grid = (n_q_blocks, batch * heads)
    args = (
        q, k, v, bias_arg, kv_num_blocks, kv_indices, out, lse,
        seqlen_q, seqlen_k, heads, heads // heads_kv, kv_indices.shape[-1], scale * _LOG2E,
        int(kv_indices.shape[-1]).bit_length(),
        *q.stride(), *k.stride(), *v.stride(), *bias_strides,
        *kv_num_blocks.stride(), *kv_indices.stride(), *out.stride(), *lse.stride(),
    )
    # In-tile offsets are 32-bit unless a tile could span 2**31 elements (huge row or feature strides).
    inner = [abs(st) for t in (q, k, v, out) for st in t.stride()[2:]] + [abs(st) for st in bias_strides[2:]]
    wide = 2 * max(block_m, block_n, head_dim) * max(inner) >= 2**31
    meta = dict(
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, HAS_BIAS=has_bias,
        EVEN_K=seqlen_k % block_n == 0, USE_TMA=use_tma, WIDE=wide,
        DOT_FP32=dot_fp32, DOT_PRECISION=precision,
    )
    if not config:
        block_sparse_fwd_tuned[grid](*args, **meta)
    else:
        block_sparse_fwd_kernel[grid](
            *args, **meta, num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 2),
        )


_CAPABILITY: dict[int, bool] = {}


def _hopper_or_newer(device):
    import torch

    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _CAPABILITY:
        _CAPABILITY[key] = torch.cuda.get_device_capability(key)[0] >= 9
    return _CAPABILITY[key]
