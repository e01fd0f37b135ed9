"""CPU timing of TempCache's eviction at the cap: age against redundancy, at Wan2.1-like shapes.

Two measurements, float32, one layer:
  * the slot search alone (``_new_slots``: every one of a frame's P tokens needs a slot, none is free) over
    growing caps, to show how its cost scales with the cap N;
  * a whole commit of one frame (``LayerKVCache.commit``) at the cap, after the cache has filled up.

    PYTHONPATH=src python3 scripts/bench_evict_cpu.py --heads 12 --tokens 1560 --head-dim 128
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from longroll.cache import CacheBuffers, CacheConfig, LayerKVCache, TempCachePolicy
from longroll.cache.tempcache import _new_slots


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def slot_search(heads: int, p: int, d: int, cap: int, compress: float | None, repeats: int) -> float:
    g = torch.Generator().manual_seed(0)
    buf = CacheBuffers.allocate(1, heads, cap, d, d, torch.float32, torch.device("cpu"))
    frames = cap // p
    base = torch.randn(1, heads, p, d, generator=g)
    # A scene that drifts: old frames are similar to one another, as a world model's revisited places.
    buf.k[:, :, :cap] = base.repeat(1, 1, frames + 1, 1)[:, :, :cap] + 0.7 * torch.randn(1, heads, cap, d, generator=g)
    buf.v[:, :, :cap] = torch.randn(1, heads, cap, d, generator=g)
    buf.frame[:, :, :cap] = (torch.arange(cap) // p).int()
    buf.lengths.fill_(cap)
    new = torch.ones(1, heads, p, dtype=torch.bool)
    count0 = torch.ones(1, heads, cap + 1)
    v0 = buf.v.clone()

    def run() -> None:
        buf.count.copy_(count0)  # the same work every repeat (merges change counts and values)
        buf.v.copy_(v0)
        _new_slots(buf, new, cap, frames - 3, 3, True, compress)

    return _median_ms(run, repeats)


def commit(heads: int, p: int, d: int, frames: int, evict_by: str, repeats: int) -> float:
    policy = TempCachePolicy(
        max_entries=frames * p, sink_frames=3, recent_frames=3, max_group=16, evict_by=evict_by, compress_threshold=0.5
    )  # type: ignore[arg-type]
    cfg = CacheConfig(tokens_per_frame=p, frames_per_chunk=1, policy=policy, check_finite=False, commit_graphs="off")
    cache = LayerKVCache(cfg, batch=1, heads=heads, head_dim=d)
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1, heads, p, d, generator=g)
    f = 0

    def one() -> None:
        nonlocal f
        k = base + 0.7 * torch.randn(1, heads, p, d, generator=g)
        cache.stage(k, torch.randn(1, heads, p, d, generator=g), frame_start=f, k_match=k)
        cache.commit()
        f += 1

    for _ in range(frames + 2):
        one()
    return _median_ms(one, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=1560)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--caps", default="3900,7800,15600,23400,46800", help="caps of the slot search, entries")
    ap.add_argument("--frames", type=int, default=15, help="cap of the whole commit, in frames")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    h, p, d = args.heads, args.tokens, args.head_dim
    out: dict[str, object] = {"threads": torch.get_num_threads(), "heads": h, "tokens": p, "head_dim": d}
    search = []
    for cap in (int(c) for c in args.caps.split(",")):
        age = slot_search(h, p, d, cap, None, args.repeats)
        red = slot_search(h, p, d, cap, 0.5, args.repeats)
        search.append({"cap": cap, "age_ms": round(age, 1), "redundancy_ms": round(red, 1)})
        print(f"slot search cap {cap:6d}: age {age:8.1f} ms  redundancy {red:8.1f} ms", flush=True)
    out["slot_search"] = search
    whole = {}
    for ev in ("age", "redundancy"):
        whole[ev] = round(commit(h, p, d, args.frames, ev, args.repeats), 1)
        print(f"commit of one frame at the cap ({args.frames} frames = {args.frames * p} entries), {ev}: "
              f"{whole[ev]:.1f} ms", flush=True)  # fmt: skip
    out["commit_ms"] = whole
    print(json.dumps(out))


if __name__ == "__main__":
    main()
