"""Text-to-video generation with any cache policy: prompt -> streamed MP4 + a JSON record of timings.

The DiT and the decoder are timed apart. ``RolloutEngine`` times each chunk's DiT work (denoising steps + the
commit pass) and then hands the chunk to :class:`_StreamingSink`, which decodes it with the persistent-cache
decoder (the Wan VAE, or the tiny decoder of :mod:`longroll.pipeline.tiny_decoder`) and appends it to the MP4
while its own clock runs; the engine's clock for the next chunk starts after the sink returns. Hence two
figures everywhere: *DiT-only* (what the attention policies change) and *end-to-end* (text encoding + DiT +
decode + MP4 writing, i.e. what a user waits for; model loading excluded).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from longroll.pipeline.decoder import StreamingDecoder
from longroll.pipeline.loader import LoadedPipeline
from longroll.pipeline.outdir import prepare_out_dir
from longroll.pipeline.record import run_record
from longroll.pipeline.rollout import ChunkStats, RolloutConfig, RolloutEngine
from longroll.pipeline.sampler import SamplerConfig
from longroll.pipeline.video import Mp4Writer
from longroll.policies.cached import CachedProcessor
from longroll.policies.config import EQUAL_MEMORY_FRAMES, PolicyConfig, preset

log = logging.getLogger(__name__)

#: Frame rate of Wan 2.1 videos.
WAN_FPS = 16
#: What :func:`generate` writes into its folder: a complete run, or one that was interrupted or failed.
VIDEO_FILE, STATS_FILE = "video.mp4", "stats.json"
PARTIAL_VIDEO_FILE, PARTIAL_STATS_FILE = "video.partial.mp4", "stats.partial.json"


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so that host clocks measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def json_safe(x: Any) -> Any:
    """A JSON-safe copy of nested dicts/lists/tuples: non-finite floats (NaN, inf) become None."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


@dataclass
class GenerateResult:
    """What :func:`generate` produced.

    Attributes:
        video_path: the MP4 (``out_dir/video.mp4``); stats_path: ``out_dir/stats.json``.
        latents: (1, C, num_frames, h, w) generated latents on the pipeline's device.
        video_frames: frames in the MP4 (``1 + 4 (num_frames - 1)`` for Wan's VAE).
        stats: the content of ``stats.json``.
    """

    video_path: Path
    stats_path: Path
    latents: torch.Tensor
    video_frames: int
    stats: dict[str, Any] = field(default_factory=dict)


class _StreamingSink:
    """``on_chunk`` callback: decode a finished chunk, append it to the MP4, record its timings."""

    def __init__(
        self, decoder: StreamingDecoder, writer: Mp4Writer, total: int, progress: Callable[[int, int], None] | None
    ) -> None:
        self.decoder, self.writer, self.total, self.progress = decoder, writer, total, progress
        self.records: list[dict[str, Any]] = []

    def __call__(self, chunk: int, latents: torch.Tensor, st: ChunkStats) -> None:
        dev = self.decoder.device
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        sync(dev)
        t0 = time.perf_counter()
        frames = self.decoder.decode_chunk(latents)  # (T, H, W, 3) uint8; .cpu() inside syncs
        t1 = time.perf_counter()
        self.writer.append(frames)
        t2 = time.perf_counter()
        self.records.append(
            {
                "chunk": chunk,
                "frame_start": st.frame_start,
                "latent_frames": latents.shape[2],
                "video_frames": int(frames.shape[0]),
                "dit_seconds": st.seconds,
                "decode_seconds": t1 - t0,
                "write_seconds": t2 - t1,
                "dit_peak_bytes": st.peak_bytes,
                "decode_peak_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0,
                "cache_bytes": st.cache_bytes,
            }
        )
        log.debug("chunk %d: DiT %.3f s, decode %.3f s", chunk, st.seconds, t1 - t0)
        if self.progress is not None:
            self.progress(chunk + 1, self.total)


def _latent_shape(pipe: LoadedPipeline, height: int, width: int) -> tuple[int, int, int]:
    """(channels, height // 8, width // 8), checking that the DiT's patch grid divides the latent."""
    f = pipe.decoder.spatial_factor
    _, ph, pw = pipe.wan_config.patch_size
    for name, px, p in (("height", height, ph), ("width", width, pw)):
        if px < 1 or px % (f * p):
            raise ValueError(f"{name} must be a positive multiple of {f * p} (VAE factor {f} x patch {p}), got {px}")
    return pipe.wan_config.in_channels, height // f, width // f


def _processor(pipe: LoadedPipeline, policy: PolicyConfig, tpf: int, fpc: int) -> CachedProcessor:
    return CachedProcessor.for_model(
        policy, pipe.wan_config, tokens_per_frame=tpf, frames_per_chunk=fpc, dtype=pipe.dtype, device=pipe.device
    )


