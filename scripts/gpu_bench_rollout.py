"""Long-rollout benchmark phases at Wan2.1-1.3B shapes on one GPU, each written to its own JSON + PNG.

One invocation measures one phase, so that a device call can run several and keep what finished if a later one
runs out of time. Run from the repository root, e.g.::

    PYTHONPATH=src python3 scripts/gpu_bench_rollout.py --phase long --policies sink_window --out $OUT/long_sink

Phases (all bf16, 480x832 = 1,560 tokens per latent frame, chunks of 3 latent frames, 4 denoising steps + the
commit pass, random weights, equal memory of 15 latent frames for every bounded policy):

- ``long``: rollouts of ``--frames`` latent frames (default 750, about 3,000 video frames) of the given policies,
  no dense baseline (dense cannot hold that cache), per-chunk component breakdown;
- ``history``: dense (or any policy) measured at sampled cache lengths (random K/V prefilled), for a linear
  fit that extrapolates past memory;
- ``short``: a few chunks of the given policies with components and the streaming decode (end-to-end; the Wan
  VAE, or with ``--decoder tiny`` the TAEHV-architecture tiny decoder, both with random weights);
- ``graphs``: TempCache-based policies with and without CUDA graphs (commit, AnnSA selection).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from longroll.bench.rollout import bench_rollout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phase", choices=("long", "history", "short", "graphs"), required=True)
    p.add_argument("--policies", default="sink_window", help="comma-separated policy presets")
    p.add_argument("--frames", type=int, default=None, help="latent frames generated (per phase default)")
    p.add_argument("--history", default="15,60,120,180,225", help="history phase: cache lengths in latent frames")
    p.add_argument("--decoder", choices=("wan", "tiny"), default="wan", help="short phase: decoder timed (default wan)")
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    policies = tuple(x for x in args.policies.split(",") if x)
    common = {"preset": "wan2.1-1.3b", "policies": policies, "command": " ".join(["python3", *sys.argv])}
    t0 = time.perf_counter()
    if args.phase == "long":
        report = bench_rollout(
            num_frames=args.frames or 750, include_dense=False, components=True, out_dir=args.out, **common
        )
    elif args.phase == "history":
        hist = tuple(int(x) for x in args.history.split(","))
        report = bench_rollout(
            num_frames=args.frames or 3, include_dense=False, history_frames=hist, out_dir=args.out, **common
        )
    elif args.phase == "short":
        report = bench_rollout(
            num_frames=args.frames or 30, include_dense=False, components=True, decode=True, decoder=args.decoder,
            out_dir=args.out, **common,
        )  # fmt: skip
    else:
        for graphs in ("off", "auto"):
            report = bench_rollout(
                num_frames=args.frames or 30, include_dense=False, components=True, cuda_graphs=graphs,
                out_dir=f"{args.out}/{graphs}", **common,
            )  # fmt: skip
    logging.info("phase %s done in %.0f s: %s", args.phase, time.perf_counter() - t0, report.json_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
