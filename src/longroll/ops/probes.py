"""Quality probes shared by benchmarks and calibration: recall, density and relative error of approximate
attention against the exact one. They materialise scores per query chunk, so they are for sampled queries."""

from __future__ import annotations

import math

import torch

from longroll.ops.reference import expand_kv_heads


def relative_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| over all elements, computed in float64 (host sync: for reports only)."""
    if out.shape != ref.shape:
        raise ValueError(f"out has shape {tuple(out.shape)} but ref has {tuple(ref.shape)}")
    num = (out.double() - ref.double()).norm()
    den = ref.double().norm().clamp_min(1e-300)
    return float(num / den)


def attention_recall(
    q: torch.Tensor,
    k: torch.Tensor,
    keep: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    query_chunk: int = 256,
) -> float:
    """Share of the exact attention mass that falls on the kept query-key pairs, averaged over queries.

    Args:
        q: (batch, heads, seqlen_q, head_dim); k: (batch, heads_kv, seqlen_k, head_dim).
        keep: bool, broadcastable to (batch, heads, seqlen_q, seqlen_k) -- e.g. (batch, heads, 1, seqlen_k) for a
            per-key selection or a dense block mask expanded to tokens.
        bias: (batch, heads_kv, seqlen_k) per-key logit bias of the exact attention.
    """
    b, h, lq, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    kk = expand_kv_heads(k, h).float()
    total = 0.0
    for s in range(0, lq, query_chunk):
        logits = torch.matmul(q[:, :, s : s + query_chunk].float(), kk.transpose(-1, -2)) * scale
        if bias is not None:
            logits = logits + expand_kv_heads(bias, h).float()[:, :, None, :]
        p = torch.softmax(logits, dim=-1)
        kp = keep if keep.shape[2] == 1 else keep[:, :, s : s + query_chunk]
        total += float((p * kp.to(p.dtype)).sum())
    return total / (b * h * lq)


def density(keep: torch.Tensor) -> float:
    """Fraction of query-key pairs computed. keep: bool, any shape whose last two axes are (queries, keys)."""
    return float(keep.float().mean())
