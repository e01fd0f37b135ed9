"""End-to-end video FPS at Wan2.1-1.3B shapes in one GPU call: the ``all`` policy against dense, DiT variants
(compiled chunk, fused projections, FP8 linears) and decoders (tiny, Wan VAE), one ``summary.json``.

    PYTHONPATH=src python3 scripts/gpu_bench_end_to_end.py --out $OUT/end_to_end                 # H200, < 9 min
    PYTHONPATH=src python3 scripts/gpu_bench_end_to_end.py --preset tiny --device cpu --out /tmp/e2e   # CPU check

Every run is :func:`longroll.bench.rollout.run_rollout_bench` (random weights at the preset's shapes, same seed
so every variant has the same weights; warm-up rollout first; medians over the last 3 chunks), with the
``all`` policy at a 15-latent-frame cache. In order (later runs are skipped when ``--minutes`` is spent):

1. the headline DiT (``--headline``, default compiled + fused projections, bf16 linears) with the tiny
   decoder (TAEHV architecture, random weights, channels-last): decode after each chunk (``overlap off``:
   clean DiT-only and serial end-to-end figures), then decode overlapped with the next chunk's DiT;
2. dense with the same DiT at sampled cache lengths (random K/V prefilled; dense cannot hold 750 latent
   frames), DiT only, for a linear fit that is *extrapolated* to 3,000 video frames (750 latent frames);
3. the Wan VAE (diffusers' ``AutoencoderKLWan``, random weights) overlapped, when diffusers is installed;
   otherwise ``fps_e2e_wan_vae`` is null with the reason;
4. DiT variants, DiT only: eager unfused, eager fused, compiled unfused, compiled fused + FP8 (row scales);
   and the tiny decoder compiled.

``all`` keeps a bounded cache (at its cap from the sixth chunk on): its per-chunk cost at 3,000 video frames
is taken as the steady state measured here (the long-rollout runs measured it flat to 3,000 frames).
Speed-ups at 3,000 frames: ``speedup_e2e_vs_dense`` divides dense's extrapolated DiT-only chunk time (its
decode assumed fully hidden behind its long chunk: a lower bound of the speed-up) by ``all``'s overlapped
end-to-end chunk time; ``speedup_e2e_vs_dense_serial`` adds the same measured decode to both sides without
overlap; ``speedup_dit_vs_dense`` compares DiT only.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.utils import counters

from longroll.bench.rollout import TEMPORAL_FACTOR, RolloutBenchConfig, run_rollout_bench
from longroll.models.wan import CausalWanModel, WanConfig
from longroll.ops.fp8 import fp8_unsupported_reason
from longroll.pipeline.generate import json_safe
from longroll.pipeline.record import run_record

log = logging.getLogger("gpu_bench_end_to_end")

#: Per preset: latent frames of the ``all`` rollouts, dense's sampled cache lengths, cache cap, dtype, default
#: device and compile backend (aot_eager on the CPU: traces the same graphs without a C++ build per graph).
PRESETS: dict[str, dict[str, Any]] = {
    "wan2.1-1.3b": {
        "frames": 30, "history": (15, 60, 120, 180), "memory_frames": 15, "dtype": "bf16", "device": "cuda",
        "backend": "inductor", "text_len": 512,
    },
    "tiny": {
        "frames": 12, "history": (3, 6, 9), "memory_frames": 6, "dtype": "fp32", "device": "cpu",
        "backend": "aot_eager", "text_len": 16,
    },
}  # fmt: skip
#: DiT variants: name -> (compile_dit, fuse_projections, fp8).
VARIANTS: dict[str, tuple[bool, bool, str]] = {
    "eager": (False, False, "off"),
    "eager_fused": (False, True, "off"),
    "compiled": (True, False, "off"),
    "compiled_fused": (True, True, "off"),
    "compiled_fused_fp8": (True, True, "row"),
}
TARGET_VIDEO_FRAMES = 3000
TARGET_LATENT_FRAMES = TARGET_VIDEO_FRAMES // TEMPORAL_FACTOR  # 750: 1 + 4 * 749 = 2,997 video frames


class Runner:
    """Runs benchmark configurations while the time budget lasts, keeping every result or failure."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.p = PRESETS[args.preset]
        self.device = args.device or self.p["device"]
        self.deadline = time.perf_counter() + 60 * args.minutes
        self.runs: dict[str, dict[str, Any]] = {}

    def config(self, variant: str, **options: Any) -> RolloutBenchConfig:
        compile_dit, fuse, fp8 = VARIANTS[variant]
        base: dict[str, Any] = {
            "preset": self.args.preset, "policies": ("all",), "num_frames": self.p["frames"],
            "include_dense": False, "memory_frames": self.p["memory_frames"], "dtype": self.p["dtype"],
            "device": self.device, "text_len": self.p["text_len"], "compile_dit": compile_dit,
            "fuse_projections": fuse, "fp8": fp8, "compile_backend": self.p["backend"],
            "decoder_channels_last": True,
        }  # fmt: skip
        return RolloutBenchConfig(**(base | options))

    def run(self, name: str, variant: str, **options: Any) -> dict[str, Any] | None:
        """One benchmark; None (and the reason recorded) when skipped or failed."""
        if time.perf_counter() > self.deadline:
            self.runs[name] = {"status": "skipped: --minutes spent"}
            log.info("%s: skipped (time budget)", name)
            return None
        t0 = time.perf_counter()
        # Each run compiles its own model afresh (Inductor's graph cache makes repeats cheap): graphs of earlier
        # runs' models would otherwise count against Dynamo's recompile limit and silently fall back to eager.
        torch._dynamo.reset()
        graphs0 = counters["stats"]["unique_graphs"]
        try:
            data = run_rollout_bench(self.config(variant, **options), command=None)
        except Exception as e:  # one failing variant (e.g. FP8 on an old GPU) must not lose the others
            self.runs[name] = {"status": f"failed: {type(e).__name__}: {' '.join(str(e).split()[:40])}"}
            log.exception("%s failed", name)
            return None
        policy = data["config"]["policies"][0]
        out = {
            "status": "ok",
            "variant": variant,
            "options": dict(options),
            "seconds": time.perf_counter() - t0,
            "compiled_graphs_added": counters["stats"]["unique_graphs"] - graphs0,
            "summary": data["summary"][policy],
            "chunk_seconds": [r["seconds"] for r in data["chunks"] if r["measured"]],
            "chunk_e2e_seconds": [r["e2e_seconds"] for r in data["chunks"] if r["e2e_seconds"] is not None],
            "cache_bytes": [r["cache_bytes"] for r in data["chunks"] if r["measured"]],
        }
        self.runs[name] = out
        log.info("%s (%s) done in %.0f s: %s", name, variant, out["seconds"], _brief(out["summary"]))
        return out