def _timing(records: list[dict[str, Any]], text_s: float, e2e_s: float, fpc: int) -> dict[str, Any]:
    """DiT-only and end-to-end totals and rates (video frames per second unless named ``latent``)."""
    dit = sum(r["dit_seconds"] for r in records)
    latent = sum(r["latent_frames"] for r in records)
    video = sum(r["video_frames"] for r in records)
    warm = [r["dit_seconds"] for r in records[1:]]  # chunk 0 pays one-off kernel selection and allocation
    warm_median = statistics.median(warm) if warm else None
    return {
        "text_seconds": text_s,
        "dit_seconds": dit,
        "decode_seconds": sum(r["decode_seconds"] for r in records),
        "write_seconds": sum(r["write_seconds"] for r in records),
        "end_to_end_seconds": e2e_s,
        "dit_fps_latent": latent / dit if dit else None,
        "dit_fps_video": video / dit if dit else None,
        "dit_warm_median_chunk_seconds": warm_median,
        # Warm chunks yield 4 video frames per latent frame (Wan VAE temporal factor).
        "dit_warm_fps_latent": fpc / warm_median if warm_median else None,
        "end_to_end_fps_video": video / e2e_s if e2e_s else None,
    }


def _json_safe(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"type": type(obj).__name__, **{k: _json_safe(v) for k, v in dataclasses.asdict(obj).items()}}
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, str | int | float | bool) or obj is None:
        return obj
    return str(obj)


def _record(
    pipe: LoadedPipeline,
    settings: dict[str, Any],
    records: list[dict[str, Any]],
    text_s: float,
    e2e_s: float,
    command: str | None,
) -> dict[str, Any]:
    """The content of ``stats.json``: command, settings, model, environment, timings, memory, chunks."""
    record = run_record(pipe.device, command)
    return {
        "command": record["command"],
        "date": record["date"],
        **settings,
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "model": {
            "folder": str(pipe.folder),
            "checkpoint": None if pipe.checkpoint is None else str(pipe.checkpoint),
            "decoder": "wan" if pipe.tiny_decoder is None else "tiny",
            "tiny_decoder": None if pipe.tiny_decoder is None else str(pipe.tiny_decoder),
            "wan_config": _json_safe(pipe.wan_config),
        },
        "environment": record["environment"],
        "timing": _timing(records, text_s, e2e_s, settings["frames_per_chunk"]),
        "memory": {
            "dit_peak_bytes_max": max(r["dit_peak_bytes"] for r in records),
            "decode_peak_bytes_max": max(r["decode_peak_bytes"] for r in records),
            "cache_bytes_final": records[-1]["cache_bytes"],
            "note": "peaks are torch.cuda.max_memory_allocated per chunk; 0 on CPU",
        },
        "chunks": records,
    }


def _write_partial(
    pipe: LoadedPipeline,
    settings: dict[str, Any],
    records: list[dict[str, Any]],
    text_s: float,
    e2e_s: float,
    command: str | None,
    extra: dict[str, Any] | None,
    path: Path,
    video: Path | None,
    video_frames: int,
    error: BaseException,
) -> None:
    """``stats.partial.json`` of a run that stopped: what was completed, and why it stopped."""
    reason = "interrupted" if isinstance(error, KeyboardInterrupt) else f"{type(error).__name__}: {error}"
    record = run_record(pipe.device, command)
    stats: dict[str, Any] = {
        "partial": True,
        "stopped_by": " ".join(reason.split()),
        "chunks_completed": len(records),
        "video": None if video is None else str(video),
        "video_frames": video_frames,
        "command": record["command"],
        "date": record["date"],
        "environment": record["environment"],
        **settings,
        "chunks": records,
        **(extra or {}),
    }
    if records:
        stats["timing"] = _timing(records, text_s, e2e_s, settings["frames_per_chunk"])
    try:
        path.write_text(json.dumps(json_safe(stats), indent=2, allow_nan=False) + "\n")
    except (OSError, TypeError, ValueError) as e:  # never hide the original error behind this one
        log.warning("could not write %s: %s", path, e)


