"""Top-1 searches over many (batch, head) rows without materialising every row's score matrix at once."""

from __future__ import annotations

from collections.abc import Callable

import torch

#: Score elements held at once by :func:`argmax_by_rows` (256 MiB of float32).
SCORE_BUDGET = 1 << 26


def argmax_by_rows(
    scores: Callable[[slice], torch.Tensor], rows: int, per_row: int, budget: int = SCORE_BUDGET
) -> torch.Tensor:
    """``scores(slice(0, rows)).argmax(-1)``, computed a few rows at a time.

    A stacked commit of every layer (``CacheGroup``) searches ``frames x layers x batch`` rows at once; their
    score matrices together would take gigabytes (10 GB at Wan2.1-1.3B shapes) for a result of a few megabytes.

    Args:
        scores: maps a slice of leading rows to their (r, heads, n, m) scores.
        rows: leading rows in all; per_row: score elements of one row (heads * n * m).
        budget: most score elements held at once (at least one row).

    Returns:
        (rows, heads, n) int64.
    """
    step = max(1, budget // max(per_row, 1))
    if step >= rows:
        return scores(slice(0, rows)).argmax(dim=-1)
    return torch.cat([scores(slice(r, min(r + step, rows))).argmax(dim=-1) for r in range(0, rows, step)])
