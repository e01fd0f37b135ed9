"""Training the world model: episodes rendered on the device, diffusion forcing under a block-causal mask.

Recipe (one forward per batch of whole episodes):

- Data: every step draws fresh episodes (:func:`~longroll.world.episode.sample_episodes`: the "mixture"
  trajectory family, and a share ``revisit_fraction`` of "revisit" tours) and renders them on the training
  device; nothing is stored or loaded but the prompt embeddings. There is no epoch: each world seed is new, so
  the model cannot memorise maps.
- Noise (diffusion forcing per chunk): each chunk of ``frames_per_chunk`` frames is either clean context
  (timestep 0, no loss) or noised to its own sigma, ``x_t = (1 - sigma) x0 + sigma noise`` with
  ``sigma = shift(s)``, ``s ~ U(0, 1)``, the shift the few-step sampler applies to its timesteps
  (``WorldModelSpec.sampler_shift``). The
  probability that a chunk is clean is drawn per episode from ``clean_prob``, so the model sees histories from
  all-clean (a rollout's committed frames, whose commit pass runs at timestep 0) to mostly noisy (robustness to
  its own imperfect history). With probability ``clean_prefix_prob`` an episode also keeps a clean prefix of
  ``clean_prefix_frames`` frames (whole chunks): ground truth of the places a revisit returns to, as the memory
  evaluation gives it (:data:`MEMORY_CONTEXT_FRAMES`).
- Attention: block-causal over chunks, so one forward trains every chunk on its own history exactly as the
  rollout engine will call it; :class:`BlockCausalProcessor` computes it chunk by chunk (flash-attention
  eligible) and equals ``DenseProcessor(self_mask=block_causal_mask(...))``.
- Loss: MSE between the predicted and the true velocity ``noise - x0`` on the noised chunks, tokens of revisited
  tiles weighted by ``stale_weight``: tiles that come back into view after a sink-window cache of
  ``stale_sink_frames`` + ``stale_window_frames`` frames has evicted every frame that showed them
  (:func:`~longroll.world.episode.tile_categories`). Only a model that retrieves old context can predict them,
  and they are a few percent of the tokens, so without the weight their gradient is lost among the tiles the
  previous frames show.
- Optimiser: AdamW, linear warm-up then cosine decay on the larger of the step and the time fraction (so a
  time-budgeted run still anneals), gradient clipping, and an EMA of the weights that is what gets saved.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F

from longroll.models.wan.masks import block_causal_mask
from longroll.policies.processor import AttentionProcessor, DenseProcessor
from longroll.world.episode import STALE, EpisodeConfig, Episodes, sample_episodes, tile_categories
from longroll.world.latents import frames_to_latents
from longroll.world.model import WorldModelSpec, WorldWanModel
from longroll.world.text import PromptTable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`train`.

    Args:
        batch_size: episodes per step.
        num_frames: frames per training episode (a multiple of the spec's frames_per_chunk).
        lr: peak AdamW learning rate.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        warmup_steps: linear warm-up steps.
        weight_decay: AdamW decoupled weight decay (not applied to biases, norms, tables and embeddings).
        grad_clip: global gradient-norm clip.
        ema_decay: decay of the weight EMA (ramped up from 0.9 during the first steps).
        clean_prob: range of the per-episode probability that a chunk is clean context.
        seed: seed of the data stream and the noise.
        attention: ``"chunked"`` (:class:`BlockCausalProcessor`) or ``"mask"`` (dense SDPA with a bool mask).
        autocast: bfloat16 autocast on CUDA.
        log_every: steps between log lines (and host syncs).
        revisit_fraction: share of each batch drawn from the "revisit" family (rounded to whole episodes; the
            rest is "mixture", which holds a quarter of revisit tours of its own). 0: the original recipe.
        clean_prefix_prob: probability that an episode's first frames are all clean context.
        clean_prefix_frames: (lo, hi) length of that prefix in frames, drawn uniformly over the whole chunks in
            the range; both multiples of the spec's frames_per_chunk (checked by :func:`train`), hi < num_frames.
        stale_weight: loss weight of the tokens of revisited (stale) tiles relative to the others (>= 1; 1 is
            the plain mean and skips the tile bookkeeping).
        stale_sink_frames, stale_window_frames: the sink-window geometry that defines stale tiles (the
            evaluation's 15-frame baseline: 3 + 12).
    """

    batch_size: int = 32
    num_frames: int = 48
    lr: float = 5e-4
    min_lr_ratio: float = 0.05
    warmup_steps: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    clean_prob: tuple[float, float] = (0.2, 0.9)
    seed: int = 0
    attention: Literal["chunked", "mask"] = "chunked"
    autocast: bool = True
    log_every: int = 50
    revisit_fraction: float = 0.0
    clean_prefix_prob: float = 0.0
    clean_prefix_frames: tuple[int, int] = (0, 0)
    stale_weight: float = 1.0
    stale_sink_frames: int = 3
    stale_window_frames: int = 12

    def __post_init__(self) -> None:
        object.__setattr__(self, "clean_prefix_frames", tuple(self.clean_prefix_frames))
        for name in ("batch_size", "num_frames", "log_every", "stale_window_frames"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.stale_sink_frames, int) or self.stale_sink_frames < 0:
            raise ValueError(f"stale_sink_frames must be an int >= 0, got {self.stale_sink_frames!r}")
        for name in ("revisit_fraction", "clean_prefix_prob"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if not (isinstance(self.stale_weight, int | float) and math.isfinite(self.stale_weight)
                and self.stale_weight >= 1.0):  # fmt: skip
            raise ValueError(f"stale_weight must be a finite number >= 1, got {self.stale_weight!r}")
        prefix = self.clean_prefix_frames
        if (
            len(prefix) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in prefix)
            or not 0 <= prefix[0] <= prefix[1] < self.num_frames
        ):
            raise ValueError(
                f"clean_prefix_frames must be two ints with 0 <= lo <= hi < num_frames={self.num_frames}, "
                f"got {prefix!r}"
            )
        if self.clean_prefix_prob > 0 and prefix[1] == 0:
            raise ValueError("clean_prefix_prob > 0 needs clean_prefix_frames with hi > 0")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"lr must be > 0 and min_lr_ratio in [0, 1], got {self.lr}, {self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or not self.grad_clip > 0:
            raise ValueError("warmup_steps and weight_decay must be >= 0 and grad_clip > 0")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        lo, hi = self.clean_prob
        if not 0 <= lo <= hi < 1:
            raise ValueError(f"clean_prob must satisfy 0 <= lo <= hi < 1, got {self.clean_prob}")
        if self.attention not in ("chunked", "mask"):
            raise ValueError(f"attention must be 'chunked' or 'mask', got {self.attention!r}")


