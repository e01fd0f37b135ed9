"""Rollout benchmark: per-chunk DiT latency, FPS and memory against frames generated, one curve per policy.

Random weights at a preset's shapes (no checkpoint, text encoder or VAE: the context is random embeddings of
the right width), so the numbers measure the attention policies and the DiT, not a particular model. Every
policy runs in the same process as the dense baseline, on the same model, context and noise.

Timing: ``RolloutEngine`` syncs the GPU and times each chunk's DiT work (all denoising steps + the commit
pass); those are the *DiT-only* figures. ``rollout_seconds`` is the wall time of the whole rollout call
(DiT + noise sampling + host overhead between chunks), the end-to-end figure of a decoder-less run. Before
the measured run each policy does an unrecorded warm-up rollout of two chunks (kernel selection, allocator
growth), and summaries use medians over warm chunks (chunk >= 1).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from longroll.cache.host_tier import HostTierConfig
from longroll.models.wan import PRESETS, CausalWanModel, WanConfig
from longroll.ops.attention import BACKENDS
from longroll.ops.fp8 import check_fp8_granularity
from longroll.parallel import HeadParallelGroup, HeadParallelProcessor, shard_wan_model
from longroll.pipeline.compiled import CompiledChunkDenoiser
from longroll.pipeline.decoder import StreamingDecoder, check_decoder_name
from longroll.pipeline.loader import default_device, resolve_dtype
from longroll.pipeline.overlap import DecodeQueue, check_overlap_mode
from longroll.pipeline.record import run_record
from longroll.pipeline.rollout import ChunkDenoiser, ChunkStats, RolloutConfig, RolloutEngine
from longroll.pipeline.sampler import SamplerConfig
from longroll.policies.cached import CachedProcessor, group_size
from longroll.policies.config import EQUAL_MEMORY_FRAMES, PRESET_NAMES, AttentionPolicy, preset
from longroll.policies.timing import ComponentTimer

log = logging.getLogger(__name__)

#: Video pixels per latent pixel (Wan VAE) and video frames per latent frame after the first.
SPATIAL_FACTOR = 8
TEMPORAL_FACTOR = 4
#: Default video size per preset: Wan's 480p, and a small one that keeps CPU runs of the tiny model short.
DEFAULT_SIZE = {"tiny": (64, 64)}
WAN_SIZE = (480, 832)
JSON_NAME, PNG_NAME = "bench_rollout.json", "bench_rollout.png"


@dataclass(frozen=True)
class RolloutBenchConfig:
    """What to measure.

    Args:
        preset: a :data:`longroll.models.wan.PRESETS` name (``wan2.1-1.3b``, ``tiny``, ...).
        policies: names from :data:`longroll.policies.config.PRESET_NAMES`; ``dense`` is added first when
            missing and ``include_dense`` is set.
        num_frames: latent frames to generate (a multiple of ``frames_per_chunk``).
        frames_per_chunk: latent frames per chunk.
        height, width: video pixels (latent = px / 8, tokens = latent / 2 per axis); None: the preset's default.
        memory_frames: cache budget of bounded policies, latent frames.
        max_dense_frames: stop ``dense`` after this many latent frames (before it runs out of memory); later
            points are recorded as not measured.
        dtype: ``bf16``/``fp16``/``fp32``; None: bf16 on CUDA, fp32 on CPU.
        device: None: CUDA if available.
        text_len: tokens of the random prompt context (512 for Wan).
        seed: weights, context and noise seed.
        sampler: per-chunk schedule (default: 4 few-step denoising passes).
        warmup: run an unrecorded two-chunk rollout per policy first.
        include_dense: always measure the dense baseline.
        components: also time attention, ANN selection/planning and cache commits per chunk (CUDA events; the
            rest of the chunk is linears, norms and glue).
        history_frames: when given, each policy is instead measured at these cache lengths (latent frames of
            random K/V committed before the rollout, so lengths past what a rollout could reach in the time,
            or past memory, can be sampled): ``num_frames`` are generated after each prefill and the last
            chunk is recorded. Lengths that run out of memory are recorded as such and end the policy's sweep.
        decode: also decode every chunk with a random-weight decoder and time it, for end-to-end figures (DiT +
            decode per chunk).
        decoder: which one: ``"wan"``, the Wan2.1 VAE (``diffusers.AutoencoderKLWan``, the streaming decoder
            of :class:`~longroll.pipeline.vae.LatentDecoder`), or ``"tiny"``, the TAEHV-architecture tiny
            decoder at taew2_1's shapes (:class:`~longroll.pipeline.tiny_decoder.TinyLatentDecoder`).
        cuda_graphs: CUDA-graph capture of the launch-bound steps (``auto``, ``off``); see
            :class:`~longroll.policies.cached.CachedProcessor`.
        overlap_commit: commits and AnnSA plans on a side stream (``auto``, ``off``); see
            :class:`~longroll.policies.cached.CachedProcessor`. With ``components`` set to time them in line,
            use ``off``: a side-stream commit's span measures its own duration, not what it adds to the chunk.
        group_commits: every layer's TempCache committed in one batched call (``auto``), in groups of that many
            consecutive layers (an int), or per layer (``off``); see
            :class:`~longroll.policies.cached.CachedProcessor`.
        overlap_decode: with ``decode``: ``off`` decodes each chunk before the next chunk's DiT, ``auto``
            decodes it on a side CUDA stream while the next chunk's DiT runs (in line off CUDA), ``emulate``
            the one-behind schedule without streams; see :class:`~longroll.pipeline.overlap.DecodeQueue`.
        decoder_channels_last, decoder_compile: the decoder's channels-last layout and ``torch.compile``.
        fuse_projections: fused q/k/v (and cross-attention k/v) projections
            (:meth:`~longroll.models.wan.CausalWanModel.fuse_projections`).
        fp8: ``off``, or FP8 block linears with ``row`` or ``tensor`` scales
            (:meth:`~longroll.models.wan.CausalWanModel.quantize_fp8`).
        compile_dit: the DiT under ``torch.compile`` with the attention policy outside the graphs
            (:class:`~longroll.pipeline.compiled.CompiledChunkDenoiser`), backend ``compile_backend``.
        host_tier: a host tier under every policy's cache (TempCache and sink-window policies only); None: each
            preset's own (``retrieval`` has one, the others none).
        drop_host_tier: run every preset without a host tier (``retrieval``'s cache alone: the baseline of its
            tier); excludes ``host_tier``.
        attention_backend: every policy's dense attention route (:func:`longroll.ops.attention.attention`),
            e.g. ``fa4`` for flash-attn-4 on both sides of a comparison; ``auto``: each preset's own.
    """

    preset: str = "tiny"
    policies: tuple[str, ...] = ("dense", "sink_window", "tempcache")
    num_frames: int = 6
    frames_per_chunk: int = 3
    height: int | None = None
    width: int | None = None
    memory_frames: int = EQUAL_MEMORY_FRAMES
    max_dense_frames: int | None = None
    dtype: str | None = None
    device: str | None = None
    text_len: int = 512
    seed: int = 0
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    warmup: bool = True
    include_dense: bool = True
    components: bool = False
    history_frames: tuple[int, ...] = ()
    decode: bool = False
    decoder: str = "wan"
    cuda_graphs: str = "auto"
    overlap_commit: str = "auto"
    group_commits: str | int = "off"
    overlap_decode: str = "off"
    decoder_channels_last: bool = False
    decoder_compile: bool = False
    fuse_projections: bool = False
    fp8: str = "off"
    compile_dit: bool = False
    compile_backend: str = "inductor"
    host_tier: HostTierConfig | None = None
    drop_host_tier: bool = False
    attention_backend: str = "auto"

    def __post_init__(self) -> None:
        if self.attention_backend not in BACKENDS:
            raise ValueError(f"attention_backend must be one of {BACKENDS}, got {self.attention_backend!r}")
        if self.drop_host_tier and self.host_tier is not None:
            raise ValueError(f"drop_host_tier=True excludes host_tier={self.host_tier!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        pols = tuple(self.policies)
        unknown = [p for p in pols if p not in PRESET_NAMES]
        if not pols or unknown or len(set(pols)) != len(pols):
            raise ValueError(f"policies must be distinct names from {list(PRESET_NAMES)}, got {list(pols)}")
        if self.include_dense and "dense" not in pols:
            pols = ("dense", *pols)
        object.__setattr__(self, "policies", pols)
        if self.frames_per_chunk < 1 or self.num_frames < 1 or self.num_frames % self.frames_per_chunk:
            raise ValueError(
                f"num_frames ({self.num_frames}) must be a positive multiple of frames_per_chunk "
                f"({self.frames_per_chunk})"
            )
        for name in ("height", "width"):
            px = getattr(self, name)
            if px is not None and (px < 16 or px % 16):
                raise ValueError(f"{name} must be a multiple of 16 pixels (VAE 8 x patch 2), got {px}")
        if self.memory_frames <= self.frames_per_chunk:
            raise ValueError(f"memory_frames must exceed frames_per_chunk, got {self.memory_frames}")
        if self.max_dense_frames is not None and self.max_dense_frames < 1:
            raise ValueError(f"max_dense_frames must be >= 1, got {self.max_dense_frames}")
        if self.text_len < 1:
            raise ValueError(f"text_len must be >= 1, got {self.text_len}")
        hist = tuple(self.history_frames)
        if any(h < 0 or h % self.frames_per_chunk for h in hist) or list(hist) != sorted(set(hist)):
            raise ValueError(
                f"history_frames must be increasing multiples of frames_per_chunk={self.frames_per_chunk}, "
                f"got {list(hist)}"
            )
        object.__setattr__(self, "history_frames", hist)
        check_decoder_name(self.decoder)
        if self.cuda_graphs not in ("auto", "off"):
            raise ValueError(f"cuda_graphs must be 'auto' or 'off', got {self.cuda_graphs!r}")
        if self.overlap_commit not in ("auto", "off"):
            raise ValueError(f"overlap_commit must be 'auto' or 'off', got {self.overlap_commit!r}")
        group_size(self.group_commits, 1)  # validates (any layer count)
        check_overlap_mode(self.overlap_decode)
        if self.fp8 != "off":
            check_fp8_granularity(self.fp8)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) in video pixels."""
        default = DEFAULT_SIZE.get(self.preset, WAN_SIZE)
        return (self.height or default[0], self.width or default[1])

    @property
    def latent_hw(self) -> tuple[int, int]:
        h, w = self.size
        return h // SPATIAL_FACTOR, w // SPATIAL_FACTOR


