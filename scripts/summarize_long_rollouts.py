"""Summarise the H100 long-rollout runs in ``results/gpu/long_rollout`` against the project's targets.

    python3 scripts/summarize_long_rollouts.py [--dir results/gpu/long_rollout]

Reads the JSON written by ``scripts/gpu_bench_rollout.py`` (750-frame rollouts of the bounded policies, 60-frame
runs of the others, dense at sampled cache lengths, a decode run) and writes ``summary.json``, ``summary.png``
and ``summary.md`` (the README table) into the same folder. Dense at 3,000 video frames is *extrapolated*: a
least-squares line through its per-chunk cost at the sampled cache lengths (it runs out of memory past ~130
latent frames on one H100); every figure that depends on it says so.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

#: Video frames per latent frame (Wan VAE) and latent frames per chunk in these runs.
TEMPORAL, FPC = 4, 3
#: The reference points, in latent frames: 240 and 3,000 video frames.
AT_240, AT_3000 = 60, 750
OVERHEAD = ("ann_select", "ann_plan", "cache_commit")


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _chunks(data: dict[str, Any], policy: str) -> list[dict[str, Any]]:
    return [r for r in data["chunks"] if r["policy"] == policy and r["measured"]]


def _at(chunks: list[dict[str, Any]], frames: int) -> dict[str, Any]:
    """The chunk that ends at ``frames`` latent frames (or the last one before)."""
    return max((r for r in chunks if r["frames_generated"] <= frames), key=lambda r: r["frames_generated"])


def policy_summary(
    chunks: list[dict[str, Any]], dense_fit: tuple[float, float, int], decode_s: float
) -> dict[str, Any]:
    """Latency, flatness, memory, overhead and speed-up figures of one policy's rollout; ``dense_fit`` is
    (intercept s, slope s per history frame, largest measured history)."""
    secs = [r["seconds"] for r in chunks]
    last = statistics.median(secs[-3:])
    first = secs[0]
    at240 = _at(chunks, AT_240)
    comps: dict[str, list[float]] = {}
    for r in chunks[2:]:  # past the warm-up and first-capture chunks
        for name, value in (r["components"] or {}).items():
            comps.setdefault(name, []).append(value)
    med = {name: statistics.median(v) for name, v in comps.items()}
    warm = statistics.median(secs[2:]) if len(secs) > 2 else last
    overhead = sum(med.get(name, 0.0) for name in OVERHEAD)
    frames = chunks[-1]["frames_generated"]
    a, b, _ = dense_fit
    dense_last = a + b * (frames - FPC)  # the last chunk sees frames - FPC frames of history
    out = {
        "frames": frames,
        "ms_first_chunk": 1e3 * first,
        "ms_at_240_video_frames": 1e3 * at240["seconds"],
        "ms_last3": 1e3 * last,
        "ms_max": 1e3 * max(secs),
        "last_over_first": last / first,
        "last_over_240": last / at240["seconds"],
        "peak_gib_at_240": at240["peak_bytes"] / 2**30,
        "peak_gib_last": chunks[-1]["peak_bytes"] / 2**30,
        "peak_last_over_240": chunks[-1]["peak_bytes"] / at240["peak_bytes"],
        "cache_gib": chunks[-1]["cache_bytes"] / 2**30,
        "components_ms": {k: 1e3 * v for k, v in med.items()},
        "overhead_share": overhead / warm,
        "fps_video_dit": TEMPORAL * FPC / last,
        "fps_video_e2e": TEMPORAL * FPC / (last + decode_s),
        "dense_ms_at_end": 1e3 * dense_last,
        "dense_at_end_extrapolated": frames - FPC > dense_fit[2],
        "speedup_dit_vs_dense": dense_last / last,
        "speedup_e2e_vs_dense": (dense_last + decode_s) / (last + decode_s),
    }
    return out


def plot(
    path: Path, runs: dict[str, list[dict[str, Any]]], dense: dict[str, Any], fit: tuple[float, float, int]
) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax_t, ax_m = fig.subplots(1, 2)
    for name, chunks in runs.items():
        x = [TEMPORAL * r["frames_generated"] for r in chunks]
        line = ax_t.plot(x, [1e3 * r["seconds"] for r in chunks], lw=1, label=name)[0]
        ax_m.plot(x, [r["peak_bytes"] / 2**30 for r in chunks], lw=1, color=line.get_color(), label=name)
    pts = [r for r in dense["chunks"] if r["measured"]]
    hx = [TEMPORAL * (r["history_frames"] + r["frames_generated"]) for r in pts]
    ax_t.plot(hx, [1e3 * r["seconds"] for r in pts], "ko", ms=4, label="dense (measured)")
    ax_m.plot(hx, [r["peak_bytes"] / 2**30 for r in pts], "ko", ms=4, label="dense (measured)")
    xs = [0, TEMPORAL * AT_3000]
    ax_t.plot(
        xs, [1e3 * (fit[0] + fit[1] * x / TEMPORAL) for x in xs], "k--", lw=1, label="dense (linear fit, extrap.)"
    )
    ax_m.axhline(79.6, color="r", lw=0.8, ls=":", label="H100 memory")
    ax_t.set(xlabel="video frames generated", ylabel="DiT ms per chunk (12 video frames)", yscale="log",
             title="per-chunk latency, Wan2.1-1.3B shapes, H100")  # fmt: skip
    ax_m.set(xlabel="video frames generated", ylabel="GiB", title="peak CUDA memory")
    for ax in (ax_t, ax_m):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def table(summary: dict[str, Any]) -> str:
    rows = [
        "| policy | video frames run | ms/chunk at 240 / at end | end / first chunk | end / at 240 | peak GiB at "
        "240 / at end | ANN + plan + commit | vs sink-window | DiT x vs dense | e2e x vs dense |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s in summary["policies"].items():
        star = "*" if s["dense_at_end_extrapolated"] else ""
        rows.append(
            f"| {name} | {TEMPORAL * s['frames']:,} | {s['ms_at_240_video_frames']:.0f} / {s['ms_last3']:.0f} | "
            f"{s['last_over_first']:.2f} | {s['last_over_240']:.2f} | "
            f"{s['peak_gib_at_240']:.1f} / {s['peak_gib_last']:.1f} | {100 * s['overhead_share']:.0f} % | "
            f"{s['latency_over_sink_window']:.2f} | {s['speedup_dit_vs_dense']:.1f}{star} | "
            f"{s['speedup_e2e_vs_dense']:.1f}{star} |"
        )
    d = summary["dense"]
    rows.append(
        f"| dense (cuDNN) | sampled to {TEMPORAL * d['max_measured_history']:,} | "
        f"{d['ms_at_240_video_frames']:.0f} / {d['ms_at_3000_extrapolated']:.0f}* | — | — | "
        f"{d['peak_gib_at_240']:.1f} / OOM | — | — | 1 | 1 |"
    )
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path("results/gpu/long_rollout"))
    args = p.parse_args(argv)
    d = args.dir
    dense = _load(d / "dense_history.json")
    fit_s = dense["summary"]["dense"]
    dense_pts = [r for r in dense["chunks"] if r["measured"]]
    fit = (fit_s["fit_intercept_s"], fit_s["fit_slope_s_per_frame"], max(r["history_frames"] for r in dense_pts))
    decode = _load(d / "decode_12.json")
    decode_s = statistics.median(v["median_decode_seconds"] for v in decode["summary"].values())
    runs: dict[str, list[dict[str, Any]]] = {}
    for name in ("sink_window", "tempcache", "all"):
        runs[name] = _chunks(_load(d / f"{name}_750.json"), name)
    short = _load(d / "policies_60.json")
    for name in short["summary"]:
        if name not in runs:
            runs[name] = _chunks(short, name)
    at240 = next(r for r in dense_pts if r["history_frames"] == AT_240)
    summary: dict[str, Any] = {
        "device": dense["environment"]["device_name"],
        "environment": dense["environment"],
        "sources": sorted(p.name for p in d.glob("*.json") if p.name != "summary.json"),
        "decode_seconds_per_chunk": decode_s,
        "dense": {
            "fit_intercept_s": fit[0],
            "fit_slope_s_per_latent_frame": fit[1],
            "max_measured_history": fit[2],
            "ms_at_240_video_frames": 1e3 * at240["seconds"],
            "peak_gib_at_240": at240["peak_bytes"] / 2**30,
            "ms_at_3000_extrapolated": 1e3 * (fit[0] + fit[1] * (AT_3000 - FPC)),
            "status": fit_s["status"],
        },
        "policies": {name: policy_summary(ch, fit, decode_s) for name, ch in runs.items()},
        "notes": {
            "dense": "measured at sampled cache lengths (random K/V prefill), extrapolated linearly past memory",
            "e2e": "DiT seconds per chunk + the streaming Wan2.1 VAE decode of the chunk (random weights, bf16)",
            "overhead_share": "(ann_select + ann_plan + cache_commit) / median warm chunk time",
            "runs": "sink_window, tempcache, all: 750 latent frames; the others 60 latent frames",
            "speedups": "dense at the same length; * = past dense's memory, from the linear fit",
        },
    }
    sink = summary["policies"]["sink_window"]["ms_last3"]
    for s in summary["policies"].values():
        s["latency_over_sink_window"] = s["ms_last3"] / sink
    (d / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (d / "summary.md").write_text(table(summary))
    plot(d / "summary.png", runs, dense, fit)
    print(table(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
