"""Equal memory, less time: every bounded policy against sink + window at the same cache size, in one process.

GPU run (one call, H200, about 7 minutes at the default 750 latent frames = 3,000 video frames):
    PYTHONPATH=src python3 scripts/gpu_bench_equal_memory.py --out $OUT/equal_memory

CPU smoke run (tiny preset, a few frames; checks the script end to end, times nothing meaningful):
    PYTHONPATH=src python3 scripts/gpu_bench_equal_memory.py --smoke --out /tmp/equal_memory

Two measurements per policy, same model, context, noise and cache size (``--memory-frames`` latent frames):

1. latency and memory: a rollout of ``--frames`` latent frames without component timers (no extra syncs);
   ``ms_per_chunk`` is the median of the last ``--last`` chunks, ``peak_gib`` the largest per-chunk peak;
2. overhead share: a short rollout (``--components-frames``) with CUDA-event timers around the ANN selection,
   the AnnSA plan and the cache commit, run in line (``overlap_commit="off"``, so that the spans add up to the
   chunk); ``overhead_share`` = their sum over the chunk time (median over the second half of the chunks, where
   the cache is at its cap and its commit captured). The timers sync, so
   these chunks are not used for latency. The latency run overlaps commits and plans with the commit pass on a
   side stream (the default); ``--no-overlap`` turns that off there too.

Writes ``summary.json`` with the keys ``device, versions, date, command, policies.<name>.{ms_per_chunk, peak_gib,
overhead_share}, ratios.{all_vs_sink_window, tempcache_vs_sink_window}`` (plus the raw reports), and
``summary.png`` (per-chunk latency and peak memory against video frames).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path
from typing import Any

from longroll.bench.rollout import RolloutBenchConfig, plot_report, run_rollout_bench

OVERHEAD = ("ann_select", "ann_plan", "cache_commit")


def policy_summary(latency: dict[str, Any], comps: dict[str, Any], policy: str, last: int) -> dict[str, Any]:
    """Median latency of the last chunks, peak memory and the ANN + plan + commit share of one policy."""
    chunks = [c for c in latency["chunks"] if c["policy"] == policy and c.get("measured", True) and c["seconds"]]
    tail = chunks[-last:]
    ms = statistics.median(c["seconds"] for c in tail) * 1e3
    peak = max(c["peak_bytes"] or 0 for c in chunks) / 2**30
    # Steady state only: the second half of the timed run (the cache is at its cap and its commit captured).
    timed = [c for c in comps["chunks"] if c["policy"] == policy and c.get("components") and c["seconds"]]
    steady = timed[len(timed) // 2 :]
    shares = [sum(c["components"].get(k, 0.0) for k in OVERHEAD) / c["seconds"] for c in steady]
    return {
        "ms_per_chunk": ms,
        "peak_gib": peak,
        "overhead_share": statistics.median(shares) if shares else None,
        "chunks_in_median": len(tail),
        "first_chunk_ms": chunks[0]["seconds"] * 1e3,
        "components_ms": {
            k: statistics.median(c["components"].get(k, 0.0) for c in steady) * 1e3
            for k in ("attention", "cross_attention", *OVERHEAD)
        }
        if steady
        else {},
    }


def build_summary(
    latency: dict[str, Any], comps: dict[str, Any], policies: tuple[str, ...], last: int, components_frames: int,
    command: str,
) -> dict[str, Any]:
    """The acceptance summary of a latency run and a components run (the records of ``run_rollout_bench``)."""
    env, cfg = latency["environment"], latency["config"]
    summary: dict[str, Any] = {
        "device": env.get("device_name"),
        "versions": env.get("versions"),
        "date": latency["date"],
        "command": command,
        "config": {
            "preset": cfg["preset"],
            "latent_frames": cfg["num_frames"],
            "video_frames": 4 * cfg["num_frames"],
            "memory_frames": cfg["memory_frames"],
            "last_chunks": last,
            "components_frames": components_frames,
            "overlap_commit": cfg["overlap_commit"],
            "group_commits": cfg["group_commits"],
            "attention_backend": cfg.get("attention_backend", "auto"),
        },
        "policies": {name: policy_summary(latency, comps, name, last) for name in policies},
    }
    base = summary["policies"]["sink_window"]
    summary["ratios"] = {
        f"{name}_vs_sink_window": summary["policies"][name]["ms_per_chunk"] / base["ms_per_chunk"]
        for name in policies
        if name != "sink_window"
    }
    summary["peak_vs_sink_window"] = {
        name: summary["policies"][name]["peak_gib"] / base["peak_gib"] if base["peak_gib"] else None
        for name in policies
    }
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--policies", default="sink_window,tempcache,all")
    p.add_argument("--frames", type=int, default=750, help="latent frames of the latency rollout")
    p.add_argument("--components-frames", type=int, default=90, help="latent frames of the timed-components run")
    p.add_argument("--last", type=int, default=50, help="chunks in the latency median (the last ones)")
    p.add_argument("--memory-frames", type=int, default=15)
    p.add_argument("--no-overlap", action="store_true", help="commits in line in the latency run too")
    p.add_argument("--group-commits", default="off",
                   help="'off' (per layer), 'auto' (every layer in one batched call) or N layers per batched call")
    p.add_argument("--attention-backend", default="auto",
                   help="every policy's dense attention route, e.g. 'fa4' (flash-attn-4) on both sides")
    p.add_argument("--smoke", action="store_true", help="tiny preset on the CPU, a few frames")
    p.add_argument("--from-runs", action="store_true",
                   help="no rollout: rebuild summary.json and summary.png from the latency_run.json and "
                        "components_run.json already in --out (the runs' own command is recorded)")
    args = p.parse_args(argv)
    if args.from_runs:
        out = Path(args.out)
        latency = json.loads((out / "latency_run.json").read_text())
        comps = json.loads((out / "components_run.json").read_text())
        names = tuple(latency["config"]["policies"])
        frames = comps["config"]["num_frames"]
        summary = build_summary(latency, comps, names, args.last, frames, latency["command"])
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        plot_report(latency, out / "summary.png")
        print(json.dumps(summary["ratios"]))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    policies = tuple(x for x in args.policies.split(",") if x)
    if "sink_window" not in policies:
        raise SystemExit("--policies must include sink_window (the baseline of the ratios)")
    preset = "wan2.1-1.3b"
    if args.smoke:
        preset, args.frames, args.components_frames, args.last = "tiny", 9, 6, 2
        args.memory_frames = min(args.memory_frames, 6)
    gc: str | int = int(args.group_commits) if args.group_commits.isdigit() else args.group_commits
    command = " ".join(["python3", *sys.argv])
    common: dict[str, Any] = {"preset": preset, "policies": policies, "include_dense": False,
                              "memory_frames": args.memory_frames,
                              "group_commits": gc, "attention_backend": args.attention_backend}  # fmt: skip
    overlap = "off" if args.no_overlap else "auto"
    latency = run_rollout_bench(
        RolloutBenchConfig(num_frames=args.frames, overlap_commit=overlap, **common), command=command
    )
    comps = run_rollout_bench(
        RolloutBenchConfig(num_frames=args.components_frames, components=True, overlap_commit="off", **common),
        command=command,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = build_summary(latency, comps, policies, args.last, args.components_frames, command)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "latency_run.json").write_text(json.dumps(latency, indent=1))
    (out / "components_run.json").write_text(json.dumps(comps, indent=1))
    plot_report(latency, out / "summary.png")
    for name, s in summary["policies"].items():
        share = "-" if s["overhead_share"] is None else f"{s['overhead_share']:.3f}"
        print(f"{name:12s} {s['ms_per_chunk']:8.1f} ms/chunk  peak {s['peak_gib']:6.2f} GiB  overhead {share}")
    print(json.dumps(summary["ratios"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