@dataclass
class RolloutBenchReport:
    """The measurements (``data``, as written to JSON) and the files written (None when no ``out_dir``)."""

    data: dict[str, Any]
    json_path: Path | None = None
    png_path: Path | None = None


def _record(policy: str, st: ChunkStats | None, fpc: int, chunk: int, reason: str | None = None) -> dict[str, Any]:
    """One point of a curve; ``st`` None marks a chunk that was not measured."""
    rec: dict[str, Any] = {
        "policy": policy,
        "chunk": chunk,
        "frames_generated": (chunk + 1) * fpc,
        "measured": st is not None,
        "seconds": None,
        "fps_latent": None,
        "fps_video": None,
        "peak_bytes": None,
        "cache_bytes": None,
        "components": None,
        "decode_seconds": None,
        "e2e_seconds": None,
    }
    if st is not None:
        rec.update(
            seconds=st.seconds,
            fps_latent=fpc / st.seconds,
            fps_video=TEMPORAL_FACTOR * fpc / st.seconds,
            peak_bytes=st.peak_bytes,
            cache_bytes=st.cache_bytes,
            components=st.components or None,
        )
    else:
        rec["reason"] = reason
    return rec


class _Bench:
    """Shared state of one benchmark: the random model and context, built once for every policy; with a
    ``group`` of several ranks, this rank's head-parallel shard of the model (same weights on every rank)."""

    def __init__(self, cfg: RolloutBenchConfig, group: HeadParallelGroup | None = None) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device) if cfg.device else default_device()
        # One timer for every policy's processor (and the group's all-reduces): each run collects it per chunk.
        self.timer = ComponentTimer(self.device) if cfg.components else None
        self.group = None if group is None or group.size == 1 else dataclasses.replace(group, timer=self.timer)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.wan = WanConfig.from_preset(cfg.preset)
        lh, lw = cfg.latent_hw
        self.tokens_per_frame = self.wan.tokens_per_frame(lh, lw)
        torch.manual_seed(cfg.seed)
        with torch.device(self.device):
            self.model = CausalWanModel(self.wan).to_inference_dtype(self.dtype).eval()
        if self.group is not None:
            if cfg.fuse_projections or cfg.fp8 != "off" or cfg.compile_dit:
                raise ValueError("a head-parallel run takes neither fuse_projections, fp8 nor compile_dit (yet)")
            shard_wan_model(self.model, self.group)
        if cfg.fuse_projections:
            self.model.fuse_projections()
        if cfg.fp8 != "off":
            self.model.quantize_fp8(check_fp8_granularity(cfg.fp8))
        self.denoiser: ChunkDenoiser = (
            CompiledChunkDenoiser(self.model, backend=cfg.compile_backend) if cfg.compile_dit else self.model
        )
        g = torch.Generator(device=self.device).manual_seed(cfg.seed)
        shape = (1, cfg.text_len, self.wan.text_dim)
        self.context = torch.randn(shape, generator=g, device=self.device).to(self.dtype)
        self.decoder: StreamingDecoder | None = None
        if cfg.decode and cfg.decoder == "tiny":
            from longroll.pipeline.tiny_decoder import TinyLatentDecoder, TinyVideoDecoder

            # The default config is taew2_1's shape; random weights time the same work.
            self.decoder = TinyLatentDecoder(
                TinyVideoDecoder(),
                device=self.device,
                dtype=self.dtype,
                channels_last=cfg.decoder_channels_last,
                compile=cfg.decoder_compile,
            )
        elif cfg.decode:
            from diffusers import AutoencoderKLWan

            from longroll.pipeline.vae import LatentDecoder

            # diffusers' default AutoencoderKLWan config is Wan2.1's VAE; random weights time the same work.
            self.decoder = LatentDecoder(
                AutoencoderKLWan(),
                device=self.device,
                dtype=self.dtype,
                channels_last=cfg.decoder_channels_last,
                compile=cfg.decoder_compile,
            )

    def _decode_queue(self) -> DecodeQueue | None:
        """A fresh decode of one video (the frames are dropped once on the host), or None without decode."""
        if self.decoder is None:
            return None
        self.decoder.reset()
        return DecodeQueue(self.decoder, lambda chunk, frames: None, self.cfg.overlap_decode)

    def _timed_on_chunk(self, stats: list[ChunkStats], decode: list[float], queue: DecodeQueue | None) -> Any:
        """``on_chunk`` that keeps the stats and hands the chunk to ``queue``, timing that hand-over: the whole
        decode (to uint8 frames on the host) when not overlapped, its enqueueing when overlapped."""

        def on_chunk(i: int, lat: torch.Tensor, st: ChunkStats) -> None:
            stats.append(st)
            if queue is not None:
                t0 = time.perf_counter()
                queue.submit(i, lat)
                if not queue.overlapped and self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                decode.append(time.perf_counter() - t0)

        return on_chunk

    @staticmethod
    def _finish(queue: DecodeQueue | None, decode: list[float]) -> None:
        """Wait for the decodes still under way; the wait is the last chunk's."""
        if queue is not None:
            t0 = time.perf_counter()
            queue.finish()
            if decode:
                decode[-1] += time.perf_counter() - t0

    def _processor(self, policy: str) -> CachedProcessor:
        c, w = self.cfg, self.wan
        options: dict[str, Any] = dict(
            tokens_per_frame=self.tokens_per_frame,
            frames_per_chunk=c.frames_per_chunk,
            dtype=self.dtype,
            device=self.device,
            memory_frames=c.memory_frames,
            timer=self.timer,
            cuda_graphs="auto" if c.cuda_graphs == "auto" else "off",
            overlap_commit="auto" if c.overlap_commit == "auto" else "off",
            group_commits=c.group_commits,
        )
        if self.group is not None:
            if c.attention_backend != "auto":
                raise ValueError("attention_backend applies to single-device runs; leave it 'auto' with a group")
            return HeadParallelProcessor.for_model(policy, w, group=self.group, **options)
        if c.host_tier is not None or c.drop_host_tier or c.attention_backend != "auto":
            pol: AttentionPolicy = preset(
                policy, tokens_per_frame=self.tokens_per_frame, frames_per_chunk=c.frames_per_chunk,
                memory_frames=c.memory_frames,
            )  # fmt: skip
            changes: dict[str, Any] = {}
            if c.host_tier is not None or c.drop_host_tier:
                changes["host_tier"] = c.host_tier
            if c.attention_backend != "auto":
                changes["attention_backend"] = c.attention_backend
            return CachedProcessor.for_model(dataclasses.replace(pol, **changes), w, **options)
        return CachedProcessor.for_model(policy, w, **options)

    def _rollout(
        self, policy: str, num_frames: int, on_chunk: Any = None, processor: CachedProcessor | None = None
    ) -> None:
        c = self.cfg
        lh, lw = c.latent_hw
        # The benchmark streams chunks to its decoder (on_chunk): keeping every chunk's latents on the device
        # would grow device memory by one chunk of latents per chunk (0.6 MB at Wan2.1-1.3B shapes).
        rc = RolloutConfig(num_frames, c.frames_per_chunk, (self.wan.in_channels, lh, lw), c.sampler, c.seed,
                           keep_latents="none")  # fmt: skip
        proc = self._processor(policy) if processor is None else processor
        RolloutEngine(self.denoiser, proc, rc).run(self.context, on_chunk=on_chunk, dtype=self.dtype)

    def _prefilled(self, policy: str, frames: int) -> CachedProcessor:
        """A processor whose caches already hold ``frames`` latent frames of random unit-scale K/V."""
        proc = self._processor(policy)
        fpc, p = self.cfg.frames_per_chunk, self.tokens_per_frame
        g = torch.Generator(device=self.device).manual_seed(self.cfg.seed + 1)
        shape = (1, self.wan.num_heads, fpc * p, self.wan.head_dim)
        caches = proc.caches()
        first, heads = caches[0].head_ids[0], proc.heads  # a shard draws the full K/V, keeps its heads
        for cache in caches:
            for f0 in range(0, frames, fpc):
                k = torch.randn(shape, generator=g, device=self.device).to(self.dtype)
                v = torch.randn_like(k)
                sl = slice(first, first + heads)
                cache.stage(k[:, sl], v[:, sl], frame_start=f0)
                cache.commit()
        proc.replan()
        return proc

    def run_policy_at(self, policy: str) -> list[dict[str, Any]]:
        """One record per sampled history length: the last chunk of a short rollout after the prefill."""
        c = self.cfg
        records: list[dict[str, Any]] = []
        for hist in c.history_frames:
            stats: list[ChunkStats] = []
            decode: list[float] = []
            try:
                proc = self._prefilled(policy, hist)
                queue = self._decode_queue()
                self._rollout(policy, c.num_frames, self._timed_on_chunk(stats, decode, queue), processor=proc)
                self._finish(queue, decode)
                rec = _record(policy, stats[-1], c.frames_per_chunk, len(stats) - 1)
                if decode:
                    rec["decode_seconds"], rec["e2e_seconds"] = decode[-1], rec["seconds"] + decode[-1]
            except torch.OutOfMemoryError:
                rec = _record(policy, None, c.frames_per_chunk, 0, f"out of memory at {hist} history frames")
            rec["history_frames"] = hist
            records.append(rec)
            self._free()
            if not rec["measured"]:
                break
        return records

    def _free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def run_policy(self, policy: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Per-chunk records (all chunks, unmeasured ones marked) and the policy's summary."""
        c = self.cfg
        fpc, chunks = c.frames_per_chunk, c.num_frames // c.frames_per_chunk
        limit = c.num_frames
        if policy == "dense" and c.max_dense_frames is not None:
            limit = min(limit, c.max_dense_frames // fpc * fpc)
        stats: list[ChunkStats] = []
        decode: list[float] = []

        status, wall = "ok", 0.0
        try:
            if c.warmup and limit:
                # The decoder warms up too (kernel selection, any compilation), on its own video.
                warm: list[float] = []
                queue = self._decode_queue()
                self._rollout(policy, min(limit, 2 * fpc), self._timed_on_chunk([], warm, queue))
                self._finish(queue, warm)
                self._free()
            t0 = time.perf_counter()
            if limit:
                queue = self._decode_queue()
                self._rollout(policy, limit, on_chunk=self._timed_on_chunk(stats, decode, queue))
                self._finish(queue, decode)
            wall = time.perf_counter() - t0
            if limit < c.num_frames:
                status = f"stopped after {limit} frames (--max-dense-frames)"
        except torch.OutOfMemoryError:
            status = f"out of memory after {len(stats) * fpc} frames"
            log.warning("%s: %s", policy, status)
        self._free()
        reason = status if status != "ok" else None
        records = [_record(policy, stats[i] if i < len(stats) else None, fpc, i, reason) for i in range(chunks)]
        for rec, secs in zip(records, decode, strict=False):
            rec["decode_seconds"], rec["e2e_seconds"] = secs, rec["seconds"] + secs
        summary = _summary(stats, fpc, wall, status)
        if decode:
            e2e = [r["e2e_seconds"] for r in records if r["e2e_seconds"] is not None]
            summary["median_decode_seconds"] = statistics.median(decode[1:] or decode)
            summary["median_chunk_seconds_e2e_last3"] = statistics.median(e2e[-3:])
            summary["fps_video_e2e_last3"] = TEMPORAL_FACTOR * fpc / summary["median_chunk_seconds_e2e_last3"]
        return records, summary


def _summary(stats: list[ChunkStats], fpc: int, wall: float, status: str) -> dict[str, Any]:
    """Totals and warm medians of one policy (None where nothing was measured)."""
    secs = [s.seconds for s in stats]
    warm = secs[1:] or secs
    last = warm[-3:]
    med_warm = statistics.median(warm) if warm else None
    med_last = statistics.median(last) if last else None
    return {
        "status": status,
        "measured_frames": len(stats) * fpc,
        "dit_seconds": sum(secs),
        "rollout_seconds": wall if stats else None,
        "median_chunk_seconds_warm": med_warm,
        "median_chunk_seconds_last3": med_last,
        "fps_latent_warm": fpc / med_warm if med_warm else None,
        "fps_latent_last3": fpc / med_last if med_last else None,
        "fps_video_last3": TEMPORAL_FACTOR * fpc / med_last if med_last else None,
        "peak_bytes_max": max((s.peak_bytes for s in stats), default=None),
        "cache_bytes_last": stats[-1].cache_bytes if stats else None,
    }


def _fit_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Least-squares line ``seconds = a + b * history_frames`` through the measured sampled lengths, so that
    lengths past memory can be extrapolated (and labelled as such by the reader)."""
    pts = [(r["history_frames"], r["seconds"]) for r in records if r["measured"]]
    out: dict[str, Any] = {
        "status": "ok" if all(r["measured"] for r in records) else records[-1].get("reason", "not measured"),
        "points": pts,
        "fit_intercept_s": None,
        "fit_slope_s_per_frame": None,
    }
    out["fit_intercept_s"], out["fit_slope_s_per_frame"] = _line(pts)
    e2e = [(r["history_frames"], r["e2e_seconds"]) for r in records if r["measured"] and r["e2e_seconds"]]
    if e2e:
        out["points_e2e"] = e2e
        out["fit_e2e_intercept_s"], out["fit_e2e_slope_s_per_frame"] = _line(e2e)
    return out


def _line(pts: list[tuple[float, float]]) -> tuple[float | None, float | None]:
    """Least-squares (intercept, slope) through ``pts``; (None, None) with fewer than two points."""
    if len(pts) < 2:
        return None, None
    n = len(pts)
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else 0.0
    return my - slope * mx, slope


def run_rollout_bench(
    config: RolloutBenchConfig, *, command: str | None = None, group: HeadParallelGroup | None = None
) -> dict[str, Any]:
    """Measure every policy of ``config``; returns the JSON-ready report (see :func:`bench_rollout`). With a
    ``group`` of several ranks, every rank of it must call this with the same config (head-parallel run)."""
    bench = _Bench(config, group)
    records: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    for policy in config.policies:
        log.info("benchmarking %s", policy)
        if config.history_frames:
            recs = bench.run_policy_at(policy)
            summary[policy] = _fit_summary(recs)
        else:
            recs, summary[policy] = bench.run_policy(policy)
        records.extend(recs)
    h, w = config.size
    return {
        "benchmark": "rollout",
        **run_record(bench.device, command),
        "config": {
            **{k: v for k, v in dataclasses.asdict(config).items() if k != "sampler"},
            "sampler": dataclasses.asdict(config.sampler),
            "height": h,
            "width": w,
            "latent_hw": list(config.latent_hw),
            "tokens_per_frame": bench.tokens_per_frame,
            "dtype": str(bench.dtype).removeprefix("torch."),
            "device": str(bench.device),
            "wan_config": dataclasses.asdict(bench.wan),
            "ranks": 1 if bench.group is None else bench.group.size,
        },
        "notes": {
            "seconds": "DiT only per chunk: all denoising steps + the commit pass, GPU-synchronised",
            "rollout_seconds": "wall time of the measured rollout (DiT + noise + host overhead); no text encoder/VAE",
            "peak_bytes": "torch.cuda.max_memory_allocated during the chunk; 0 on CPU",
            "fps_video": f"{TEMPORAL_FACTOR} video frames per latent frame (Wan VAE)",
            "weights": "random, at the preset's shapes",
            "decode_seconds": "with decode: streaming decode of the chunk by `config.decoder` (wan: Wan2.1 VAE, "
            "tiny: TAEHV-architecture tiny decoder; random weights) to uint8 frames on the host, synchronised; "
            "with overlap_decode auto on CUDA only the enqueueing (the decode runs during the next chunk's DiT, "
            "whose seconds then hold what it did not hide; the last chunk's includes the final wait)",
            "e2e_seconds": "with decode: seconds (DiT) + decode_seconds per chunk",
            "ranks": "processes sharing the model by attention heads (head-parallel); timings are rank 0's, and "
            "with components the all_reduce span is the time spent in the group's all-reduces",
        },
        "summary": summary,
        "chunks": records,
    }


def plot_report(data: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Latency and memory against frames generated, one line per policy, to a PNG (Agg backend, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax_t, ax_m = fig.subplots(1, 2)
    chunks = data["chunks"]
    cuda_peaks = any((r["peak_bytes"] or 0) > 0 for r in chunks)
    biggest = max((r["peak_bytes"] or 0) if cuda_peaks else (r["cache_bytes"] or 0) for r in chunks)
    unit, scale = ("GiB", 2**30) if biggest >= 2**30 else ("MiB", 2**20)
    dec = data["config"].get("decoder", "VAE")  # older reports have no decoder field
    for policy, summ in data["summary"].items():
        pts = [r for r in chunks if r["policy"] == policy and r["measured"]]
        # sampled lengths: the chunk's position is the prefilled history plus what the short rollout made
        x = [r.get("history_frames", 0) + r["frames_generated"] for r in pts]
        label = policy if summ["status"] == "ok" else f"{policy} ({summ['status']})"
        line = ax_t.plot(x, [1e3 * r["seconds"] for r in pts], marker="o", ms=3, label=label)[0]
        e2e = [(xi, 1e3 * r["e2e_seconds"]) for xi, r in zip(x, pts, strict=True) if r.get("e2e_seconds")]
        if e2e:
            ax_t.plot(*zip(*e2e, strict=True), ls=":", color=line.get_color(), label=f"{policy} + {dec} decode")
        if cuda_peaks:
            peak = [r["peak_bytes"] / scale for r in pts]
            ax_m.plot(x, peak, marker="o", ms=3, color=line.get_color(), label=f"{policy} peak")
        cache = [r["cache_bytes"] / scale for r in pts]
        ax_m.plot(x, cache, ls="--", color=line.get_color(), label=f"{policy} KV cache")
    cfg = data["config"]
    ax_t.set(xlabel="latent frames generated", ylabel="DiT ms per chunk", title="chunk latency (DiT only)")
    ax_m.set(xlabel="latent frames generated", ylabel=unit, title="memory (solid: CUDA peak, dashed: KV cache)")
    for ax in (ax_t, ax_m):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    env = data["environment"]
    fig.suptitle(f"{cfg['preset']} {cfg['height']}x{cfg['width']} {cfg['dtype']} on {env['device_name']}", fontsize=9)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def bench_rollout(
    preset: str,
    policies: tuple[str, ...] | list[str],
    num_frames: int,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    command: str | None = None,
    group: HeadParallelGroup | None = None,
    **options: Any,
) -> RolloutBenchReport:
    """Benchmark cache policies on a random-weight model at ``preset``'s shapes.

    Args:
        preset, policies, num_frames: see :class:`RolloutBenchConfig`; ``options`` are its other fields.
        out_dir: when given, write ``bench_rollout.json`` and ``bench_rollout.png`` there.
        command: recorded in the JSON (default: this process's command line).
        group: run head-parallel over this group (every rank calls with the same arguments; give ``out_dir``
            on one rank only).

    Returns:
        The report; ``data["chunks"]`` holds one record per (policy, chunk) with ``frames_generated``,
        ``seconds`` (DiT only), ``fps_latent``, ``fps_video``, ``peak_bytes``, ``cache_bytes`` and ``measured``.
    """
    config = RolloutBenchConfig(preset=preset, policies=tuple(policies), num_frames=num_frames, **options)
    data = run_rollout_bench(config, command=command, group=group)
    report = RolloutBenchReport(data)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        report.json_path = out / JSON_NAME
        report.json_path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
        report.png_path = plot_report(data, out / PNG_NAME)
        log.info("wrote %s and %s", report.json_path, report.png_path)
    return report
