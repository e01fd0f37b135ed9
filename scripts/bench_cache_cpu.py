"""CPU benchmark of the cache policies (not a test): commit cost per frame, attention time vs cache length,
and recall/density/error of TempCache on synthetic video-like K/V with 3-D RoPE.

    python scripts/bench_cache_cpu.py --frames 96 --out results/cache_cpu
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from longroll.bench.cache_policies import CacheBenchConfig, as_table, plot, report_header, run, to_json
from longroll.eval.synthetic import SceneConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--frames", type=int, default=96)
    ap.add_argument("--tokens-per-frame", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--memory-frames", type=int, default=12)
    ap.add_argument("--out", type=Path, default=Path("results/cache_cpu"))
    a = ap.parse_args()
    scene = SceneConfig(tokens_per_frame=a.tokens_per_frame, width=16, heads=a.heads, head_dim=64)
    cfg = CacheBenchConfig(frames=a.frames, scene=scene, memory_frames=a.memory_frames, probe_every=4)
    results = run(cfg)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "cache_policies.json").write_text(
        json.dumps(report_header() | {"config": repr(cfg), "results": to_json(results)}, indent=1)
    )
    plot(results, a.out / "cache_policies.png")
    print(as_table(results))


if __name__ == "__main__":
    main()