def generate(
    pipe: LoadedPipeline,
    prompt: str,
    *,
    num_frames: int,
    policy_name: str,
    seed: int,
    out_dir: str | os.PathLike[str],
    frames_per_chunk: int = 3,
    sampler: SamplerConfig | None = None,
    height: int = 480,
    width: int = 832,
    memory_frames: int = EQUAL_MEMORY_FRAMES,
    fps: float = WAN_FPS,
    command: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    extra: dict[str, Any] | None = None,
    processor_factory: Callable[[PolicyConfig, int, int], CachedProcessor] | None = None,
) -> GenerateResult:
    """Generate a video from a prompt with a cache policy, streaming the decode into ``out_dir/video.mp4``.

    Args:
        pipe: from :func:`longroll.pipeline.loader.load_pipeline`.
        prompt: the text prompt.
        num_frames: latent frames to generate (multiple of ``frames_per_chunk``); the video has
            ``1 + 4 (num_frames - 1)`` frames.
        policy_name: a name of :data:`longroll.policies.config.PRESET_NAMES`.
        seed: noise seed (chunk c uses ``seed + c``).
        out_dir: created if needed (and checked writable before any work); receives ``video.mp4`` and
            ``stats.json``, or, when the run is interrupted or fails, ``video.partial.mp4`` (the chunks done,
            playable) and ``stats.partial.json`` (``"partial": true``, what stopped it); earlier results in
            it are removed first.
        frames_per_chunk: latent frames per chunk (3 for Self-Forcing).
        sampler: per-chunk schedule (default: Self-Forcing's 4 steps 1000/750/500/250, shift 5).
        height, width: video size in pixels (multiples of 16).
        memory_frames: cache budget of the bounded policies, in latent frames.
        fps: video frame rate.
        command: recorded in the stats (default: this process's command line).
        progress: called with (chunks done, chunks total) after each chunk.
        extra: JSON-ready entries added to the stats (e.g. the caller's model load time).
        processor_factory: builds the empty processor from (policy, tokens_per_frame, frames_per_chunk), e.g.
            one rank's head-parallel processor; default: a :class:`CachedProcessor` of every head.
    """
    sampler = sampler if sampler is not None else SamplerConfig()
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty text, got {prompt!r}")
    latent_shape = _latent_shape(pipe, height, width)
    tpf = pipe.wan_config.tokens_per_frame(latent_shape[1], latent_shape[2])
    policy = preset(policy_name, tokens_per_frame=tpf, frames_per_chunk=frames_per_chunk, memory_frames=memory_frames)
    rollout = RolloutConfig(num_frames, frames_per_chunk, latent_shape, sampler, seed)
    out = prepare_out_dir(out_dir, name="out_dir")
    video_path, stats_path = out / VIDEO_FILE, out / STATS_FILE
    partial_video, partial_stats = out / PARTIAL_VIDEO_FILE, out / PARTIAL_STATS_FILE
    # Files of an earlier run in this folder would pass for this run's results.
    for stale in (video_path, stats_path, partial_video, partial_stats):
        stale.unlink(missing_ok=True)
    if processor_factory is None:
        processor = _processor(pipe, policy, tpf, frames_per_chunk)
    else:
        processor = processor_factory(policy, tpf, frames_per_chunk)
    engine = RolloutEngine(pipe.model, processor, rollout)
    sync(pipe.device)
    t_start = time.perf_counter()
    context = pipe.text_encoder.encode([prompt]).to(device=pipe.device, dtype=pipe.dtype)
    sync(pipe.device)
    text_s = time.perf_counter() - t_start
    pipe.decoder.reset()
    settings = {
        "prompt": prompt,
        "policy": policy_name,
        "policy_config": _json_safe(policy),
        "seed": seed,
        "num_latent_frames": num_frames,
        "frames_per_chunk": frames_per_chunk,
        "memory_frames": memory_frames,
        "height": height,
        "width": width,
        "latent_shape": list(latent_shape),
        "tokens_per_frame": tpf,
        "fps": fps,
        "sampler": _json_safe(sampler),
    }
    # The video is written under a partial name and renamed once complete: an interrupted or failed run
    # leaves a playable, clearly partial MP4 (the writer closes the file on the way out) and partial stats.
    writer = Mp4Writer(partial_video, fps)
    sink = _StreamingSink(pipe.decoder, writer, rollout.num_chunks, progress)
    try:
        with writer:
            result = engine.run(context, on_chunk=sink, dtype=pipe.dtype)
    except BaseException as e:
        pipe.decoder.reset()
        done = writer.frames_written
        elapsed = time.perf_counter() - t_start
        video = partial_video if done else None
        _write_partial(pipe, settings, sink.records, text_s, elapsed, command, extra, partial_stats, video, done, e)
        raise
    partial_video.replace(video_path)
    e2e_s = time.perf_counter() - t_start
    pipe.decoder.reset()
    settings["video_frames"] = writer.frames_written
    stats = {**_record(pipe, settings, sink.records, text_s, e2e_s, command), "partial": False, **(extra or {})}
    stats_path.write_text(json.dumps(stats, indent=2, allow_nan=False) + "\n")
    log.info(
        "%s: %d frames, DiT %.2f s, end to end %.2f s",
        video_path,
        writer.frames_written,
        stats["timing"]["dit_seconds"],
        e2e_s,
    )
    return GenerateResult(video_path, stats_path, result.latents, writer.frames_written, stats)
