"""Needle benchmark of the host tier on the CPU (not a test): recall of a key block planted N latent frames ago,
long evicted from the device cache, for queries aligned with it; writes JSON.

    python scripts/bench_needle.py --out results/needle --n 20,100,1000,3000 --seeds 4
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

from longroll.bench.needle import NeedleConfig, needle_sweep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("results/needle"))
    ap.add_argument("--n", default="20,100,1000,3000", help="comma-separated frames ago")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--policies", default="sink_window,tempcache")
    ap.add_argument("--top-blocks", type=int, default=4)
    a = ap.parse_args()
    n_agos = [int(x) for x in a.n.split(",") if x.strip()]
    report: dict[str, object] = {
        "command": " ".join(["python3", *sys.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "environment": {"device": "cpu", "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
                        "python": platform.python_version(), "machine": platform.machine()},
        "note": "recall is the share of the needle's host entries that the last commit's selection retrieves; "
        "ms_per_frame is wall time per latent frame of the whole loop (shared CPU: indicative only)",
    }  # fmt: skip
    for name in (p.strip() for p in a.policies.split(",") if p.strip()):
        cfg = NeedleConfig(policy=name, top_blocks=a.top_blocks)  # type: ignore[arg-type]
        sweep = report[name] = needle_sweep(cfg, n_agos, a.seeds)
        for row in sweep["results"]:
            print(
                f"{name:12s} N={row['n_frames_ago']:5d} recall={row['recall_mean']:.3f} "
                f"(min {row['recall_min']:.3f}, {row['trials']} trials) {row['ms_per_frame']:.2f} ms/frame"
            )
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "needle.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
