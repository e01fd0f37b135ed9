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

import numpy as np
import torch

from longroll.pipeline.decoder import StreamingDecoder
from longroll.pipeline.loader import LoadedPipeline
from longroll.pipeline.outdir import prepare_out_dir
from longroll.pipeline.overlap import DecodeQueue, check_overlap_mode
from longroll.pipeline.record import run_record
from longroll.pipeline.rollout import ChunkStats, RolloutConfig, RolloutEngine
from longroll.pipeline.sampler import SamplerConfig
from longroll.pipeline.video import Mp4Writer
from longroll.policies.cached import CachedProcessor
from longroll.policies.config import EQUAL_MEMORY_FRAMES

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
    """``on_chunk`` callback: decode a finished chunk (through a :class:`DecodeQueue`, overlapped with the next
    chunk's DiT where the mode and device allow), append its frames to the MP4, record its timings."""

    def __init__(
        self,
        decoder: StreamingDecoder,
        writer: Mp4Writer,
        total: int,
        progress: Callable[[int, int], None] | None,
        overlap: str = "off",
    ) -> None:
        self.decoder, self.writer, self.total, self.progress = decoder, writer, total, progress
        self.queue = DecodeQueue(decoder, self._write, overlap)
        self.records: list[dict[str, Any]] = []
        self._pending: dict[int, dict[str, Any]] = {}
        self._write_seconds = 0.0  # spent in _write during the current call
        self.stopped_in_sink = False  # a write or the progress callback raised: write nothing more

    def _write(self, chunk: int, frames: np.ndarray) -> None:
        try:
            t0 = time.perf_counter()
            self.writer.append(frames)
            dt = time.perf_counter() - t0
            self._write_seconds += dt
            rec = self._pending.pop(chunk)
            rec["video_frames"] = int(frames.shape[0])
            rec["write_seconds"] = dt
            self.records.append(rec)
            if self.progress is not None:
                self.progress(chunk + 1, self.total)
        except BaseException:
            self.stopped_in_sink = True
            raise

    def __call__(self, chunk: int, latents: torch.Tensor, st: ChunkStats) -> None:
        dev = self.decoder.device
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        sync(dev)
        rec: dict[str, Any] = {
            "chunk": chunk,
            "frame_start": st.frame_start,
            "latent_frames": latents.shape[2],
            "video_frames": None,
            "dit_seconds": st.seconds,
            "decode_seconds": None,
            "write_seconds": None,
            "dit_peak_bytes": st.peak_bytes,
            "decode_peak_bytes": None,
            "cache_bytes": st.cache_bytes,
        }
        self._pending[chunk] = rec  # completed and listed in records when its frames are written
        self._write_seconds = 0.0
        t0 = time.perf_counter()
        try:
            self.queue.submit(chunk, latents)  # off: decodes and writes; overlapped: enqueues, writes chunk - 1
        finally:
            # Host time of the decode (overlapped: its enqueueing and any wait), the MP4 writing taken out.
            rec["decode_seconds"] = time.perf_counter() - t0 - self._write_seconds
            rec["decode_peak_bytes"] = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
        log.debug("chunk %d: DiT %.3f s", chunk, st.seconds)

    def finish(self) -> None:
        """Write the chunks still being decoded."""
        self.queue.finish()


def _flush_after_failure(sink: _StreamingSink) -> None:
    """Write the chunks whose decode was under way when the rollout failed in the DiT (they are complete), so
    that the partial video holds every finished chunk, as without the overlap. When the failure came from the
    sink itself (a write, or the progress callback, e.g. an interrupt), nothing more is written; a second
    failure here only drops the rest."""
    if sink.stopped_in_sink:
        sink.queue.discard()
        return
    try:
        sink.finish()
    except Exception as e:  # the original error is the one to raise
        log.warning("could not write the chunks being decoded: %s", " ".join(str(e).split()[:30]))
        sink.queue.discard()


