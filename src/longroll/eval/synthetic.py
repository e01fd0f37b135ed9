"""Synthetic video-like attention inputs with known structure, for tests, CPU benchmarks and the CPU demo.

A "scene" is a static background of P tokens per frame whose keys drift slowly, an object that moves across
token positions and keeps its own appearance, and sensor noise. ``novel=True`` draws every frame afresh (a
scene cut every frame), the worst case for any cache compression.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SceneConfig:
    """Shape and dynamics of a synthetic scene.

    Args:
        tokens_per_frame: P, tokens of one latent frame (a ``height x width`` grid).
        width: grid width (P must be a multiple).
        heads, head_dim: attention geometry.
        object_tokens: side of the square moving object, in tokens.
        speed: object displacement per frame, in tokens.
        noise: std of per-frame key/value noise relative to unit-norm-ish keys.
        drift: std of the slow per-frame random walk of the background.
        key_scale: norm of the keys (sharper attention for larger values).
        novel: every frame entirely new.
        seed: generator seed.
    """

    tokens_per_frame: int = 256
    width: int = 16
    heads: int = 2
    head_dim: int = 64
    object_tokens: int = 4
    speed: int = 1
    noise: float = 0.01
    drift: float = 0.002
    key_scale: float = 4.0
    novel: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.tokens_per_frame % self.width:
            raise ValueError(f"tokens_per_frame={self.tokens_per_frame} must be a multiple of width={self.width}")
        if self.object_tokens > min(self.width, self.tokens_per_frame // self.width):
            raise ValueError(f"object_tokens={self.object_tokens} does not fit the grid")


def scene_frames(
    cfg: SceneConfig, *, batch: int = 1, dtype: torch.dtype = torch.float32
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless stream of frames.

    Yields:
        k: (batch, heads, tokens_per_frame, head_dim) keys; v: same shape, values.
    """
    g = torch.Generator().manual_seed(cfg.seed)
    shape = (batch, cfg.heads, cfg.tokens_per_frame, cfg.head_dim)
    obj_shape = (batch, cfg.heads, cfg.object_tokens**2, cfg.head_dim)

    def unit(*s: int) -> torch.Tensor:
        x = torch.randn(*s, generator=g)
        return x / x.norm(dim=-1, keepdim=True)

    bk, bv = unit(*shape) * cfg.key_scale, torch.randn(*shape, generator=g)
    ok, ov = unit(*obj_shape) * cfg.key_scale, torch.randn(*obj_shape, generator=g)
    h = cfg.tokens_per_frame // cfg.width
    t = 0
    while True:
        if cfg.novel:
            bk, bv = unit(*shape) * cfg.key_scale, torch.randn(*shape, generator=g)
        else:
            bk = bk + cfg.drift * cfg.key_scale * torch.randn(*shape, generator=g)
        k, v = bk.clone(), bv.clone()
        row = (t * cfg.speed) // max(1, cfg.width - cfg.object_tokens + 1) % (h - cfg.object_tokens + 1)
        col = (t * cfg.speed) % max(1, cfg.width - cfg.object_tokens + 1)
        pos = torch.tensor(
            [(row + i) * cfg.width + col + j for i in range(cfg.object_tokens) for j in range(cfg.object_tokens)]
        )
        k[:, :, pos] = ok
        v[:, :, pos] = ov
        k = k + cfg.noise * cfg.key_scale * torch.randn(*shape, generator=g) / cfg.head_dim**0.5
        v = v + cfg.noise * torch.randn(*shape, generator=g)
        yield k.to(dtype), v.to(dtype)
        t += 1


def scene_chunks(
    cfg: SceneConfig, frames_per_chunk: int, *, batch: int = 1, dtype: torch.dtype = torch.float32
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Frames grouped into chunks: yields k, v of shape (batch, heads, frames_per_chunk * P, head_dim)."""
    it = scene_frames(cfg, batch=batch, dtype=dtype)
    while True:
        parts = [next(it) for _ in range(frames_per_chunk)]
        yield torch.cat([p[0] for p in parts], dim=2), torch.cat([p[1] for p in parts], dim=2)


def clustered_qk(
    n_q: int,
    n_k: int,
    *,
    heads: int = 2,
    head_dim: int = 64,
    clusters: int = 16,
    spread: float = 0.3,
    scale: float = 4.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys drawn around shared cluster centres (semantic structure, as in video DiTs).

    Returns:
        q: (1, heads, n_q, head_dim); k: (1, heads, n_k, head_dim).
    """
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(1, heads, clusters, head_dim, generator=g), dim=-1)

    def draw(n: int) -> torch.Tensor:
        lab = torch.randint(0, clusters, (n,), generator=g)
        x = centres[:, :, lab] + spread * torch.randn(1, heads, n, head_dim, generator=g) / head_dim**0.5
        return torch.nn.functional.normalize(x, dim=-1) * scale

    return draw(n_q), draw(n_k)
