"""CPU benchmark of the KV-cache policies on synthetic video-like K/V with real 3-D RoPE.

For each policy it rolls a scene out chunk by chunk and records: commit cost per frame, attention time vs
cache length, cache entries and bytes, and -- against the unbounded cache fed the same frames -- the relative
L2 error of the attention output, the attention recall (share of the exact attention mass that falls on keys
kept verbatim) and the density (entries attended / entries of the full cache).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from longroll.ann.config import Int8Config, LSHConfig
from longroll.cache import CacheConfig, CachePolicy, FullPolicy, LayerKVCache, SinkWindowPolicy, TempCachePolicy
from longroll.cache.config import BudgetPolicy
from longroll.eval.synthetic import SceneConfig, scene_chunks
from longroll.models.wan.model import WanRotaryEmbedding, apply_rope
from longroll.ops.attention import attention
from longroll.ops.probes import attention_recall, relative_l2
from longroll.pipeline.record import run_record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheBenchConfig:
    """Scene and rollout of the benchmark.

    Args:
        frames: latent frames rolled out.
        frames_per_chunk: frames per commit.
        scene: the synthetic scene (tokens per frame, heads, dims, dynamics).
        memory_frames: budget/cap of the bounded policies, in frames.
        probe_every: chunks between quality/timing probes.
        repeats: timed repetitions per attention probe (median reported).
    """

    frames: int = 64
    frames_per_chunk: int = 2
    scene: SceneConfig = field(
        default_factory=lambda: SceneConfig(tokens_per_frame=256, width=16, heads=4, head_dim=64)
    )
    memory_frames: int = 12
    probe_every: int = 4
    repeats: int = 3

    def __post_init__(self) -> None:
        if self.frames < self.frames_per_chunk or self.frames % self.frames_per_chunk:
            raise ValueError(f"frames must be a positive multiple of frames_per_chunk, got {self.frames}")
        if self.memory_frames <= self.frames_per_chunk + 1:
            raise ValueError(f"memory_frames must exceed frames_per_chunk + 1, got {self.memory_frames}")


def default_policies(cfg: CacheBenchConfig) -> dict[str, CachePolicy]:
    """The policies compared, all bounded ones at the same memory (``memory_frames``)."""
    p = cfg.scene.tokens_per_frame
    cap = cfg.memory_frames * p
    return {
        "full": FullPolicy(),
        "sink_window": SinkWindowPolicy(sink_frames=1, window_frames=cfg.memory_frames - 1),
        "budget": BudgetPolicy(budget_tokens=cap, sink_frames=1),
        "tempcache_int8": TempCachePolicy(max_entries=cap, ann=Int8Config()),
        "tempcache_lsh": TempCachePolicy(max_entries=cap, ann=LSHConfig(bits=16, tables=2)),
        "tempcache_post_rope": TempCachePolicy(max_entries=cap, ann=Int8Config(), match_keys="post_rope"),
        "tempcache_unbounded_group": TempCachePolicy(max_entries=cap, ann=Int8Config(), max_group=None),
    }


@dataclass
class Probe:
    frames: int
    entries: float
    bytes: int
    attention_ms: float
    rel_l2: float
    recall: float
    density: float


@dataclass
class PolicyResult:
    name: str
    commit_ms_per_frame: float
    probes: list[Probe]


def _median_ms(fn: object, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class _Rope:
    """Wan's 3-D RoPE over the scene's (height, width) grid."""

    def __init__(self, scene: SceneConfig) -> None:
        self.rope = WanRotaryEmbedding(scene.head_dim, 4096, 10000.0)
        self.h, self.w = scene.tokens_per_frame // scene.width, scene.width

    def __call__(self, x: torch.Tensor, frame: int, frames: int) -> torch.Tensor:
        cos, sin = self.rope(frames, self.h, self.w, frame_offset=frame, device=x.device)
        return apply_rope(x, cos, sin)


def run_policy(cfg: CacheBenchConfig, name: str, policy: CachePolicy) -> PolicyResult:
    """Roll the scene out with ``policy`` next to an unbounded reference cache and probe both."""
    sc = cfg.scene
    ccfg = CacheConfig(sc.tokens_per_frame, cfg.frames_per_chunk, policy, check_finite=False)
    rcfg = CacheConfig(sc.tokens_per_frame, cfg.frames_per_chunk, FullPolicy(), check_finite=False)
    kw = dict(batch=1, heads=sc.heads, head_dim=sc.head_dim)
    cache, ref = LayerKVCache(ccfg, **kw), LayerKVCache(rcfg, **kw)  # type: ignore[arg-type]
    rope = _Rope(sc)
    gen = scene_chunks(sc, cfg.frames_per_chunk)
    commit_ms: list[float] = []
    probes: list[Probe] = []
    fpc = cfg.frames_per_chunk
    for c in range(cfg.frames // fpc):
        k_raw, v = next(gen)
        k = rope(k_raw, c * fpc, fpc)
        for cc in (cache, ref):
            cc.stage(k, v, frame_start=c * fpc, k_match=k_raw)
        if (c + 1) % cfg.probe_every == 0:
            probes.append(_probe(cfg, cache, ref, k))
        # The committing pass's queries (only the budget policy reads them): drawn like the probe queries,
        # with independent noise, as a chunk's queries resemble its own keys.
        q_commit = _queries(k)
        t0 = time.perf_counter()
        cache.commit(queries=q_commit)
        commit_ms.append((time.perf_counter() - t0) * 1e3 / fpc)
        ref.commit()
    return PolicyResult(name, statistics.median(commit_ms), probes)


def _queries(k: torch.Tensor) -> torch.Tensor:
    """Queries of a chunk: its keys, scaled so that a token's own copies get most of the attention (about
    60 % of the mass over 30 frames, as in video DiTs' sharp spatio-temporal diagonals), plus noise.
    (B, H, n, D) -> same."""
    return 3.0 * k + 0.5 * torch.randn_like(k)


def _probe(
    cfg: CacheBenchConfig,
    cache: LayerKVCache,
    ref: LayerKVCache,
    q_src: torch.Tensor,
) -> Probe:
    q = _queries(q_src)
    view, rview = cache.view(), ref.view()
    ms = _median_ms(lambda: attention(q, *view), cfg.repeats)
    rel = relative_l2(attention(q, *view).out, attention(q, *rview).out)
    n_ref = rview.k.shape[2]
    entries = cache.mean_entries()
    keep = _kept_verbatim(view.k, rview.k)[:, :, None, :]
    recall = attention_recall(q[:, :, ::8], rview.k, keep)
    return Probe(
        frames=cache.committed_frames,
        entries=entries,
        bytes=cache.nbytes(),
        attention_ms=ms,
        rel_l2=rel,
        recall=recall,
        density=(entries + cache.staged_tokens) / n_ref,
    )


def _kept_verbatim(k: torch.Tensor, k_ref: torch.Tensor) -> torch.Tensor:
    """Which reference keys are still held unchanged by the cache: bool (B, H, n_ref).

    Keys are compared through a random float64 projection (a fingerprint): equal keys give equal values and
    distinct random keys collide with probability ~0.
    """
    r = torch.randn(k.shape[-1], dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    fp, fp_ref = k.double() @ r, k_ref.double() @ r
    out = torch.zeros(fp_ref.shape, dtype=torch.bool)
    for b in range(fp.shape[0]):
        for h in range(fp.shape[1]):
            out[b, h] = torch.isin(fp_ref[b, h], fp[b, h])
    return out


def run(cfg: CacheBenchConfig, policies: dict[str, CachePolicy] | None = None) -> list[PolicyResult]:
    torch.manual_seed(0)
    return [run_policy(cfg, n, p) for n, p in (policies or default_policies(cfg)).items()]


def as_table(results: list[PolicyResult]) -> str:
    """A plain-text summary: the last probe of each policy."""
    head = (
        f"{'policy':<26}{'frames':>7}{'entries':>9}{'MiB':>7}{'commit ms/fr':>13}{'attn ms':>9}"
        f"{'rel L2':>8}{'recall':>8}{'density':>8}"
    )
    rows = [head, "-" * len(head)]
    for r in results:
        p = r.probes[-1]
        rows.append(
            f"{r.name:<26}{p.frames:>7}{p.entries:>9.0f}{p.bytes / 2**20:>7.1f}{r.commit_ms_per_frame:>13.2f}"
            f"{p.attention_ms:>9.2f}{p.rel_l2:>8.4f}{p.recall:>8.3f}{p.density:>8.3f}"
        )
    return "\n".join(rows)


def to_json(results: list[PolicyResult]) -> list[dict[str, object]]:
    return [asdict(r) for r in results]


def report_header() -> dict[str, object]:
    """Date, command and environment recorded with every result file."""
    return run_record("cpu")


def plot(results: list[PolicyResult], path: Path) -> None:
    """Attention time, cache MiB and relative error vs frames, one line per policy (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for r in results:
        x = [p.frames for p in r.probes]
        axes[0].plot(x, [p.attention_ms for p in r.probes], marker="o", label=r.name)
        axes[1].plot(x, [p.bytes / 2**20 for p in r.probes], marker="o", label=r.name)
        axes[2].plot(x, [p.rel_l2 for p in r.probes], marker="o", label=r.name)
    for ax, title in zip(
        axes, ("attention ms (one layer, CPU)", "cache MiB (one layer)", "rel. L2 vs full cache"), strict=True
    ):
        ax.set_title(title)
        ax.set_xlabel("generated latent frames")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_cache_bench(out_dir: Path, frames: int = 48) -> tuple[str, list[Path]]:
    """``longroll bench cache``: every cache policy on the synthetic scene, on the CPU; returns the summary table
    and the files written (``cache_policies.json`` and ``cache_policies.png`` under ``out_dir``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = CacheBenchConfig(frames=frames)
    results = run(cfg)
    files = [out_dir / "cache_policies.json", out_dir / "cache_policies.png"]
    files[0].write_text(json.dumps(report_header() | {"config": repr(cfg), "results": to_json(results)}, indent=1))
    plot(results, files[1])
    log.info("wrote %s", out_dir)
    return as_table(results), files
