"""The host tier at scale: GPU memory, per-chunk latency and host memory of a rollout with a host tier under the
cache, against the same policy without it, plus the needle check on the device, in one process.

GPU run (one call, H200; two rollouts of ``--frames`` latent frames at Wan2.1-1.3B shapes, random weights):
    PYTHONPATH=src python3 scripts/gpu_bench_retrieval.py --out $OUT/retrieval

CPU smoke run (tiny preset, a few frames; checks the script end to end, times nothing meaningful):
    PYTHONPATH=src python3 scripts/gpu_bench_retrieval.py --smoke --out /tmp/retrieval

Measured:

1. ``latency_vs_no_tier``: median chunk time of the last ``--last`` chunks with the tier over the same without;
2. ``gpu_peak_last_over_first``: the peak allocated GPU memory of the last chunk over that of the first chunk
   with the tier (the tier's device part is allocated up front: flat by construction, measured here);
3. ``host_bytes_per_frame``: pinned host bytes of every layer's tier over the latent frames of history its budget
   holds (``host_bytes_total`` too); records are padded when a commit evicts fewer entries than a chunk's tokens
   (TempCache at its cap), so a TempCache tier holds fewer entries than its bytes could;
4. ``needle``: recall of a key block planted 3,000 latent frames ago (tiny geometry) on this device.

``revisit_psnr_below_dense_db`` comes from the world-model memory test (``scripts/eval_memory.py`` with a
``host=`` layout), not from this run: it is written as null here.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from longroll.bench.needle import NeedleConfig, needle_sweep
from longroll.bench.rollout import RolloutBenchConfig, run_rollout_bench
from longroll.cache.host_tier import HostTierConfig, host_tier_bytes
from longroll.models.wan import WanConfig
from longroll.policies.config import preset as preset_policy


def _chunks(report: dict[str, Any], policy: str) -> list[dict[str, Any]]:
    return [c for c in report["chunks"] if c["policy"] == policy and c.get("measured", True) and c["seconds"]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--policy",
        default="tempcache",
        choices=("tempcache", "tempcache_lsh", "sink_window", "retrieval"),
        help="retrieval: the preset with its own tier (--host-frames, --block-tokens, --top-blocks unused) "
        "against its cache alone",
    )
    p.add_argument("--frames", type=int, default=750, help="latent frames per rollout (750 = 3,000 video frames)")
    p.add_argument("--memory-frames", type=int, default=15)
    p.add_argument("--host-frames", type=int, default=60, help="latent frames of evicted entries held on the host")
    p.add_argument("--block-tokens", type=int, default=120, help="entries per host block (divides a chunk)")
    p.add_argument("--top-blocks", type=int, default=16)
    p.add_argument("--last", type=int, default=50)
    p.add_argument("--needle-frames", type=int, default=3000)
    p.add_argument("--smoke", action="store_true", help="tiny preset on the CPU, a few frames")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    preset = "wan2.1-1.3b"
    if args.smoke:
        preset, args.frames, args.last, args.needle_frames, args.top_blocks = "tiny", 12, 2, 60, 2
        args.memory_frames, args.host_frames = min(args.memory_frames, 6), min(args.host_frames, 12)
    command = " ".join(["python3", *sys.argv])
    base: dict[str, Any] = {"preset": preset, "policies": (args.policy,), "include_dense": False,
                            "memory_frames": args.memory_frames, "num_frames": args.frames}  # fmt: skip
    probe = RolloutBenchConfig(**base)
    wan = WanConfig.from_preset(preset)
    tpf = wan.tokens_per_frame(*probe.latent_hw)
    chunk = tpf * probe.frames_per_chunk
    if args.policy == "retrieval":
        own = preset_policy("retrieval", tokens_per_frame=tpf, frames_per_chunk=probe.frames_per_chunk,
                            memory_frames=args.memory_frames).host_tier  # fmt: skip
        assert own is not None
        tier, block = own, own.block_tokens
        plain = run_rollout_bench(RolloutBenchConfig(**base, drop_host_tier=True), command=command)
        tiered = run_rollout_bench(RolloutBenchConfig(**base), command=command)
    else:
        block = math.gcd(args.block_tokens, chunk)
        tier = HostTierConfig(args.host_frames * tpf, block_tokens=block, top_blocks=args.top_blocks)
        plain = run_rollout_bench(RolloutBenchConfig(**base), command=command)
        tiered = run_rollout_bench(RolloutBenchConfig(**base, host_tier=tier), command=command)
    a, b = _chunks(plain, args.policy), _chunks(tiered, args.policy)
    ms_plain = statistics.median(c["seconds"] for c in a[-args.last :]) * 1e3
    ms_tier = statistics.median(c["seconds"] for c in b[-args.last :]) * 1e3
    first, last = b[0]["peak_bytes"], b[-1]["peak_bytes"]
    first_plain, last_plain = a[0]["peak_bytes"], a[-1]["peak_bytes"]
    peak_plain = max((c["peak_bytes"] or 0) for c in a)
    peak_tier = max((c["peak_bytes"] or 0) for c in b)
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    # The bench's default dtype: bf16 on CUDA, fp32 on the CPU.
    dtype_size = 2 if device == "cuda" else 4
    host_total = wan.num_layers * host_tier_bytes(
        tier, batch=1, heads=wan.num_heads, head_dim=wan.head_dim, v_dim=wan.head_dim, chunk_tokens=chunk,
        itemsize=dtype_size,
    )  # fmt: skip
    held_frames = tier.records(chunk) * probe.frames_per_chunk
    needle = {
        name: needle_sweep(NeedleConfig(policy=name), [args.needle_frames], seeds=2, device=device)["results"][0]
        for name in ("sink_window", "tempcache")
    }
    env = tiered["environment"]
    summary: dict[str, Any] = {
        "device": env.get("device_name"),
        "versions": env.get("versions"),
        "date": tiered["date"],
        "command": command,
        "config": {
            "preset": preset,
            "policy": args.policy,
            "latent_frames": args.frames,
            "video_frames": 4 * args.frames,
            "memory_frames": args.memory_frames,
            "host_tier": {
                "host_budget_tokens": tier.host_budget_tokens,
                "block_tokens": block,
                "top_blocks": tier.top_blocks,
                "held_latent_frames": held_frames,
            },
            "last_chunks": args.last,
        },
        "gpu_peak_last_over_first": (last / first) if first and last else None,
        "gpu_peak_last_over_first_no_tier": (last_plain / first_plain) if first_plain and last_plain else None,
        "gpu_peak_vs_no_tier": (peak_tier / peak_plain) if peak_plain else None,
        "gpu_peak_first_gib": first / 2**30 if first else None,
        "gpu_peak_last_gib": last / 2**30 if last else None,
        "latency_vs_no_tier": ms_tier / ms_plain,
        "ms_per_chunk": {"no_tier": ms_plain, "host_tier": ms_tier},
        "host_bytes_total": host_total,
        "host_bytes_per_frame": host_total / held_frames,
        "host_bytes_per_frame_unit": "bytes of pinned host memory per latent frame of evicted history held",
        "needle": needle,
        "revisit_psnr_below_dense_db": None,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "no_tier_run.json").write_text(json.dumps(plain, indent=1))
    (out / "host_tier_run.json").write_text(json.dumps(tiered, indent=1))
    print(json.dumps({k: summary[k] for k in ("gpu_peak_last_over_first", "latency_vs_no_tier",
                                               "host_bytes_per_frame")}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
