"""Where one layer's commit time goes: the TempCache commit at its cap, timed and profiled kernel by kernel.

One layer's cache at Wan2.1-1.3B shapes (12 heads x 128, 1,560 tokens per latent frame, chunks of 3 frames,
bf16, a 15-frame cap) is filled with a synthetic video whose keys follow the previous frame's for a share of
the tokens (so that merges, overflow merges and evictions all happen), then every variant's steady-state commit
is timed (median of CUDA-event timings over warm commits, stage time subtracted) and one commit is profiled.

    PYTHONPATH=src python3 scripts/gpu_profile_commit.py --out $OUT/commit

Variants: the sink-window's ring, TempCache with int8 matching (the fused top-1 kernel on CUDA) under age and
redundancy eviction (the redundancy merge plan both as torch ops and as the fused kernels of
``longroll.ops.redundancy``: their buffers after the same chunks are compared), and with LSH matching under
age eviction.

Writes ``commit.json`` (per variant: commit ms, stage ms, top kernels with counts and total ms, kernel count)
and ``<variant>_kernels.txt``. On a machine without CUDA it runs a small smoke version on the CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from longroll.cache import CacheConfig, LayerKVCache
from longroll.pipeline.record import run_record
from longroll.policies.config import TempCacheLayout, preset

HEADS, HEAD_DIM, FPC, MEMORY = 12, 128, 3, 15


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Video:
    """Keys and values of a synthetic video: each frame keeps ``follow`` of the previous frame's tokens (plus a
    little noise, cosine ~0.95) and draws the rest afresh. Shapes (1, HEADS, tpf, HEAD_DIM)."""

    def __init__(self, tpf: int, follow: float, device: torch.device, dtype: torch.dtype) -> None:
        self.tpf, self.follow, self.device, self.dtype = tpf, follow, device, dtype
        self.gen = torch.Generator(device=device).manual_seed(0)
        self.prev = self._rand()

    def _rand(self) -> torch.Tensor:
        return torch.randn(1, HEADS, self.tpf, HEAD_DIM, device=self.device, generator=self.gen)

    def frame(self) -> torch.Tensor:
        keep = torch.rand(1, HEADS, self.tpf, 1, device=self.device, generator=self.gen) < self.follow
        nxt = torch.where(keep, self.prev + 0.3 * self._rand(), self._rand())
        self.prev = nxt
        return nxt

    def chunk(self) -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.cat([self.frame() for _ in range(FPC)], dim=2)
        return k.to(self.dtype), torch.randn(k.shape, device=self.device, generator=self.gen).to(self.dtype)


def measure(name: str, cache: LayerKVCache, video: Video, warm_chunks: int, timed: int, out: Path) -> dict:
    device = cache.device
    for _ in range(warm_chunks):
        k, v = video.chunk()
        cache.stage(k, v, frame_start=cache.committed_frames, k_match=k)
        cache.commit()
    stage_ms, commit_ms = [], []
    for _ in range(timed):
        k, v = video.chunk()
        _sync(device)
        if device.type == "cuda":
            e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            e0.record()
            cache.stage(k, v, frame_start=cache.committed_frames, k_match=k)
            e1.record()
            cache.commit()
            e2.record()
            torch.cuda.synchronize()
            stage_ms.append(e0.elapsed_time(e1))
            commit_ms.append(e1.elapsed_time(e2))
        else:
            cache.stage(k, v, frame_start=cache.committed_frames, k_match=k)
            cache.commit()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    k, v = video.chunk()
    cache.stage(k, v, frame_start=cache.committed_frames, k_match=k)
    _sync(device)
    with profile(activities=activities) as prof:
        cache.commit()
        _sync(device)
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"] if device.type == "cuda" else []
    kernels = sorted(
        ({"name": e.key[:160], "count": e.count, "ms": e.self_device_time_total / 1e3} for e in events),
        key=lambda r: -r["ms"],
    )
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    (out / f"{name}_kernels.txt").write_text(prof.key_averages().table(sort_by=sort_by, row_limit=40))
    lengths = cache.buffers.lengths.float()
    return {
        "commit_ms": statistics.median(commit_ms) if commit_ms else None,
        "stage_ms": statistics.median(stage_ms) if stage_ms else None,
        "commit_ms_all": commit_ms,
        "kernel_launches": sum(r["count"] for r in kernels),
        "kernel_ms_total": sum(r["ms"] for r in kernels),
        "top_kernels": kernels[:25],
        "mean_entries": float(lengths.mean()),
        "merged_share": float((cache.buffers.count > 1).float().mean()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--follow", type=float, default=0.7, help="share of tokens that follow the previous frame")
    ap.add_argument("--timed", type=int, default=20)
    ap.add_argument("--recent", type=int, nargs="*", default=[3], help="TempCache recent_frames values to time")
    ap.add_argument("--plan-backends", nargs="*", default=["torch", "triton"],
                    help="redundancy merge-plan backends to time (both: their buffers are compared)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tpf = 1560 if device.type == "cuda" else 16
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    timed = args.timed if device.type == "cuda" else 2
    args.out.mkdir(parents=True, exist_ok=True)
    variants: dict[str, Any] = {}
    # name -> (preset, layout fields): the sink-window's ring, TempCache with each eviction and matching family.
    table: dict[str, tuple[str, dict[str, Any]]] = {"sink_window": ("sink_window", {})}
    backends: dict[str, str] = {}
    for r in args.recent:
        table[f"tempcache_age_r{r}"] = ("tempcache", {"recent_frames": r, "evict_by": "age"})
        for backend in args.plan_backends:
            name = f"tempcache_redundancy_{backend}_r{r}"
            table[name] = ("tempcache", {"recent_frames": r, "evict_by": "redundancy"})
            backends[name] = backend
        table[f"tempcache_lsh_age_r{r}"] = ("tempcache_lsh", {"recent_frames": r, "evict_by": "age"})
    buffers: dict[str, Any] = {}
    for name, (base, fields) in table.items():
        pol = preset(base, tokens_per_frame=tpf, frames_per_chunk=FPC, memory_frames=MEMORY,
                     layout=TempCacheLayout(**fields) if base != "sink_window" else None)  # fmt: skip
        cache_policy = pol.cache
        if name in backends:
            cache_policy = dataclasses.replace(cache_policy, plan_backend=backends[name])  # type: ignore[arg-type]
        cfg = CacheConfig(tokens_per_frame=tpf, frames_per_chunk=FPC, policy=cache_policy, check_finite=False)
        cache = LayerKVCache(cfg, batch=1, heads=HEADS, head_dim=HEAD_DIM, dtype=dtype, device=device)
        video = Video(tpf, args.follow, device, dtype)
        variants[name] = measure(name, cache, video, warm_chunks=MEMORY // FPC + 4, timed=timed, out=args.out)
        if name in backends:
            buffers[name] = cache.buffers
        r_ = variants[name]
        print(f"{name}: commit {r_['commit_ms']} ms, {r_['kernel_launches']} kernels, merged {r_['merged_share']:.2f}")
    # The same chunks through both plan backends: merges, victims and counts must agree; values to rounding.
    agreement: dict[str, Any] = {}
    for r in args.recent:
        names = [f"tempcache_redundancy_{b}_r{r}" for b in args.plan_backends]
        if len(names) == 2:
            a, b = (buffers[n] for n in names)
            # The trash slot (the last) takes masked writes in any order: it is left out.
            agreement[f"r{r}"] = {
                field: bool(torch.equal(getattr(a, field)[:, :, : a.slots], getattr(b, field)[:, :, : a.slots]))
                for field in ("k", "count", "frame")
            } | {
                "lengths": bool(torch.equal(a.lengths, b.lengths)),
                "v_max_abs_diff": float((a.v.float() - b.v.float())[:, :, : a.slots].abs().max()),
            }
            print(f"r{r} torch vs triton plan: {agreement[f'r{r}']}")
    rec = run_record(device) | {"shapes": {"heads": HEADS, "head_dim": HEAD_DIM, "tokens_per_frame": tpf,
                                            "frames_per_chunk": FPC, "memory_frames": MEMORY, "dtype": str(dtype)},
                                "follow": args.follow, "variants": variants, "plan_agreement": agreement}  # fmt: skip
    (args.out / "commit.json").write_text(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
