"""AnnSA at Wan2.1-1.3B shapes: ANN planning and index cost against the dense attention it replaces.

GPU run (one call, H100):
    PYTHONPATH=src python3 scripts/gpu_bench_sparse.py --out $OUT/sparse.json

CPU smoke run (tiny shapes, torch block-sparse backend):
    PYTHONPATH=src python3 scripts/gpu_bench_sparse.py --quick --out /tmp/sparse.json

For every cache length (B=1, H=12, D=128, bf16, Lq=4,680 = one chunk of 3 latent frames, structured keys drawn
around shared cluster centres on the device) and every ANN setting, a full-policy ``LayerKVCache`` is filled
through stage/commit and then, with CUDA events (medians after warm-up):

- ``plan_ms``: ``AnnSAPlanner.plan`` + ``AnnSAPlan.apply_to`` (bucket the history, reorder the cache), once per commit;
- ``index_ms``: ``AnnSAPlanner.select`` (query hashing + sort + block selection + index), paid every step;
- ``sparse_attn_ms``: ``block_sparse_attention`` on the bucket-sorted queries (Triton on CUDA), plus the
  query permutation and un-permutation of ``run``;
- ``dense_ms``: cuDNN SDPA over the same view (the call AnnSA replaces);
- ``bias_*``: the same with a TempCache-style log-count bias (-inf on 1 % of slots): block-sparse with the bias
  against the head-dim augmented cuDNN route.

AnnCA (``annca`` in the JSON): one chunk's cross-attention to a Wan-style 512-token prompt whose last 448 tokens
are identical pads: dense SDPA over 512, the exact collapse and dense attention over the collapsed prompt, and
AnnCA (LSH and int8, gather and mask modes) with density and recall.

``index_frac_of_dense`` = index_ms / dense_ms (target <= 0.10). Density comes from the selection (device
tensor), recall from ``measure_layer`` on sampled queries, and the max error of the sparse output on sampled
queries against float64 attention with the same selection (next to torch's own bf16 error). Host syncs in
``select`` are checked with ``torch.cuda.set_sync_debug_mode("error")``. Every result, or the error that stopped
it, goes to the JSON with device, versions, date and command line.
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
from typing import Any

import torch
import torch.nn.functional as F

from longroll.ann import Int8Config, LSHConfig
from longroll.cache import CacheConfig, CacheView, FullPolicy, LayerKVCache
from longroll.ops.attention import attention
from longroll.ops.block_sparse import block_sparse_attention
from longroll.ops.reference import attention_ref
from longroll.sparse import (
    AnnCA,
    AnnCAConfig,
    AnnSAConfig,
    AnnSAPlanner,
    annca_recall,
    collapse_duplicates,
    measure_layer,
)


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_out = os.path.join(os.environ["OUT"], "sparse.json") if os.environ.get("OUT") else "sparse.json"
    p.add_argument("--out", default=default_out, help="JSON path (default $OUT/sparse.json)")
    p.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (torch block-sparse backend)")
    p.add_argument("--lk", type=int, nargs="+", default=[32760, 131040, 262080], help="cached keys")
    p.add_argument("--tokens-per-frame", type=int, default=1560)
    p.add_argument("--frames-per-chunk", type=int, default=3)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--clusters", type=int, default=256)
    p.add_argument("--spread", type=float, default=0.5)
    p.add_argument("--scale", type=float, default=10.0, help="key/query norm")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--query-sample", type=int, default=128, help="queries for recall and error")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.quick:
        args.lk, args.tokens_per_frame, args.frames_per_chunk = [1024, 2048], 128, 2
        args.heads, args.head_dim, args.clusters, args.reps, args.warmup = 2, 64, 16, 3, 1
        args.query_sample = 32
    return args


def _ann_settings(quick: bool) -> list[tuple[str, AnnSAConfig]]:
    backend: Any = "torch" if quick else "auto"
    ann: list[tuple[str, Any, int]] = [
        ("lsh6_p1", LSHConfig(bits=6, probes=1), 16),
        ("lsh8_p1", LSHConfig(bits=8, probes=1), 16),
        ("lsh8_t2", LSHConfig(bits=8, tables=2, probes=0), 16),
        ("int8_k32", Int8Config(), 32),
        ("int8_k128", Int8Config(), 128),
    ]
    return [(n, AnnSAConfig(ann=a, top_k_blocks=k, backend=backend)) for n, a, k in ann]


def _clustered(args: argparse.Namespace, n_q: int, n_k: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """clustered_qk drawn on the device: q (1, H, n_q, D), k (1, H, n_k, D), v (1, H, n_k, D) in bf16/fp32."""
    g = torch.Generator(device=device).manual_seed(args.seed)
    h, d = args.heads, args.head_dim
    centres = F.normalize(torch.randn(1, h, args.clusters, d, generator=g, device=device), dim=-1)

    def draw(n: int) -> torch.Tensor:
        lab = torch.randint(0, args.clusters, (n,), generator=g, device=device)
        x = centres[:, :, lab] + args.spread * torch.randn(1, h, n, d, generator=g, device=device) / d**0.5
        return F.normalize(x, dim=-1) * args.scale

    dtype = torch.float32 if args.quick else torch.bfloat16
    q, k = draw(n_q), draw(n_k)
    v = torch.randn(1, h, n_k, d, generator=g, device=device)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _timer(device: torch.device, reps: int, warmup: int) -> Callable[[Callable[[], Any]], dict[str, float]]:
    def run(fn: Callable[[], Any]) -> dict[str, float]:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        qs = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
        return {"median": statistics.median(times), "p20": qs[0], "p80": qs[-1]}

    return run


def _fill(args: argparse.Namespace, k: torch.Tensor, v: torch.Tensor, lk: int) -> LayerKVCache:
    """Commit the first ``lk`` keys chunk by chunk into a full-policy cache (nothing staged)."""
    chunk = args.tokens_per_frame * args.frames_per_chunk
    cfg = CacheConfig(args.tokens_per_frame, args.frames_per_chunk, FullPolicy(initial_frames=1), check_finite=False)
    cache = LayerKVCache(cfg, batch=1, heads=args.heads, head_dim=args.head_dim, dtype=k.dtype, device=k.device)
    for i, s in enumerate(range(0, lk, chunk)):
        cache.stage(k[:, :, s : s + chunk], v[:, :, s : s + chunk], frame_start=i * args.frames_per_chunk)
        cache.commit()
    return cache


def _dense(q: torch.Tensor, view: CacheView) -> torch.Tensor:
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, view.k, view.v)
    return F.scaled_dot_product_attention(q, view.k, view.v)


def _sync_free(fn: Callable[[], Any], device: torch.device) -> tuple[bool | None, str | None]:
    """(True, None) when ``fn`` runs under sync-debug mode "error"; (False, traceback) if not; None off CUDA."""
    if device.type != "cuda":
        return None, None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return True, None
    except RuntimeError:
        return False, traceback.format_exc()[-1500:]
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _graph_ms(fn: Callable[[], Any], timer: Callable[[Callable[[], Any]], dict[str, float]]) -> dict[str, Any]:
    """Median time of ``fn`` replayed as one CUDA graph (launch overhead removed), or the capture error."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return timer(graph.replay)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def _errors(
    q: torch.Tensor, view: CacheView, out: torch.Tensor, sel: Any, bias: torch.Tensor | None, n: int
) -> dict[str, float]:
    """Max abs error of sampled output rows vs float64 attention with the same selection, and torch's bf16 one."""
    ids = torch.linspace(0, q.shape[2] - 1, n, device=q.device).round().long().unique()
    mask = sel.key_mask(ids)
    ref, _ = attention_ref(q[:, :, ids], view.k, view.v, bias, key_mask=mask)
    same, _ = attention_ref(q[:, :, ids], view.k, view.v, bias, key_mask=mask, upcast=False)
    return {
        "max_err": float((out[:, :, ids].double() - ref.double()).abs().max()),
        "torch_same_dtype_err": float((same.double() - ref.double()).abs().max()),
    }


