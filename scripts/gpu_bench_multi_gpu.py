"""Head-parallel speed-up: per-chunk DiT latency on 1, 2, 4 ... GPUs of one host, and the all-reduce time.

Launch with torchrun, one process per GPU; every group size up to the number of processes is measured in the
same call (sizes other than the world use the first ranks; the others wait)::

    torchrun --standalone --nproc-per-node 4 scripts/gpu_bench_multi_gpu.py --out $OUT/multi_gpu

Per preset (default Wan2.1-14B and 1.3B shapes, random weights, bf16, 480x832, chunks of 3 latent frames, 4
denoising steps + the commit pass, ``sink_window`` with a 15-frame cache): rank 0 first runs the plain one-GPU
model (no sharding, no process group), then each group size runs the head-parallel model (same weights, seed
and noise). The rollout generates enough chunks to fill the cache and then ``--measured-chunks`` more; the
summary is the median over those (the cache full, a steady state). ``comm_ms_per_chunk`` is the time rank 0's
compute stream waits on the group's all-reduces (CUDA events around each; load imbalance between ranks shows
up there). ``max_abs_diff_vs_1`` compares the head-parallel latents with the one-GPU ones (bf16: rounding
differences, amplified by the policy, not an error bound).

Writes ``summary.json`` under ``--out`` with keys ``device``, ``gpus`` (the group sizes), ``preset`` (the
presets), ``ms_per_chunk``, ``speedup_vs_1``, ``comm_ms_per_chunk`` (each {preset: {gpus: value}}), the
targets and whether they were met, ``runs`` with every measurement, and ``check``: first, a float32 rollout of a
small 8-head model (5 policies) on every group size against one process, by the project's tolerance rule
(``check.passed``; ``--no-check`` skips it).

CPU check of the script itself (gloo, tiny shapes, a few seconds)::

    torchrun --standalone --nproc-per-node 2 scripts/gpu_bench_multi_gpu.py --device cpu --presets tiny \\
        --height 64 --width 64 --frames-per-chunk 2 --memory-frames 4 --measured-chunks 2 --out /tmp/multi
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from longroll.models.wan import CausalWanModel, WanConfig
from longroll.parallel import ALL_REDUCE_SPAN, HeadParallelGroup, HeadParallelProcessor, init_from_env, shard_wan_model
from longroll.pipeline.record import run_record
from longroll.pipeline.rollout import ChunkStats, RolloutConfig, RolloutEngine
from longroll.pipeline.sampler import SamplerConfig
from longroll.policies.cached import CachedProcessor
from longroll.policies.config import preset
from longroll.policies.timing import ComponentTimer

log = logging.getLogger("gpu_bench_multi_gpu")

#: The acceptance targets at 14B shapes: speed-up over one GPU per group size.
TARGETS = {"wan2.1-14b": {2: 1.8, 4: 3.3}}


def _model(cfg: WanConfig, dtype: torch.dtype, device: torch.device, seed: int) -> CausalWanModel:
    """Random weights on ``device``: half-precision ones built directly in ``dtype`` (a 14B float32 copy is not
    needed), float32 and float64 ones drawn in float32 (so that both hold the same weights)."""
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32)
    try:
        with torch.device(device):
            model = CausalWanModel(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.to_inference_dtype(dtype).eval()


def _run(
    args: argparse.Namespace,
    cfg: WanConfig,
    device: torch.device,
    group: HeadParallelGroup | None,
    timer: ComponentTimer,
) -> tuple[list[ChunkStats], list[float], torch.Tensor]:
    """One rollout; returns the stats and the all-reduce seconds of the chunks measured (the cache full), and
    the latents (float32, on the CPU)."""
    dtype = getattr(args, "dtype", None) or (torch.float32 if args.device == "cpu" else torch.bfloat16)
    model = _model(cfg, dtype, device, args.seed)
    if group is not None:
        shard_wan_model(model, group)
    lh, lw = args.height // 8, args.width // 8
    tpf = cfg.tokens_per_frame(lh, lw)
    fpc = args.frames_per_chunk
    policy = preset(args.policy, tokens_per_frame=tpf, frames_per_chunk=fpc, memory_frames=args.memory_frames)
    kw: dict[str, Any] = dict(tokens_per_frame=tpf, frames_per_chunk=fpc, dtype=dtype, device=device)
    if group is None:
        proc: CachedProcessor = CachedProcessor.for_model(policy, cfg, **kw)
    else:
        proc = HeadParallelProcessor.for_model(policy, cfg, group=group, **kw)
    fill = math.ceil(args.memory_frames / fpc)
    chunks = fill + 1 + args.measured_chunks
    sampler = SamplerConfig(timesteps=args.timesteps) if getattr(args, "timesteps", None) else SamplerConfig()
    rollout = RolloutConfig(chunks * fpc, fpc, (cfg.in_channels, lh, lw), sampler, seed=args.seed)
    g = torch.Generator(device=device).manual_seed(args.seed)
    context = torch.randn((1, args.text_len, cfg.text_dim), generator=g, device=device).to(dtype)
    comm: list[float] = []
    stats: list[ChunkStats] = []

    def on_chunk(i: int, latents: torch.Tensor, st: ChunkStats) -> None:
        stats.append(st)
        comm.append(timer.collect().get(ALL_REDUCE_SPAN, 0.0))  # after the engine's end-of-chunk sync

    result = RolloutEngine(model, proc, rollout).run(context, on_chunk=on_chunk, dtype=dtype)
    latents = result.latents.float().cpu()
    del model, proc, result
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return stats[fill + 1 :], comm[fill + 1 :], latents


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="wan2.1-14b,wan2.1-1.3b", help="comma-separated Wan presets")
    p.add_argument("--sizes", default=None, help="group sizes to measure (default 1, 2, 4, ... up to the world)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cuda (NCCL) or cpu (gloo, a check)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--frames-per-chunk", type=int, default=3)
    p.add_argument("--memory-frames", type=int, default=15, help="cache of the policy, latent frames")
    p.add_argument("--policy", default="sink_window")
    p.add_argument("--measured-chunks", type=int, default=4, help="chunks measured once the cache is full")
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/gpu/multi_gpu", help="folder for summary.json")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the float32 correctness check")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    launched = init_from_env(args.device)
    world, rank = launched.world_size, launched.rank
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [1 << i for i in range(8) if 1 << i <= world]
    if any(s < 1 or s > world for s in sizes):
        raise ValueError(f"--sizes must lie in [1, {world}] (the processes started), got {sizes}")
    presets = [x for x in args.presets.split(",") if x]
    runs: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    check = _check(args, launched, sizes) if args.check else None
    for name in presets:
        cfg = WanConfig.from_preset(name)
        single: torch.Tensor | None = None
        for n in sizes:
            # new_group is collective: every rank creates every subgroup, in the same order.
            sub = dist.new_group(ranks=list(range(n))) if n > 1 else None
            timer = ComponentTimer(launched.device)
            if rank < n:
                group = None if n == 1 else HeadParallelGroup(sub, timer=timer)
                t0 = time.perf_counter()
                stats, comm, latents = _run(args, cfg, launched.device, group, timer)
                if rank == 0:
                    rec = _record(name, n, stats, comm, time.perf_counter() - t0)
                    if n == 1:
                        single = latents
                    elif single is not None:
                        rec["max_abs_diff_vs_1"] = float((latents - single).abs().max())
                    runs.append(rec)
                    log.info("%s on %d: %.1f ms/chunk, all-reduce %.1f ms", name, n, rec["ms_per_chunk"],
                             rec["comm_ms_per_chunk"])  # fmt: skip
            dist.barrier()
    if rank == 0:
        _write(args, launched.device, sizes, presets, runs, time.perf_counter() - t_start, check)
    dist.destroy_process_group()
    return 0


#: The correctness check: a small float32 model with 8 heads (divides 1, 2, 4 and 8 ranks), a few chunks. The
#: int8 policies are left out: a rounding-level difference can flip one of their discrete decisions, which
#: tests/test_parallel.py allows for by their own float32 error.
CHECK_POLICIES = ("dense", "tempcache_lsh", "annsa", "annca", "all")


def _check(args: argparse.Namespace, launched: Any, sizes: list[int]) -> dict[str, Any] | None:
    """Every size's float32 rollout of :data:`CHECK_POLICIES` against the one-process one, by the project's
    rule: error <= 2 x float32's own error (one process, against float64) + the float32 eps term. Returns the
    result on rank 0 (None elsewhere)."""
    cfg = dataclasses.replace(WanConfig.from_preset("tiny"), num_heads=8)
    small = argparse.Namespace(**{**vars(args), "height": 128, "width": 128, "frames_per_chunk": 2,
                                  "memory_frames": 4, "measured_chunks": 2, "text_len": 16,
                                  "timesteps": (1000.0, 500.0)})  # fmt: skip
    rank, device = launched.rank, launched.device
    out: dict[str, Any] = {"policies": {}, "passed": True}
    for policy in CHECK_POLICIES:
        small.policy = policy
        timer = ComponentTimer(device)
        ref = ref64 = None
        if rank == 0:
            ref = _run(argparse.Namespace(**{**vars(small), "dtype": torch.float32}), cfg, device, None, timer)[2]
            ref64 = _run(argparse.Namespace(**{**vars(small), "dtype": torch.float64}), cfg, device, None, timer)[2]
        row: dict[str, Any] = {}
        for n in sizes:
            sub = dist.new_group(ranks=list(range(n))) if n > 1 else None
            if n > 1 and rank < n:
                group = HeadParallelGroup(sub, timer=timer)
                lat = _run(argparse.Namespace(**{**vars(small), "dtype": torch.float32}), cfg, device, group, timer)[2]
                if rank == 0:
                    assert ref is not None and ref64 is not None
                    base = float((ref.double() - ref64.double()).abs().max())
                    err = float((lat.double() - ref.double()).abs().max())
                    tol = 2 * base + 2 * float(((ref + 0.3 - 0.3) - ref).abs().max()) + torch.finfo(torch.float32).eps
                    row[str(n)] = {"max_abs_err": err, "tolerance": tol, "ok": err <= tol}
                    out["passed"] &= err <= tol
            dist.barrier()
        out["policies"][policy] = row
        if rank == 0:
            log.info("check %s: %s", policy, row)
    return out if rank == 0 else None


def _record(name: str, n: int, stats: list[ChunkStats], comm: list[float], wall: float) -> dict[str, Any]:
    """One measurement (rank 0's clocks): medians over the measured chunks."""
    return {
        "preset": name,
        "gpus": n,
        "ms_per_chunk": 1e3 * statistics.median(s.seconds for s in stats),
        "comm_ms_per_chunk": 1e3 * statistics.median(comm),
        "chunk_ms": [1e3 * s.seconds for s in stats],
        "comm_ms": [1e3 * c for c in comm],
        "peak_bytes": max(s.peak_bytes for s in stats),
        "cache_bytes": stats[-1].cache_bytes,
        "wall_seconds": wall,
    }


def _write(
    args: argparse.Namespace, device: torch.device, sizes: list[int], presets: list[str], runs: list[dict[str, Any]],
    seconds: float,
    check: dict[str, Any] | None,
) -> None:
    """summary.json: per preset and group size, latency, speed-up over one GPU and all-reduce time."""
    ms: dict[str, dict[str, float]] = {name: {} for name in presets}
    comm: dict[str, dict[str, float]] = {name: {} for name in presets}
    for r in runs:
        ms[r["preset"]][str(r["gpus"])] = r["ms_per_chunk"]
        comm[r["preset"]][str(r["gpus"])] = r["comm_ms_per_chunk"]
    speedup = {
        name: {g: ms[name]["1"] / v for g, v in per.items()} if "1" in per else {} for name, per in ms.items()
    }
    met = {
        name: {str(g): speedup.get(name, {}).get(str(g), 0.0) >= t for g, t in want.items() if str(g) in ms[name]}
        for name, want in TARGETS.items()
        if name in ms
    }
    record = run_record(device, " ".join(["torchrun", *sys.argv]))
    summary = {
        "device": record["environment"].get("device_name", str(device)),
        "gpus": sizes,
        "preset": presets,
        "ms_per_chunk": ms,
        "speedup_vs_1": speedup,
        "comm_ms_per_chunk": comm,
        "targets": {name: {str(g): t for g, t in want.items()} for name, want in TARGETS.items()},
        "targets_met": met,
        "config": {k: v for k, v in vars(args).items()},
        "notes": {
            "ms_per_chunk": "DiT only per chunk (4 denoising steps + the commit pass), rank 0, median over the "
            "chunks after the cache is full; random weights",
            "comm_ms_per_chunk": "time rank 0's stream waits on the group's all-reduces per chunk (CUDA events), "
            "including waiting for slower ranks",
            "max_abs_diff_vs_1": "largest difference of the head-parallel latents from the one-GPU latents",
        },
        "command": record["command"],
        "date": record["date"],
        "environment": record["environment"],
        "seconds_total": seconds,
        "check": check,
        "runs": runs,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("wrote %s", out / "summary.json")


if __name__ == "__main__":
    sys.exit(main())
