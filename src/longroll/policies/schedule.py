"""When to run sparse attention: dense early denoising steps and a calibrated set of sparse layers.

The FAST-AR paper keeps the first 30 % of denoising steps dense and sparsifies the ~70 % of blocks that
empirically tolerate it (following Sparse VideoGen). Both knobs live in :class:`SparseSchedule`; the layer set
comes from :func:`calibrate_layers` over (recall, density) probes that :func:`measure_layer` takes on a sample
chunk with the real planner.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from longroll.sparse.annsa import measure_layer


@dataclass(frozen=True)
class SparseSchedule:
    """Which (denoising step, layer) pairs run sparse attention.

    The first ``dense_steps(num_steps) = floor(dense_fraction * num_steps + 1/2)`` steps are dense (the
    product rounded half up). Few-step samplers get: 4 steps -> step 0 dense (0.3 * 4 = 1.2 -> 1); 3 steps ->
    step 0; 5 steps -> steps 0-1 (1.5 -> 2); 1 step -> sparse (0.3 -> 0). 50 steps -> the first 15. Rounding
    rather than ceil keeps a 4-step distilled sampler (Self-Forcing) at one dense step, as the public
    reproductions do.

    Args:
        dense_fraction: share of the leading denoising steps kept dense, in [0, 1].
        sparse_layers: layer ids that may run sparse; None means every layer.
    """

    dense_fraction: float = 0.3
    sparse_layers: frozenset[int] | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.dense_fraction <= 1.0:
            raise ValueError(f"dense_fraction must be in [0, 1], got {self.dense_fraction!r}")
        if self.sparse_layers is not None:
            if not isinstance(self.sparse_layers, frozenset):
                raise ValueError(
                    f"sparse_layers must be a frozenset of ints or None, got {type(self.sparse_layers).__name__}"
                )
            bad = [x for x in self.sparse_layers if not isinstance(x, int) or isinstance(x, bool) or x < 0]
            if bad:
                raise ValueError(f"sparse_layers must hold non-negative ints, got {sorted(map(repr, bad))}")

    def dense_steps(self, num_steps: int) -> int:
        """Number of leading dense steps out of ``num_steps``."""
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        # The epsilon absorbs binary rounding of products such as 0.3 * 5 that are meant to be exact halves.
        return min(num_steps, math.floor(self.dense_fraction * num_steps + 0.5 + 1e-9))

    def is_sparse(self, step: int, num_steps: int, layer: int) -> bool:
        """True when ``layer`` runs sparse attention at denoising ``step`` (0-based) of ``num_steps``."""
        if not isinstance(step, int) or not 0 <= step < num_steps:
            raise ValueError(f"step must be an int in [0, num_steps={num_steps}), got {step!r}")
        if not isinstance(layer, int) or layer < 0:
            raise ValueError(f"layer must be a non-negative int, got {layer!r}")
        if step < self.dense_steps(num_steps):
            return False
        return self.sparse_layers is None or layer in self.sparse_layers


def calibrate_layers(
    samples: Mapping[int, tuple[float, float]], target_recall: float = 0.9, max_density: float = 0.5
) -> frozenset[int]:
    """Layers whose sparse selection is both faithful and worth it on a sample chunk.

    Args:
        samples: layer -> (recall, density) measured with :func:`measure_layer`.
        target_recall: minimum recall, in [0, 1].
        max_density: maximum density, in (0, 1]: denser layers gain too little over the dense kernel.

    Returns:
        The layers with recall >= target_recall and density <= max_density.
    """
    if not 0.0 <= target_recall <= 1.0:
        raise ValueError(f"target_recall must be in [0, 1], got {target_recall!r}")
    if not 0.0 < max_density <= 1.0:
        raise ValueError(f"max_density must be in (0, 1], got {max_density!r}")
    chosen = set()
    for layer, pair in samples.items():
        if not isinstance(layer, int) or layer < 0:
            raise ValueError(f"samples keys must be non-negative layer ids, got {layer!r}")
        if len(pair) != 2 or not all(math.isfinite(float(x)) for x in pair):
            raise ValueError(f"samples[{layer}] must be a finite (recall, density) pair, got {pair!r}")
        recall, density = pair
        if recall >= target_recall and density <= max_density:
            chosen.add(layer)
    return frozenset(chosen)


__all__ = ["SparseSchedule", "calibrate_layers", "measure_layer"]
