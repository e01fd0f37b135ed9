"""The synthetic needle test of the host tier: a distinctive key block planted N latent frames ago, long evicted
from the device cache, must come back when the chunk's queries are aligned with it.

Frames are fed to a :class:`~longroll.cache.kv_cache.LayerKVCache` directly (no model): every frame's keys are
standard normal, except the needle frame's, ``scale * u + noise * z`` for one unit direction ``u`` per head; the
last chunk's queries are ``u + noise * z``. Recall is the share of the needle's entries (per head, as held by
the host tier) that the selection of the last commit retrieves.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from longroll.ann import Int8Config
from longroll.cache.config import CacheConfig, SinkWindowPolicy, TempCachePolicy
from longroll.cache.host_tier import HostTierConfig
from longroll.cache.kv_cache import LayerKVCache


@dataclass(frozen=True)
class NeedleConfig:
    """Geometry of the needle test (tiny by default, so that 3,000 frames run in seconds on a CPU).

    Args:
        policy: the device cache: ``"sink_window"`` (1 sink) or ``"tempcache"`` (1 sink, no ring).
        tokens_per_frame, frames_per_chunk, batch, heads, head_dim: K/V geometry.
        memory_frames: the device cache's size, in frames.
        block_tokens, top_blocks: the host tier's block size and blocks retrieved per chunk.
        scale, noise: the needle keys are ``scale * u + noise * z``, the aligned queries ``u + noise * z``.
    """

    policy: Literal["sink_window", "tempcache"] = "sink_window"
    tokens_per_frame: int = 8
    frames_per_chunk: int = 1
    batch: int = 2
    heads: int = 2
    head_dim: int = 16
    memory_frames: int = 15
    block_tokens: int = 8
    top_blocks: int = 4
    scale: float = 3.0
    noise: float = 0.3

    def __post_init__(self) -> None:
        if self.policy not in ("sink_window", "tempcache"):
            raise ValueError(f"policy must be 'sink_window' or 'tempcache', got {self.policy!r}")
        for name in ("tokens_per_frame", "frames_per_chunk", "batch", "heads", "head_dim", "top_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.memory_frames <= self.frames_per_chunk + 1:
            raise ValueError(f"memory_frames must exceed frames_per_chunk + 1, got {self.memory_frames}")

    def cache_config(self, host_frames: int) -> CacheConfig:
        """The device cache with a host tier of ``host_frames`` frames."""
        tpf, fpc = self.tokens_per_frame, self.frames_per_chunk
        tier = HostTierConfig(host_frames * tpf, block_tokens=self.block_tokens, top_blocks=self.top_blocks)
        policy: SinkWindowPolicy | TempCachePolicy
        if self.policy == "sink_window":
            policy = SinkWindowPolicy(1, self.memory_frames - 1)
        else:
            policy = TempCachePolicy(max_entries=self.memory_frames * tpf, sink_frames=1, ann=Int8Config())
        return CacheConfig(tpf, fpc, policy, check_finite=False, host_tier=tier)


def needle_trial(cfg: NeedleConfig, n_ago: int, seed: int, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Plant a needle ``n_ago`` frames before the last frame, roll on and select with aligned queries (the
    draws are made on the CPU, so that every device sees the same frames).

    Returns:
        ``recall`` (B, H) float32 share of the needle's host entries retrieved, ``frames`` fed, ``seconds``.
    """
    if n_ago < cfg.memory_frames:
        raise ValueError(f"n_ago must be >= memory_frames={cfg.memory_frames} (evicted from the cache), got {n_ago}")
    g = torch.Generator().manual_seed(seed)
    b, h, d, tpf, fpc = cfg.batch, cfg.heads, cfg.head_dim, cfg.tokens_per_frame, cfg.frames_per_chunk
    total = n_ago + 2  # frame 0 is the sink (never evicted): the needle comes after it
    total += (-total) % fpc
    cache = LayerKVCache(cfg.cache_config(total + fpc), batch=b, heads=h, head_dim=d, device=device)
    dev = cache.device
    u = F.normalize(torch.randn(b, h, 1, d, generator=g), dim=-1)
    needle = total - 1 - n_ago
    t0 = time.perf_counter()
    chunks = total // fpc
    for c in range(chunks):
        k = torch.randn(b, h, fpc * tpf, d, generator=g)
        v = torch.randn(b, h, fpc * tpf, d, generator=g)
        if c * fpc <= needle < (c + 1) * fpc:
            sl = slice((needle - c * fpc) * tpf, (needle - c * fpc + 1) * tpf)
            k[:, :, sl] = cfg.scale * u + cfg.noise * k[:, :, sl]
        k, v = k.to(dev), v.to(dev)
        cache.stage(k, v, frame_start=c * fpc, k_match=k)
        q = torch.randn(b, h, fpc * tpf, d, generator=g)
        if c == chunks - 1:
            q = u + cfg.noise * q
        cache.commit(queries=q.to(dev))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    host = cache.host
    assert host is not None and host.selected is not None and host.selected_ok is not None
    bpr, bt = host.blocks_per_record, cfg.block_tokens
    selected, ok = host.selected.cpu(), host.selected_ok.cpu()
    rec, blk = selected // bpr, selected % bpr
    bi, hi = torch.arange(b)[:, None, None], torch.arange(h)[None, :, None]
    frames = host.host_frame.view(host.records, b, h, bpr, bt)[rec, bi, hi, blk]
    count = host.host_count.view(host.records, b, h, bpr, bt)[rec, bi, hi, blk] * ok[..., None]
    got = ((frames == needle) & (count > 0)).flatten(2).sum(-1)
    held = ((host.host_frame == needle) & (host.host_count > 0)).sum(dim=(0, 3))
    recall = got.float() / held.clamp_min(1).float()
    return {"recall": recall, "held": held, "frames": total, "seconds": seconds}


def needle_sweep(
    cfg: NeedleConfig, n_agos: list[int], seeds: int, device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """Recall vs N over ``seeds`` seeds (every batch row and head a trial): a JSON-ready dict."""
    rows = []
    for n in n_agos:
        trials = [needle_trial(cfg, n, s, device) for s in range(seeds)]
        rec = torch.cat([t["recall"].flatten() for t in trials])
        rows.append({
            "n_frames_ago": n,
            "recall_mean": float(rec.mean()),
            "recall_min": float(rec.min()),
            "trials": int(rec.numel()),
            "needle_entries_held_mean": float(torch.cat([t["held"].flatten() for t in trials]).float().mean()),
            "ms_per_frame": 1e3 * sum(t["seconds"] for t in trials) / sum(t["frames"] for t in trials),
        })  # fmt: skip
    return {"config": asdict(cfg), "seeds": seeds, "results": rows}


__all__ = ["NeedleConfig", "needle_sweep", "needle_trial"]
