"""Flow-matching samplers for chunked rollouts: a few-step list (Self-Forcing / CausVid style) and Euler."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class SamplerConfig:
    """Denoising schedule of one chunk.

    The model predicts the flow velocity ``v = noise - x0`` at ``x_t = (1 - sigma) x0 + sigma noise``;
    its timestep input is ``1000 * sigma``. Timesteps map to sigmas through the usual shift
    ``sigma = shift * s / (1 + (shift - 1) * s)``, ``s = t / 1000``.

    Args:
        timesteps: descending timesteps in (0, 1000], one per denoising step.
        shift: timestep shift (Wan: 5.0 at 480p; 1.0 disables it).
        mode: ``"few_step"`` predicts x0 and re-noises with fresh noise to the next sigma (distilled few-step
            models); ``"euler"`` integrates the flow ODE.
        context_timestep: timestep of the clean pass that commits the chunk into the caches.
    """

    timesteps: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)
    shift: float = 5.0
    mode: Literal["few_step", "euler"] = "few_step"
    context_timestep: float = 0.0

    def __post_init__(self) -> None:
        ts = tuple(float(t) for t in self.timesteps)
        object.__setattr__(self, "timesteps", ts)
        if not ts:
            raise ValueError("timesteps must hold at least one step")
        if any(not 0.0 < t <= 1000.0 for t in ts) or any(a <= b for a, b in itertools.pairwise(ts)):
            raise ValueError(f"timesteps must be strictly descending in (0, 1000], got {ts}")
        if self.shift <= 0:
            raise ValueError(f"shift must be positive, got {self.shift}")
        if self.mode not in ("few_step", "euler"):
            raise ValueError(f"mode must be 'few_step' or 'euler', got {self.mode!r}")
        if not 0.0 <= self.context_timestep < 1000.0:
            raise ValueError(f"context_timestep must be in [0, 1000), got {self.context_timestep}")

    @classmethod
    def euler(cls, num_steps: int, shift: float = 5.0) -> SamplerConfig:
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        return cls(tuple(1000.0 * (1 - i / num_steps) for i in range(num_steps)), shift, "euler")

    def sigma(self, t: float) -> float:
        s = t / 1000.0
        return self.shift * s / (1 + (self.shift - 1) * s)

    @property
    def sigmas(self) -> tuple[float, ...]:
        """Per-step sigmas, followed by the final 0."""
        return (*(self.sigma(t) for t in self.timesteps), 0.0)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)
