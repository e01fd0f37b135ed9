"""The fixed-budget baseline: keep the entries the newest queries attend to most."""

from __future__ import annotations

import math

import torch

from longroll.cache.buffers import CacheBuffers
from longroll.cache.config import BudgetPolicy


def importance(keys: torch.Tensor, queries: torch.Tensor, sample: int) -> torch.Tensor:
    """Mean attention probability each key receives from a strided sample of queries.

    Args:
        keys: (B, Hk, N, D); queries: (B, H, Lq, D) with Hk dividing H (query heads of a group are averaged).

    Returns:
        (B, Hk, N) float32.
    """
    b, _h, lq, d = queries.shape
    hk = keys.shape[1]
    step = max(1, lq // sample)
    qs = queries[:, :, ::step][:, :, :sample].float()
    qs = qs.reshape(b, hk, -1, d)
    p = torch.softmax(torch.matmul(qs, keys.float().transpose(-1, -2)) / math.sqrt(d), dim=-1)
    return p.mean(dim=2)


def compact_to_budget(
    buf: CacheBuffers, total: int, staged: int, policy: BudgetPolicy, tokens_per_frame: int, queries: torch.Tensor
) -> int:
    """Keep sinks, the newest ``staged`` entries and the most important of the rest, packed into the first
    ``budget`` slots. Slots [0, total) are valid on entry (the staged chunk last). Returns the new length."""
    budget = policy.budget_tokens
    if total <= budget:
        return total
    sink = min(policy.sink_frames * tokens_per_frame, total - staged)
    keys = buf.k[:, :, :total]
    score = importance(keys, queries, policy.query_sample)
    # Sinks and the newest chunk are always kept: give them an unbeatable score.
    score[:, :, :sink] = float("inf")
    score[:, :, total - staged : total] = float("inf")
    keep = score.topk(budget, dim=-1).indices.sort(dim=-1).values
    d, dv = buf.k.shape[-1], buf.v.shape[-1]
    k = buf.k.gather(2, keep[..., None].expand(*keep.shape, d))
    # Non-finite queries (NaN, or an Inf that turns scores into NaN or ties) would choose the kept entries
    # arbitrarily; checking needs a host sync, so instead the choice is poisoned: the kept keys become NaN and
    # every later attention over the cache shows it.
    poisoned = (~torch.isfinite(queries)).flatten(1).any(dim=-1)[:, None, None, None]  # (B, 1, 1, 1), no sync
    k = torch.where(poisoned, float("nan"), k)
    v = buf.v.gather(2, keep[..., None].expand(*keep.shape, dv))
    c = buf.count.gather(2, keep)
    f = buf.frame.gather(2, keep)
    buf.k[:, :, :budget] = k
    buf.v[:, :, :budget] = v
    buf.count[:, :, :budget] = c
    buf.frame[:, :, :budget] = f
    buf.count[:, :, budget:total] = 0.0
    buf.frame[:, :, budget:total] = -1
    return budget
