"""Dense attention with TempCache's per-key log-count bias, every exact route side by side, at the capped shape.

GPU run (one call, H200, about 2 minutes):
    PYTHONPATH=src python3 scripts/gpu_bench_bias.py --out $OUT/bias.json

CPU smoke run (tiny shapes; checks the script end to end, times nothing meaningful):
    PYTHONPATH=src python3 scripts/gpu_bench_bias.py --smoke --out /tmp/bias.json

Shape: Wan2.1-1.3B at 480x832 with a 15-frame cache: B=1, H=12, D=128, Lq = 4,680 (one 3-frame chunk),
Lk = 28,080 (15 cached + 3 staged frames), bf16. Counts as TempCache leaves them (``--merged`` share of the keys
in groups of 2-8, the rest 1); the bias is log(count).

Routes (each is exact maths; every one is checked against a float64 reference on two heads, next to torch's
own bf16 error on the same rows):
    cudnn_nobias      cuDNN SDPA without the bias: the speed the bias must not cost more than 5 % over
    cudnn_mask        cuDNN SDPA with the bias as a (B, H, 1, Lk) float mask
    aug{W}            head-dim augmentation (q -> [q, 1/s, 1/s, 0..], k -> [k, b_hi, b_lo, 0..]), qk width W,
                      kernel only (pre-built inputs); aug{W}_build includes building them, as the route does
    vaug{W}           value augmentation: v -> [m v, m, 0..] of width W, qk unchanged at 128;
                      out = o[:, :, :, :128] / o[:, :, :, 128] (exact: the weights are m e^s / sum m e^s)
    triton            longroll's block-sparse kernel with every block (the portable path)
    aug_route         ``attention(backend="sdpa_augmented")``: the build and cuDNN, as TempCache runs it
    lse_triton        the Triton kernel returning the log-sum-exp (the host tier's route before)
    lse_cudnn         cuDNN over the augmented inputs returning the log-sum-exp (``sdpa_augmented`` with
                      ``return_lse``, what "auto" now picks for it on CUDA); both also report the lse's error
    tier_triton       the host tier's attention: cache (Lk keys) and slot region (``--slots`` keys) each with
    tier_cudnn        its log-sum-exp, merged; on the Triton kernel or cuDNN; checked against the union
    tier_union        the same union as one cuDNN call (``attention_union``: both parts' augmented keys built into
                      one buffer, the values concatenated), the host tier's route on CUDA
    flex              compiled FlexAttention (Triton backend), score_mod adding the bias
    flex_flash        compiled FlexAttention with kernel_options BACKEND=FLASH (flash-attn-4's CuTe DSL
                      kernels), same score_mod; only where ``flash_attn.cute`` imports
    fa4_nobias        flash-attn-4's own interface without the bias, for its raw speed on this chip
    fa4_aug{W}        flash-attn-4 over the augmented q, k of qk width W (kernel only; it takes any multiple of
                      8 on SM90), and ``fa4`` the shipped route (``attention(backend="fa4")``: build + kernel)

Timing: CUDA-graph replays (medians of 20 after warm-up) where the route captures, else
``triton.testing.do_bench`` medians. One failing route is recorded with its error and does not stop the run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from longroll.ops.attention import attention, attention_union, augment_qk
from longroll.ops.merge import merge_attention
from longroll.ops.reference import attention_ref
from longroll.pipeline.record import run_record


def make_inputs(b: int, h: int, lq: int, lk: int, d: int, merged: float, device: str, dtype: torch.dtype, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g).to(device, dtype)
    k = torch.randn(b, h, lk, d, generator=g).to(device, dtype)
    v = torch.randn(b, h, lk, d, generator=g).to(device, dtype)
    count = torch.ones(b, h, lk)
    sel = torch.rand(b, h, lk, generator=g) < merged
    count[sel] = torch.randint(2, 9, (int(sel.sum()),), generator=g).float()
    bias = count.log().to(device)
    return q, k, v, count.to(device), bias


def vaugment(v: torch.Tensor, count: torch.Tensor, width: int) -> torch.Tensor:
    """(B, H, Lk, Dv) values, (B, H, Lk) counts -> (B, H, Lk, width) = [m v, m, 0...]."""
    dv = v.shape[-1]
    va = v.new_zeros(*v.shape[:-1], width)
    va[..., :dv] = (v.float() * count[..., None]).to(v.dtype)
    va[..., dv] = count.to(v.dtype)
    return va


def bench(fn: Callable[[], Any], device: str, reps: int = 20) -> dict[str, Any]:
    if device != "cuda":
        import time

        t0 = time.perf_counter()
        fn()
        return {"ms": (time.perf_counter() - t0) * 1e3, "timer": "host"}
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            graph.replay()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1))
        return {"ms": statistics.median(times), "timer": "graph", "spread_ms": [min(times), max(times)]}
    except Exception as exc:  # some routes do not capture: time them eagerly instead
        import triton.testing

        ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
        return {"ms": ms, "timer": "do_bench", "graph_error": repr(exc)[:300]}


def main() -> None:
    default_out = os.path.join(os.environ.get("OUT", "out"), "bias.json")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=default_out)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--lq", type=int, default=4680)
    p.add_argument("--lk", type=int, nargs="+", default=[28080])
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--slots", type=int, default=1920, help="keys of the host tier's slot region (tier_* routes)")
    p.add_argument("--merged", type=float, default=0.4, help="share of keys in merged groups (counts 2-8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="", help="comma-separated route names to run (default: every route)")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.smoke:
        args.lq, args.lk, args.heads, args.slots = 97, [300], 2, 40
    d = 128
    record = run_record(device)
    record["args"] = vars(args)
    record["cases"] = []
    for lk in args.lk:
        record["cases"].append(run_case(lk, args, device, dtype, d))
        if device == "cuda":
            torch.cuda.empty_cache()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1, default=str)
    print("wrote", args.out)


def run_case(lk: int, args: argparse.Namespace, device: str, dtype: torch.dtype, d: int) -> dict[str, Any]:
    """Every route at one key length: errors against float64 on two heads, then the timing."""
    q, k, v, count, bias = make_inputs(1, args.heads, args.lq, lk, d, args.merged, device, dtype, args.seed)
    scale = 1.0 / math.sqrt(d)
    # error rows: two heads, every query (the bias is per key, so all rows matter equally)
    hs = slice(0, 2)
    ref, _ = attention_ref(q[:, hs], k[:, hs], v[:, hs], bias[:, hs], scale=scale, upcast=True)
    own, _ = attention_ref(q[:, hs], k[:, hs], v[:, hs], bias[:, hs], scale=scale, upcast=False)
    ref = ref.double()
    torch_err = (own.double() - ref).abs().max().item()
    flops = 4 * args.heads * args.lq * lk * d
    case: dict[str, Any] = {"lq": args.lq, "lk": lk, "heads": args.heads, "torch_bf16_max_err": torch_err,
                            "routes": {}}  # fmt: skip

    def cudnn(qq, kk, vv, mask=None):
        if device != "cuda":
            return F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale)
        with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale)

    routes: dict[str, Callable[[], torch.Tensor]] = {}
    routes["cudnn_nobias"] = lambda: cudnn(q, k, v)
    mask = bias.to(dtype)[:, :, None, :]
    routes["cudnn_mask"] = lambda: cudnn(q, k, v, mask)
    for width_mult in (16, 32, 64):
        qa, ka = augment_qk(q, k, bias, scale, multiple=width_mult)
        w = qa.shape[-1]
        routes[f"aug{w}"] = lambda qa=qa, ka=ka: cudnn(qa, ka, v)
    routes["aug192_build"] = lambda: cudnn(*augment_qk(q, k, bias, scale), v)
    for w in (136, 144, 160, 192):
        va = vaugment(v, count, w)
        routes[f"vaug{w}"] = lambda va=va: _vsplit(cudnn(q, k, va), d)
    routes["vaug_build"] = lambda: _vsplit(cudnn(q, k, vaugment(v, count, 144)), d)
    routes["triton"] = lambda: attention(q, k, v, bias, scale=scale, backend="triton").out
    routes["aug_route"] = lambda: attention(q, k, v, bias, scale=scale, backend="sdpa_augmented").out
    # With the log-sum-exp, as the host tier's merge needs it: the Triton kernel and cuDNN over augmented inputs.
    lse_fns = {
        "lse_triton": lambda: attention(q, k, v, bias, scale=scale, backend="triton", return_lse=True),
        "lse_cudnn": lambda: attention(q, k, v, bias, scale=scale, backend="sdpa_augmented", return_lse=True),
    }
    for name, lse_fn in lse_fns.items():
        routes[name] = lambda lse_fn=lse_fn: lse_fn().out
    # The host tier's attention: the cache and the retrieved slot region (its own keys), merged by log-sum-exp.
    slots = args.slots
    sq, sk, sv, _, sbias = make_inputs(1, args.heads, args.lq, slots, d, args.merged, device, dtype, args.seed + 1)
    sq = q
    for route in ("triton", "sdpa_augmented"):
        def tier(route=route):
            near = attention(q, k, v, bias, scale=scale, backend=route, return_lse=True)
            back = attention(sq, sk, sv, sbias, scale=scale, backend=route, return_lse=True)
            return merge_attention(near.out, near.lse, back.out, back.lse)[0]

        routes["tier_" + ("cudnn" if route == "sdpa_augmented" else route)] = tier
    routes["tier_union"] = lambda: attention_union(q, ((k, v, bias), (sk, sv, sbias)), scale=scale)
    tier_ref = None
    try:
        from torch.nn.attention.flex_attention import flex_attention

        bias_f = bias.float()

        def score_mod(score, b, hh, qi, kv):
            return score + bias_f[b, hh, kv]

        flex_c = torch.compile(flex_attention, dynamic=False)
        routes["flex"] = lambda: flex_c(q, k, v, score_mod=score_mod, scale=scale)
        try:
            import flash_attn.cute  # noqa: F401

            case["flash_attn_cute"] = "importable"
            flex_f = torch.compile(flex_attention, dynamic=False)
            routes["flex_flash"] = lambda: flex_f(
                q, k, v, score_mod=score_mod, scale=scale, kernel_options={"BACKEND": "FLASH"}
            )
            from flash_attn.cute import flash_attn_func

            qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
            routes["fa4_nobias"] = lambda: flash_attn_func(qt, kt, vt, softmax_scale=scale)[0].transpose(1, 2)
            for width_mult in (16, 32, 64):
                qa, ka = (x.transpose(1, 2).contiguous() for x in augment_qk(q, k, bias, scale, multiple=width_mult))
                routes[f"fa4_aug{qa.shape[-1]}"] = lambda qa=qa, ka=ka: flash_attn_func(
                    qa, ka, vt, softmax_scale=scale
                )[0].transpose(1, 2)
            routes["fa4"] = lambda: attention(q, k, v, bias, scale=scale, backend="fa4").out
        except Exception as exc:
            case["flash_attn_cute"] = repr(exc)[:300]
    except Exception as exc:
        case["flex_error"] = repr(exc)[:300]
    only = [x for x in args.only.split(",") if x]
    for name, fn in routes.items():
        if only and name not in only:
            continue
        res: dict[str, Any] = {}
        try:
            out = fn()
            if name.startswith("tier_"):
                if tier_ref is None:
                    uk, uv, ub = (torch.cat([a[:, hs], b[:, hs]], 2) for a, b in ((k, sk), (v, sv), (bias, sbias)))
                    tier_ref = attention_ref(q[:, hs], uk, uv, ub, scale=scale, upcast=True)[0].double()
                    tier_own = attention_ref(q[:, hs], uk, uv, ub, scale=scale, upcast=False)[0].double()
                    case["tier_torch_bf16_max_err"] = (tier_own - tier_ref).abs().max().item()
                res["max_err"] = (out[:, hs].double() - tier_ref).abs().max().item()
                res["within_rule"] = bool(
                    res["max_err"] <= 2 * case["tier_torch_bf16_max_err"] + torch.finfo(dtype).eps
                )
                res["finite"] = bool(torch.isfinite(out).all().item())
            elif name not in ("cudnn_nobias", "fa4_nobias"):
                res["max_err"] = (out[:, hs].double() - ref).abs().max().item()
                res["within_rule"] = bool(res["max_err"] <= 2 * torch_err + torch.finfo(dtype).eps)
                res["finite"] = bool(torch.isfinite(out).all().item())
            res |= bench(fn, device)
            res["tflops"] = flops / (res["ms"] * 1e-3) / 1e12
        except Exception as exc:  # record and go on
            res["error"] = repr(exc)[:500]
            res["trace"] = traceback.format_exc()[-800:]
        if name in lse_fns and "error" not in res:
            # The log-sum-exp against the float64 one of the same rows.
            lse = lse_fns[name]().lse
            assert lse is not None
            lse_ref = attention_ref(q[:, hs], k[:, hs], v[:, hs], bias[:, hs], scale=scale, upcast=True)[1]
            res["lse_max_err"] = (lse[:, hs].double() - lse_ref.double()).abs().max().item()
        case["routes"][name] = res
        if "ms" in res:
            line = f"{res['ms']:.3f} ms  {res['tflops']:.0f} TFLOP/s  err {res.get('max_err', 0):.2e}"
        else:
            line = res["error"][:160]
        print(f"lk={lk} {name:14s} {line}", flush=True)
    base = case["routes"].get("cudnn_nobias", {}).get("ms")
    if base:
        for res in case["routes"].values():
            if "ms" in res:
                res["vs_cudnn_nobias"] = res["ms"] / base
    return case


def _vsplit(o: torch.Tensor, d: int) -> torch.Tensor:
    return (o[..., :d].float() / o[..., d : d + 1].float()).to(o.dtype)


if __name__ == "__main__":
    main()
