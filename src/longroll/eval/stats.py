"""Paired comparisons over episodes: mean difference and its percentile-bootstrap confidence interval.

Two policies rolled out on the same episodes, from the same context and noise, give one score each per episode;
their difference per episode removes what the episodes share (how hard the world is), so the interval of the
mean difference is much tighter than the two scores' own spreads. A claim counts only where the interval
excludes zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PairedDifference:
    """Mean of per-episode differences ``a - b`` and its bootstrap interval.

    Attributes:
        mean: mean difference over the episodes where both scores are finite.
        ci95: (lo, hi) percentile-bootstrap interval of the mean at ``level``.
        episodes: episodes used (pairs with a non-finite score are left out: e.g. no revisited tile).
        wins: episodes where ``a > b``.
        level: coverage of the interval.
    """

    mean: float
    ci95: tuple[float, float]
    episodes: int
    wins: int
    level: float

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely on one side of zero."""
        lo, hi = self.ci95
        return lo > 0 or hi < 0

    def to_json(self) -> dict[str, object]:
        return {"mean": self.mean, "ci95": list(self.ci95), "episodes": self.episodes, "wins": self.wins,
                "level": self.level, "excludes_zero": self.excludes_zero}  # fmt: skip


def bootstrap_mean_ci(
    values: Sequence[float], *, resamples: int = 10_000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values`` (all finite; at least one).

    Deterministic for a seed. With one value the interval is that value.
    """
    if not isinstance(resamples, int) or isinstance(resamples, bool) or resamples < 1:
        raise ValueError(f"resamples must be a positive int, got {resamples!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    x = torch.as_tensor(list(values), dtype=torch.float64)
    if x.dim() != 1 or x.numel() == 0:
        raise ValueError(f"values must be a non-empty 1-d sequence, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("values must be finite (drop the episodes without a score first)")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, x.numel(), (resamples, x.numel()), generator=gen)
    means = x[idx].mean(dim=1)
    alpha = (1 - level) / 2
    lo, hi = torch.quantile(means, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    return float(lo), float(hi)


def paired_difference(
    a: Sequence[float], b: Sequence[float], *, resamples: int = 10_000, level: float = 0.95, seed: int = 0
) -> PairedDifference:
    """Per-episode ``a[i] - b[i]``, its mean and bootstrap interval (see :class:`PairedDifference`).

    Pairs where either score is not finite (NaN: nothing to score; inf: identical to a reference) are left out.
    With no finite pair the mean and interval are NaN.
    """
    if len(a) != len(b):
        raise ValueError(f"a and b must score the same episodes, got {len(a)} and {len(b)} values")
    diffs = [x - y for x, y in zip(a, b, strict=True) if math.isfinite(x) and math.isfinite(y)]
    if not diffs:
        return PairedDifference(math.nan, (math.nan, math.nan), 0, 0, level)
    lo, hi = bootstrap_mean_ci(diffs, resamples=resamples, level=level, seed=seed)
    return PairedDifference(sum(diffs) / len(diffs), (lo, hi), len(diffs), sum(d > 0 for d in diffs), level)


__all__ = ["PairedDifference", "bootstrap_mean_ci", "paired_difference"]
