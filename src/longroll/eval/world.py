"""Evaluation of cache policies on the world model: fidelity against the dense rollout and the ground truth,
error on revisited places, and per-layer attention recall and density.

For each trajectory family (``mixture``, ``revisit``) a batch of held-out episodes (seeds from
:data:`~longroll.world.training.EVAL_SEED`, which no training step reaches: the first episodes of the training
script's own evaluation) is rolled out with every policy, from the same ground-truth context and with the same
noise seed, so any difference between two rollouts is the policy's. Per policy and family:

- PSNR and SSIM of the generated frames against the dense rollout (the unbounded cache: what the policy
  approximates), PSNR against the world's ground truth overall, over the first 16 generated frames, over their
  tiles that had been seen before (the only ones the model can know), and per tile category: ``stale`` tiles
  are those that come back into view after a sink-window cache of the same memory has evicted every frame
  that showed them (see :func:`~longroll.world.episode.tile_categories`): the revisit error;
- per layer, the attention **recall** (share of the exact attention mass over the whole history, computed
  against an unbounded shadow cache fed the same keys, that falls on keys the policy both still holds
  verbatim and computes) and **density** (computed query-key pairs over those of dense attention over the
  whole history), measured by :class:`ProbedProcessor` at the last denoising step of each chunk (a sparse step
  under the default schedule); for AnnCA the same two numbers over the prompt tokens.

A TempCache group counts as its newest key only (the one it holds verbatim), so recall understates what merging
keeps; its error is the direct measure.
"""

from __future__ import annotations

import hashlib
import logging
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from longroll.cache.config import CacheConfig, FullPolicy
from longroll.cache.kv_cache import LayerKVCache
from longroll.eval.metrics import ssim
from longroll.ops.probes import attention_recall
from longroll.pipeline.generate import json_safe
from longroll.pipeline.record import run_record
from longroll.pipeline.rollout import ChunkStats
from longroll.policies.cached import CachedProcessor
from longroll.policies.config import EQUAL_MEMORY_FRAMES, PRESET_NAMES, AttentionPolicy
from longroll.sparse.annca import annca_recall
from longroll.world.episode import FAMILIES, EpisodeConfig, Episodes, Family, sample_episodes
from longroll.world.model import WorldModelSpec, WorldWanModel
from longroll.world.rollout import (
    WorldRollout,
    psnr_from_mse,
    rollout_world,
    score_rollout,
    world_processor,
)
from longroll.world.training import EVAL_SEED

log = logging.getLogger(__name__)

#: Policies of a default evaluation (dense first: every other one is compared with it).
DEFAULT_PRESETS: tuple[str, ...] = ("dense", "sink_window", "budget", "tempcache", "annsa", "annca", "all", "all_int8")
#: Fingerprint projection seed for matching cached keys to the shadow cache's (see :func:`match_keys`).
_FINGERPRINT_SEED = 7


# ----------------------------------------------------------------------------------------------------------
# Probing attention during a rollout


def match_keys(k: torch.Tensor, valid: torch.Tensor, k_ref: torch.Tensor) -> torch.Tensor:
    """Where each reference key is held verbatim in ``k``.

    Keys are compared by a float64 random projection (a fingerprint): equal keys give equal values, and
    distinct keys collide with probability ~0.

    Args:
        k: (B, H, L, D) the policy's cache; valid: (B, H, L) bool, its occupied slots.
        k_ref: (B, H, L_ref, D) the keys of the unbounded cache.

    Returns:
        (B, H, L_ref) int64: the slot of ``k`` holding each reference key, or -1.
    """
    if k.shape[:2] != k_ref.shape[:2] or k.shape[-1] != k_ref.shape[-1] or valid.shape != k.shape[:3]:
        raise ValueError(
            f"k {tuple(k.shape)}, valid {tuple(valid.shape)} and k_ref {tuple(k_ref.shape)} must share batch, "
            "heads and head_dim"
        )
    r = torch.randn(k.shape[-1], dtype=torch.float64, generator=torch.Generator().manual_seed(_FINGERPRINT_SEED))
    r = r.to(k.device)
    fp = (k.double() @ r).masked_fill(~valid, math.inf)
    fp_ref = (k_ref.double() @ r).contiguous()
    if fp.shape[-1] == 0:
        return torch.full(fp_ref.shape, -1, dtype=torch.long, device=k.device)
    ordered, perm = fp.sort(dim=-1)
    pos = torch.searchsorted(ordered.contiguous(), fp_ref).clamp(max=fp.shape[-1] - 1)
    found = ordered.gather(-1, pos) == fp_ref
    return torch.where(found, perm.gather(-1, pos), -1)


