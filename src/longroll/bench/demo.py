"""``longroll demo``: the bundled world model rolled out with dense attention and with the longroll policy.

A held-out episode of the ``revisit`` family (the camera leaves its start, drives a loop and comes back to
places last seen 20-40 frames earlier) is rolled out twice from the same ground-truth context and noise: with
the unbounded (dense) cache, and with a longroll policy whose cache holds ``memory_frames`` frames, fewer than
the rollout generates. The default policy (``auto``, :func:`demo_policy`) depends on the device: on CUDA
``all_int8`` (TempCache + AnnSA + AnnCA, int8 ANN; the LSH variant ``all`` loses ~2 dB against the ground truth
at the world model's 64 tokens per frame, because its AnnCA drops ~40 % of the cross-attention mass, measured by
``longroll eval``); on a CPU ``tempcache`` alone, because there the sparse paths run their torch reference twins,
which cost more than the attention they skip at these shapes, while TempCache's bounded cache is what makes a
chunk cheaper than dense's growing one. The demo writes to its output folder:

- ``side_by_side.mp4``: ground truth | dense | longroll, labelled, upscaled 4x;
- ``latency.png`` and ``memory.png``: per-chunk DiT latency and cache (and, on CUDA, peak) memory against
  generated frames, for both policies;
- ``demo.json``: config, device, versions, per-chunk stats, PSNR against the ground truth (overall and on
  revisited tiles) and against the dense rollout, and the summary;

and returns the summary table for the command line to print.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longroll.eval.world import chunk_reporter, chunk_summary, compare_frames, eval_episodes, file_digest
from longroll.pipeline.loader import default_device
from longroll.pipeline.outdir import prepare_out_dir
from longroll.pipeline.record import run_record
from longroll.pipeline.video import tile_clips, write_mp4
from longroll.policies.config import EQUAL_MEMORY_FRAMES, PRESET_NAMES
from longroll.world.model import load_world_model, shipped_checkpoint_path
from longroll.world.rollout import WorldRollout, rollout_world, score_rollout
from longroll.world.training import EVAL_SEED

log = logging.getLogger(__name__)

FILES = ("side_by_side.mp4", "latency.png", "memory.png", "demo.json")
AUTO = "auto"


def demo_policy(policy: str, device: torch.device) -> tuple[str, str]:
    """The longroll policy the demo runs on ``device`` and why (``policy`` is a preset name or ``auto``)."""
    if policy != AUTO:
        return policy, "chosen with --policy"
    if device.type == "cuda":
        return "all_int8", "auto on CUDA: TempCache + AnnSA + AnnCA (int8 ANN), the sparse paths on their GPU kernels"
    return "tempcache", (
        "auto on a CPU: TempCache alone; AnnSA and AnnCA run their torch reference twins there, which cost more "
        "than the attention they skip at 64 tokens per frame"
    )


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs.

    Args:
        frames: frames of the episode, the ground-truth context (3) included; context plus a multiple of 3.
            72 by default: on a 2-core CPU dense attention's chunk catches up with TempCache's flat one (its
            cap reached from the fifth chunk on) near frame 48 and is ~20 % slower by frame 72.
        policy: the longroll policy compared with ``dense``: a preset name, or ``auto`` (:func:`demo_policy`).
        memory_frames: cache memory of the bounded policy, in frames.
        episode: which held-out revisit episode (index into the evaluation batch).
        fps: frame rate of the video.
        scale: upscaling of the 64x64 frames in the video.
        warmup: roll one chunk of each policy out first (unrecorded), so that the first recorded chunk does not
            pay one-off costs (thread pools, allocator growth).
    """

    frames: int = 72
    policy: str = "auto"
    memory_frames: int = EQUAL_MEMORY_FRAMES
    episode: int = 0
    fps: float = 8.0
    scale: int = 4
    warmup: bool = True

    def __post_init__(self) -> None:
        for name in ("frames", "memory_frames", "scale"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.episode, int) or self.episode < 0:
            raise ValueError(f"episode must be a non-negative int, got {self.episode!r}")
        if self.policy != AUTO and (self.policy not in PRESET_NAMES or self.policy == "dense"):
            raise ValueError(f"policy must be {AUTO!r} or a preset other than dense, one of "
                             f"{[p for p in PRESET_NAMES if p != 'dense']}, got {self.policy!r}")  # fmt: skip
        if not self.fps > 0:
            raise ValueError(f"fps must be positive, got {self.fps!r}")


