"""``longroll demo``: a short CPU rollout of every cache policy on a synthetic video-like scene.

It prints a summary table and writes ``cache_policies.json`` and ``cache_policies.png`` (attention time,
memory and error vs generated frames) under the output folder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from longroll.bench.cache_policies import CacheBenchConfig, PolicyResult, as_table, report_header, run, to_json

log = logging.getLogger(__name__)


def plot(results: list[PolicyResult], path: Path) -> None:
    """Attention time, cache MiB and relative error vs frames, one line per policy (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for r in results:
        x = [p.frames for p in r.probes]
        axes[0].plot(x, [p.attention_ms for p in r.probes], marker="o", label=r.name)
        axes[1].plot(x, [p.bytes / 2**20 for p in r.probes], marker="o", label=r.name)
        axes[2].plot(x, [p.rel_l2 for p in r.probes], marker="o", label=r.name)
    for ax, title in zip(
        axes, ("attention ms (one layer, CPU)", "cache MiB (one layer)", "rel. L2 vs full cache"), strict=True
    ):
        ax.set_title(title)
        ax.set_xlabel("generated latent frames")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(out_dir: Path, device: str | None = None, frames: int = 48) -> tuple[str, list[Path]]:
    """Run the demo; returns the summary table and the files written. ``device`` is accepted for CLI
    symmetry; the synthetic cache benchmark runs on the CPU."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = CacheBenchConfig(frames=frames)
    results = run(cfg)
    files = [out_dir / "cache_policies.json", out_dir / "cache_policies.png"]
    files[0].write_text(json.dumps(report_header() | {"config": repr(cfg), "results": to_json(results)}, indent=1))
    plot(results, files[1])
    log.info("wrote %s", out_dir)
    return as_table(results), files
