"""Attention masks for full-sequence forwards that reproduce chunk-by-chunk generation."""

from __future__ import annotations

import torch


def block_causal_mask(
    num_frames: int, tokens_per_frame: int, frames_per_chunk: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Self-attention mask in which each chunk of frames sees itself and every earlier chunk.

    With it, ``model(x_full, t, ctx, processor=DenseProcessor(self_mask=mask))`` computes in one pass what a
    chunk-by-chunk rollout with a full KV cache computes. Tokens are frame-major, as in the model. A last
    chunk shorter than ``frames_per_chunk`` is allowed.

    Args:
        num_frames: latent frames of the sequence (after temporal patching).
        tokens_per_frame: tokens of one frame, e.g. ``WanConfig.tokens_per_frame(h, w)``.
        frames_per_chunk: frames generated per autoregressive step (3 for Self-Forcing).
        device: where to allocate the mask.

    Returns:
        bool (L, L) with L = num_frames * tokens_per_frame; True means query i may attend to key j.
    """
    for name, value in (
        ("num_frames", num_frames),
        ("tokens_per_frame", tokens_per_frame),
        ("frames_per_chunk", frames_per_chunk),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    chunk_tokens = tokens_per_frame * frames_per_chunk
    chunk = torch.arange(num_frames * tokens_per_frame, device=device) // chunk_tokens
    return chunk[:, None] >= chunk[None, :]
