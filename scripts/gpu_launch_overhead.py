"""Host time of one block-sparse attention call, and where it goes (GPU; Wan2.1-1.3B shapes).

Times ``--calls`` back-to-back calls without synchronising (host enqueue time per call) and with a final
synchronise (wall per call), for the autotuned and a forced configuration, the ops entry point and the bare
kernel launcher; then profiles the autotuned entry point with cProfile. Writes JSON to ``--out``.

    PYTHONPATH=src python3 scripts/gpu_launch_overhead.py --out $OUT/overhead.json
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import platform
import pstats
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--lk", type=int, default=4680)
    p.add_argument("--density", type=float, default=0.1)
    args = p.parse_args()
    import torch
    import triton

    from longroll.kernels import block_sparse_fwd as kernels
    from longroll.ops.block_index import BlockSparseIndex
    from longroll.ops.block_sparse import block_sparse_attention

    dev = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    b, h, lq, d, blk = 1, 12, 4680, 128, 128
    q = torch.randn(b, h, lq, d, generator=g).to(dev, torch.bfloat16)
    k = torch.randn(b, h, args.lk, d, generator=g).to(dev, torch.bfloat16)
    v = torch.randn(b, h, args.lk, d, generator=g).to(dev, torch.bfloat16)
    bias = torch.rand(b, h, args.lk, generator=g).to(dev)
    nqb, nkb = -(-lq // blk), -(-args.lk // blk)
    keep = max(1, round(args.density * nkb))
    rank = torch.rand(b, h, nqb, nkb, generator=g).argsort(-1).argsort(-1)
    idx = BlockSparseIndex.from_dense(rank < keep, blk, blk, lq, args.lk).to(dev)
    out, lse = torch.empty_like(q), torch.empty(b, h, lq, device=dev)
    num, ids = idx.kv_num_blocks, idx.kv_indices
    t64 = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}

    calls = {
        "ops_autotuned": lambda: block_sparse_attention(q, k, v, idx, bias, backend="triton"),
        "ops_forced_t64": lambda: block_sparse_attention(q, k, v, idx, bias, backend="triton", triton_config=t64),
        "launch_autotuned": lambda: kernels.launch(q, k, v, bias, num, ids, out, lse, 0.088, blk, blk, None, 1),
        "launch_forced_t64": lambda: kernels.launch(q, k, v, bias, num, ids, out, lse, 0.088, blk, blk, t64, 1),
        "torch_empty_x2": lambda: (torch.empty_like(q), torch.empty(b, h, lq, device=dev)),
    }
    report: dict = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python3", *sys.argv]),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor(),
        "shape": dict(b=b, h=h, lq=lq, lk=args.lk, d=d, density=args.density),
        "calls": {},
    }
    for name, fn in calls.items():
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.calls):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        rec = dict(host_us=(t1 - t0) / args.calls * 1e6, wall_us=(t2 - t0) / args.calls * 1e6)
        report["calls"][name] = rec
        print(f"{name:22s} host {rec['host_us']:8.1f} us  wall {rec['wall_us']:8.1f} us")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.calls):
        calls["ops_autotuned"]()
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
    report["profile_ops_autotuned"] = buf.getvalue()
    print(buf.getvalue()[:6000])
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