def _latent_shape(pipe: LoadedPipeline, height: int, width: int) -> tuple[int, int, int]:
    """(channels, height // 8, width // 8), checking that the DiT's patch grid divides the latent."""
    f = pipe.decoder.spatial_factor
    _, ph, pw = pipe.wan_config.patch_size
    for name, px, p in (("height", height, ph), ("width", width, pw)):
        if px < 1 or px % (f * p):
            raise ValueError(f"{name} must be a positive multiple of {f * p} (VAE factor {f} x patch {p}), got {px}")
    return pipe.wan_config.in_channels, height // f, width // f


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
    host_bytes: int = 0,
) -> dict[str, Any]:
    """The content of ``stats.json``: command, settings, model, environment, timings, memory (``host_bytes``: a
    host tier's store), chunks."""
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
            "host_bytes": host_bytes,
            "note": "peaks are torch.cuda.max_memory_allocated per chunk; 0 on CPU; host_bytes: a host tier's store",
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
    preset: str,
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
    overlap_decode: str = "auto",
    processor_cls: type[CachedProcessor] = CachedProcessor,
    processor_options: dict[str, Any] | None = None,
) -> GenerateResult:
    """Generate a video from a prompt with a cache policy, streaming the decode into ``out_dir/video.mp4``.

    Args:
        pipe: from :func:`longroll.pipeline.loader.load_pipeline`.
        prompt: the text prompt.
        num_frames: latent frames to generate (multiple of ``frames_per_chunk``); the video has
            ``1 + 4 (num_frames - 1)`` frames.
        preset: the attention preset, a name of :data:`longroll.policies.config.PRESET_NAMES`.
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
        overlap_decode: ``auto`` decodes chunk i on a side CUDA stream while chunk i+1's DiT runs (on the CPU
            the same one-behind schedule in line), ``off`` decodes each chunk before the next chunk's DiT; see
            :class:`~longroll.pipeline.overlap.DecodeQueue`. The video is the same either way. Overlapped, a
            chunk's ``dit_seconds`` include whatever of the previous chunk's decode the GPU did not hide.
        processor_cls, processor_options: the processor is ``processor_cls.for_model(preset, ...,
            **processor_options)``, e.g. one rank's head-parallel processor and its group.
    """
    sampler = sampler if sampler is not None else SamplerConfig()
    overlap = check_overlap_mode(overlap_decode)
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty text, got {prompt!r}")
    latent_shape = _latent_shape(pipe, height, width)
    tpf = pipe.wan_config.tokens_per_frame(latent_shape[1], latent_shape[2])
    processor = processor_cls.for_model(
        preset, pipe.wan_config, tokens_per_frame=tpf, frames_per_chunk=frames_per_chunk, dtype=pipe.dtype,
        device=pipe.device, memory_frames=memory_frames, **(processor_options or {}),
    )  # fmt: skip
    # Latents go to host memory chunk by chunk: the video streams to disk, device memory stays flat.
    rollout = RolloutConfig(num_frames, frames_per_chunk, latent_shape, sampler, seed, keep_latents="host")
    out = prepare_out_dir(out_dir, name="out_dir")
    video_path, stats_path = out / VIDEO_FILE, out / STATS_FILE
    partial_video, partial_stats = out / PARTIAL_VIDEO_FILE, out / PARTIAL_STATS_FILE
    # Files of an earlier run in this folder would pass for this run's results.
    for stale in (video_path, stats_path, partial_video, partial_stats):
        stale.unlink(missing_ok=True)
    engine = RolloutEngine(pipe.model, processor, rollout)
    sync(pipe.device)
    t_start = time.perf_counter()
    context = pipe.text_encoder.encode([prompt]).to(device=pipe.device, dtype=pipe.dtype)
    sync(pipe.device)
    text_s = time.perf_counter() - t_start
    pipe.decoder.reset()
    settings = {
        "prompt": prompt,
        "policy": preset,
        "policy_config": _json_safe(processor.policy),
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
        "overlap_decode": overlap,
    }
    # The video is written under a partial name and renamed once complete: an interrupted or failed run
    # leaves a playable, clearly partial MP4 (the writer closes the file on the way out) and partial stats.
    writer = Mp4Writer(partial_video, fps)
    sink = _StreamingSink(pipe.decoder, writer, rollout.num_chunks, progress, overlap)
    try:
        with writer:
            try:
                result = engine.run(context, on_chunk=sink, dtype=pipe.dtype)
            except BaseException:
                _flush_after_failure(sink)
                raise
            sink.finish()
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
    record = _record(pipe, settings, sink.records, text_s, e2e_s, command, processor.host_bytes())
    stats = {**record, "partial": False, **(extra or {})}
    stats_path.write_text(json.dumps(stats, indent=2, allow_nan=False) + "\n")
    log.info(
        "%s: %d frames, DiT %.2f s, end to end %.2f s",
        video_path,
        writer.frames_written,
        stats["timing"]["dit_seconds"],
        e2e_s,
    )
    return GenerateResult(video_path, stats_path, result.latents, writer.frames_written, stats)