def _bench_setting(args: argparse.Namespace, data: dict[str, Any], name: str, cfg: AnnSAConfig) -> dict[str, Any]:
    cache, q, k_new, v_new, state = data["cache"], data["q"], data["k_new"], data["v_new"], data["state"]
    timer = data["timer"]
    cache.load_state_dict(state)
    planner = AnnSAPlanner(cfg)
    row: dict[str, Any] = {"setting": name, "config": repr(cfg)}
    # Planning and applying the plan, as a layer does once per commit (repeats find the slots already in order).
    row["plan_ms"] = timer(lambda: planner.plan(cache).apply_to(cache))
    plan = planner.plan(cache)
    plan.apply_to(cache)
    cache.stage(k_new, v_new, frame_start=cache.committed_frames)
    view = cache.view()
    row["select_sync_free"], row["select_sync_trace"] = _sync_free(lambda: planner.select(q, view, plan), q.device)
    row["index_ms"] = timer(lambda: planner.select(q, view, plan))
    if q.is_cuda:
        row["index_graph_ms"] = _graph_ms(lambda: planner.select(q, view, plan), timer)
        row["run_graph_ms"] = _graph_ms(lambda: planner.run(q, view, plan), timer)
    sel = planner.select(q, view, plan)
    qp = sel.permute_queries(q)
    row["sparse_attn_ms"] = timer(lambda: block_sparse_attention(qp, view.k, view.v, sel.index, backend=cfg.backend))
    row["run_ms"] = timer(lambda: planner.run(q, view, plan))
    row["density"] = float(sel.density.mean())
    row["own_chunk_density"] = q.shape[2] / view.k.shape[2]
    row["recall"], _ = measure_layer(q, view, planner, plan, query_sample=args.query_sample)
    row |= _errors(q, view, planner.run(q, view, plan).out, sel, None, args.query_sample)
    g = torch.Generator(device=q.device).manual_seed(args.seed + 7)
    counts = torch.randint(1, 5, view.k.shape[:3], generator=g, device=q.device).float()
    bias = torch.log(counts).masked_fill(torch.rand(counts.shape, generator=g, device=q.device) < 0.01, -math.inf)
    row["bias_sparse_attn_ms"] = timer(
        lambda: block_sparse_attention(qp, view.k, view.v, sel.index, bias, backend=cfg.backend)
    )
    backend: Any = "sdpa_augmented" if q.is_cuda else "sdpa"
    row["bias_dense_ms"] = timer(lambda: attention(q, view.k, view.v, bias, backend=backend))
    out_b = sel.unpermute(block_sparse_attention(qp, view.k, view.v, sel.index, bias, backend=cfg.backend).out)
    row["bias_errors"] = _errors(q, view, out_b, sel, bias, args.query_sample)
    dense_ms = data["dense_ms"]["median"]
    row["index_frac_of_dense"] = row["index_ms"]["median"] / dense_ms
    if "median" in row.get("index_graph_ms", {}):
        row["index_graph_frac_of_dense"] = row["index_graph_ms"]["median"] / dense_ms
    row["run_speedup_vs_dense"] = dense_ms / row["run_ms"]["median"]
    row["bias_speedup_vs_dense"] = row["bias_dense_ms"]["median"] / row["bias_sparse_attn_ms"]["median"]
    cache.commit()  # leaves nothing staged for the next setting's load_state_dict
    return row