@dataclass(frozen=True)
class ProbeRecord:
    """One layer's measurement at one chunk.

    Attributes:
        kind: ``"self"`` (self-attention over the cache) or ``"cross"`` (AnnCA over the prompt).
        frame: absolute latent frame of the chunk's first frame.
        layer: transformer block.
        recall: share of the exact attention mass on what the policy computed (mean over batch, heads and
            sampled queries).
        density: computed query-key pairs over those of dense attention.
    """

    kind: str
    frame: int
    layer: int
    recall: float
    density: float


class ProbedProcessor(CachedProcessor):
    """A :class:`CachedProcessor` that also measures, at the last denoising step of each chunk, how much of the
    exact attention its policy computes, layer by layer (see the module docstring).

    Every layer gets an unbounded shadow cache staged and committed with the same keys, the reference for
    self-attention recall. Probes read back to the host: evaluation only.

    Args:
        policy: as :class:`CachedProcessor`; radial masks are not probed.
        query_stride: every ``query_stride``-th query of a chunk is probed.
        probe_every: probe every ``probe_every``-th chunk (by absolute frame).
        **kwargs: the other arguments of :class:`CachedProcessor`.
    """

    def __init__(self, policy: AttentionPolicy, *, query_stride: int = 4, probe_every: int = 1, **kwargs: Any) -> None:
        if policy.radial is not None:
            raise ValueError(f"policy {policy.name!r} uses a radial mask, which ProbedProcessor does not probe")
        for name, value in (("query_stride", query_stride), ("probe_every", probe_every)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        super().__init__(policy, **kwargs)
        self.query_stride, self.probe_every = query_stride, probe_every
        caches = self.caches()
        c0 = caches[0]
        full = CacheConfig(c0.config.tokens_per_frame, c0.config.frames_per_chunk, FullPolicy(), check_finite=False)
        self.shadows = [
            LayerKVCache(full, batch=c.batch, heads=c.heads, head_dim=c.head_dim, v_dim=c.v_dim, dtype=c.dtype,
                         device=c.device, layer=c.layer, head_ids=c.head_ids)
            for c in caches
        ]  # fmt: skip
        self.records: list[ProbeRecord] = []

    def _probing(self) -> bool:
        info = self.current_pass
        fpc = self.frames_per_chunk
        chunk = info.frame_start // fpc
        return not info.commit and info.step == info.num_steps - 1 and chunk % self.probe_every == 0

    def self_attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pre_rope: torch.Tensor
    ) -> torch.Tensor:
        """As :meth:`CachedProcessor.self_attention`; q, k, v: (B, H, Lq, D) -> (B, H, Lq, D)."""
        info = self.current_pass
        shadow = self.shadows[layer]
        shadow.stage(k, v, frame_start=info.frame_start)
        out = super().self_attention(layer, q, k, v, k_pre_rope)
        if self._probing():
            self._probe_self(layer, q)
        if info.commit:
            shadow.commit()
        return out

    def cross_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """As :meth:`CachedProcessor.cross_attention`; q: (B, H, Lq, D), k, v: (B, H, L_ctx, D)."""
        out = super().cross_attention(layer, q, k, v)
        ca, prompt = self.layers[layer].annca, self.collapsed_prompt(layer)
        if ca is not None and prompt is not None and self._probing() and self.is_sparse(layer):
            frame = self.current_pass.frame_start
            if self.annca_selecting[layer] is False:
                # The processor found selection not worth it for this prompt: exact attention ran.
                self.records.append(ProbeRecord("cross", frame, layer, 1.0, 1.0))
            else:
                sel = ca.select(q, prompt, tokens_per_frame=self.tokens_per_frame)
                recall = annca_recall(q, prompt, sel, tokens_per_frame=self.tokens_per_frame)
                self.records.append(ProbeRecord("cross", frame, layer, recall, float(sel.density.mean())))
        return out

    def _probe_self(self, layer: int, q: torch.Tensor) -> None:
        lay, shadow = self.layers[layer], self.shadows[layer]
        view, ref = lay.cache.view(), shadow.view()
        b, h, lq, _ = q.shape
        if h != view.k.shape[1]:
            raise ValueError(f"probes need as many query heads as kv heads, got {h} and {view.k.shape[1]}")
        ids = torch.arange(0, lq, self.query_stride, device=q.device)
        # Occupied slots: a TempCache view marks empty ones with a -inf bias; other views hold no empty slot.
        lv = view.k.shape[2]
        valid = torch.ones(b, view.k.shape[1], lv, dtype=torch.bool, device=q.device)
        if view.bias is not None:
            valid = view.bias > float("-inf")  # (B, H, Lv)
        # The selection is a deterministic function of q and the planned cache: the one the step used.
        sel = lay.selection(q) if self.is_sparse(layer) else None
        if sel is not None:
            computed = sel.key_mask(ids) & valid[:, :, None, :]
        else:
            computed = valid[:, :, None, :].expand(b, h, len(ids), -1)
        slot = match_keys(view.k, valid, ref.k)  # (B, H, L_ref)
        keep = computed.gather(-1, slot.clamp_min(0)[:, :, None, :].expand(b, h, len(ids), -1))
        keep &= (slot >= 0)[:, :, None, :]
        recall = attention_recall(q[:, :, ids], ref.k, keep, bias=ref.bias)
        density = float(computed.float().sum(-1).mean()) / ref.k.shape[2]
        self.records.append(ProbeRecord("self", self.current_pass.frame_start, layer, recall, density))

    def layer_summary(self, kind: str = "self") -> dict[str, list[float] | None]:
        """Per layer: mean recall and density over the probed chunks (``recall``, ``density``) and at the last
        probed chunk, the longest history (``recall_last``, ``density_last``); None where never probed."""
        out: dict[str, list[float] | None] = {}
        records = [r for r in self.records if r.kind == kind]
        last = max((r.frame for r in records), default=-1)
        for metric in ("recall", "density"):
            for suffix, pick in (("", records), ("_last", [r for r in records if r.frame == last])):
                per_layer: list[float] = []
                for layer in range(self.num_layers):
                    vals = [getattr(r, metric) for r in pick if r.layer == layer]
                    per_layer.append(statistics.fmean(vals) if vals else math.nan)
                out[metric + suffix] = None if all(math.isnan(x) for x in per_layer) else per_layer
        return out


