"""Where the time of one steady-state chunk goes: a torch.profiler trace of one chunk per policy at
Wan2.1-1.3B shapes (random weights, bf16, 480x832, chunks of 3 latent frames, 4 steps + commit, 15-frame
memory), and the streaming Wan2.1 VAE decode of a chunk with and without cuDNN autotuning.

    PYTHONPATH=src python3 scripts/gpu_profile_chunk.py --out $OUT/profile --policies all,tempcache,sink_window

Writes ``profile.json`` (per policy: chunk wall time, top CUDA kernels by total time with their counts, kernel
launches per chunk, CPU-side op counts; decode timings) and ``<policy>_kernels.txt`` tables.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from longroll.models.wan import CausalWanModel, WanConfig
from longroll.pipeline.record import environment_info
from longroll.pipeline.rollout import RolloutConfig, RolloutEngine
from longroll.pipeline.sampler import SamplerConfig
from longroll.policies.cached import CachedProcessor

FPC = 3
#: (preset, tokens per frame, latent shape, device) of the real run and of the CPU smoke run.
REAL = ("wan2.1-1.3b", 1560, (16, 60, 104), "cuda")
SMOKE = ("tiny", 16, (16, 8, 8), "cpu")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def profile_policy(
    model: CausalWanModel, wan: WanConfig, context: torch.Tensor, policy: str, chunks: int, geometry: tuple
) -> dict:
    """Roll out ``chunks`` chunks and profile the last one."""
    _, tpf, latent, device = geometry
    proc = CachedProcessor.for_model(policy, wan, tokens_per_frame=tpf, frames_per_chunk=FPC,
                                     dtype=context.dtype, device=device, memory_frames=15)  # fmt: skip
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    prof = profile(activities=activities)
    walls: list[float] = []

    def on_chunk(i: int, lat: torch.Tensor, st: Any) -> None:
        walls.append(st.seconds)
        if i == chunks - 2:
            _sync()
            prof.start()
        elif i == chunks - 1:
            _sync()
            prof.stop()

    cfg = RolloutConfig(chunks * FPC, FPC, latent, SamplerConfig(), seed=0)
    RolloutEngine(model, proc, cfg).run(context, on_chunk=on_chunk, dtype=context.dtype)
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in kernels)
    top = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:25]
    ops = [e for e in events if e.key.startswith("aten::")]
    return {
        "chunk_ms_last": 1e3 * walls[-1],
        "chunk_ms_median_warm": 1e3 * statistics.median(walls[1:-1]),
        "cuda_kernel_ms_total_profiled_chunk": total / 1e3,
        "kernel_launches": sum(e.count for e in kernels),
        "aten_ops": sum(e.count for e in ops),
        "top_kernels": [{"name": e.key[:120], "count": e.count, "ms": e.self_device_time_total / 1e3} for e in top],
        "table": events.table(
            sort_by="self_cuda_time_total" if device == "cuda" else "self_cpu_time_total",
            row_limit=30,
            max_name_column_width=70,
        ),
    }


def time_decode(benchmark: bool, chunks: int = 6) -> dict:
    from diffusers import AutoencoderKLWan

    from longroll.pipeline.vae import LatentDecoder

    torch.backends.cudnn.benchmark = benchmark
    dec = LatentDecoder(AutoencoderKLWan(), device="cuda", dtype=torch.bfloat16)
    secs = []
    for _ in range(chunks):
        z = torch.randn(1, 16, FPC, 60, 104, device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dec.decode_chunk_float(z)
        torch.cuda.synchronize()
        secs.append(time.perf_counter() - t0)
    torch.backends.cudnn.benchmark = False
    return {"cudnn_benchmark": benchmark, "seconds": secs, "median_warm_s": statistics.median(secs[2:])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="profile one steady-state chunk per policy")
    p.add_argument("--out", required=True)
    p.add_argument("--policies", default="all,tempcache,sink_window")
    p.add_argument("--chunks", type=int, default=10, help="chunks rolled out per policy (the last is profiled)")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU, to check the script")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    geometry = SMOKE if args.smoke else REAL
    name, _, _, device = geometry
    dtype = torch.float32 if args.smoke else torch.bfloat16
    wan = WanConfig.from_preset(name)
    torch.manual_seed(0)
    with torch.device(device):
        model = CausalWanModel(wan).to_inference_dtype(dtype).eval()
    context = torch.randn(1, 512, wan.text_dim, device=device).to(dtype)
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python3", *sys.argv]),
        "environment": environment_info(torch.device(device)),
        "policies": {},
    }
    for policy in args.policies.split(","):
        res = profile_policy(model, wan, context, policy, args.chunks, geometry)
        (out / f"{policy}_kernels.txt").write_text(res.pop("table"))
        report["policies"][policy] = res
        print(policy, {k: v for k, v in res.items() if k != "top_kernels"}, flush=True)
    try:
        if args.smoke:
            raise ImportError("not in --smoke")
        report["decode"] = [time_decode(False), time_decode(True)]
        print("decode", [(d["cudnn_benchmark"], round(d["median_warm_s"], 4)) for d in report["decode"]])
    except ImportError as err:
        report["decode"] = f"skipped: {err}"
    (out / "profile.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