def _bench_length(args: argparse.Namespace, lk: int, device: torch.device) -> dict[str, Any]:
    chunk = args.tokens_per_frame * args.frames_per_chunk
    q, k, v = _clustered(args, chunk, lk + chunk, device)
    cache = _fill(args, k, v, lk)
    state = {n: t.clone() for n, t in cache.state_dict().items()}
    timer = _timer(device, args.reps, args.warmup)
    k_new, v_new = k[:, :, lk:].contiguous(), v[:, :, lk:].contiguous()
    cache.stage(k_new, v_new, frame_start=cache.committed_frames)
    view = cache.view()
    dense_ms = timer(lambda: _dense(q, view))
    cache.commit()
    out: dict[str, Any] = {"lk": lk, "lq": chunk, "dense_ms": dense_ms, "settings": []}
    data = {
        "cache": cache,
        "q": q,
        "k_new": k_new,
        "v_new": v_new,
        "state": state,
        "timer": timer,
        "dense_ms": dense_ms,
    }
    for name, cfg in _ann_settings(args.quick):
        try:
            row = _bench_setting(args, data, name, cfg)
        except Exception as exc:  # keep the other settings' numbers
            row = {"setting": name, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
            if cache.staged_tokens:
                cache.commit()
        out["settings"].append(row)
        _report(lk, row, dense_ms["median"])
    return out


def _report(lk: int, row: dict[str, Any], dense_ms: float) -> None:
    if "error" in row:
        print(f"Lk={lk:7d} {row['setting']:10s} ERROR {row['error']}", flush=True)
        return
    med = {n: row[n]["median"] for n in ("plan_ms", "index_ms", "sparse_attn_ms", "run_ms")}
    print(
        f"Lk={lk:7d} {row['setting']:10s} plan {med['plan_ms']:7.3f} ms  index {med['index_ms']:6.3f} ms"
        f" ({100 * row['index_frac_of_dense']:5.1f}% of dense {dense_ms:.3f})  sparse {med['sparse_attn_ms']:7.3f}"
        f"  run {med['run_ms']:7.3f}  density {row['density']:.3f}  recall {row['recall']:.3f}"
        f"  err {row['max_err']:.2e} (torch {row['torch_same_dtype_err']:.2e})  sync-free {row['select_sync_free']}"
        f"  graph index {row.get('index_graph_ms', {}).get('median', float('nan')):.3f}"
        f" run {row.get('run_graph_ms', {}).get('median', float('nan')):.3f}",
        flush=True,
    )


def _bench_annca(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Cross-attention of one chunk to a Wan-style prompt: 512 tokens, the last 512 - real identical pads."""
    real, total = 64, 512
    chunk = args.tokens_per_frame * args.frames_per_chunk
    q, k, v = _clustered(args, chunk, total, device)
    k[:, :, real:], v[:, :, real:] = k[:, :, real : real + 1], v[:, :, real : real + 1]
    timer = _timer(device, args.reps, args.warmup)
    out: dict[str, Any] = {"prompt_tokens": total, "distinct_tokens": real + 1, "lq": chunk}
    out["dense_512_ms"] = timer(lambda: F.scaled_dot_product_attention(q, k, v))
    out["collapse_ms"] = timer(lambda: collapse_duplicates(k, v))
    prompt = collapse_duplicates(k, v)
    out["collapsed_width"] = prompt.k.shape[2]
    out["collapsed_dense_ms"] = timer(lambda: attention(q, prompt.k, prompt.v, prompt.bias).out)
    ref, _ = attention_ref(q[:, :, :256], k, v)
    for name, ann in (("lsh8", LSHConfig(bits=8)), ("int8_k4", Int8Config(topk=4))):
        for mode in ("gather", "mask"):
            annca = AnnCA(
                AnnCAConfig(ann=ann, mode=mode),
                head_dim=args.head_dim,
                layer=0,
                head_ids=range(args.heads),
                device=device,
            )
            res = annca.run(q, prompt, tokens_per_frame=args.tokens_per_frame)
            out[f"{name}_{mode}"] = {
                "ms": timer(lambda a=annca: a.run(q, prompt, tokens_per_frame=args.tokens_per_frame)),
                "density": float(res.selection.density.mean()),
                "recall": annca_recall(q, prompt, res.selection, tokens_per_frame=args.tokens_per_frame),
                "fallback_frames": int(res.selection.fallback.sum()),
            }
    out["collapse_max_err_vs_dense_512"] = float(
        (attention(q[:, :, :256], prompt.k, prompt.v, prompt.bias).out.double() - ref.double()).abs().max()
    )
    same = attention_ref(q[:, :, :256], k, v, upcast=False)[0]
    out["torch_same_dtype_err_dense_512"] = float((same.double() - ref.double()).abs().max())
    print(f"AnnCA: {json.dumps(out)}", flush=True)
    return out


def _env(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *sys.argv]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def main() -> int:
    args = _parse()
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    record: dict[str, Any] = _env(device) | {"config": vars(args), "results": []}
    t0 = time.perf_counter()
    for lk in args.lk:
        try:
            record["results"].append(_bench_length(args, lk, device))
        except Exception as exc:
            record["results"].append(
                {"lk": lk, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
            )
            print(f"Lk={lk}: ERROR {exc}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    try:
        record["annca"] = _bench_annca(args, device)
    except Exception as exc:
        record["annca"] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        print(f"AnnCA: ERROR {exc}", flush=True)
    record["wall_s"] = time.perf_counter() - t0
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {args.out} ({record['wall_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
