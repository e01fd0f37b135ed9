"""World-model rollouts with any cache policy, and their fidelity against the ground truth.

:func:`rollout_world` commits the first ``context_frames`` ground-truth frames of each episode, then generates
the rest chunk by chunk with :class:`~longroll.pipeline.rollout.RolloutEngine` over a
:class:`~longroll.policies.cached.CachedProcessor` of the named policy; the episode's actions drive the
camera. :func:`score_rollout` compares the result with the ground truth: PSNR per frame and per tile category
(novel, recently seen, seen only long ago; see :func:`~longroll.world.episode.tile_categories`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch

from longroll.cache.config import SinkWindowPolicy
from longroll.pipeline.rollout import ChunkStats, RolloutConfig, RolloutEngine
from longroll.pipeline.sampler import SamplerConfig
from longroll.policies.cached import CachedProcessor
from longroll.policies.config import EQUAL_MEMORY_FRAMES, AttentionPolicy, preset
from longroll.world.episode import NOVEL, RECENT, STALE, Episodes, tile_categories
from longroll.world.latents import frames_to_latents, latents_to_uint8
from longroll.world.model import WorldModelSpec, WorldWanModel
from longroll.world.text import load_prompt_embeddings

CATEGORY_NAMES = {NOVEL: "novel", RECENT: "recent", STALE: "stale"}


def world_sampler(
    spec: WorldModelSpec, steps: int | None = None, mode: Literal["few_step", "euler"] = "few_step"
) -> SamplerConfig:
    """The rollout schedule: the spec's default timesteps, or ``steps`` evenly spaced ones from 1000 down.

    The shift is the one the model was trained with; the commit pass runs at timestep 0 (clean context), as in
    training.
    """
    if steps is None:
        timesteps = spec.sampler_timesteps
    elif isinstance(steps, int) and steps >= 1:
        timesteps = tuple(1000.0 * (1 - i / steps) for i in range(steps))
    else:
        raise ValueError(f"steps must be a positive int or None, got {steps!r}")
    return SamplerConfig(timesteps, shift=spec.sampler_shift, mode=mode, context_timestep=0.0)


@dataclass
class WorldRollout:
    """A generated batch of episodes.

    Attributes:
        frames: (B, F, 3, H, W) uint8; the first ``context_frames`` are the ground truth that was committed.
        latents: (B, C, F, h, w) the generated latents (context included).
        stats: per-chunk timings and cache sizes from the engine.
        seconds: wall time of the rollout (context commit included).
        policy: the cache policy's name.
        context_frames: ground-truth frames given before generation.
    """

    frames: torch.Tensor
    latents: torch.Tensor
    stats: list[ChunkStats]
    seconds: float
    policy: str
    context_frames: int


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    return model.patch_embedding.weight.dtype  # type: ignore[union-attr, return-value]


def world_processor(
    model: WorldWanModel,
    policy: AttentionPolicy | str,
    *,
    batch: int,
    device: torch.device | str,
    memory_frames: int = EQUAL_MEMORY_FRAMES,
    cls: type[CachedProcessor] = CachedProcessor,
    **options: Any,
) -> CachedProcessor:
    """An empty processor of ``cls`` (a :class:`CachedProcessor` or a subclass, e.g. one that probes attention)
    with one layer per layer of ``model``, in the weights' dtype, for an :class:`AttentionPolicy` or a preset
    name (built at the world model's geometry with ``memory_frames``; see :meth:`CachedProcessor.for_model`);
    ``options`` go to the constructor."""
    spec = model.spec
    return cls.for_model(
        policy, model.config, tokens_per_frame=spec.tokens_per_frame, frames_per_chunk=spec.frames_per_chunk,
        dtype=_model_dtype(model), device=device, batch=batch, memory_frames=memory_frames, **options,
    )  # fmt: skip


@torch.no_grad()
def rollout_world(
    model: WorldWanModel,
    policy: str | AttentionPolicy,
    episodes: Episodes,
    *,
    steps: int | None = None,
    device: torch.device | str = "cpu",
    context: torch.Tensor | None = None,
    context_frames: int | None = None,
    memory_frames: int = EQUAL_MEMORY_FRAMES,
    mode: Literal["few_step", "euler"] = "few_step",
    seed: int = 0,
    processor: CachedProcessor | None = None,
    on_chunk: Callable[[int, torch.Tensor, ChunkStats], None] | None = None,
) -> WorldRollout:
    """Roll the world model out over a batch of episodes.

    Args:
        model: the world model, already on ``device`` (any dtype; latents and caches use the weights' dtype).
        policy: a preset name (``dense``, ``sink_window``, ``budget``, ``tempcache``, ...) or an
            :class:`AttentionPolicy`; ignored when ``processor`` is given.
        episodes: B episodes of F frames; F - context_frames must be a multiple of frames_per_chunk.
        steps: denoising steps per chunk (default: the spec's schedule, 4 steps).
        device: where to run.
        context: (B, L, text_dim) prompt embeddings; default: the stored embeddings of the episodes' worlds.
        context_frames: ground-truth frames committed first (default: the spec's, one chunk).
        memory_frames: memory of the bounded policies in frames (sink-window: 3 sinks + the rest as window).
        mode: sampler mode (``few_step`` re-noises between steps, ``euler`` integrates the ODE).
        seed: noise seed (chunk c uses seed + c, identical across policies).
        processor: an empty processor to run instead of a new one (see :func:`world_processor`), e.g. a
            subclass that measures attention; its batch must be the episodes'.
        on_chunk: called after each generated chunk, as by :meth:`RolloutEngine.run`.
    """
    spec = model.spec
    eps = episodes.to(device)
    f0 = spec.context_frames if context_frames is None else context_frames
    fpc = spec.frames_per_chunk
    generated = eps.num_frames - f0
    if f0 < 0 or generated < fpc or generated % fpc:
        raise ValueError(f"episodes of {eps.num_frames} frames leave {generated} to generate, not a multiple of {fpc}")
    dtype = _model_dtype(model)
    if context is None:
        context = load_prompt_embeddings().context(eps.world_ids)
    context = context.to(device=device, dtype=dtype)
    if processor is None:
        processor = world_processor(model, policy, batch=eps.batch, device=device, memory_frames=memory_frames)
    elif processor.batch != eps.batch or processor.committed_frames:
        raise ValueError(
            f"processor must be empty and hold a batch of {eps.batch}, got batch {processor.batch} with "
            f"{processor.committed_frames} committed frames"
        )
    rollout_cfg = RolloutConfig(
        num_frames=generated, frames_per_chunk=fpc, latent_shape=spec.latent_shape,
        sampler=world_sampler(spec, steps, mode), seed=seed,
    )  # fmt: skip
    initial = frames_to_latents(eps.render(frames=slice(0, f0))).to(dtype) if f0 else None
    poses = eps.poses * (eps.config.step_px // spec.token_px)
    t0 = time.perf_counter()
    with model.bind_poses(poses):
        result = RolloutEngine(model, processor, rollout_cfg).run(
            context, actions=eps.actions, initial_latents=initial, dtype=dtype, on_chunk=on_chunk
        )
    seconds = time.perf_counter() - t0
    name = processor.policy.name
    return WorldRollout(latents_to_uint8(result.latents), result.latents, result.stats, seconds, name, f0)


# ----------------------------------------------------------------------------------------------------------
# Fidelity


@overload
def psnr_from_mse(mse: float, data_range: float = 1.0) -> float: ...


@overload
def psnr_from_mse(mse: torch.Tensor, data_range: float = 1.0) -> torch.Tensor: ...


def psnr_from_mse(mse: float | torch.Tensor, data_range: float = 1.0) -> float | torch.Tensor:
    """PSNR in dB, ``10 log10(data_range**2 / mse)``, of a mean squared error: the one PSNR of the project.

    Args:
        mse: a float, or a tensor of any shape (each element one mean squared error).
        data_range: the signal's range (1 for images on [0, 1]).

    Returns:
        Like ``mse``: +inf where the error is 0, NaN where it is NaN.
    """
    if isinstance(mse, torch.Tensor):
        ratio = mse.double() / data_range**2
        return torch.where(ratio > 0, -10.0 * torch.log10(ratio), torch.where(ratio <= 0, math.inf, math.nan))
    r = float(mse) / data_range**2
    if math.isnan(r):
        return math.nan
    return math.inf if r <= 0 else -10.0 * math.log10(r)


def squared_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """pred, target: (B, F, 3, H, W) uint8 -> (B, F, H, W) float32 squared error on [0, 1], averaged over RGB."""
    if pred.shape != target.shape or pred.dtype != torch.uint8 or target.dtype != torch.uint8:
        raise ValueError(f"pred and target must be uint8 of one shape, got {tuple(pred.shape)}, {tuple(target.shape)}")
    diff = (pred.float() - target.float().to(pred.device)) / 255.0
    return diff.pow(2).mean(dim=2)


def score_rollout(
    episodes: Episodes,
    rollout: WorldRollout,
    spec: WorldModelSpec,
    *,
    memory_frames: int = EQUAL_MEMORY_FRAMES,
    first: int = 16,
    ground_truth: torch.Tensor | None = None,
) -> dict[str, float | list[float]]:
    """Fidelity of a rollout against the ground truth.

    Tile categories use the sink-window geometry of ``memory_frames`` (what that baseline keeps), so "stale"
    tiles are exactly those only a longer memory can reproduce.

    Returns:
        ``psnr_first{first}``: PSNR over the first ``first`` generated frames (all tiles),
        ``psnr_first{first}_known``: the same over the tiles that were not novel (the only ones whose ground truth
        the model can know; novel tiles are a guess at unseen map), ``psnr``: over all generated frames,
        ``psnr_{novel,recent,stale}``: over generated tiles of each category,
        ``frac_{novel,recent,stale}``: their shares, ``psnr_per_frame``: PSNR of each generated frame over the
        batch. PSNRs pool the squared error before the log.
    """
    f0 = rollout.context_frames
    gt = episodes.render() if ground_truth is None else ground_truth
    err = squared_error(rollout.frames, gt.to(rollout.frames.device))[:, f0:]  # (B, F', H, W)
    window = preset("sink_window", tokens_per_frame=spec.tokens_per_frame, frames_per_chunk=spec.frames_per_chunk,
                    memory_frames=memory_frames).cache  # fmt: skip
    assert isinstance(window, SinkWindowPolicy)
    cats = tile_categories(
        episodes.to(err.device), frames_per_chunk=spec.frames_per_chunk, sink_frames=window.sink_frames,
        window_frames=window.window_frames, context_frames=f0, tile_px=spec.token_px,
    )[:, f0:]  # fmt: skip
    cats = cats.repeat_interleave(spec.token_px, dim=-1).repeat_interleave(spec.token_px, dim=-2)
    known = cats[:, :first] != NOVEL
    known_mse = float(err[:, :first][known].mean()) if bool(known.any()) else math.nan
    out: dict[str, float | list[float]] = {
        f"psnr_first{first}": psnr_from_mse(float(err[:, :first].mean())),
        f"psnr_first{first}_known": psnr_from_mse(known_mse) if math.isfinite(known_mse) else math.nan,
        "psnr": psnr_from_mse(float(err.mean())),
    }
    for cat, name in CATEGORY_NAMES.items():
        mask = cats == cat
        out[f"frac_{name}"] = float(mask.float().mean())
        out[f"psnr_{name}"] = psnr_from_mse(float(err[mask].mean())) if bool(mask.any()) else math.nan
    out["psnr_per_frame"] = [psnr_from_mse(float(e)) for e in err.mean(dim=(0, 2, 3))]
    return out
