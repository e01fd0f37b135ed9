"""Fidelity metrics between videos: PSNR and SSIM, in torch (CPU or GPU), frame by frame."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longroll.world.rollout import psnr_from_mse


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"videos must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() != 4 or a.shape[1] not in (1, 3):
        raise ValueError(f"videos must be (frames, channels 1 or 3, height, width), got {tuple(a.shape)}")


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-frame PSNR in dB.

    Args:
        a, b: (frames, channels, height, width) in [0, data_range].

    Returns:
        (frames,) float64; identical frames give +inf.
    """
    _check_pair(a, b)
    return psnr_from_mse((a.double() - b.double()).pow(2).flatten(1).mean(1), data_range)


def _gaussian(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """Per-frame SSIM with a Gaussian window (the standard constants K1=0.01, K2=0.03), averaged over channels.

    Args:
        a, b: (frames, channels, height, width) in [0, data_range]; height and width >= ``window``.

    Returns:
        (frames,) float64.
    """
    _check_pair(a, b)
    if min(a.shape[-2:]) < window:
        raise ValueError(f"frames must be at least {window}x{window} for the SSIM window, got {tuple(a.shape[-2:])}")
    c = a.shape[1]
    g = _gaussian(window, sigma, a.device)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window).contiguous()
    x, y = a.double(), b.double()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=c)

    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)