def _brief(summary: dict[str, Any]) -> str:
    keys = ("fps_video_last3", "fps_video_e2e_last3", "median_decode_seconds", "fit_slope_s_per_frame", "status")
    return ", ".join(f"{k}={summary[k]}" for k in keys if k in summary)


def _fps(summary: dict[str, Any] | None, key: str) -> float | None:
    return None if summary is None else summary.get(key)


def fp8_output_error(preset: str, device: str, dtype: str, size: tuple[int, int]) -> dict[str, Any]:
    """Relative L2 change of one DiT forward (3 latent frames, dense attention) with FP8 block linears: a
    sanity figure only; the quality change is measured on the world model (``scripts/eval_memory.py --fp8``)."""
    reason = fp8_unsupported_reason(device)
    if reason is not None:
        return {"rel_l2": None, "reason": reason}
    cfg = WanConfig.from_preset(preset)
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    torch.manual_seed(0)
    with torch.device(device):
        model = CausalWanModel(cfg).to_inference_dtype(torch_dtype).eval()
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(1, cfg.in_channels, 3, size[0] // 8, size[1] // 8, generator=g, device=device)
        ctx = torch.randn(1, 64, cfg.text_dim, generator=g, device=device)
    t = torch.full((1, 3), 500.0, device=device)
    with torch.no_grad():
        ref = model(x.to(torch_dtype), t, ctx.to(torch_dtype)).float()
        out = model.fuse_projections().quantize_fp8("row")(x.to(torch_dtype), t, ctx.to(torch_dtype)).float()
    del model
    return {"rel_l2": float((out - ref).norm() / ref.norm()), "granularity": "row", "inputs": "random, t=500"}


def dense_extrapolation(dense: dict[str, Any] | None) -> tuple[float | None, str | None]:
    """Dense's DiT-only chunk seconds at :data:`TARGET_LATENT_FRAMES` from its fit, or None and why not (no
    fit, or a line that does not grow with the cache: timing noise dominates, nothing to extrapolate)."""
    if not dense or dense.get("fit_slope_s_per_frame") is None:
        return None, "no fit: fewer than two measured cache lengths"
    slope, intercept = dense["fit_slope_s_per_frame"], dense["fit_intercept_s"]
    if slope <= 0:
        return None, f"fit slope {slope:.3g} s per frame is not positive: timing noise dominates"
    return intercept + slope * TARGET_LATENT_FRAMES, None


def summarize(r: Runner, headline: str, fp8_err: dict[str, Any]) -> dict[str, Any]:
    """The acceptance figures from the runs (None where a run is missing), with how each was obtained."""
    fpc = 3
    video_per_chunk = TEMPORAL_FACTOR * fpc
    serial = r.runs.get("all_tiny_serial", {}).get("summary")
    over = r.runs.get("all_tiny_overlap", {}).get("summary")
    wan = r.runs.get("all_wan_overlap", {}).get("summary")
    dense = r.runs.get("dense_history", {}).get("summary")
    dit_s = _fps(serial, "median_chunk_seconds_last3")
    e2e_over_s = _fps(over, "median_chunk_seconds_e2e_last3")
    e2e_serial_s = _fps(serial, "median_chunk_seconds_e2e_last3")
    decode_s = _fps(serial, "median_decode_seconds")
    dense_at, dense_note = dense_extrapolation(dense)

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    wan_reason = r.runs.get("all_wan_overlap", {}).get("status")
    return {
        "fps_e2e_tiny_decoder": _fps(over, "fps_video_e2e_last3"),
        "fps_e2e_tiny_decoder_serial": _fps(serial, "fps_video_e2e_last3"),
        "fps_e2e_wan_vae": _fps(wan, "fps_video_e2e_last3"),
        "fps_e2e_wan_vae_reason": None if wan else wan_reason,
        "fps_dit_only": _fps(serial, "fps_video_last3"),
        "speedup_e2e_vs_dense": ratio(dense_at, e2e_over_s),
        "speedup_e2e_vs_dense_decoder": "tiny (the Wan VAE needs diffusers)" if not wan else "tiny",
        "speedup_e2e_vs_dense_wan_vae": ratio(dense_at, _fps(wan, "median_chunk_seconds_e2e_last3")),
        "speedup_e2e_vs_dense_serial": ratio(
            None if dense_at is None or decode_s is None else dense_at + decode_s, e2e_serial_s
        ),
        "speedup_dit_vs_dense": ratio(dense_at, dit_s),
        "dense_dit_seconds_per_chunk_at_3000_extrapolated": dense_at,
        "dense_extrapolation_note": dense_note,
        "all_seconds_per_chunk": {
            "dit": dit_s,
            "e2e_overlap": e2e_over_s,
            "e2e_serial": e2e_serial_s,
            "decode_serial": decode_s,
        },
        "fps_dit_only_by_variant": {
            name[len("dit_") :]: _fps(run.get("summary"), "fps_video_last3") or run.get("status")
            for name, run in r.runs.items()
            if name.startswith("dit_")
        }
        | {headline: _fps(serial, "fps_video_last3")},
        "fp8_one_forward_rel_l2": fp8_err,
        "headline_variant": headline,
        "video_frames_per_chunk": video_per_chunk,
        "extrapolation": (
            f"dense: a least-squares line through its DiT-only chunk time at the sampled cache lengths "
            f"{list(r.p['history'])} latent frames (random K/V prefilled; points in runs.dense_history), "
            f"evaluated at {TARGET_LATENT_FRAMES} latent frames (~{TARGET_VIDEO_FRAMES} video frames): measured "
            f"lengths only up to {max(r.p['history'])}. all: its cache is bounded ({r.p['memory_frames']} latent "
            f"frames), so its steady-state chunk measured over {r.p['frames']} latent frames stands for the chunk "
            f"at {TARGET_VIDEO_FRAMES} frames (cache_bytes per chunk in runs show it at the cap)."
        ),
        "notes": {
            "weights": "random at the preset's shapes (DiT, tiny decoder, Wan VAE); same seed for every variant",
            "fps": f"video frames per second: {video_per_chunk} per chunk / median of the last 3 chunk times",
            "speedup_e2e_vs_dense": "dense DiT-only at 3,000 (extrapolated; decode taken as hidden, a lower bound) "
            "/ all's end-to-end chunk with the decode overlapped",
        },
    }


def write_summary(
    r: Runner, head: str, fp8_err: dict[str, Any], out: Path, t0: float, *, complete: bool
) -> dict[str, Any]:
    """Write ``out/summary.json`` from the runs so far (after every run: a call stopped from outside keeps
    what finished); returns its content."""
    record = run_record(r.device, " ".join(["python3", *sys.argv]))
    h, w = RolloutBenchConfig(preset=r.args.preset).size
    summary = {
        "device": record["environment"]["device_name"],
        **summarize(r, head, fp8_err),
        "complete": complete,
        "date": record["date"],
        "command": record["command"],
        "versions": record["environment"]["versions"],
        "environment": record["environment"],
        "preset": r.args.preset,
        "size": [h, w],
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in r.p.items()},
        "bench_config_headline": json_safe(dataclasses.asdict(r.config(head))),
        "total_seconds": time.perf_counter() - t0,
        "runs": r.runs,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(json_safe(summary), indent=1, allow_nan=False) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("results/gpu/end_to_end"))
    p.add_argument("--preset", choices=sorted(PRESETS), default="wan2.1-1.3b")
    p.add_argument("--device", default=None, help="default: the preset's (cuda for wan2.1-1.3b)")
    p.add_argument("--headline", choices=sorted(VARIANTS), default="compiled_fused", help="DiT of runs 1-3")
    p.add_argument("--minutes", type=float, default=7.0, help="no run starts after this")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("longroll").setLevel(logging.WARNING)
    r = Runner(args)
    if r.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --preset tiny --device cpu")
    head = args.headline
    t0 = time.perf_counter()
    fp8_err: dict[str, Any] = {"rel_l2": None, "reason": "not measured yet"}

    def run(name: str, variant: str, **options: Any) -> dict[str, Any] | None:
        out = r.run(name, variant, **options)
        write_summary(r, head, fp8_err, args.out, t0, complete=False)
        return out

    tiny = {"decode": True, "decoder": "tiny"}
    if run("all_tiny_serial", head, overlap_decode="off", **tiny) is None and head != "eager_fused":
        log.warning("headline %s failed; the headline runs use eager_fused instead", head)
        r.runs[f"all_tiny_serial_{head}"] = r.runs.pop("all_tiny_serial")
        head = "eager_fused"
        run("all_tiny_serial", head, overlap_decode="off", **tiny)
    run("all_tiny_overlap", head, overlap_decode="auto", **tiny)
    run("dense_history", head, policies=("dense",), history_frames=r.p["history"], num_frames=6)
    if importlib.util.find_spec("diffusers") is None:
        r.runs["all_wan_overlap"] = {
            "status": "not measured: diffusers is not installed (the Wan VAE is diffusers' AutoencoderKLWan; "
            "longroll has no implementation of its own)"
        }
    else:
        run("all_wan_overlap", head, overlap_decode="auto", decode=True, decoder="wan")
    for variant in VARIANTS:
        if variant != head:
            run(f"dit_{variant}", variant)
    run("all_tiny_overlap_decoder_compiled", head, overlap_decode="auto", decoder_compile=True, **tiny)
    h, w = RolloutBenchConfig(preset=args.preset).size
    try:
        fp8_err = fp8_output_error(args.preset, r.device, r.p["dtype"], (h, w))
    except Exception as e:  # reported, like a failed run
        fp8_err = {"rel_l2": None, "reason": f"failed: {type(e).__name__}: {' '.join(str(e).split()[:40])}"}
    summary = write_summary(r, head, fp8_err, args.out, t0, complete=True)
    keys = ("fps_e2e_tiny_decoder", "fps_e2e_wan_vae", "fps_dit_only", "speedup_e2e_vs_dense")
    log.info("wrote %s: %s", args.out / "summary.json", {k: summary[k] for k in keys})
    return 0


if __name__ == "__main__":
    sys.exit(main())