# ----------------------------------------------------------------------------------------------------------
# Comparisons


def compare_frames(frames: torch.Tensor, reference: torch.Tensor, start: int) -> dict[str, float]:
    """PSNR (pooled squared error) and mean SSIM of generated frames against a reference rollout.

    Args:
        frames, reference: (B, F, 3, H, W) uint8 of one shape.
        start: first frame compared (the generated ones: after the context).

    Returns:
        ``psnr`` (dB, inf when identical) and ``ssim`` (mean over episodes and frames).
    """
    if frames.shape != reference.shape or frames.dim() != 5:
        raise ValueError(f"frames and reference must be (B, F, 3, H, W) of one shape, got {tuple(frames.shape)}, "
                         f"{tuple(reference.shape)}")  # fmt: skip
    a = frames[:, start:].flatten(0, 1).double() / 255.0
    b = reference[:, start:].flatten(0, 1).to(frames.device).double() / 255.0
    return {"psnr": psnr_from_mse(float((a - b).pow(2).mean())), "ssim": float(ssim(a, b).mean())}


def per_frame_psnr(frames: torch.Tensor, reference: torch.Tensor, start: int) -> list[float]:
    """(B, F, 3, H, W) uint8 pair -> PSNR of each generated frame, pooled over the batch."""
    a = frames[:, start:].double() / 255.0
    b = reference[:, start:].to(frames.device).double() / 255.0
    return psnr_from_mse((a - b).pow(2).mean(dim=(0, 2, 3, 4))).tolist()


def per_episode_scores(
    episodes: Episodes, rollout: WorldRollout, ground_truth: torch.Tensor, spec: WorldModelSpec, memory_frames: int
) -> dict[str, list[float]]:
    """PSNR against the ground truth of each episode on its own: overall and on revisited (stale) tiles.

    Args:
        ground_truth: (B, F, 3, H, W) uint8 frames of ``episodes``.
    """
    out: dict[str, list[float]] = {"psnr": [], "psnr_stale": []}
    for i in range(episodes.batch):
        one = replace(rollout, frames=rollout.frames[i : i + 1], latents=rollout.latents[i : i + 1])
        s = score_rollout(episodes.select(slice(i, i + 1)), one, spec, memory_frames=memory_frames,
                          ground_truth=ground_truth[i : i + 1])  # fmt: skip
        for key in out:
            out[key].append(float(s[key]))  # type: ignore[arg-type]
    return out


