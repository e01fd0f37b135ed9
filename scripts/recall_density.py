"""Recall-versus-density curves of AnnSA's block selection on clustered synthetic queries and keys (CPU).

    PYTHONPATH=src python3 scripts/recall_density.py [--out recall_density.json]

A full-policy KV cache is filled with ``--history`` keys drawn around shared cluster centres
(:func:`longroll.eval.synthetic.clustered_qk`), the chunk's own ``--lq`` keys are staged and the chunk's queries
are drawn around the same centres. For every LSH setting (bits x probes x tables) and every int8 top-k, the
real planner (plan: bucket + reorder; select: per-step block index) is probed with
:func:`longroll.sparse.measure_layer`: recall = exact attention mass on the selected keys (sampled queries),
density = computed query-key pairs / all pairs (sink and own-chunk blocks included). Fewer bits, more probes
and more tables select more key blocks, so both recall and density must grow; the script checks that order
(and the same along int8 top-k and an LSH ``max_density`` cap sweep, own-bucket hits ranked first).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
import time
from typing import Any

import torch

from longroll.ann import Int8Config, LSHConfig
from longroll.cache import CacheConfig, FullPolicy, LayerKVCache
from longroll.eval.synthetic import clustered_qk
from longroll.sparse import AnnSAConfig, AnnSAPlanner, measure_layer


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="also write the records as JSON here")
    p.add_argument("--lq", type=int, default=4096, help="chunk queries (= staged keys)")
    p.add_argument("--history", type=int, default=16384, help="committed keys")
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--clusters", type=int, default=64)
    p.add_argument("--spread", type=float, default=0.5)
    p.add_argument("--scale", type=float, default=10.0, help="key/query norm (sharper attention when larger)")
    p.add_argument("--block", type=int, default=128, help="q and kv block size")
    p.add_argument("--query-sample", type=int, default=256)
    p.add_argument("--topk", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--caps", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.4], help="LSH max_density sweep")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def _cache(args: argparse.Namespace, k: torch.Tensor, v: torch.Tensor) -> LayerKVCache:
    """A full-policy cache holding ``history`` committed keys, nothing staged (chunks of ``lq`` tokens)."""
    cfg = CacheConfig(tokens_per_frame=args.lq, frames_per_chunk=1, policy=FullPolicy(), check_finite=False)
    cache = LayerKVCache(cfg, batch=1, heads=args.heads, head_dim=args.head_dim)
    for f, s in enumerate(range(0, args.history, args.lq)):
        cache.stage(k[:, :, s : s + args.lq], v[:, :, s : s + args.lq], frame_start=f)
        cache.commit()
    return cache


def _probe(args: argparse.Namespace, data: tuple[torch.Tensor, ...], config: AnnSAConfig) -> dict[str, Any]:
    q, k, v = data
    cache = _cache(args, k, v)
    planner = AnnSAPlanner(config)
    t0 = time.perf_counter()
    plan = planner.plan(cache)
    plan.apply_to(cache)
    plan_s = time.perf_counter() - t0
    cache.stage(k[:, :, args.history :], v[:, :, args.history :], frame_start=cache.committed_frames)
    t0 = time.perf_counter()
    recall, density = measure_layer(q, cache.view(), planner, plan, query_sample=args.query_sample)
    return {"recall": recall, "density": density, "plan_s": plan_s, "probe_s": time.perf_counter() - t0}


def _monotone(rows: list[dict[str, Any]], vary: str, fixed: tuple[str, ...], increasing: bool) -> list[str]:
    """Violations of "recall and density grow along ``vary``" among rows that agree on ``fixed``."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[f] for f in fixed), []).append(r)
    bad = []
    for key, grp in groups.items():
        grp = sorted(grp, key=lambda r: r[vary], reverse=not increasing)
        for a, b in itertools.pairwise(grp):
            for m in ("recall", "density"):
                if b[m] < a[m] - 1e-6:
                    bad.append(f"{m} drops from {vary}={a[vary]} to {b[vary]} at {dict(zip(fixed, key, strict=True))}")
    return bad


def main() -> int:
    args = _parse()
    if args.history % args.lq:
        raise SystemExit(f"--history ({args.history}) must be a multiple of --lq ({args.lq})")
    q, k = clustered_qk(
        args.lq,
        args.history + args.lq,
        heads=args.heads,
        head_dim=args.head_dim,
        clusters=args.clusters,
        spread=args.spread,
        scale=args.scale,
        seed=args.seed,
    )
    v = torch.randn(k.shape, generator=torch.Generator().manual_seed(args.seed + 1))
    data = (q, k.contiguous(), v)
    t_start = time.perf_counter()
    lsh_rows, int8_rows = [], []
    for bits in (4, 6, 8):
        for probes in (0, 1):
            for tables in (1, 2):
                ann = LSHConfig(bits=bits, tables=tables, probes=probes, seed=args.seed)
                cfg = AnnSAConfig(ann=ann, q_block_size=args.block, kv_block_size=args.block, backend="torch")
                row = {"family": "lsh", "bits": bits, "probes": probes, "tables": tables} | _probe(args, data, cfg)
                lsh_rows.append(row)
                print(
                    f"lsh  bits={bits} probes={probes} tables={tables}  recall={row['recall']:.3f}  "
                    f"density={row['density']:.3f}"
                )
    cap_rows = []
    for cap in args.caps:
        cfg = AnnSAConfig(
            ann=LSHConfig(bits=4, probes=1, seed=args.seed),
            q_block_size=args.block,
            kv_block_size=args.block,
            max_density=cap,
            backend="torch",
        )
        row = {"family": "lsh_cap", "bits": 4, "probes": 1, "max_density": cap} | _probe(args, data, cfg)
        cap_rows.append(row)
        print(f"lsh  bits=4 probes=1 max_density={cap:.2f}  recall={row['recall']:.3f}  density={row['density']:.3f}")
    for topk in args.topk:
        cfg = AnnSAConfig(
            ann=Int8Config(), q_block_size=args.block, kv_block_size=args.block, top_k_blocks=topk, backend="torch"
        )
        row = {"family": "int8", "top_k_blocks": topk} | _probe(args, data, cfg)
        int8_rows.append(row)
        print(f"int8 top_k_blocks={topk:3d}  recall={row['recall']:.3f}  density={row['density']:.3f}")
    problems = (
        _monotone(lsh_rows, "bits", ("probes", "tables"), increasing=False)
        + _monotone(lsh_rows, "probes", ("bits", "tables"), increasing=True)
        + _monotone(lsh_rows, "tables", ("bits", "probes"), increasing=True)
        + _monotone(int8_rows, "top_k_blocks", (), increasing=True)
        + _monotone(cap_rows, "max_density", (), increasing=True)
    )
    for p in problems:
        print("NOT MONOTONE:", p)
    print(f"monotone in bits, probes, tables, top-k and cap: {not problems}  ({time.perf_counter() - t_start:.1f} s)")
    if args.out:
        record = {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
            "torch": torch.__version__,
            "config": vars(args),
            "floor_density_note": "density includes the always-attended own-chunk and sink blocks",
            "lsh": lsh_rows,
            "lsh_cap": cap_rows,
            "int8": int8_rows,
            "monotone": not problems,
            "violations": problems,
        }
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
