"""The commit's parts at Wan2.1-1.3B shapes, timed as the captured commit runs them (CUDA-graph replays).

Measures what the fused commit chooses between, in one process on one device:

- the k smallest of a row's age keys (int64) and merge ranks (int32), 12 rows x 23,400 entries (a 15-frame
  cap), k = 1,560 (a frame's tokens): ``torch.topk`` against a full ``torch.sort`` sliced to k (the same values:
  the keys are distinct);
- the int8 top-1 match of a frame's 1,560 tokens against the previous frame's, 12 heads x 128, with fp16 or
  int8 tensor-core products, over tile shapes, warps and stages (each checked against the reference index);
- the int8 quantisation of a frame's matching keys: the torch twin against the fused kernel (checked equal).

    PYTHONPATH=src python3 scripts/gpu_bench_commit_parts.py --out $OUT/parts

Writes ``parts.json`` (median microseconds per call over graph replays, and the checks).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from longroll.ops.quantize import quantize_int8, quantize_int8_reference
from longroll.ops.top1 import int8_top1_reference
from longroll.pipeline.record import run_record

ROWS, ENTRIES, TOKENS, HEAD_DIM = 12, 23400, 1560, 128


def graph_us(fn: Callable[[], object], reps: int = 20, replays: int = 15) -> float:
    """Median microseconds per call of ``fn`` captured ``reps`` times in one CUDA graph, over ``replays``."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    times = []
    for _ in range(replays):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3 / reps)
    return statistics.median(times)


def smallest(dev: torch.device) -> dict:
    gen = torch.Generator(device=dev).manual_seed(0)
    out = {}
    for dtype in (torch.int64, torch.int32):
        hi = 2**62 if dtype == torch.int64 else 2**31 - 1
        # Distinct keys, as the age and rank keys are (the slot is in them).
        keys = torch.randint(0, hi >> 15, (ROWS, ENTRIES), device=dev, generator=gen, dtype=torch.int64)
        keys = ((keys << 15) | torch.arange(ENTRIES, device=dev)).to(dtype)
        ref = torch.topk(keys, TOKENS, dim=-1, largest=False).values
        same = torch.equal(torch.sort(keys, dim=-1).values[:, :TOKENS], ref)
        out[str(dtype).split(".")[-1]] = {
            "topk_us": graph_us(lambda k=keys: torch.topk(k, TOKENS, dim=-1, largest=False).values),
            "sort_us": graph_us(lambda k=keys: torch.sort(k, dim=-1).values[:, :TOKENS]),
            "same_values": same,
        }
    return out


def top1(dev: torch.device) -> dict:
    from longroll.kernels.int8_top1 import int8_top1_kernel

    gen = torch.Generator(device=dev).manual_seed(1)
    prev = torch.nn.functional.normalize(torch.randn(1, ROWS, TOKENS, HEAD_DIM, device=dev, generator=gen), dim=-1)
    x = torch.nn.functional.normalize(prev + 0.3 * torch.randn(prev.shape, device=dev, generator=gen), dim=-1)
    qc, qs = quantize_int8_reference(x)
    cc, cs = quantize_int8_reference(prev)
    ref = int8_top1_reference(qc, qs, cc, cs).view(ROWS, TOKENS)
    q2, c2 = qc.view(ROWS, TOKENS, HEAD_DIM), cc.view(ROWS, TOKENS, HEAD_DIM)
    qs2, cs2 = qs.view(ROWS, TOKENS), cs.view(ROWS, TOKENS)
    rows = []
    for i8, bn, bm, warps, stages in [
        (False, 64, 64, 4, 3), (True, 64, 64, 4, 3), (True, 64, 128, 4, 3), (True, 128, 64, 4, 3),
        (True, 128, 128, 8, 3), (True, 64, 64, 4, 4), (True, 32, 64, 4, 3), (True, 64, 32, 4, 3),
        (False, 64, 32, 4, 3), (True, 128, 64, 8, 4),
    ]:  # fmt: skip
        out = torch.empty(ROWS, TOKENS, dtype=torch.int64, device=dev)

        def run(i8: bool = i8, bn: int = bn, bm: int = bm, warps: int = warps, stages: int = stages,
                out: torch.Tensor = out) -> None:  # fmt: skip
            int8_top1_kernel[((TOKENS + bn - 1) // bn, ROWS)](
                q2, qs2, c2, cs2, out, TOKENS, TOKENS, q2.stride(0), q2.stride(1), qs2.stride(0), c2.stride(0),
                c2.stride(1), cs2.stride(0), out.stride(0),
                D=HEAD_DIM, BLOCK_N=bn, BLOCK_M=bm, INT8_DOT=i8, num_warps=warps, num_stages=stages,
            )  # fmt: skip

        try:
            run()
            torch.cuda.synchronize()
        except Exception as err:  # a tile the compiler refuses: recorded, not fatal
            rows.append({"int8_dot": i8, "block_n": bn, "block_m": bm, "error": repr(err)[:300]})
            continue
        rows.append({"int8_dot": i8, "block_n": bn, "block_m": bm, "num_warps": warps, "num_stages": stages,
                     "us": graph_us(run), "same_index": bool(torch.equal(out, ref))})  # fmt: skip
    return {"configs": rows}


def quantize(dev: torch.device) -> dict:
    x = torch.nn.functional.normalize(torch.randn(1, ROWS, TOKENS, HEAD_DIM, device=dev), dim=-1)
    c0, s0 = quantize_int8_reference(x)
    c1, s1 = quantize_int8(x, backend="triton")
    return {
        "torch_us": graph_us(lambda: quantize_int8_reference(x)),
        "triton_us": graph_us(lambda: quantize_int8(x, backend="triton")),
        "same_codes": bool(torch.equal(c0, c1)),
        "same_scales": bool(torch.equal(s0, s1)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 2
    dev = torch.device("cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    rec = run_record(dev) | {
        "shapes": {"rows": ROWS, "entries": ENTRIES, "tokens": TOKENS, "head_dim": HEAD_DIM},
        "smallest_k": smallest(dev),
        "top1": top1(dev),
        "quantize": quantize(dev),
    }
    (args.out / "parts.json").write_text(json.dumps(rec, indent=1))
    print(json.dumps({k: rec[k] for k in ("smallest_k", "top1", "quantize")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
