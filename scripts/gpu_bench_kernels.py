"""Correctness and speed of the block-sparse Triton forward against dense and FlexAttention baselines.

GPU run (one call, H100):
    PYTHONPATH=src python3 scripts/gpu_bench_kernels.py --out $OUT/kernels.json

CPU smoke run (tiny shapes, Triton interpreter):
    TRITON_INTERPRET=1 PYTHONPATH=src python3 scripts/gpu_bench_kernels.py --quick --out /tmp/k.json

(a) bf16 kernel vs the float64 reference on small shapes (max error, next to torch's own bf16 error);
(b) medians after warm-up at Wan2.1-1.3B shapes (B=1, H=12, D=128, Lq=4680) over cache lengths and
densities: the kernel's TFLOP/s on kept blocks (4·H·Lq·Lk·D·density), cuDNN SDPA dense, SDPA with the bias
as a broadcast mask, the head-dim augmentation route, and compiled FlexAttention with the same block mask and
a score_mod adding the bias. Every measurement (or the error that stopped it) goes to the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from typing import Any


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_out = os.path.join(os.environ["OUT"], "kernels.json") if os.environ.get("OUT") else "kernels.json"
    p.add_argument("--out", default=default_out, help="JSON path (default $OUT/kernels.json)")
    p.add_argument("--quick", action="store_true", help="tiny shapes; runs on CPU under TRITON_INTERPRET=1")
    p.add_argument("--lk", type=int, nargs="+", default=[4680, 32760, 131040, 262080], help="key lengths")
    p.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.3, 0.5, 1.0])
    p.add_argument("--lq", type=int, default=4680)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block", type=int, default=128, help="index block size on both axes")
    p.add_argument("--extra-q-block", type=int, default=64, help="also time this q block size (0: skip)")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    p.add_argument("--budget-s", type=float, default=500.0, help="skip remaining slow baselines past this")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def bias_score_mod(bias: Any) -> Callable[..., Any]:
    """FlexAttention score_mod adding a per-key bias (batch, heads, seqlen_k)."""

    def score_mod(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return score + bias[b, h, kv_idx]

    return score_mod


def main() -> int:
    args = _parse()
    if args.quick:
        # Must precede the first triton import: the interpreter is chosen when kernels are decorated.
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
        args.lk, args.densities, args.lq, args.heads, args.head_dim = [300], [0.3, 1.0], 200, 2, 64
        args.block, args.extra_q_block = 64, 0
    import torch
    import triton

    from longroll.ops.attention import MASKED_BIAS, attention
    from longroll.ops.block_index import BlockSparseIndex
    from longroll.ops.block_sparse import block_sparse_attention, block_sparse_attention_ref
    from longroll.ops.reference import attention_ref

    t_start = time.perf_counter()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float16
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *sys.argv]),
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "python": platform.python_version(),
        "interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "dtype": str(dtype),
        "flops": "4*H*Lq*Lk*D*density_exact (kept query-key pairs only)",
        "correctness": [],
        "timings": [],
    }

    def rnd(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=dev, dtype=dt)

    def random_index(b: int, h: int, lq: int, lk: int, bq: int, bk: int, density: float) -> BlockSparseIndex:
        nqb, nkb = -(-lq // bq), -(-lk // bk)
        keep = max(1, min(nkb, round(density * nkb)))
        order = torch.rand(b, h, nqb, nkb, generator=gen).argsort(dim=-1)[..., :keep]
        dense = torch.zeros(b, h, nqb, nkb, dtype=torch.bool).scatter_(-1, order, True)
        return BlockSparseIndex.from_dense(dense, bq, bk, lq, lk).to(dev)

    def timeit(fn: Callable[[], object]) -> float:
        """Median milliseconds."""
        if cuda:
            return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
        fn()
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)

    def tuned_config() -> str | None:
        try:
            from longroll.kernels import block_sparse_fwd

            cfg = block_sparse_fwd.block_sparse_fwd_tuned.best_config
            return None if cfg is None else str(cfg)
        except Exception:
            return None

    # ---------------------------------------------------------------- (a) correctness
    d_small = args.head_dim
    cases = [
        dict(name="mha_bias", b=1, h=4, hk=4, lq=300, lk=1000, bq=128, bk=128, density=0.5, layout="bhld"),
        dict(name="gqa_bias_blhd", b=2, h=4, hk=2, lq=257, lk=700, bq=128, bk=128, density=0.3, layout="blhd"),
        dict(name="q64_kv128", b=1, h=2, hk=1, lq=200, lk=1025, bq=64, bk=128, density=0.4, layout="bhld"),
        dict(name="d64_all_blocks", b=1, h=2, hk=2, lq=256, lk=512, bq=128, bk=64, density=1.0, layout="bhld"),
    ]
    if args.quick:
        cases = [dict(c, lk=min(int(c["lk"]), 300), lq=min(int(c["lq"]), 130), bq=64, bk=64) for c in cases[:3]]
    for case in cases:
        entry: dict[str, Any] = {k: v for k, v in case.items()}
        try:
            d = 64 if case["name"].startswith("d64") else d_small
            b, h, hk, lq, lk = (int(case[x]) for x in ("b", "h", "hk", "lq", "lk"))
            if case["layout"] == "blhd":
                q = rnd(b, lq, h, d).transpose(1, 2)
                k = rnd(b, lk, hk, d).transpose(1, 2)
                v = rnd(b, lk, hk, d).transpose(1, 2)
            else:
                q, k, v = rnd(b, h, lq, d), rnd(b, hk, lk, d), rnd(b, hk, lk, d)
            bias = (torch.rand(b, hk, lk, generator=gen) * 2.0).to(dev)
            bias[..., ::11] = MASKED_BIAS
            idx = random_index(b, h, lq, lk, int(case["bq"]), int(case["bk"]), float(case["density"]))
            got = block_sparse_attention(q, k, v, idx, bias, backend="triton", check_ids=True)
            ref = block_sparse_attention_ref(q, k, v, idx, bias)
            same = attention_ref(q, k, v, bias.masked_fill(bias <= MASKED_BIAS, float("-inf")), upcast=False,
                                 key_mask=idx.key_mask().expand(b, h, lq, lk))
            finite = torch.isfinite(ref.lse)
            entry.update(
                density_exact=idx.density(),
                max_err_out=float((got.out.double() - ref.out.double()).abs().max()),
                max_err_out_torch_same_dtype=float((same[0].double() - ref.out.double()).abs().max()),
                max_err_lse=float((got.lse - ref.lse)[finite].abs().max()) if bool(finite.any()) else 0.0,
                lse_inf_match=bool(((got.lse == float("-inf")) == ~finite).all()),
                out_layout_strides=list(got.out.stride()),
                config=tuned_config(),
            )
            # The tests' rule: within twice torch's own error at this dtype plus two rounding steps.
            r = ref.out.to(dtype)
            eps = 2 * float((r + 0.3 - 0.3 - r).abs().max())
            entry["tolerance"] = 2 * entry["max_err_out_torch_same_dtype"] + eps
            entry["ok"] = bool(entry["max_err_out"] <= entry["tolerance"] and entry["lse_inf_match"])
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["traceback"] = traceback.format_exc(limit=4)
        report["correctness"].append(entry)
        print(f"[check] {entry.get('name')}: out err {entry.get('max_err_out')} "
              f"(torch {dtype} {entry.get('max_err_out_torch_same_dtype')}), lse err {entry.get('max_err_lse')}, "
              f"ok={entry.get('ok')} {entry.get('error', '')}", flush=True)

    # FlexAttention correctness once, on a small shape, so its timings below can be trusted.
    flex_fn: Callable[..., Any] | None = None
    if not args.no_flex and cuda:
        try:
            import torch._dynamo
            from torch.nn.attention.flex_attention import flex_attention

            torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
            flex_fn = torch.compile(flex_attention, dynamic=False)
            b, h, lq, lk, d = 1, 4, 300, 1000, d_small
            q, k, v = rnd(b, h, lq, d), rnd(b, h, lk, d), rnd(b, h, lk, d)
            bias = (torch.rand(b, h, lk, generator=gen) * 2.0).to(dev)
            idx = random_index(b, h, lq, lk, 128, 128, 0.5)
            bm = idx.to_flex_block_mask()

            score_mod = bias_score_mod(bias)
            t0 = time.perf_counter()
            out = flex_fn(q, k, v, score_mod=score_mod, block_mask=bm)
            ref = block_sparse_attention_ref(q, k, v, idx, bias)
            report["correctness"].append(dict(
                name="flex_compiled_bias", max_err_out=float((out.double() - ref.out.double()).abs().max()),
                compile_s=time.perf_counter() - t0,
            ))
            print(f"[check] flex: out err {report['correctness'][-1]['max_err_out']}", flush=True)
        except Exception as exc:
            report["correctness"].append(dict(name="flex_compiled_bias", error=f"{type(exc).__name__}: {exc}"))
            print(f"[check] flex failed: {exc}", flush=True)
            flex_fn = None

    # ---------------------------------------------------------------- (b) timings
    def record(**kw: Any) -> dict[str, Any]:
        report["timings"].append(kw)
        return kw

    def over_budget() -> bool:
        return time.perf_counter() - t_start > args.budget_s

    b, h, d, lq = 1, args.heads, args.head_dim, args.lq
    blocks = [(args.block, args.block)]
    if args.extra_q_block and args.extra_q_block != args.block:
        blocks.append((args.extra_q_block, args.block))
    dense_tflops: dict[int, float] = {}

    def time_lk(lk: int) -> None:
        q, k, v = rnd(b, h, lq, d), rnd(b, h, lk, d), rnd(b, h, lk, d)
        bias = (torch.rand(b, h, lk, generator=gen) * 2.0).to(dev)  # log-counts of merged keys
        dense_flops = 4.0 * h * lq * lk * d

        def run_dense(method: str, fn: Callable[[], object]) -> None:
            try:
                ms = timeit(fn)
                rec = record(method=method, lk=lk, density=1.0, density_exact=1.0, ms=ms,
                             tflops=dense_flops / ms * 1e-9)
                if method == "cudnn_dense_nobias":
                    dense_tflops[lk] = rec["tflops"]
            except Exception as exc:
                record(method=method, lk=lk, density=1.0, error=f"{type(exc).__name__}: {exc}")

        if cuda:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            def cudnn(fn: Callable[[], object]) -> Callable[[], object]:
                def wrapped() -> object:
                    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                        return fn()

                return wrapped

            sdpa = torch.nn.functional.scaled_dot_product_attention
            run_dense("cudnn_dense_nobias", cudnn(lambda: sdpa(q, k, v)))
            run_dense("cudnn_sdpa_bias_mask", cudnn(lambda: attention(q, k, v, bias, backend="sdpa")))
            run_dense("cudnn_sdpa_augmented", cudnn(lambda: attention(q, k, v, bias, backend="sdpa_augmented")))
        else:
            run_dense("torch_dense_nobias", lambda: attention(q, k, v, backend="chunked"))
            dense_tflops[lk] = report["timings"][-1].get("tflops", float("nan"))

        for bq, bk in blocks:
            dens_list = args.densities if (bq, bk) == blocks[0] else [0.3]
            if (bq, bk) != blocks[0] and lk != args.lk[min(1, len(args.lk) - 1)]:
                continue
            for dens in dens_list:
                idx = random_index(b, h, lq, lk, bq, bk, dens)
                exact = idx.density()
                flops = dense_flops * exact
                for with_bias in (True, False) if dens == 1.0 else (True,):
                    bb = bias if with_bias else None
                    method = f"triton_block_sparse{'_bias' if with_bias else '_nobias'}_q{bq}_k{bk}"
                    try:
                        ms = timeit(partial(block_sparse_attention, q, k, v, idx, bb, backend="triton"))
                        tf = flops / ms * 1e-9
                        record(method=method, lk=lk, density=dens, density_exact=exact, ms=ms, tflops=tf,
                               ratio_vs_cudnn_dense=tf / dense_tflops.get(lk, float("nan")), config=tuned_config())
                    except Exception as exc:
                        record(method=method, lk=lk, density=dens, error=f"{type(exc).__name__}: {exc}")
                if flex_fn is not None and (bq, bk) == blocks[0]:
                    method = "flex_compiled_bias"
                    if over_budget():
                        record(method=method, lk=lk, density=dens, error="skipped: time budget spent")
                        continue
                    try:
                        bm = idx.to_flex_block_mask()
                        score_mod = bias_score_mod(bias)
                        t0 = time.perf_counter()
                        flex_fn(q, k, v, score_mod=score_mod, block_mask=bm)
                        torch.cuda.synchronize()
                        compile_s = time.perf_counter() - t0
                        ms = timeit(partial(flex_fn, q, k, v, score_mod=score_mod, block_mask=bm))
                        tf = flops / ms * 1e-9
                        record(method=method, lk=lk, density=dens, density_exact=exact, ms=ms, tflops=tf,
                               ratio_vs_cudnn_dense=tf / dense_tflops.get(lk, float("nan")),
                               first_call_s=compile_s)
                    except Exception as exc:
                        record(method=method, lk=lk, density=dens, error=f"{type(exc).__name__}: {exc}"[:2000])
        print(f"[time] lk={lk} done at {time.perf_counter() - t_start:.0f}s", flush=True)

    for lk in args.lk:
        time_lk(lk)  # its tensors are freed on return
        if cuda:
            torch.cuda.empty_cache()

    report["wall_s"] = time.perf_counter() - t_start
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1, default=str)

    print(f"\n{report['device']} | torch {report['torch']} | triton {report['triton']} | {report['dtype']}")
    print(f"{'method':40s} {'Lk':>7s} {'dens':>6s} {'ms':>9s} {'TFLOP/s':>8s} {'/cuDNN':>7s}")
    for r in report["timings"]:
        if "error" in r:
            print(f"{r['method']:40s} {r['lk']:7d} {r['density']:6.2f}   ERROR {r['error'][:60]}")
            continue
        ratio = r.get("ratio_vs_cudnn_dense", float("nan"))
        print(f"{r['method']:40s} {r['lk']:7d} {r['density_exact']:6.3f} {r['ms']:9.3f} {r['tflops']:8.1f} "
              f"{'' if math.isnan(ratio) else f'{ratio:7.2f}'}")
    bad = [c for c in report["correctness"] if c.get("ok") is False or "error" in c]
    print(f"correctness: {len(report['correctness']) - len(bad)}/{len(report['correctness'])} ok; "
          f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
