"""The autoregressive rollout engine: chunk by chunk, K denoising steps that stage K/V, then a clean pass
that commits the chunk, with any attention policy."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from longroll.pipeline.sampler import SamplerConfig
from longroll.policies.cached import CachedProcessor, PassInfo
from longroll.policies.processor import AttentionProcessor

log = logging.getLogger(__name__)


class ChunkDenoiser(Protocol):
    """A causal video transformer as the engine sees it (e.g. :class:`longroll.models.wan.CausalWanModel`)."""

    def __call__(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        *,
        frame_offset: int = 0,
        processor: AttentionProcessor | None = None,
        actions: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class RolloutConfig:
    """What to generate.

    Args:
        num_frames: latent frames to generate (after any initial frames); a multiple of ``frames_per_chunk``.
        frames_per_chunk: latent frames denoised together.
        latent_shape: (channels, height, width) of a latent frame.
        sampler: the per-chunk denoising schedule.
        seed: noise seed; chunk c draws from ``seed + c`` so every policy sees the same noise.
        keep_latents: where the result keeps each chunk's latents: ``"device"`` (next to the model),
            ``"host"`` (copied to CPU memory after each chunk, so device memory stays flat over any rollout
            length), or ``"none"`` (streaming through ``on_chunk`` only; the result's latents have 0 frames).
    """

    num_frames: int
    frames_per_chunk: int = 3
    latent_shape: tuple[int, int, int] = (16, 60, 104)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    seed: int = 0
    keep_latents: Literal["device", "host", "none"] = "device"

    def __post_init__(self) -> None:
        if self.frames_per_chunk < 1:
            raise ValueError(f"frames_per_chunk must be >= 1, got {self.frames_per_chunk}")
        if self.num_frames < 1 or self.num_frames % self.frames_per_chunk:
            raise ValueError(
                f"num_frames must be a positive multiple of frames_per_chunk={self.frames_per_chunk}, "
                f"got {self.num_frames}"
            )
        if len(self.latent_shape) != 3 or min(self.latent_shape) < 1:
            raise ValueError(f"latent_shape must be (channels, height, width), got {self.latent_shape}")
        if self.keep_latents not in ("device", "host", "none"):
            raise ValueError(f"keep_latents must be 'device', 'host' or 'none', got {self.keep_latents!r}")

    @property
    def num_chunks(self) -> int:
        return self.num_frames // self.frames_per_chunk


@dataclass
class ChunkStats:
    """Measurements of one chunk (the DiT only: denoising steps + commit pass)."""

    chunk: int
    frame_start: int
    seconds: float
    peak_bytes: int
    cache_bytes: int
    components: dict[str, float] = field(default_factory=dict)


@dataclass
class RolloutResult:
    """latents: (batch, channels, frames, height, width), initial frames included, where
    ``RolloutConfig.keep_latents`` says (0 frames with ``"none"``); stats: one per chunk."""

    latents: torch.Tensor
    stats: list[ChunkStats]


class RolloutOutOfMemoryError(torch.OutOfMemoryError):
    """Out of memory while generating a chunk: names the chunk, its frames and the memory in use.

    The processor's committed history is that of the chunks before: a state saved after one of them (e.g. from
    ``on_chunk`` with ``CachedProcessor.state_dict()``) resumes the rollout from there.

    Attributes:
        chunk: index of the chunk in this run; frame_start: its first absolute latent frame.
    """

    def __init__(self, message: str, chunk: int, frame_start: int) -> None:
        super().__init__(message)
        self.chunk, self.frame_start = chunk, frame_start


def memory_in_use(device: torch.device) -> str:
    """What is held now, for error messages: CUDA allocated / reserved / total, or the process's peak RSS."""
    if device.type == "cuda":
        gib = 2**30
        total = torch.cuda.get_device_properties(device).total_memory
        allocated, reserved = torch.cuda.memory_allocated(device) / gib, torch.cuda.memory_reserved(device) / gib
        return f"{allocated:.2f} GiB allocated, {reserved:.2f} GiB reserved of {total / gib:.2f} GiB on {device}"
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return f"process peak resident memory {peak / 2**20:.2f} GiB"
    except (ImportError, OSError):
        return "host memory (not measurable here)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RolloutEngine:
    """Self-Forcing-style chunked inference around any :class:`ChunkDenoiser` and :class:`CachedProcessor`."""

    def __init__(self, model: ChunkDenoiser, processor: CachedProcessor, config: RolloutConfig) -> None:
        if processor.frames_per_chunk != config.frames_per_chunk:
            raise ValueError(
                f"processor caches hold chunks of {processor.frames_per_chunk} frames, "
                f"config.frames_per_chunk is {config.frames_per_chunk}"
            )
        self.model, self.processor, self.config = model, processor, config

    def _forward(
        self, x: torch.Tensor, t: float, context: torch.Tensor, frame: int, info: PassInfo, actions: torch.Tensor | None
    ) -> torch.Tensor:
        self.processor.begin_pass(info)
        ts = torch.full((x.shape[0], x.shape[2]), t, device=x.device, dtype=torch.float32)
        return self.model(x, ts, context, frame_offset=frame, processor=self.processor, actions=actions)

    def _denoise_chunk(
        self, noise: torch.Tensor, context: torch.Tensor, frame: int, actions: torch.Tensor | None, gen: torch.Generator
    ) -> torch.Tensor:
        s = self.config.sampler
        sig = s.sigmas
        x = noise
        x0 = noise
        for i, _t in enumerate(s.timesteps):
            info = PassInfo(frame, i, s.num_steps, commit=False)
            v = self._forward(x, 1000.0 * sig[i], context, frame, info, actions).to(x.dtype)
            x0 = x - sig[i] * v
            if s.mode == "euler":
                x = x + (sig[i + 1] - sig[i]) * v
            elif i + 1 < s.num_steps:
                fresh = torch.randn(x.shape, generator=gen, device=gen.device, dtype=torch.float32).to(x)
                x = (1 - sig[i + 1]) * x0 + sig[i + 1] * fresh
        return x if s.mode == "euler" else x0

    def commit(
        self, clean: torch.Tensor, context: torch.Tensor, frame: int, actions: torch.Tensor | None = None
    ) -> None:
        """Run the clean pass of frames ``[frame, frame + clean.shape[2])`` and commit them to the caches
        (also how initial frames of a world model or an image-to-video prompt enter the context)."""
        s = self.config.sampler
        fpc = self.config.frames_per_chunk
        # The caches take at most one chunk per commit: longer prefixes go in chunk-sized pieces.
        for i in range(0, clean.shape[2], fpc):
            info = PassInfo(frame + i, s.num_steps, s.num_steps, commit=True)
            act = None if actions is None else actions[:, i : i + fpc]
            self._forward(clean[:, :, i : i + fpc], s.context_timestep, context, frame + i, info, act)

    @torch.no_grad()
    def run(
        self,
        context: torch.Tensor,
        *,
        actions: torch.Tensor | None = None,
        initial_latents: torch.Tensor | None = None,
        on_chunk: Callable[[int, torch.Tensor, ChunkStats], None] | None = None,
        dtype: torch.dtype | None = None,
    ) -> RolloutResult:
        """Generate ``config.num_frames`` latent frames after those the processor's caches already hold.

        A processor restored from a saved state (``CachedProcessor.load_state_dict``) therefore resumes the
        rollout where it stopped; chunk noise is seeded by absolute frame, so a resumed rollout reproduces the
        uninterrupted one.

        Args:
            context: (batch, text_len, text_dim) prompt embeddings.
            actions: (batch, initial + num_frames) long, per-frame actions of a world model (this call's frames).
            initial_latents: (batch, channels, f0, height, width) clean frames committed before generation.
            on_chunk: called after each chunk with (chunk index, latents (batch, channels, F, h, w), stats).
            dtype: dtype of the latents fed to the model (default: the context's).
        """
        cfg = self.config
        self.processor.reset_prompt()
        dev = context.device
        dtype = context.dtype if dtype is None else dtype
        b = context.shape[0]
        c, h, w = cfg.latent_shape
        frames: list[torch.Tensor] = []
        base = self.processor.committed_frames
        f0 = 0
        if initial_latents is not None and base:
            raise ValueError(f"initial_latents given but the caches already hold {base} frames")
        if initial_latents is not None:
            if (
                initial_latents.dim() != 5
                or initial_latents.shape[0] != b
                or tuple(initial_latents.shape[3:]) != (h, w)
            ):
                raise ValueError(
                    f"initial_latents must have shape ({b}, {c}, f0, {h}, {w}), got {tuple(initial_latents.shape)}"
                )
            f0 = initial_latents.shape[2]
            self.commit(initial_latents.to(dtype), context, 0, None if actions is None else actions[:, :f0])
            frames.extend(self._kept(initial_latents.to(dtype)))
        if actions is not None and actions.shape != (b, f0 + cfg.num_frames):
            raise ValueError(f"actions must have shape ({b}, {f0 + cfg.num_frames}), got {tuple(actions.shape)}")
        stats: list[ChunkStats] = []
        fpc = cfg.frames_per_chunk
        if self.processor.timer is not None:
            self.processor.timer.collect()  # drop spans of the initial-frame commit
        for ci in range(cfg.num_chunks):
            rel = f0 + ci * fpc
            frame = base + rel
            gen = torch.Generator(device=dev).manual_seed(cfg.seed + frame)
            act = None if actions is None else actions[:, rel : rel + fpc]
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            _sync(dev)
            t0 = time.perf_counter()
            try:
                noise = torch.randn((b, c, fpc, h, w), generator=gen, device=dev, dtype=torch.float32).to(dtype)
                clean = self._denoise_chunk(noise, context, frame, act, gen)
                self.commit(clean, context, frame, act)
                _sync(dev)
            except torch.OutOfMemoryError as e:
                if isinstance(e, RolloutOutOfMemoryError):
                    raise
                cache_mib = self.processor.cache_bytes() / 2**20
                raise RolloutOutOfMemoryError(
                    f"out of memory in chunk {ci} of {cfg.num_chunks} (latent frames {frame}-{frame + fpc - 1}): "
                    f"{memory_in_use(dev)}; the KV caches hold {cache_mib:.1f} MiB. Chunks before it are "
                    f"complete: a state saved after one of them resumes from there. ({' '.join(str(e).split()[:30])})",
                    ci,
                    frame,
                ) from e
            st = ChunkStats(
                chunk=ci,
                frame_start=frame,
                seconds=time.perf_counter() - t0,
                peak_bytes=torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0,
                cache_bytes=self.processor.cache_bytes(),
                components={} if self.processor.timer is None else self.processor.timer.collect(),
            )
            stats.append(st)
            frames.extend(self._kept(clean))
            log.debug("chunk %d: %.3f s", ci, st.seconds)
            if on_chunk is not None:
                on_chunk(ci, clean, st)
        if not frames:  # keep_latents="none"
            where = torch.device("cpu") if cfg.keep_latents == "host" else dev
            return RolloutResult(torch.empty((b, c, 0, h, w), dtype=dtype, device=where), stats)
        return RolloutResult(torch.cat(frames, dim=2), stats)

    def _kept(self, latents: torch.Tensor) -> list[torch.Tensor]:
        """What the result keeps of one chunk's latents (B, C, F, h, w): nothing, a host copy or the tensor."""
        keep = self.config.keep_latents
        if keep == "none":
            return []
        return [latents.cpu() if keep == "host" else latents]
