"""Pure-torch reference twins: the maths of every attention op, written to be obviously right.

They materialise the full score matrix, so they are for tests, probes and small shapes only. With
``upcast=True`` they compute in float64 (the ground truth); with ``upcast=False`` they compute in the input
dtype, which gives the "same maths in torch at that dtype" error used by the tolerance rule.
"""

from __future__ import annotations

import math

import torch

from longroll.ops._checks import check_bias, check_qkv


def expand_kv_heads(x: torch.Tensor, heads_q: int) -> torch.Tensor:
    """Repeat key/value heads for grouped-query attention: (B, Hk, ...) -> (B, heads_q, ...)."""
    hk = x.shape[1]
    return x if hk == heads_q else x.repeat_interleave(heads_q // hk, dim=1)


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    upcast: bool = True,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with an optional per-key logit bias, materialising all scores.

    Args:
        q: (batch, heads, seqlen_q, head_dim).
        k: (batch, heads_kv, seqlen_k, head_dim); heads_kv divides heads.
        v: (batch, heads_kv, seqlen_k, head_dim_v).
        bias: (batch, heads_kv, seqlen_k) added to every query's logit of that key (e.g. log of merged counts).
        scale: logit scale, default 1/sqrt(head_dim).
        upcast: compute in float64 (True) or in the input dtype (False).
        key_mask: optional bool (batch, heads, seqlen_q, seqlen_k); False drops the pair.

    Returns:
        out: (batch, heads, seqlen_q, head_dim_v) in q.dtype. Rows with no key left are zero.
        lse: (batch, heads, seqlen_q) float32 log-sum-exp of the scaled, biased logits (-inf for empty rows).
    """
    check_qkv(q, k, v)
    check_bias(bias, k)
    h = q.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    ct = torch.float64 if upcast else q.dtype
    kk = expand_kv_heads(k, h).to(ct)
    vv = expand_kv_heads(v, h).to(ct)
    s = torch.matmul(q.to(ct), kk.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + expand_kv_heads(bias, h).to(ct)[:, :, None, :]
    if key_mask is not None:
        s = s.masked_fill(~key_mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    out = torch.matmul(p, vv)
    return out.to(q.dtype), lse.float()