class BlockCausalProcessor:
    """Block-causal self-attention computed chunk by chunk: chunk i attends to the keys of chunks 0..i.

    Equal to ``DenseProcessor(self_mask=block_causal_mask(...))`` but without a mask, so every call may use a
    flash kernel and skips the masked half of the score matrix.

    Args:
        chunk_tokens: tokens per chunk (frames_per_chunk * tokens_per_frame).
    """

    def __init__(self, chunk_tokens: int) -> None:
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        self.chunk_tokens = chunk_tokens

    def self_attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pre_rope: torch.Tensor
    ) -> torch.Tensor:
        """q, k, v: (B, heads, L, head_dim) -> (B, heads, L, head_dim)."""
        c = self.chunk_tokens
        outs = [
            F.scaled_dot_product_attention(q[:, :, s : s + c], k[:, :, : s + c], v[:, :, : s + c])
            for s in range(0, q.shape[2], c)
        ]
        return torch.cat(outs, dim=2)

    def cross_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: (B, heads, L, head_dim); k, v: (B, heads, L_ctx, head_dim) -> (B, heads, L, head_dim)."""
        return F.scaled_dot_product_attention(q, k, v)


@dataclass
class Batch:
    """Model inputs of a batch of episodes.

    Attributes:
        latents: (B, C, F, h, w) float32 clean latents.
        context: (B, text_tokens, text_dim) float32 prompt embeddings.
        actions: (B, F) long.
        poses: (B, F, 2) long camera displacement from frame 0 in tokens.
    """

    latents: torch.Tensor
    context: torch.Tensor
    actions: torch.Tensor
    poses: torch.Tensor


def make_batch(episodes: Episodes, prompts: PromptTable, spec: WorldModelSpec) -> Batch:
    """Render episodes on their device and package them for the model."""
    latents = frames_to_latents(episodes.render())
    poses = episodes.poses * (episodes.config.step_px // spec.token_px)
    return Batch(latents, prompts.context(episodes.world_ids), episodes.actions, poses)


def shifted_sigma(s: torch.Tensor, shift: float) -> torch.Tensor:
    """The sampler's timestep shift: s in [0, 1] -> shift * s / (1 + (shift - 1) * s)."""
    return shift * s / (1 + (shift - 1) * s)


