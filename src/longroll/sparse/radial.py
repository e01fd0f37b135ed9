"""A Radial-Attention-style static mask for chunked AR rollouts: the peer baseline for AnnSA.

Radial Attention keeps, between frames ``d`` apart, only tokens within a spatial band whose width halves with
every doubling of ``d`` (attention energy decays with distance), which costs O(n log n) instead of O(n^2).
Adapted to a KV cache whose slots are in time order (the ``full`` policy appends frame after frame): a query
block of the current chunk keeps

- every key of the first ``dense_frames`` frames before it and of its own chunk,
- every key of the sink frames,
- in a history frame ``d`` frames back, the key blocks whose in-frame position lies within
  ``tokens_per_frame / 2 ** ceil(log2(d / dense_frames))`` tokens of the query block's own position
  (positions are raster order, as Radial Attention flattens frames); blocks overlapping the query block's
  own position are always kept.

The mask depends only on the geometry, so it is built once per chunk and shared by every layer and step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longroll.ops.block_index import BlockSparseIndex


@dataclass(frozen=True)
class RadialConfig:
    """Args:
    dense_frames: frames before the chunk attended in full.
    sink_frames: first frames of the video attended in full.
    q_block_size, kv_block_size: block sizes of the index (powers of two).
    """

    dense_frames: int = 1
    sink_frames: int = 1
    q_block_size: int = 128
    kv_block_size: int = 128

    def __post_init__(self) -> None:
        if self.dense_frames < 0 or self.sink_frames < 0:
            raise ValueError(f"dense_frames and sink_frames must be >= 0, got {self.dense_frames}, {self.sink_frames}")
        for name in ("q_block_size", "kv_block_size"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {v}")


def radial_block_mask(
    config: RadialConfig, *, history_frames: int, chunk_frames: int, tokens_per_frame: int, device: torch.device | str
) -> torch.Tensor:
    """Block mask of one chunk's queries over [history ; chunk] keys in time order.

    Args:
        history_frames: committed frames in the cache (slots ``[0, history_frames * P)``).
        chunk_frames: frames of the chunk (queries, and the last keys).
        tokens_per_frame: P.

    Returns:
        bool (nqb, nkb): True keeps the (query block, key block) pair.
    """
    p = tokens_per_frame
    lq, lk = chunk_frames * p, (history_frames + chunk_frames) * p
    bq, bk = config.q_block_size, config.kv_block_size
    q_tok = torch.arange(0, lq, bq, device=device).clamp_max(lq - 1)
    q_frame = history_frames + q_tok // p
    q_lo, q_hi = q_tok % p, (torch.clamp(q_tok + bq, max=lq) - 1) % p
    k_tok = torch.arange(0, lk, bk, device=device)
    k_frame = k_tok // p
    k_lo, k_hi = k_tok % p, (torch.clamp(k_tok + bk, max=lk) - 1) % p
    d = q_frame[:, None] - k_frame[None, :]
    octave = torch.ceil(torch.log2(torch.clamp(d.float() / max(config.dense_frames, 1), min=1.0)))
    half = p / torch.pow(2.0, octave)
    # a block may wrap into the next frame (k_hi < k_lo): treat it as reaching the frame's end
    k_hi = torch.where(k_hi < k_lo, torch.full_like(k_hi, p - 1), k_hi)
    q_hi = torch.where(q_hi < q_lo, torch.full_like(q_hi, p - 1), q_hi)
    gap = torch.clamp(k_lo[None, :] - q_hi[:, None], min=0) + torch.clamp(q_lo[:, None] - k_hi[None, :], min=0)
    keep = gap.float() <= half
    keep |= d <= config.dense_frames
    keep |= (k_frame < config.sink_frames)[None, :]
    keep |= (k_frame >= history_frames)[None, :]
    return keep


def radial_index(
    config: RadialConfig, *, history_frames: int, chunk_frames: int, tokens_per_frame: int, device: torch.device | str
) -> BlockSparseIndex:
    """:func:`radial_block_mask` as a (1, 1, nqb, nkb) index shared by every batch element and head."""
    mask = radial_block_mask(
        config,
        history_frames=history_frames,
        chunk_frames=chunk_frames,
        tokens_per_frame=tokens_per_frame,
        device=device,
    )
    p = tokens_per_frame
    return BlockSparseIndex.from_dense(
        mask[None, None],
        config.q_block_size,
        config.kv_block_size,
        chunk_frames * p,
        (history_frames + chunk_frames) * p,
    )


def radial_density_estimate(history_frames: int, dense_frames: int = 1) -> float:
    """Rough share of history keys kept for a long history (the band sum ~ log2 of the history)."""
    if history_frames <= 0:
        return 1.0
    kept = min(history_frames, dense_frames) + sum(
        1 / 2 ** math.ceil(math.log2(d / max(dense_frames, 1))) for d in range(dense_frames + 1, history_frames + 1)
    )
    return kept / history_frames
