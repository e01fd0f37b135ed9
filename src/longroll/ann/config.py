"""Configs of the two preprocessing-free ANN families.

Both are stateless apart from seeded random projections, so an index costs nothing to build beyond hashing or
quantising the vectors, which is what lets it be rebuilt per chunk and per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class LSHConfig:
    """Random-projection sign hashing (SimHash).

    Args:
        bits: sign bits per table; a table has 2**bits buckets.
        tables: independent hash tables (a vector lands in one bucket per table).
        probes: Hamming radius of multi-probe lookups (0: own bucket only, 1: also the ``bits`` neighbours).
        seed: base seed; projections are drawn per (seed, layer, global head id), so any subset of heads
            (one GPU's shard) gets exactly the projections it would get in a single-GPU run.
    """

    bits: int = 8
    tables: int = 1
    probes: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 16:
            raise ValueError(f"bits must be in [1, 16], got {self.bits}")
        if not 1 <= self.tables <= 16:
            raise ValueError(f"tables must be in [1, 16], got {self.tables}")
        if self.probes not in (0, 1):
            raise ValueError(f"probes must be 0 or 1 (Hamming radius), got {self.probes}")


@dataclass(frozen=True)
class Int8Config:
    """8-bit scalar-quantised similarity search: symmetric per-vector int8 codes, top-k by integer dot product.

    Args:
        topk: candidates returned per query by :meth:`Int8Searcher.topk` users that ask for more than one.
        top1_backend: how :meth:`Int8Searcher.top1` runs: ``"torch"`` (the score matrix, then its arg-max),
            ``"triton"`` (the fused kernel of :mod:`longroll.ops.top1`: no score matrix; the same index) or
            ``"auto"`` (the default: the kernel on CUDA where its head dims allow, the score matrix elsewhere).
            Measured on one H200 (``scripts/gpu_profile_commit.py``, ``results/gpu/commit/commit_fused.json``): a
            TempCache layer's commit at Wan2.1-1.3B shapes and a 15-frame cap takes 2.68 ms instead of 3.09 (3-frame
            ring; 2.40 instead of 2.81 without), the score matrix's writes, reads and arg-max gone.
    """

    topk: int = 1
    top1_backend: Literal["auto", "torch", "triton"] = "auto"

    def __post_init__(self) -> None:
        if self.topk < 1:
            raise ValueError(f"topk must be >= 1, got {self.topk}")
        if self.top1_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"top1_backend must be 'auto', 'torch' or 'triton', got {self.top1_backend!r}")


AnnConfig = LSHConfig | Int8Config