def chunk_summary(stats: Sequence[ChunkStats]) -> dict[str, float]:
    """Per-chunk DiT latency (first, last, median, in ms) and the last chunk's cache size (MiB)."""
    ms = [1e3 * s.seconds for s in stats]
    return {
        "ms_first": ms[0],
        "ms_last": ms[-1],
        "ms_median": statistics.median(ms),
        "cache_mib": stats[-1].cache_bytes / 2**20,
        "peak_mib": max(s.peak_bytes for s in stats) / 2**20,
    }


# ----------------------------------------------------------------------------------------------------------
# The evaluation


@dataclass(frozen=True)
class WorldEvalConfig:
    """What :func:`evaluate_world` runs.

    Args:
        policies: preset names (:data:`~longroll.policies.config.PRESET_NAMES`, radial excluded); ``dense`` is
            put first when missing (it is the reference of every comparison).
        families: trajectory families, each evaluated on its own batch of episodes.
        episodes: held-out episodes per family (rolled out together as one batch).
        frames: frames per episode, the ground-truth context included.
        memory_frames: memory of the bounded policies, in frames (and the sink-window geometry that defines
            stale tiles).
        steps: denoising steps per chunk (None: the model's default schedule).
        query_stride: probe every ``query_stride``-th query of a chunk.
        probe_every: probe every ``probe_every``-th chunk.
    """

    policies: tuple[str, ...] = DEFAULT_PRESETS
    families: tuple[Family, ...] = FAMILIES
    episodes: int = 2
    frames: int = 48
    memory_frames: int = EQUAL_MEMORY_FRAMES
    steps: int | None = None
    query_stride: int = 4
    probe_every: int = 1

    def __post_init__(self) -> None:
        pols = tuple(self.policies)
        bad = [p for p in pols if p not in PRESET_NAMES or p == "radial"]
        if not pols or bad or len(set(pols)) != len(pols):
            names = [p for p in PRESET_NAMES if p != "radial"]
            raise ValueError(f"policies must be distinct names from {names}, got {list(pols)}")
        if "dense" not in pols:
            pols = ("dense", *pols)
        elif pols[0] != "dense":
            pols = ("dense", *(p for p in pols if p != "dense"))
        object.__setattr__(self, "policies", pols)
        fams = tuple(self.families)
        if not fams or any(f not in FAMILIES for f in fams) or len(set(fams)) != len(fams):
            raise ValueError(f"families must be distinct names from {list(FAMILIES)}, got {list(fams)}")
        object.__setattr__(self, "families", fams)
        for name in ("episodes", "frames", "memory_frames", "query_stride", "probe_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"steps must be a positive int or None, got {self.steps!r}")


def eval_episodes(family: Family, n: int, frames: int, model: WorldWanModel) -> Episodes:
    """The held-out episodes of a family: the first ``n`` of the training script's evaluation batch."""
    spec = model.spec
    cfg = EpisodeConfig(num_frames=frames, view_px=spec.view_px, step_px=spec.step_px, family=family)
    return sample_episodes(n, EVAL_SEED + FAMILIES.index(family), cfg)


def _check_frames(model: WorldWanModel, frames: int) -> None:
    spec = model.spec
    generated = frames - spec.context_frames
    if generated < spec.frames_per_chunk or generated % spec.frames_per_chunk:
        raise ValueError(
            f"frames={frames} must be the context ({spec.context_frames}) plus a positive multiple of "
            f"{spec.frames_per_chunk} frames"
        )


def file_digest(path: str | Path) -> str:
    """First 16 hex digits of a file's SHA-256 (which checkpoint produced a result)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


@dataclass
class PolicyRun:
    """One policy's rollout of one family's episodes and its measurements (JSON-ready through :meth:`to_json`)."""

    policy: str
    rollout: WorldRollout
    scores: dict[str, Any]
    vs_dense: dict[str, float]
    psnr_vs_dense_per_frame: list[float]
    chunks: dict[str, float]
    layers: dict[str, dict[str, list[float] | None]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "seconds": self.rollout.seconds,
            **self.chunks,
            "psnr_vs_dense": self.vs_dense["psnr"],
            "ssim_vs_dense": self.vs_dense["ssim"],
            **self.scores,
            "psnr_vs_dense_per_frame": self.psnr_vs_dense_per_frame,
            "layers": self.layers,
            "chunk_seconds": [s.seconds for s in self.rollout.stats],
            "chunk_cache_bytes": [s.cache_bytes for s in self.rollout.stats],
        }


def chunk_reporter(
    report: Callable[[str, int, int], None], label: str, total: int
) -> Callable[[int, torch.Tensor, ChunkStats], None]:
    """An ``on_chunk`` callback of :meth:`RolloutEngine.run` that calls ``report(label, done, total)``."""

    def on_chunk(chunk: int, _latents: torch.Tensor, _stats: ChunkStats) -> None:
        report(label, chunk + 1, total)

    return on_chunk


def evaluate_family(
    model: WorldWanModel,
    family: Family,
    cfg: WorldEvalConfig,
    *,
    device: torch.device | str,
    progress: Callable[[str], None] | None = None,
    chunk_progress: Callable[[str, int, int], None] | None = None,
) -> tuple[Episodes, list[PolicyRun]]:
    """Roll ``cfg.episodes`` held-out episodes of ``family`` out with every policy and measure them.

    ``progress`` gets one line per finished rollout; ``chunk_progress`` gets (label, chunks done, chunks total)
    after every generated chunk."""
    _check_frames(model, cfg.frames)
    spec = model.spec
    episodes = eval_episodes(family, cfg.episodes, cfg.frames, model).to(device)
    gt = episodes.render()
    runs: list[PolicyRun] = []
    dense_frames: torch.Tensor | None = None
    for name in cfg.policies:
        proc = world_processor(
            model, name, batch=episodes.batch, device=device, memory_frames=cfg.memory_frames, cls=ProbedProcessor,
            query_stride=cfg.query_stride, probe_every=cfg.probe_every,
        )  # fmt: skip
        assert isinstance(proc, ProbedProcessor)
        total = (cfg.frames - spec.context_frames) // spec.frames_per_chunk
        on_chunk = None if chunk_progress is None else chunk_reporter(chunk_progress, f"{family} {name}", total)
        out = rollout_world(model, name, episodes, steps=cfg.steps, device=device, seed=EVAL_SEED,
                            memory_frames=cfg.memory_frames, processor=proc, on_chunk=on_chunk)  # fmt: skip
        if dense_frames is None:
            dense_frames = out.frames
        scores: dict[str, Any] = dict(
            score_rollout(episodes, out, spec, memory_frames=cfg.memory_frames, ground_truth=gt)
        )
        scores["per_episode"] = per_episode_scores(episodes, out, gt, spec, cfg.memory_frames)
        f0 = out.context_frames
        layers = {"self": proc.layer_summary("self"), "cross": proc.layer_summary("cross")}
        run = PolicyRun(name, out, scores, compare_frames(out.frames, dense_frames, f0),
                        per_frame_psnr(out.frames, dense_frames, f0), chunk_summary(out.stats), layers)  # fmt: skip
        runs.append(run)
        msg = (f"{family:<8} {name:<12} psnr vs dense {run.vs_dense['psnr']:6.2f}  vs gt {scores['psnr']:6.2f}  "
               f"stale {scores['psnr_stale']:6.2f}  ({out.seconds:.1f} s)")  # fmt: skip
        log.info(msg)
        if progress is not None:
            progress(msg)
        del proc
    return episodes, runs


def evaluate_world(
    model: WorldWanModel,
    cfg: WorldEvalConfig,
    *,
    device: torch.device | str,
    checkpoint: str | Path | None = None,
    command: str | None = None,
    progress: Callable[[str], None] | None = None,
    chunk_progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Run the evaluation (see the module docstring); returns the JSON-ready report.

    Args:
        model: the world model on ``device``.
        cfg: what to run.
        checkpoint: the file the model came from (its digest is recorded).
        command: the command line to record (default: this process's).
        progress: called with one line per finished rollout.
        chunk_progress: called with (label, chunks done, chunks total) after every generated chunk.
    """
    report: dict[str, Any] = run_record(device, command)
    report["config"] = asdict(cfg)
    report["model"] = {
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "sha256_16": None if checkpoint is None or not Path(checkpoint).is_file() else file_digest(checkpoint),
        "spec": asdict(model.spec),
        "dtype": str(next(model.parameters()).dtype),
    }
    report["families"] = {}
    for family in cfg.families:
        episodes, runs = evaluate_family(
            model, family, cfg, device=device, progress=progress, chunk_progress=chunk_progress
        )
        report["families"][family] = {
            "world_ids": episodes.world_ids.tolist(),
            "seeds": episodes.seeds.tolist(),
            "policies": {r.policy: r.to_json() for r in runs},
        }
    report["summary"] = summarize(report)
    return json_safe(report)


def _mean_or_nan(values: Sequence[float] | None) -> float:
    vals = [v for v in values or () if v is not None and math.isfinite(v)]
    return statistics.fmean(vals) if vals else math.nan


def summarize(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """One row per policy: its key metrics, per family where they differ (the README tables)."""
    fams = report["families"]
    policies = list(next(iter(fams.values()))["policies"])
    rows: dict[str, dict[str, float]] = {}
    for name in policies:
        row: dict[str, float] = {}
        for family, data in fams.items():
            p = data["policies"][name]
            for key in ("psnr_vs_dense", "ssim_vs_dense", "psnr", "psnr_first16", "psnr_first16_known", "psnr_stale"):
                row[f"{family}/{key}"] = p[key]
        per_family = [data["policies"][name] for data in fams.values()]
        for kind in ("self", "cross"):
            for metric in ("recall", "density", "recall_last", "density_last"):
                row[f"{kind}_{metric}"] = _mean_or_nan(
                    [_mean_or_nan(p["layers"][kind][metric]) for p in per_family if p["layers"][kind][metric]]
                )
        row["ms_per_chunk_median"] = statistics.fmean(p["ms_median"] for p in per_family)
        row["cache_mib"] = max(p["cache_mib"] for p in per_family)
        rows[name] = row
    return rows


def as_table(report: dict[str, Any]) -> str:
    """The summary as two Markdown tables, fidelity and attention/cost, separated by a blank line ('-' for
    None and NaN; an empty PSNR vs dense means identical to dense)."""

    def fmt(x: Any, spec: str) -> str:
        return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)

    def table(head: list[str], rows: list[list[str]]) -> list[str]:
        return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]

    fams = list(report["families"])
    summary = report["summary"]
    head = ["policy"]
    for fam in fams:
        head += [f"{fam}: PSNR vs dense", f"{fam}: SSIM vs dense", f"{fam}: PSNR vs GT", f"{fam}: first 16, known"]
        if fam == "revisit":
            head.append("revisit: revisited (stale) tiles")
    rows = []
    for name, row in summary.items():
        cells = [name]
        for fam in fams:
            cells += [fmt(row[f"{fam}/psnr_vs_dense"], ".2f"), fmt(row[f"{fam}/ssim_vs_dense"], ".3f"),
                      fmt(row[f"{fam}/psnr"], ".2f"), fmt(row[f"{fam}/psnr_first16_known"], ".2f")]  # fmt: skip
            if fam == "revisit":
                cells.append(fmt(row["revisit/psnr_stale"], ".2f"))
        rows.append(cells)
    fidelity = table(head, rows)
    head = ["policy", "self recall: mean / last chunk", "self density: mean / last chunk", "cross recall",
            "cross density", "ms/chunk (median)", "cache MiB"]  # fmt: skip
    rows = [
        [name, f"{fmt(r['self_recall'], '.3f')} / {fmt(r['self_recall_last'], '.3f')}",
         f"{fmt(r['self_density'], '.3f')} / {fmt(r['self_density_last'], '.3f')}", fmt(r["cross_recall"], ".3f"),
         fmt(r["cross_density"], ".3f"), fmt(r["ms_per_chunk_median"], ".0f"), fmt(r["cache_mib"], ".1f")]
        for name, r in summary.items()
    ]  # fmt: skip
    return "\n".join(fidelity) + "\n\n" + "\n".join(table(head, rows))


