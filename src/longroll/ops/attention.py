"""Attention with an optional per-key additive logit bias, memory-bounded at any cache length.

The bias is what makes a compressed KV cache exact (Lemma 5.1 of the TempCache paper): a group of ``m``
identical keys equals one key whose logit is raised by ``log m``. It is per key and query-independent, shape
(batch, heads_kv, seqlen_k).

Backends (``backend=``):

- ``"chunked"``: pure torch, online softmax over key chunks (and query chunks), float32 accumulation. Never
  materialises more than ``max_elements`` scores; returns the log-sum-exp. Works everywhere.
- ``"sdpa"``: ``F.scaled_dot_product_attention``; the bias goes in as a float mask broadcast to
  (batch, heads, 1, seqlen_k), which the cuDNN backend applies exactly. No log-sum-exp.
- ``"sdpa_augmented"``: the kernel-agnostic trick. q gets two extra columns equal to 1/scale, k gets the bias
  split in a high and a low part (so a bf16 bias keeps ~fp32 precision), and the qk head dim is zero-padded
  to a multiple of 64: ``scale * [q, 1/scale, 1/scale] . [k, b_hi, b_lo] = scale * q.k + b``. Any dense
  kernel then applies the bias; on an H100 at 131k keys cuDNN runs it at 410 TFLOP/s against 363 for the
  mask route (``results/gpu/kernels_h100.json``). With ``return_lse`` on CUDA (fp16/bf16, where cuDNN runs
  attention) it calls cuDNN's attention directly, which also returns the log-sum-exp at no extra cost.
- ``"triton"``: the block-sparse Triton kernel of :mod:`longroll.ops.block_sparse` with every block selected;
  returns the log-sum-exp at dense-kernel speed on a GPU.
- ``"fa4"``: flash-attn-4's CuTe DSL kernel (an optional dependency, :mod:`longroll.ops.fa4`; fp16/bf16 on
  Hopper or Blackwell), the bias folded into q and k as in ``sdpa_augmented`` but with the qk width rounded up
  to 16 only; returns the log-sum-exp. Never chosen by ``"auto"``.
- ``"auto"``: when the log-sum-exp is asked for, ``sdpa_augmented`` through cuDNN on CUDA where it runs,
  else ``triton`` on CUDA (head dims the kernel supports) and ``chunked`` elsewhere; otherwise ``sdpa``
  without a bias, and with a bias ``sdpa_augmented`` on CUDA and ``sdpa`` elsewhere.

Masked keys carry a bias of ``-inf`` (or anything <= ``MASKED_BIAS``); every route gives them zero weight, and a
row whose keys are all masked (or a query with no key) is zero with a log-sum-exp of ``-inf`` on every route.

Poisoned inputs (NaN policy): a NaN is never turned into a finite value. What costs nothing is rejected here: a
non-finite ``scale`` (a host float) and bad shapes, dtypes and devices raise ``ValueError``. Tensor values are
not checked here, as that needs a host synchronisation in the per-layer hot path; instead every route
propagates them: a NaN in q gives NaN in that query's row, a NaN in k, v or the bias (or a ``+inf`` bias, which
is not a valid log-count) gives NaN in every row that attends the key. Values are checked where a check is
cheap or opt-in: ``LayerKVCache.stage`` with ``CacheConfig(check_finite=True)`` (keys, values and, at commit,
the queries), and ``LayerKVCache.load_state_dict`` / ``CachedProcessor.load_state_dict`` (always; the cache's
bias is ``log(count)`` of validated counts).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from longroll.ops._checks import check_bias, check_qkv
from longroll.ops.block_index import BlockSparseIndex
from longroll.ops.block_sparse import TRITON_HEAD_DIMS, block_sparse_attention
from longroll.ops.fa4 import AUG_MULTIPLE, fa4_forward
from longroll.ops.merge import merge_attentions
from longroll.ops.reference import expand_kv_heads
from longroll.ops.types import MASKED_BIAS, AttentionOutput

Backend = Literal["auto", "chunked", "sdpa", "sdpa_augmented", "triton", "fa4"]
BACKENDS: tuple[str, ...] = ("auto", "chunked", "sdpa", "sdpa_augmented", "triton", "fa4")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    backend: Backend = "auto",
    return_lse: bool = False,
    max_elements: int = 1 << 25,
) -> AttentionOutput:
    """Attention of q over (k, v) with an optional per-key logit bias.

    Args:
        q: (batch, heads, seqlen_q, head_dim).
        k: (batch, heads_kv, seqlen_k, head_dim); heads_kv divides heads (grouped-query attention).
        v: (batch, heads_kv, seqlen_k, head_dim_v).
        bias: (batch, heads_kv, seqlen_k), added to the scaled logit of each key for every query.
        scale: logit scale, default 1/sqrt(head_dim).
        backend: see the module docstring.
        return_lse: also return the float32 log-sum-exp (batch, heads, seqlen_q); needs ``chunked``,
            ``triton``, ``fa4``, or ``sdpa_augmented`` on CUDA in fp16/bf16.
        max_elements: cap on the scores the ``chunked`` route holds at once.

    Returns:
        :class:`AttentionOutput` with ``out`` in q.dtype.
    """
    _, h, hk, _, lk, d = check_qkv(q, k, v)
    check_bias(bias, k)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if max_elements < 1:
        raise ValueError(f"max_elements must be positive, got {max_elements}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if backend == "auto":
        if return_lse and lk > 0 and cudnn_lse_supported(q, v):
            backend = "sdpa_augmented"
        elif return_lse or lk == 0:
            backend = "triton" if q.is_cuda and lk > 0 and d in TRITON_HEAD_DIMS and v.shape[-1] == d else "chunked"
        elif bias is None:
            backend = "sdpa"
        else:
            backend = "sdpa_augmented" if q.is_cuda else "sdpa"
    if return_lse and backend == "sdpa_augmented" and not cudnn_lse_supported(q, v):
        raise ValueError(
            "backend='sdpa_augmented' returns the log-sum-exp only through cuDNN (CUDA, float16/bfloat16, qk and v "
            f"widths <= 256), got q {tuple(q.shape)} {q.dtype} on {q.device}, v width {v.shape[-1]}"
        )
    if return_lse and backend not in ("chunked", "triton", "fa4", "sdpa_augmented"):
        raise ValueError(
            f"backend={backend!r} cannot return the log-sum-exp; use backend='chunked', 'triton', 'fa4' or "
            "'sdpa_augmented' (CUDA)"
        )
    if backend == "chunked":
        out, lse = _chunked(q, k, v, bias, scale, max_elements)
        return AttentionOutput(out, lse if return_lse else None)
    if backend == "triton":
        # One (1, 1, ...) index is shared by every batch element and head.
        index = BlockSparseIndex.full(1, 1, q.shape[2], lk, device=q.device)
        res = block_sparse_attention(q, k, v, index, bias, scale=scale, backend="triton")
        return AttentionOutput(res.out, res.lse if return_lse else None)
    if lk == 0:
        raise ValueError("k has seqlen_k = 0; only backend='chunked' accepts an empty key set")
    if backend == "fa4":
        qa, ka = (q, k) if bias is None else augment_qk(q, k, bias, scale, multiple=AUG_MULTIPLE)
        raw, raw_lse = fa4_forward(qa, ka, v, scale, return_lse)
        if raw_lse is not None and bias is not None:
            # A row whose keys are all masked has no mass: -inf, as on the other routes (NaN stays NaN).
            live = expand_kv_heads(~(bias <= MASKED_BIAS).all(dim=-1), h)
            raw_lse = raw_lse.masked_fill(~live[:, :, None], float("-inf"))
        return AttentionOutput(_dense_semantics(raw, q, bias, h), raw_lse)
    if backend == "sdpa":
        return AttentionOutput(_dense_semantics(_sdpa_mask(q, k, v, bias, scale, h, hk), q, bias, h), None)
    if return_lse:
        raw, raw_lse = _cudnn_augmented(q, k, v, bias, scale, h, hk)
        return AttentionOutput(_dense_semantics(raw, q, bias, h), _lse_semantics(raw_lse, q, bias, h))
    return AttentionOutput(_dense_semantics(_sdpa_augmented(q, k, v, bias, scale, h, hk), q, bias, h), None)


def _dense_semantics(out: torch.Tensor, q: torch.Tensor, bias: torch.Tensor | None, h: int) -> torch.Tensor:
    """Give the dense SDPA routes the masking and NaN semantics of the others (no host sync).

    SDPA sees masked keys at the finite ``MASKED_BIAS`` (a ``-inf`` mask row would give NaN), so a row whose
    keys are all masked comes back as ordinary attention: it is zeroed here (multiplied by 0, which keeps a
    NaN a NaN). A NaN query is made NaN in its row whatever the kernel does with it.

    Args:
        out: (B, H, Lq, Dv); q: (B, H, Lq, D); bias: (B, Hk, Lk) or None; h: query heads.
    """
    if bias is not None:
        live = expand_kv_heads(~(bias <= MASKED_BIAS).all(dim=-1), h)  # (B, H); NaN counts as not masked
        out = out * live[:, :, None, None].to(out.dtype)
    return torch.where(torch.isnan(q).any(dim=-1, keepdim=True), float("nan"), out)


def _lse_semantics(lse: torch.Tensor, q: torch.Tensor, bias: torch.Tensor | None, h: int) -> torch.Tensor:
    """The log-sum-exp of a route that sees masked keys at ``MASKED_BIAS``: ``-inf`` on rows whose keys are all
    masked, NaN on NaN queries, as on the other routes. lse: (B, H, Lq) float32."""
    if bias is not None:
        live = expand_kv_heads(~(bias <= MASKED_BIAS).all(dim=-1), h)
        lse = lse.masked_fill(~live[:, :, None], float("-inf"))
    return torch.where(torch.isnan(q).any(dim=-1), float("nan"), lse)


def cudnn_lse_supported(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether cuDNN's attention can return the log-sum-exp for q (B, H, Lq, D) and v (B, Hk, Lk, Dv): CUDA,
    float16/bfloat16, an Ampere or later GPU, cuDNN's attention not switched off
    (``torch.backends.cuda.enable_cudnn_sdp(False)``), the augmented qk width and Dv at most 256, Dv a multiple
    of 8."""
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if not (torch.backends.cudnn.is_available() and torch.backends.cuda.cudnn_sdp_enabled()):
        return False
    if torch.cuda.get_device_capability(q.device) < (8, 0):
        return False
    width = -(-(q.shape[-1] + 2) // 64) * 64
    return width <= 256 and v.shape[-1] <= 256 and v.shape[-1] % 8 == 0


def _cudnn_augmented(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float, h: int, hk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """cuDNN's attention over the augmented q and k with its log-sum-exp: out (B, H, Lq, Dv), lse (B, H, Lq)
    float32 (natural log of the sum of the scaled, biased exponentials).

    ``F.scaled_dot_product_attention`` returns no log-sum-exp, so this calls the op it dispatches to on these
    shapes, which computes it anyway (the statistics of its online softmax)."""
    if bias is None and q.shape[-1] % 8 == 0:
        qa, ka = q, k
    else:
        # cuDNN takes qk widths that are multiples of 8: a zero bias pads the others.
        qa, ka = augment_qk(q, k, k.new_zeros(k.shape[:-1], dtype=torch.float32) if bias is None else bias, scale)
    if hk != h:
        # The op takes equal head counts: each kv head serves its group of query heads.
        ka, v = ka.repeat_interleave(h // hk, dim=1), v.repeat_interleave(h // hk, dim=1)
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(qa, ka, v, None, True, 0.0, False, False, scale=scale)
    b, _, lq, _ = q.shape
    return res[0], res[1].reshape(b, h, lq).float()


def _sdpa_mask(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float, h: int, hk: int
) -> torch.Tensor:
    mask = None
    if bias is not None:
        # (B, H, 1, Lk): broadcasting over queries keeps the mask O(Lk) instead of O(Lq*Lk).
        mask = expand_kv_heads(bias.clamp_min(MASKED_BIAS), h).to(q.dtype)[:, :, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=hk != h)


def augment_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    multiple: int = 64,
    *,
    backend: Literal["auto", "torch", "triton"] = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a per-key bias into the head dim so that any dense kernel applies it.

    Args:
        q: (batch, heads, seqlen_q, head_dim); k: (batch, heads_kv, seqlen_k, head_dim);
        bias: (batch, heads_kv, seqlen_k); scale: the logit scale the kernel will use.
        backend: ``"triton"`` builds both in one pass each (:mod:`longroll.kernels.augment`; CUDA tensors, or
            CPU ones under ``TRITON_INTERPRET=1``), ``"torch"`` with torch ops (its twin: the same bits);
            ``"auto"``: Triton on CUDA.

    Returns:
        q_aug: (batch, heads, seqlen_q, D'); k_aug: (batch, heads_kv, seqlen_k, D'), D' = head_dim + 2 rounded
        up to ``multiple`` (cuDNN refuses odd widths such as 130 or 136 and runs 192 fastest for 128); both
        contiguous.
    """
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    d = q.shape[-1]
    width = -(-(d + 2) // multiple) * multiple
    if backend == "triton" or (backend == "auto" and q.is_cuda):
        if not (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
            raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {q.device}")
        # The fill as the dtype holds it, so that the kernel's cast and torch's agree bit for bit.
        fill = float(torch.tensor(1.0 / scale, dtype=q.dtype))
        return _augment_rows(q, None, width, fill), _augment_rows(k, bias, width, 0.0)
    b = bias.float().clamp_min(MASKED_BIAS)
    hi = b.to(k.dtype)
    lo = (b - hi.float()).to(k.dtype)
    # One concatenation per side: a single pass that reads k once and writes k_aug once (zero-filling then
    # writing slices took four passes, ~0.24 ms per call at 28k keys on an H200, a sixth of the attention).
    pad = width - d - 2
    ka = torch.cat([k, hi[..., None], lo[..., None], k.new_zeros(()).expand(*k.shape[:-1], pad)], dim=-1)
    cols = q.new_zeros(width - d)
    cols[:2] = 1.0 / scale
    qa = torch.cat([q, cols.expand(*q.shape[:-1], width - d)], dim=-1)
    return qa, ka


def _augment_rows(
    x: torch.Tensor, bias: torch.Tensor | None, width: int, fill: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """x (B, H, N, D) -> (B, H, N, width): [x, b_hi, b_lo, 0...] from bias (B, H, N), or [x, fill, fill, 0...];
    written into ``out`` (B, H, N, width, last dim contiguous) when given, e.g. a slice of a larger buffer."""
    from longroll.kernels.augment import augment_rows_kernel

    b, h, n, d = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    if out is None:
        out = torch.empty(b, h, n, width, dtype=x.dtype, device=x.device)
    if n == 0:
        return out
    if bias is not None and bias.stride(-1) != 1:
        bias = bias.contiguous()  # the kernel reads a row's biases as consecutive floats
    bb = x if bias is None else bias  # any tensor when there is no bias: HAS_BIAS=False never reads it
    sb = (0, 0) if bias is None else (bias.stride(0), bias.stride(1))
    block_w = _next_power_of_2(width)
    block_r = max(1, 8192 // block_w)
    grid = ((n + block_r - 1) // block_r, h, b)
    augment_rows_kernel[grid](
        x, bb, out, n, d, width, fill, MASKED_BIAS,
        x.stride(0), x.stride(1), x.stride(2), sb[0], sb[1], out.stride(0), out.stride(1), out.stride(2),
        HAS_BIAS=bias is not None, BLOCK_R=block_r, BLOCK_W=block_w,
    )  # fmt: skip
    return out


def attention_union(
    q: torch.Tensor,
    parts: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    *,
    scale: float | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Attention of q over the union of disjoint key sets, each with its per-key bias (a cache and the blocks a
    host tier brought back), without concatenating them first.

    Args:
        q: (B, H, Lq, D); parts: non-empty sequence of (k (B, Hk, Lk_i, D), v (B, Hk, Lk_i, Dv), bias
            (B, Hk, Lk_i) or None for no bias), the same batch, Hk, D and Dv in every part.
        backend: ``"auto"`` on CUDA where cuDNN runs the augmented route (fp16/bf16): the augmented keys of
            every part built into one buffer, the values concatenated, one cuDNN call (no log-sum-exp, no
            merge); otherwise, and for any other backend, each part's attention with its log-sum-exp
            (``attention(..., backend, return_lse=True)``), merged: the same maths, the reference.

    Returns:
        (B, H, Lq, Dv) in q.dtype.
    """
    if not parts:
        raise ValueError("parts must hold at least one (k, v, bias) triple, got none")
    for i, (k, v, bias) in enumerate(parts):
        check_qkv(q, k, v)
        check_bias(bias, k)
        if k.shape[:2] != parts[0][0].shape[:2] or v.shape[-1] != parts[0][1].shape[-1]:
            raise ValueError(f"parts[{i}] must have the batch, kv heads and value width of parts[0], got k "
                             f"{tuple(k.shape)}, v {tuple(v.shape)} against k {tuple(parts[0][0].shape)}, v "
                             f"{tuple(parts[0][1].shape)}")  # fmt: skip
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    lengths = [k.shape[2] for k, _, _ in parts]
    if backend == "auto" and q.is_cuda and cudnn_lse_supported(q, parts[0][1]) and min(lengths) > 0:
        b, h = q.shape[:2]
        hk = parts[0][0].shape[1]
        width = -(-(d + 2) // 64) * 64
        fill = float(torch.tensor(1.0 / scale, dtype=q.dtype))
        qa = _augment_rows(q, None, width, fill)
        ka = torch.empty(b, hk, sum(lengths), width, dtype=q.dtype, device=q.device)
        off = 0
        live = torch.zeros(b, hk, dtype=torch.bool, device=q.device)
        for (k, _, bias), n in zip(parts, lengths, strict=True):
            if bias is None:
                bias = torch.zeros(k.shape[:-1], dtype=torch.float32, device=k.device)
            _augment_rows(k, bias, width, 0.0, out=ka[:, :, off : off + n])
            live |= ~(bias <= MASKED_BIAS).all(dim=-1)  # a row whose keys are all masked, in every part
            off += n
        v = torch.cat([v for _, v, _ in parts], dim=2)
        raw = F.scaled_dot_product_attention(qa, ka, v, scale=scale, enable_gqa=hk != h)
        raw = raw * expand_kv_heads(live, h)[:, :, None, None].to(raw.dtype)
        return torch.where(torch.isnan(q).any(dim=-1, keepdim=True), float("nan"), raw)
    route = lse_backend(backend)
    pairs = []
    for k, v, bias in parts:
        r = attention(q, k, v, bias, scale=scale, backend=route, return_lse=True)
        assert r.lse is not None
        pairs.append((r.out, r.lse))
    return merge_attentions(pairs)[0]


def lse_backend(backend: Backend) -> Backend:
    """The route to ask for when the log-sum-exp is needed: the sdpa routes return none of their own off CUDA,
    so they become ``"auto"`` (which picks one that does); the others are kept."""
    return "auto" if backend in ("sdpa", "sdpa_augmented") else backend


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _sdpa_augmented(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float, h: int, hk: int
) -> torch.Tensor:
    if bias is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=hk != h)
    qa, ka = augment_qk(q, k, bias, scale)
    return F.scaled_dot_product_attention(qa, ka, v, scale=scale, enable_gqa=hk != h)


def _chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    max_elements: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, lq, _ = q.shape
    hk, lk, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = h // hk
    out = torch.zeros(b, h, lq, dv, dtype=torch.float32, device=q.device)
    lse = torch.full((b, h, lq), float("-inf"), dtype=torch.float32, device=q.device)
    if lk == 0 or lq == 0:
        return out.to(q.dtype), lse
    # Grouped layout (B, Hk, G*Lq, D) lets one matmul serve every query head of a kv head.
    qg = q.reshape(b, hk, g * lq, q.shape[-1])
    rows = g * lq
    q_step = max(1, min(rows, max_elements // max(1, b * hk * min(lk, 1024))))
    k_step = max(1, min(lk, max_elements // max(1, b * hk * q_step)))
    out_g = out.view(b, hk, rows, dv)
    lse_g = lse.view(b, hk, rows)
    for r0 in range(0, rows, q_step):
        qc = qg[:, :, r0 : r0 + q_step].float() * scale
        m = torch.full(qc.shape[:-1], float("-inf"), device=q.device)
        den = torch.zeros_like(m)
        acc = torch.zeros(*qc.shape[:-1], dv, device=q.device)
        for c0 in range(0, lk, k_step):
            s = torch.matmul(qc, k[:, :, c0 : c0 + k_step].float().transpose(-1, -2))
            if bias is not None:
                bc = bias[:, :, c0 : c0 + k_step].float()
                s = s + torch.where(bc <= MASKED_BIAS, float("-inf"), bc)[:, :, None, :]
            m_new = torch.maximum(m, s.amax(dim=-1))
            m_safe = torch.where(torch.isfinite(m_new), m_new, 0.0)
            p = torch.exp(s - m_safe[..., None])
            corr = torch.exp(m - m_safe)
            den = den * corr + p.sum(dim=-1)
            acc = acc * corr[..., None] + torch.matmul(p, v[:, :, c0 : c0 + k_step].float())
            m = m_new
        # Only a row with no unmasked key is empty; a NaN denominator (poisoned input) stays NaN.
        empty = den == 0
        out_g[:, :, r0 : r0 + q_step] = torch.where(empty[..., None], 0.0, acc / den.clamp_min(1e-38)[..., None])
        lse_g[:, :, r0 : r0 + q_step] = torch.where(
            empty, float("-inf"), torch.where(torch.isfinite(m), m, 0.0) + torch.log(den.clamp_min(1e-38))
        )
    return out.to(q.dtype), lse
