"""Merging partial attentions by their log-sum-exp.

Attention over the union of disjoint key sets A and B equals a convex combination of the partial outputs,
weighted by exp(lse_A) and exp(lse_B). This is what lets a cache be attended in pieces (committed history,
staged chunk, sinks, key chunks) without concatenating it.
"""

from __future__ import annotations

import torch


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attentions over disjoint key sets.

    Args:
        out_a, out_b: (..., seqlen_q, head_dim_v) partial outputs, each normalised over its own keys.
        lse_a, lse_b: (..., seqlen_q) float32 log-sum-exp of each part; -inf marks an empty part.

    Returns:
        out: (..., seqlen_q, head_dim_v) in out_a.dtype; lse: (..., seqlen_q) float32.
    """
    if out_a.shape != out_b.shape:
        raise ValueError(f"out_b has shape {tuple(out_b.shape)} but out_a has {tuple(out_a.shape)}")
    if lse_a.shape != out_a.shape[:-1] or lse_b.shape != out_a.shape[:-1]:
        raise ValueError(
            f"lse_a/lse_b must have shape {tuple(out_a.shape[:-1])}, got {tuple(lse_a.shape)} and {tuple(lse_b.shape)}"
        )
    lse_a = lse_a.float()
    lse_b = lse_b.float()
    m = torch.maximum(lse_a, lse_b)
    # Both parts empty: keep m finite so the weights are 0 instead of NaN.
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    wa = torch.exp(lse_a - m_safe)
    wb = torch.exp(lse_b - m_safe)
    denom = wa + wb
    lse = torch.where(denom > 0, m_safe + torch.log(denom), torch.full_like(m, float("-inf")))
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    out = (out_a.float() * (wa / denom)[..., None] + out_b.float() * (wb / denom)[..., None]).to(out_a.dtype)
    return out, lse


def merge_attentions(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold :func:`merge_attention` over a non-empty list of ``(out, lse)`` parts."""
    if not parts:
        raise ValueError("parts must hold at least one (out, lse) pair, got an empty list")
    out, lse = parts[0]
    for o, s in parts[1:]:
        out, lse = merge_attention(out, lse, o, s)
    return out, lse
