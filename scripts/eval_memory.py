"""The memory test of the world model in one call: every policy and TempCache layout at equal memory.

GPU run (one H200, well under 9 minutes; the shipped checkpoint unless --checkpoint)::

    PYTHONPATH=src python3 scripts/eval_memory.py --out $OUT/memory --episodes 32

CPU check (2 episodes, no probes, two policies and one layout)::

    PYTHONPATH=src .venv/bin/python scripts/eval_memory.py --out /tmp/memory --smoke

FP8 quality: the same call with ``--fp8 row`` (or ``tensor``) quantizes every block Linear of the world model;
compare its ``eval.json`` with the ``--fp8 off`` run (same episodes, noise and policies).

Protocol (:mod:`longroll.eval.memory`): held-out revisit episodes of 48 frames whose first 21 are ground truth
(the outward run and the loop's first side), the rest generated with each policy from the same context and
noise; every bounded policy holds 15 frames. Writes into ``--out``:

- ``eval.json``: exactly ``{"episodes", "families": {"revisit": {policy: {psnr_revisited, psnr_recent,
  psnr_vs_gt, psnr_vs_dense}}}, "gap_recovered": {policy: share}, "ci95":
  {"<policy>_minus_sink_window_revisited": [lo, hi]}}`` (pooled PSNRs in dB; null where infinite: identical to
  dense);
- ``details.json``: config, command, environment, per-episode scores, every paired difference against
  sink-window and dense with its bootstrap 95 % interval, per-layer recall and density, timings;
- ``table.md``: the summary table; ``eval.log``: the log.

Layout candidates (``--layouts``, ``name=base:key=value,...``; keys ``sinks``, ``recent``, ``threshold``,
``overflow``, ``group``) run after the presets, while ``--minutes`` allows.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from longroll.eval.memory import (
    COMPARED_CONFIG,
    MEMORY_PRESETS,
    MemoryEvalConfig,
    compare_runs,
    evaluate_memory,
    memory_table,
    parse_layout,
    split_report,
)
from longroll.pipeline.generate import json_safe
from longroll.world.model import load_world_model
from longroll.world.training import MEMORY_CONTEXT_FRAMES

log = logging.getLogger("eval_memory")
START = time.perf_counter()

#: The layout sweep, most informative first (later ones are skipped if --minutes runs out): the verbatim recent
#: window (3, 6, 9 of the 15 frames; the rest of the memory after the sinks holds the merged older frames) alone
#: and with no soft merges below the merge threshold at the cap (the oldest groups are evicted instead; a soft
#: merge drops the newest token's key, which costs recently seen detail), the same for ``all``; then group span,
#: thresholds, sinks (1 as the old presets had, 6) and a sink-window with one sink.
DEFAULT_LAYOUTS = (
    "tc_r3=tempcache:recent=3",
    "tc_r6=tempcache:recent=6",
    "tc_r9=tempcache:recent=9",
    "tc_r6_ov90=tempcache:recent=6,overflow=0.9",
    "tc_r9_ov90=tempcache:recent=9,overflow=0.9",
    "all_r6=all:recent=6",
    "all_r9=all:recent=9",
    "tc_r6_t95=tempcache:recent=6,threshold=0.95,overflow=0.9",
    "tc_r6_g4=tempcache:recent=6,group=4",
    "tc_ov90=tempcache:overflow=0.9",
    "all_ov90=all:overflow=0.9",
    "tc_g4=tempcache:group=4",
    "tc_t95=tempcache:threshold=0.95,overflow=0.95",
    "tc_s1=tempcache:sinks=1",
    "sw_s1=sink_window:sinks=1",
    "tc_s6=tempcache:sinks=6",
    "tc_ov90_g4=tempcache:overflow=0.9,group=4",
    "tc_t80=tempcache:threshold=0.8,overflow=0.7",
    "tc_g16=tempcache:group=16",
    "all_s6=all:sinks=6",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description="Memory test of the world model's cache policies.")
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    p.add_argument("--checkpoint", default=None, help="world-model checkpoint file or shard folder (default shipped)")
    p.add_argument("--episodes", type=int, default=32, help="held-out revisit episodes (one batch)")
    p.add_argument("--frames", type=int, default=48)
    p.add_argument("--context-frames", type=int, default=MEMORY_CONTEXT_FRAMES)
    p.add_argument("--memory-frames", type=int, default=15)
    p.add_argument("--policies", default=",".join(MEMORY_PRESETS), help="comma-separated preset names")
    p.add_argument("--layouts", default=";".join(DEFAULT_LAYOUTS), help="';'-separated layout candidates ('' none)")
    p.add_argument("--no-probe", action="store_true", help="skip per-layer recall/density (faster)")
    p.add_argument("--probe-every", type=int, default=1)
    p.add_argument("--minutes", type=float, default=8.0, help="no layout candidate starts after this")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--smoke", action="store_true", help="CPU check: 2 episodes, no probes, 1 layout")
    p.add_argument(
        "--fp8",
        choices=("off", "row", "tensor"),
        default="off",
        help="FP8 linears in the blocks (torch._scaled_mm, row or tensor scales): the quality change is the "
        "difference of this run's scores against an --fp8 off run of the same episodes",
    )
    p.add_argument(
        "--against",
        type=Path,
        help="an earlier run's folder (its details.json) of the same episodes: writes against.json/.md, the "
        "paired per-episode differences of this run against it (e.g. --fp8 row against --fp8 off)",
    )
    return p.parse_args(argv)


def _against_table(diff: dict) -> str:
    def f(x: float | None, spec: str = "+.2f") -> str:
        return "-" if x is None else format(x, spec)

    head = "| policy | score | this run | base | pooled difference | paired mean [95% CI] |"
    rows = [head, "|---|---|---|---|---|---|"]
    for p, scores in diff["policies"].items():
        for k, d in scores.items():
            ci = d["paired"]["ci95"]
            rows.append(f"| {p} | {k.removeprefix('psnr_')} | {f(d['run'], '.2f')} | {f(d['base'], '.2f')} | "
                        f"{f(d['pooled_difference'])} | {f(d['paired']['mean'])} [{f(ci[0])}, {f(ci[1])}] |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the test and write its files; returns the exit status."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    formatter = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for handler in (logging.FileHandler(args.out / "eval.log", mode="w"), logging.StreamHandler(sys.stdout)):
        handler.setFormatter(formatter)
        for name in ("eval_memory", "longroll"):
            logging.getLogger(name).addHandler(handler)
    for name in ("eval_memory", "longroll"):
        logging.getLogger(name).setLevel(logging.INFO)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # scores compare policies: keep float32 matmuls exact
    layouts_text = "tc_r3=tempcache:recent=3" if args.smoke else args.layouts
    policies = ("dense", "sink_window", "tempcache") if args.smoke else tuple(
        p.strip() for p in args.policies.split(",") if p.strip()
    )  # fmt: skip
    cfg = MemoryEvalConfig(
        policies=policies,
        layouts=tuple(parse_layout(t) for t in layouts_text.split(";") if t.strip()),
        episodes=2 if args.smoke else args.episodes,
        frames=args.frames,
        context_frames=args.context_frames,
        memory_frames=args.memory_frames,
        probe=not (args.no_probe or args.smoke),
        probe_every=args.probe_every,
        resamples=1000 if args.smoke else 10_000,
    )
    base = None
    if args.against is not None:  # refused before the run, not after it
        path = args.against / "details.json"
        if not path.is_file():
            raise SystemExit(f"--against {args.against}: no details.json there")
        base = json.loads(path.read_text())
        for key in COMPARED_CONFIG:
            if base.get("config", {}).get(key) != getattr(cfg, key):
                raise SystemExit(f"--against {args.against}: its {key} is {base.get('config', {}).get(key)!r}, "
                                 f"this run's {getattr(cfg, key)!r}")  # fmt: skip
    dtype = getattr(torch, args.dtype)
    model = load_world_model(args.checkpoint, device=device, dtype=dtype)
    if args.fp8 != "off":
        model.quantize_fp8(args.fp8)
    log.info("device %s (%s), torch %s; %d episodes; policies %s; layouts %s", device,
             torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", torch.__version__,
             cfg.episodes, ",".join(cfg.policies), ",".join(c.name for c in cfg.layouts))  # fmt: skip
    budget = max(0.0, args.minutes * 60 - (time.perf_counter() - START))
    report = evaluate_memory(model, cfg, device=device, time_budget_s=budget)
    report["details"]["model"] = {"checkpoint": args.checkpoint or "shipped", "dtype": args.dtype, "fp8": args.fp8}
    summary, details = split_report(json_safe(report))
    (args.out / "eval.json").write_text(json.dumps(summary, indent=1) + "\n")
    (args.out / "details.json").write_text(json.dumps(details, indent=1) + "\n")
    (args.out / "table.md").write_text(memory_table(json_safe(report)))
    if base is not None:
        diff = compare_runs(details, base)
        diff["base"] = str(args.against)
        (args.out / "against.json").write_text(json.dumps(diff, indent=1) + "\n")
        (args.out / "against.md").write_text(_against_table(diff))
        log.info("against %s:\n%s", args.against, _against_table(diff))
    log.info("summary: %s", json.dumps(summary))
    log.info("total %.1f s", time.perf_counter() - START)
    return 0


if __name__ == "__main__":
    sys.exit(main())