@dataclass
class DemoResult:
    """The printed table, the files written and the content of ``demo.json``."""

    table: str
    files: list[Path]
    report: dict[str, Any]


def _chunk_records(out: WorldRollout, frames_per_chunk: int) -> list[dict[str, float]]:
    """Per-chunk stats; ``frames_generated`` counts the frames generated once the chunk is done."""
    f0 = out.context_frames
    return [
        {
            "chunk": s.chunk,
            "frame_start": s.frame_start,
            "frames_generated": s.frame_start - f0 + frames_per_chunk,
            "ms": 1e3 * s.seconds,
            "cache_mib": s.cache_bytes / 2**20,
            "peak_mib": s.peak_bytes / 2**20,
        }
        for s in out.stats
    ]


def _plot(report: dict[str, Any], path: Path, key: str, ylabel: str, title: str, peak: bool = False) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, p) in enumerate(report["policies"].items()):
        x = [c["frames_generated"] for c in p["chunks"]]
        ax.plot(x, [c[key] for c in p["chunks"]], marker="o", ms=3, color=f"C{i}", label=f"{name}")
        if peak:
            ax.plot(x, [c["peak_mib"] for c in p["chunks"]], ls="--", color=f"C{i}", label=f"{name}, peak allocated")
    ax.set_xlabel("generated frames")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def as_table(report: dict[str, Any]) -> str:
    """The summary printed by ``longroll demo``."""

    def f(x: Any, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    head = (f"{'policy':<12}{'ms/chunk first':>15}{'last':>7}{'median':>8}{'cache MiB':>11}{'PSNR vs GT':>12}"
            f"{'revisited':>11}{'PSNR vs dense':>15}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for name, p in report["policies"].items():
        s = p["summary"]
        lines.append(
            f"{name:<12}{s['ms_first']:>15.0f}{s['ms_last']:>7.0f}{s['ms_median']:>8.0f}{s['cache_mib']:>11.1f}"
            f"{f(s['psnr_vs_gt'], '.2f'):>12}{f(s['psnr_revisited'], '.2f'):>11}"
            f"{f(s['psnr_vs_dense'], '.2f') if name != 'dense' else '(ref)':>15}"
        )
    cfg = report["config"]
    if "policy" in report:
        lines.append(f"longroll policy: {report['policy']} ({report['policy_reason']})")
    lines.append(
        f"{report['device']}: {cfg['frames']} frames ({report['context_frames']} given), longroll cache "
        f"{cfg['memory_frames']} frames; 'revisited' = PSNR on tiles last seen before the sink-window memory"
    )
    return "\n".join(lines)


def _none_if_inf(x: float) -> float | None:
    return None if x != x or x in (float("inf"), float("-inf")) else x


def run_demo(
    out_dir: str | Path,
    config: DemoConfig | None = None,
    *,
    device: str | torch.device | None = None,
    checkpoint: str | Path | None = None,
    command: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> DemoResult:
    """Run the demo (see the module docstring) and write its files under ``out_dir``.

    Args:
        config: what to run (default :class:`DemoConfig`).
        device: default CUDA when available, else the CPU.
        checkpoint: world-model checkpoint (default: the one shipped in the package).
        command: command line recorded in ``demo.json`` (default: this process's).
        progress: called with (label, chunks done, chunks total) after every generated chunk of each rollout.

    Raises:
        ValueError: ``out_dir`` cannot be written (checked before anything runs), or a bad config.
    """
    cfg = DemoConfig() if config is None else config
    out_dir = prepare_out_dir(out_dir, name="out_dir")
    dev = default_device() if device is None else torch.device(device)
    t_start = time.perf_counter()
    ckpt = shipped_checkpoint_path() if checkpoint is None else Path(checkpoint)
    model = load_world_model(ckpt, device=dev, dtype=torch.float32)
    spec = model.spec
    generated = cfg.frames - spec.context_frames
    if generated < spec.frames_per_chunk or generated % spec.frames_per_chunk:
        raise ValueError(f"frames must be the context ({spec.context_frames}) plus a positive multiple of "
                         f"{spec.frames_per_chunk}, got {cfg.frames}")  # fmt: skip
    episodes = eval_episodes("revisit", cfg.episode + 1, cfg.frames, model).select(slice(cfg.episode, cfg.episode + 1))
    episodes = episodes.to(dev)
    gt = episodes.render()
    longroll_policy, reason = demo_policy(cfg.policy, dev)
    log.info("longroll policy: %s (%s)", longroll_policy, reason)
    policies = ("dense", longroll_policy)
    if cfg.warmup:
        short = episodes.truncate(spec.context_frames + spec.frames_per_chunk)
        for name in policies:
            warm = None if progress is None else chunk_reporter(progress, f"warm-up {name}", 1)
            rollout_world(model, name, short, device=dev, seed=EVAL_SEED, memory_frames=cfg.memory_frames,
                          on_chunk=warm)  # fmt: skip
    rollouts: dict[str, WorldRollout] = {}
    total = generated // spec.frames_per_chunk
    for name in policies:
        on_chunk = None if progress is None else chunk_reporter(progress, name, total)
        rollouts[name] = rollout_world(model, name, episodes, device=dev, seed=EVAL_SEED,
                                       memory_frames=cfg.memory_frames, on_chunk=on_chunk)  # fmt: skip
        log.info("%s: %.1f s", name, rollouts[name].seconds)
    f0 = rollouts["dense"].context_frames
    report: dict[str, Any] = run_record(dev, command)
    report |= {
        "config": asdict(cfg),
        "device": report["environment"]["device_name"],
        "checkpoint": str(ckpt),
        "checkpoint_sha256_16": file_digest(ckpt) if ckpt.is_file() else None,
        "spec": asdict(spec),
        "episode": {
            "family": "revisit",
            "prompt": episodes.prompts()[0],
            "world_id": int(episodes.world_ids[0]),
            "actions": episodes.actions[0].tolist(),
        },
        "context_frames": f0,
        "policy": longroll_policy,
        "policy_reason": reason,
        "policies": {},
    }
    for name, out in rollouts.items():
        scores = score_rollout(episodes, out, spec, memory_frames=cfg.memory_frames, ground_truth=gt)
        vs_dense = compare_frames(out.frames, rollouts["dense"].frames, f0)
        summary = chunk_summary(out.stats) | {
            "seconds": out.seconds,
            "psnr_vs_gt": _none_if_inf(float(scores["psnr"])),  # type: ignore[arg-type]
            "psnr_revisited": _none_if_inf(float(scores["psnr_stale"])),  # type: ignore[arg-type]
            "psnr_vs_dense": _none_if_inf(vs_dense["psnr"]),
            "ssim_vs_dense": vs_dense["ssim"],
        }
        report["policies"][name] = {
            "summary": summary,
            "scores": {
                k: ([_none_if_inf(x) for x in v] if isinstance(v, list) else _none_if_inf(v)) for k, v in scores.items()
            },
            "chunks": _chunk_records(out, spec.frames_per_chunk),
        }
    files = [out_dir / name for name in FILES]
    clips = [
        x[0].permute(0, 2, 3, 1).cpu().numpy()
        for x in (gt, rollouts["dense"].frames, rollouts[longroll_policy].frames)
    ]
    labels = ("ground truth", "dense (unbounded)", f"longroll {longroll_policy} ({cfg.memory_frames} fr)")
    video = tile_clips(clips, labels, scale=cfg.scale, gap=4, label_height=16)
    write_mp4(files[0], np.ascontiguousarray(video), cfg.fps)
    report["video"] = {"path": str(files[0]), "frames": int(video.shape[0]), "height": int(video.shape[1]),
                       "width": int(video.shape[2]), "fps": cfg.fps}  # fmt: skip
    on_cuda = dev.type == "cuda"
    _plot(report, files[1], "ms", "ms per chunk (DiT: denoising steps + commit)", f"per-chunk latency, {dev.type}")
    # Cache bytes are the allocated buffers of all layers (dense grows them by steps as the history grows).
    mem_title = "KV cache buffers, all layers" + (" (dashed: peak allocated)" if on_cuda else "")
    _plot(report, files[2], "cache_mib", "MiB", mem_title, peak=on_cuda)
    report["seconds_total"] = time.perf_counter() - t_start
    files[3].write_text(json.dumps(report, indent=1) + "\n")
    log.info("wrote %s", out_dir)
    return DemoResult(as_table(report), files, report)
