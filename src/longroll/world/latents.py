"""An exact, invertible "latent" space for the world model: space-to-depth of the RGB frames.

A VAE would make the world model's errors a mix of its own and the autoencoder's, and would need weights that
cannot be downloaded here. Instead a latent frame is the frame itself, rearranged: each ``factor x factor``
pixel block becomes ``3 * factor**2`` channels (``pixel_unshuffle``), and uint8 values k map to
``(k - 127.5) / 127.5`` in [-1, 1]. A 64x64 RGB frame is a 48 x 16 x 16 latent; with the Wan patch (1, 2, 2)
it is 8 x 8 = 64 tokens of 8 x 8 pixels each. Decoding is exact: ``latents_to_uint8(frames_to_latents(x))``
returns x bit for bit, so every error measured downstream is the model's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Pixels per latent cell side.
LATENT_FACTOR = 4
#: Latent channels of an RGB frame.
LATENT_CHANNELS = 3 * LATENT_FACTOR**2


def space_to_depth(x: torch.Tensor, factor: int = LATENT_FACTOR) -> torch.Tensor:
    """(..., C, H, W) -> (..., C * factor**2, H // factor, W // factor); a pure permutation of the values."""
    if x.dim() < 3 or x.shape[-1] % factor or x.shape[-2] % factor:
        raise ValueError(f"x must be (..., C, H, W) with H, W multiples of {factor}, got {tuple(x.shape)}")
    lead = x.shape[:-3]
    y = F.pixel_unshuffle(x.reshape(-1, *x.shape[-3:]), factor)
    return y.reshape(*lead, *y.shape[1:])


def depth_to_space(x: torch.Tensor, factor: int = LATENT_FACTOR) -> torch.Tensor:
    """Inverse of :func:`space_to_depth`: (..., C * factor**2, h, w) -> (..., C, h * factor, w * factor)."""
    if x.dim() < 3 or x.shape[-3] % (factor * factor):
        raise ValueError(f"x must be (..., C * {factor * factor}, h, w), got {tuple(x.shape)}")
    lead = x.shape[:-3]
    y = F.pixel_shuffle(x.reshape(-1, *x.shape[-3:]), factor)
    return y.reshape(*lead, *y.shape[1:])


def frames_to_latents(frames: torch.Tensor, factor: int = LATENT_FACTOR) -> torch.Tensor:
    """Encode frames.

    Args:
        frames: (B, F, 3, H, W) uint8 RGB.

    Returns:
        (B, 3 * factor**2, F, H // factor, W // factor) float32 in [-1, 1], the model's layout.
    """
    if frames.dim() != 5 or frames.dtype != torch.uint8 or frames.shape[2] != 3:
        raise ValueError(f"frames must be uint8 (B, F, 3, H, W), got {tuple(frames.shape)} {frames.dtype}")
    x = (frames.float() - 127.5) / 127.5
    return space_to_depth(x, factor).transpose(1, 2)


def latents_to_frames(latents: torch.Tensor, factor: int = LATENT_FACTOR) -> torch.Tensor:
    """Decode latents to float frames.

    Args:
        latents: (B, 3 * factor**2, F, h, w), any float dtype.

    Returns:
        (B, F, 3, h * factor, w * factor) float32 in [0, 1] (clamped).
    """
    if latents.dim() != 5:
        raise ValueError(f"latents must be (B, C, F, h, w), got {tuple(latents.shape)}")
    x = depth_to_space(latents.float().transpose(1, 2), factor)
    return (x * 0.5 + 0.5).clamp(0.0, 1.0)


def latents_to_uint8(latents: torch.Tensor, factor: int = LATENT_FACTOR) -> torch.Tensor:
    """Decode latents to uint8 frames: (B, C, F, h, w) -> (B, F, 3, H, W), rounding to the nearest level."""
    if latents.dim() != 5:
        raise ValueError(f"latents must be (B, C, F, h, w), got {tuple(latents.shape)}")
    x = depth_to_space(latents.float().transpose(1, 2), factor)
    return torch.round(x * 127.5 + 127.5).clamp(0, 255).to(torch.uint8)