def diffusion_forcing_noise(
    latents: torch.Tensor, frames_per_chunk: int, shift: float, cfg: TrainConfig, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise each chunk to its own level (or leave it clean).

    Args:
        latents: (B, C, F, h, w) clean latents, F a multiple of frames_per_chunk.
        shift: timestep shift of the sigmas (the sampler's).
        gen: generator on latents' device.

    Returns:
        noisy (B, C, F, h, w); timestep (B, F) = 1000 sigma; target velocity (B, C, F, h, w);
        loss weight (B, F) float, 1 on noised frames and 0 on clean ones.
    """
    b, _, f = latents.shape[:3]
    if f % frames_per_chunk:
        raise ValueError(f"frames {f} must be a multiple of frames_per_chunk={frames_per_chunk}")
    dev = latents.device
    chunks = f // frames_per_chunk
    lo, hi = cfg.clean_prob
    p_clean = lo + (hi - lo) * torch.rand(b, 1, generator=gen, device=dev)
    clean = torch.rand(b, chunks, generator=gen, device=dev) < p_clean
    sigma = shifted_sigma(torch.rand(b, chunks, generator=gen, device=dev), shift)
    if cfg.clean_prefix_prob > 0:
        # Drawn after the original recipe's numbers, so that runs without a prefix keep their noise stream.
        clean = clean | clean_prefix_chunks(b, chunks, frames_per_chunk, cfg, gen, dev)
    sigma = torch.where(clean, 0.0, sigma).repeat_interleave(frames_per_chunk, dim=1)  # (B, F)
    noise = torch.randn(latents.shape, generator=gen, device=dev)
    s = sigma[:, None, :, None, None]
    noisy = (1 - s) * latents + s * noise
    weight = (~clean).float().repeat_interleave(frames_per_chunk, dim=1)
    return noisy, 1000.0 * sigma, noise - latents, weight


def clean_prefix_chunks(
    batch: int, chunks: int, frames_per_chunk: int, cfg: TrainConfig, gen: torch.Generator, device: torch.device
) -> torch.Tensor:
    """(batch, chunks) bool: the chunks of each episode's clean prefix (none where no prefix was drawn).

    An episode gets a prefix with probability ``cfg.clean_prefix_prob``; its length is uniform over the whole
    numbers of chunks in ``cfg.clean_prefix_frames``.
    """
    lo, hi = cfg.clean_prefix_frames
    if lo % frames_per_chunk or hi % frames_per_chunk:
        raise ValueError(f"clean_prefix_frames {cfg.clean_prefix_frames} must be multiples of {frames_per_chunk}")
    c_lo, c_hi = lo // frames_per_chunk, hi // frames_per_chunk
    has = torch.rand(batch, 1, generator=gen, device=device) < cfg.clean_prefix_prob
    length = torch.randint(c_lo, c_hi + 1, (batch, 1), generator=gen, device=device)
    return has & (torch.arange(chunks, device=device) < length)


def stale_token_mask(episodes: Episodes, spec: WorldModelSpec, cfg: TrainConfig) -> torch.Tensor:
    """(B, F, h, w) bool on the latent grid: cells of tiles that are stale for the sink-window geometry of
    ``cfg`` (``stale_sink_frames`` + ``stale_window_frames``, chunks of the spec's frames_per_chunk)."""
    cats = tile_categories(
        episodes, frames_per_chunk=spec.frames_per_chunk, sink_frames=cfg.stale_sink_frames,
        window_frames=cfg.stale_window_frames, tile_px=spec.token_px,
    )  # fmt: skip  # (B, F, T, T), one tile per token
    cells = spec.token_px // spec.latent_factor  # latent cells per token side
    stale = cats == STALE
    return stale.repeat_interleave(cells, dim=-1).repeat_interleave(cells, dim=-2)


def flow_matching_loss(
    model: WorldWanModel,
    batch: Batch,
    cfg: TrainConfig,
    gen: torch.Generator,
    *,
    stale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared velocity error over the noised frames of a batch (a scalar float32 tensor).

    Args:
        stale: optional (B, F, h, w) bool, latent cells of revisited tiles (:func:`stale_token_mask`), whose
            error counts ``cfg.stale_weight`` times; the mean is then over the weights.
    """
    spec = model.spec
    noisy, timestep, target, weight = diffusion_forcing_noise(
        batch.latents, spec.frames_per_chunk, spec.sampler_shift, cfg, gen
    )
    b, _, f, h, w = batch.latents.shape
    processor: AttentionProcessor
    if cfg.attention == "chunked":
        processor = BlockCausalProcessor(spec.frames_per_chunk * spec.tokens_per_frame)
    else:
        mask = block_causal_mask(f, spec.tokens_per_frame, spec.frames_per_chunk, device=noisy.device)
        processor = DenseProcessor(self_mask=mask)
    pred = model(noisy, timestep, batch.context, processor=processor, actions=batch.actions, poses=batch.poses)
    if stale is None or cfg.stale_weight == 1.0:
        err = (pred.float() - target).pow(2).mean(dim=(1, 3, 4))  # (B, F)
        return (err * weight).sum() / weight.sum().clamp_min(1.0)
    if tuple(stale.shape) != (b, f, h, w) or stale.dtype != torch.bool:
        raise ValueError(f"stale must be bool ({b}, {f}, {h}, {w}), got {tuple(stale.shape)} {stale.dtype}")
    cell_err = (pred.float() - target).pow(2).mean(dim=1)  # (B, F, h, w)
    cell_w = weight[:, :, None, None] * (1.0 + (cfg.stale_weight - 1.0) * stale.float())
    return (cell_err * cell_w).sum() / cell_w.sum().clamp_min(1.0)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """Weight decay on matrices only: biases, norms, AdaLN tables and embeddings are left alone."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_matrix = p.dim() >= 2 and not name.endswith("scale_shift_table") and "action_embedder" not in name
        (decay if is_matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def learning_rate(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from ``lr`` to ``min_lr_ratio * lr`` over progress."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * warm * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        ema_model: the EMA weights in a model of the trained class (eval mode, float32).
        losses: per-step training loss (float).
        lrs: per-step learning rate.
        steps: optimiser steps run.
        seconds: wall time of the loop.
        stopped_by: ``"steps"`` or ``"time"``.
    """

    ema_model: WorldWanModel
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    stopped_by: str = "steps"


#: Episode seeds of training batches are ``TRAIN_SEED_BASE * seed + step``; evaluations draw from
#: ``EVAL_SEED`` and above, a range no training run reaches.
TRAIN_SEED_BASE = 1_000_003
EVAL_SEED = 1 << 40
#: Added to a step's seed for its revisit-family episodes (distinct worlds from the step's mixture ones; above
#: every training and evaluation seed).
REVISIT_SEED_OFFSET = 1 << 41
#: Ground-truth frames of the memory evaluation: the outward run and the loop's first side of a "revisit" tour
#: (up to frame 18), so every tile that comes back later was shown as ground truth (with the default 3 frames,
#: none was: a revisit then returns to places the model itself imagined, and its error against the ground truth
#: is a novel tile's whatever the memory).
MEMORY_CONTEXT_FRAMES = 21


def training_episodes(
    cfg: TrainConfig, step: int, episode_cfg: EpisodeConfig, *, device: torch.device | str = "cpu"
) -> Episodes:
    """The episodes of training step ``step``: ``round(revisit_fraction * batch_size)`` "revisit" tours after
    the "mixture" ones, each part deterministic by the step's seed."""
    seed = TRAIN_SEED_BASE * cfg.seed + step
    n_rev = round(cfg.revisit_fraction * cfg.batch_size)
    parts = []
    if n_rev < cfg.batch_size:
        mix_cfg = replace(episode_cfg, family="mixture")
        parts.append(sample_episodes(cfg.batch_size - n_rev, seed, mix_cfg, device=device))
    if n_rev:
        rev_cfg = replace(episode_cfg, family="revisit")
        parts.append(sample_episodes(n_rev, seed + REVISIT_SEED_OFFSET, rev_cfg, device=device))
    return parts[0] if len(parts) == 1 else Episodes.cat(parts)


def _ema_update(ema: Sequence[torch.Tensor], params: Sequence[torch.Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * params, one fused launch per dtype group."""
    with torch.no_grad():
        torch._foreach_lerp_(list(ema), [p.detach() for p in params], 1 - decay)


def train(
    model: WorldWanModel,
    prompts: PromptTable,
    cfg: TrainConfig,
    *,
    device: torch.device | str,
    max_steps: int,
    time_budget_s: float = math.inf,
    on_log: Callable[[int, float, float, float], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place until ``max_steps`` steps or ``time_budget_s`` seconds, whichever comes first.

    Args:
        model: a float32 world model (e.g. :func:`~longroll.world.model.init_world_model` of a new one).
        prompts: prompt embeddings of every world.
        cfg: hyper-parameters.
        device: training device.
        max_steps: step limit (also the schedule's length when the time budget does not bind).
        time_budget_s: wall-clock limit of the loop; checked before each step.
        on_log: called every ``cfg.log_every`` steps and at the end with
            (step, mean loss since the last call, learning rate, elapsed seconds).
    """
    fpc = model.spec.frames_per_chunk
    if cfg.num_frames % fpc:
        raise ValueError(f"num_frames={cfg.num_frames} must be a multiple of {fpc}")
    if any(x % fpc for x in cfg.clean_prefix_frames):
        raise ValueError(f"clean_prefix_frames={cfg.clean_prefix_frames} must be multiples of {fpc}")
    device = torch.device(device)
    model.to(device).train()
    ema = copy.deepcopy(model).float().eval().requires_grad_(False)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.99))
    ema_params, params = list(ema.parameters()), list(model.parameters())
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    episode_cfg = EpisodeConfig(num_frames=cfg.num_frames, view_px=model.spec.view_px, step_px=model.spec.step_px)
    use_autocast = cfg.autocast and device.type == "cuda"
    result = TrainResult(ema_model=ema)
    # Losses stay on the device until the end (or a log line): a host sync per step would stall the GPU queue.
    step_losses: list[torch.Tensor] = []
    window = torch.zeros((), device=device)
    t0 = time.perf_counter()
    step = 0
    for step in range(max_steps):
        elapsed = time.perf_counter() - t0
        if elapsed >= time_budget_s:
            result.stopped_by = "time"
            break
        lr = learning_rate(cfg, step, max(step / max_steps, elapsed / time_budget_s))
        for group in opt.param_groups:
            group["lr"] = lr
        episodes = training_episodes(cfg, step, episode_cfg, device=device)
        batch = make_batch(episodes, prompts, model.spec)
        stale = stale_token_mask(episodes, model.spec, cfg) if cfg.stale_weight != 1.0 else None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
            loss = flow_matching_loss(model, batch, cfg, gen, stale=stale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        _ema_update(ema_params, params, min(cfg.ema_decay, (1 + step) / (10 + step)))
        step_losses.append(loss.detach())
        result.lrs.append(lr)
        window += loss.detach()
        if (step + 1) % cfg.log_every == 0 and on_log is not None:
            on_log(step + 1, float(window) / cfg.log_every, lr, time.perf_counter() - t0)
            window.zero_()
    else:
        step = max_steps
    result.steps = step
    result.seconds = time.perf_counter() - t0
    result.losses = torch.stack(step_losses).float().tolist() if step_losses else []
    if on_log is not None and result.steps % cfg.log_every:
        done = result.steps % cfg.log_every
        on_log(result.steps, float(window) / done, result.lrs[-1], result.seconds)
    model.eval()
    return result
