"""What the generation and benchmark loops need from a streaming latent decoder, and the decoders to choose from.

Two decoders fit: :class:`longroll.pipeline.vae.LatentDecoder` (the Wan VAE, ``"wan"``) and
:class:`longroll.pipeline.tiny_decoder.TinyLatentDecoder` (the TAEHV-architecture tiny decoder, ``"tiny"``). Both
keep the temporal context of one video between chunks and give ``1 + 4 (F - 1)`` video frames for ``F``
latent frames.
"""

from __future__ import annotations

from typing import Literal, Protocol

import numpy as np
import torch

#: ``--decoder`` choices.
DecoderName = Literal["wan", "tiny"]
DECODER_NAMES: tuple[DecoderName, ...] = ("wan", "tiny")


class StreamingDecoder(Protocol):
    """A chunk-by-chunk decoder of one video's normalised DiT latents."""

    device: torch.device
    dtype: torch.dtype
    latent_channels: int
    spatial_factor: int
    temporal_factor: int

    def reset(self) -> None:
        """Forget the temporal context: the next chunk starts a new video."""

    def video_frames(self, latent_frames: int) -> int:
        """Video frames decoded from ``latent_frames`` latent frames of a new video."""
        ...

    def decode_chunk_float(self, latents: torch.Tensor) -> torch.Tensor:
        """(1, C, F, h, w) latents following those already decoded -> (1, 3, T, H, W) float32 in [-1, 1]."""
        ...

    def decode_chunk(self, latents: torch.Tensor) -> np.ndarray:
        """Like :meth:`decode_chunk_float`, as (T, H, W, 3) uint8 RGB frames."""
        ...


def check_decoder_name(name: str) -> DecoderName:
    """``name`` if it is one of :data:`DECODER_NAMES`, else a ValueError naming it."""
    for known in DECODER_NAMES:
        if name == known:
            return known
    raise ValueError(f"decoder must be one of {list(DECODER_NAMES)}, got {name!r}")


__all__ = ["DECODER_NAMES", "DecoderName", "StreamingDecoder", "check_decoder_name"]