# ----------------------------------------------------------------------------------------------------------
# Plots


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _num(x: Any) -> float:
    return math.nan if x is None else float(x)


def plot_psnr(report: dict[str, Any], path: Path) -> Path:
    """Bar charts per policy: PSNR vs the dense rollout, vs the ground truth, and on stale (revisited) tiles."""
    plt = _pyplot()
    fams = report["families"]
    policies = list(report["summary"])
    panels = [
        ("PSNR vs dense rollout (dB)", "psnr_vs_dense", list(fams)),
        ("PSNR vs ground truth (dB)", "psnr", list(fams)),
        ("PSNR on stale tiles, vs ground truth (dB)", "psnr_stale", [f for f in fams if f == "revisit"] or list(fams)),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    x = range(len(policies))
    for ax, (title, key, which) in zip(axes, panels, strict=True):
        width = 0.8 / len(which)
        for i, fam in enumerate(which):
            vals = [_num(fams[fam]["policies"][p][key]) for p in policies]
            # Identical rollouts have infinite PSNR: drawn as a hatched bar at the top of the axis.
            finite = [v for v in vals if math.isfinite(v)]
            top = max(finite) + 3 if finite else 50.0
            bars = [top if math.isnan(v) and key == "psnr_vs_dense" else v for v in vals]
            pos = [xi + (i - (len(which) - 1) / 2) * width for xi in x]
            rects = ax.bar(pos, bars, width, label=fam)
            for rect, v in zip(rects, vals, strict=True):
                if math.isnan(v) and key == "psnr_vs_dense":
                    rect.set_hatch("//")
                    rect.set_alpha(0.4)
        ax.set_xticks(list(x), policies, rotation=30, ha="right")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].text(0.01, 0.98, "hatched: identical to dense", transform=axes[0].transAxes, fontsize=7, va="top")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_layers(report: dict[str, Any], path: Path) -> Path:
    """Per-layer attention recall and density of each policy (self-attention, and AnnCA's cross-attention)."""
    plt = _pyplot()
    fams = report["families"]
    policies = list(report["summary"])
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5))
    titles = {"self": "self-attention", "cross": "cross-attention (AnnCA)"}
    for row, kind in enumerate(("self", "cross")):
        for col, metric in enumerate(("recall", "density")):
            ax = axes[row][col]
            for name in policies:
                per_family = [d["policies"][name]["layers"][kind][metric] for d in fams.values()]
                per_family = [v for v in per_family if v]
                if not per_family:
                    continue
                layers = range(len(per_family[0]))
                mean = [_mean_or_nan([_num(v[i]) for v in per_family]) for i in layers]
                ax.plot(list(layers), mean, marker="o", label=name)
            ax.set_title(f"{titles[kind]}: {metric} per layer", fontsize=10)
            ax.set_xlabel("layer")
            ax.set_ylim(0, 1.05)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_per_frame(report: dict[str, Any], path: Path) -> Path:
    """PSNR against the ground truth per generated frame, one line per policy, one panel per family."""
    plt = _pyplot()
    fams = report["families"]
    fig, axes = plt.subplots(1, len(fams), figsize=(7 * len(fams), 4), squeeze=False)
    f0 = report["model"]["spec"]["context_frames"]
    for ax, (fam, data) in zip(axes[0], fams.items(), strict=True):
        for name, p in data["policies"].items():
            ys = [_num(v) for v in p["psnr_per_frame"]]
            ax.plot(range(f0, f0 + len(ys)), ys, label=name, lw=1.2)
        ax.set_title(f"{fam}: PSNR vs ground truth per frame", fontsize=10)
        ax.set_xlabel("frame")
        ax.set_ylabel("dB")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """``eval.json``, ``psnr.png``, ``layers.png``, ``psnr_per_frame.png`` and ``table.md`` in ``out_dir``."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "eval.json"]
    paths[0].write_text(json.dumps(report, indent=1) + "\n")
    paths.append(plot_psnr(report, out / "psnr.png"))
    paths.append(plot_layers(report, out / "layers.png"))
    paths.append(plot_per_frame(report, out / "psnr_per_frame.png"))
    table = out / "table.md"
    table.write_text(as_table(report) + "\n")
    paths.append(table)
    return paths


__all__ = [
    "DEFAULT_PRESETS",
    "ProbeRecord",
    "ProbedProcessor",
    "WorldEvalConfig",
    "as_table",
    "compare_frames",
    "evaluate_world",
    "match_keys",
    "summarize",
    "write_report",
]
