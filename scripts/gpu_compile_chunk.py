"""torch.compile over longroll's attention ops as the rollout grows: one attention layer at Wan2.1-1.3B shapes
(12 heads of 128, 1,560 tokens per latent frame, chunks of 3 frames, bf16) over a LayerKVCache view, compiled
once with ``fullgraph=True`` and the view's key length marked dynamic, run chunk after chunk while the cache
grows (``dense``: without bound; ``tempcache``: up to its 15-frame cap).

    PYTHONPATH=src python3 scripts/gpu_compile_chunk.py --out $OUT/compile            # one GPU call
    PYTHONPATH=src python3 scripts/gpu_compile_chunk.py --out /tmp/compile --smoke    # CPU check (aot_eager)

The layer computes q/k/v with q/k RMS norm, biased dense attention (``torch.ops.longroll.attention``) and
block-sparse attention with every block kept (``torch.ops.longroll.block_sparse_attention``: the Triton kernel
on the GPU) over the same view, and an output projection. Writes ``compile.json``: per policy and chunk the
view length, compilations so far, compiled and eager milliseconds and the largest difference between them.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.backends.registry import lookup_backend

from longroll.cache import CacheConfig, FullPolicy, LayerKVCache, TempCachePolicy
from longroll.ops.block_index import BlockSparseIndex
from longroll.ops.custom_ops import attention_op, block_sparse_attention_op
from longroll.pipeline.record import run_record

log = logging.getLogger("gpu_compile_chunk")

#: (heads, head_dim, tokens per frame, frames per chunk, cap in frames, chunks, dtype, device, backend, block).
REAL = (12, 128, 1560, 3, 15, 12, torch.bfloat16, "cuda", "inductor", 128)
SMOKE = (2, 16, 16, 2, 4, 3, torch.float32, "cpu", "aot_eager", 16)


class CachedAttention(torch.nn.Module):
    """One attention layer over [cache view ; chunk]: dense biased and block-sparse attention of the chunk's
    queries over the same view (their sum, so that both ops are in the graph)."""

    def __init__(self, heads: int, head_dim: int) -> None:
        super().__init__()
        dim = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.norm_q, self.norm_k = torch.nn.RMSNorm(dim), torch.nn.RMSNorm(dim)
        self.out = torch.nn.Linear(dim, dim)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (batch, n, dim) -> q, k, v (batch, heads, n, head_dim), k and v contiguous for the cache."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        split = (self.heads, self.head_dim)
        q = self.norm_q(q).unflatten(-1, split).transpose(1, 2)
        k = self.norm_k(k).unflatten(-1, split).transpose(1, 2).contiguous()
        return q, k, v.unflatten(-1, split).transpose(1, 2).contiguous()

    def forward(
        self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, index: BlockSparseIndex
    ) -> torch.Tensor:
        """x: (batch, n, dim); k, v: (batch, heads, L, head_dim) the view; bias: (batch, heads, L) or None."""
        q, _, _ = self.project(x)
        dense = attention_op(q, k, v, bias).out
        sparse = block_sparse_attention_op(q, k, v, index, bias).out
        return self.out((dense + sparse).transpose(1, 2).flatten(2))


def run_policy(name: str, geometry: tuple, seed: int = 0) -> dict[str, Any]:
    heads, d, tpf, fpc, cap, chunks, dtype, device, backend, block = geometry
    policy = FullPolicy() if name == "dense" else TempCachePolicy(max_entries=cap * tpf, sink_frames=1)
    cache = LayerKVCache(CacheConfig(tpf, fpc, policy, check_finite=False), batch=1, heads=heads, head_dim=d,
                         dtype=dtype, device=device)  # fmt: skip
    torch.manual_seed(seed)
    layer = CachedAttention(heads, d).to(device=device, dtype=dtype).eval()
    compilations: list[int] = []
    inner = lookup_backend(backend)

    def counting(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        compilations.append(len(gm.graph.nodes))
        return inner(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend=counting)
    rows = []
    with torch.no_grad():
        for chunk in range(chunks):
            x = torch.randn(1, fpc * tpf, heads * d, device=device, dtype=dtype)
            _, k, v = layer.project(x)
            cache.stage(k, v, frame_start=cache.committed_frames)
            view = cache.view()
            n = view.k.shape[2]
            index = BlockSparseIndex.full(1, 1, fpc * tpf, n, block, block, device=device)
            for t in (view.k, view.v) + (() if view.bias is None else (view.bias,)):
                torch._dynamo.mark_dynamic(t, 2)
            torch._dynamo.mark_dynamic(index.kv_indices, 3)
            times = {}
            for label, fn in (("compiled", compiled), ("eager", layer)):
                fn(x, view.k, view.v, view.bias, index)  # warm-up (the first compiled call compiles)
                _sync(device)
                reps = 3 if device == "cuda" else 1
                t0 = time.perf_counter()
                for _ in range(reps):
                    y = fn(x, view.k, view.v, view.bias, index)
                _sync(device)
                times[label] = (time.perf_counter() - t0) / reps * 1e3
                if label == "compiled":
                    y_compiled = y
            err = float((y_compiled.float() - y.float()).abs().max())
            rows.append({
                "chunk": chunk, "view_keys": n, "compilations": len(compilations),
                "compiled_ms": times["compiled"], "eager_ms": times["eager"], "max_abs_diff": err,
            })  # fmt: skip
            log.info("%s chunk %d: %d keys, %d compilation(s), %.2f ms compiled, %.2f ms eager, diff %.2e",
                     name, chunk, n, len(compilations), times["compiled"], times["eager"], err)  # fmt: skip
            cache.commit()
    return {
        "policy": name,
        "chunks": rows,
        "compilations": len(compilations),
        "view_keys": sorted({r["view_keys"] for r in rows}),
        "compiled_ms_median": statistics.median(r["compiled_ms"] for r in rows[1:]),
        "eager_ms_median": statistics.median(r["eager_ms"] for r in rows[1:]),
    }


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU with the aot_eager backend")
    parser.add_argument("--policies", default="dense,tempcache")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    geometry = SMOKE if args.smoke else REAL
    if geometry[7] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --smoke on the CPU")
    results = [run_policy(p, geometry) for p in args.policies.split(",")]
    heads, d, tpf, fpc, cap, chunks, dtype, device, backend, block = geometry
    shape = {
        "heads": heads, "head_dim": d, "tokens_per_frame": tpf, "frames_per_chunk": fpc,
        "tempcache_cap_frames": cap, "chunks": chunks, "dtype": str(dtype), "backend": backend, "block": block,
    }  # fmt: skip
    report = run_record(device) | {"geometry": shape, "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile.json").write_text(json.dumps(report, indent=1))
    for r in results:
        log.info("%s: %d compilation(s) over view lengths %s", r["policy"], r["compilations"], r["view_keys"])


if __name__ == "__main__":
    main()
