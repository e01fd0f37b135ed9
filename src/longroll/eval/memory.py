"""The memory test of the world model: do cache policies keep what a revisit needs, at equal memory?

Protocol: held-out "revisit" episodes (the first of the evaluation batch, seeds from
:data:`~longroll.world.training.EVAL_SEED`), whose first ``context_frames`` frames (the outward run and the
loop's first side, :data:`~longroll.world.training.MEMORY_CONTEXT_FRAMES`) are given as ground truth; the model
generates the rest with each policy from that context and the same noise. The loop's last side and the way back
return to places of the ground-truth context after a sink-window cache of the same memory has evicted every
frame that showed them, so their error against the ground truth measures memory. (With the default 3 context
frames no revisited tile was ever shown as ground truth: the model returns to places it imagined itself, and
its error there is a novel tile's, ~14 dB, however well it remembers.)

Per policy: PSNR against the ground truth on revisited (stale) tiles, recently seen tiles and all generated
frames, PSNR against the dense rollout, each pooled over the episodes and per episode; per-layer attention recall
and density (:class:`~longroll.eval.world.ProbedProcessor`); and per-episode paired differences against
sink-window and dense with percentile-bootstrap 95 % intervals (:mod:`longroll.eval.stats`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from longroll.cache.config import SinkWindowPolicy
from longroll.cache.host_tier import HostTierConfig
from longroll.eval.stats import paired_difference
from longroll.eval.world import ProbedProcessor, run_record
from longroll.pipeline.generate import json_safe
from longroll.policies.cached import CachedProcessor
from longroll.policies.config import (
    EQUAL_MEMORY_FRAMES,
    PRESET_NAMES,
    SINK_FRAMES,
    AttentionPolicy,
    TempCacheLayout,
    preset,
)
from longroll.world.episode import (
    FAMILIES,
    NOVEL,
    RECENT,
    STALE,
    EpisodeConfig,
    Episodes,
    sample_episodes,
    tile_categories,
)
from longroll.world.model import WorldWanModel
from longroll.world.rollout import WorldRollout, rollout_world, squared_error, world_processor
from longroll.world.training import EVAL_SEED, MEMORY_CONTEXT_FRAMES

log = logging.getLogger(__name__)

#: Policies of the memory test (dense first: the reference of every comparison; sink_window second: the baseline).
MEMORY_PRESETS: tuple[str, ...] = ("dense", "sink_window", "tempcache", "all", "all_int8")
#: The presets a layout can be applied to: the TempCache ones, and sink-window (of which only the layout's
#: ``sink_frames`` applies, the window taking the rest of the memory).
LAYOUT_BASES: tuple[str, ...] = ("tempcache", "tempcache_lsh", "all", "all_int8", "sink_window")
#: Scores of a policy, each pooled over the episodes and per episode.
SCORES: tuple[str, ...] = ("psnr_revisited", "psnr_recent", "psnr_novel", "psnr_vs_gt", "psnr_vs_dense")


@dataclass(frozen=True)
class LayoutCandidate:
    """A TempCache preset under another layout (or a sink-window with other sinks), evaluated under its own name.

    Args:
        name: label in the report (must not be a preset name).
        base: the preset it modifies (one of :data:`LAYOUT_BASES`).
        layout: its TempCache layout.
        top_k_blocks: AnnSA's int8 key blocks per query block instead of the preset's (None: unchanged).
        max_density: AnnSA's cap on the ANN-selected share of key blocks instead of the preset's (None:
            unchanged).
        annca: False drops the preset's AnnCA (prompt-token selection), to tell its share of a change apart.
        host_frames: a host tier under the cache holding this many latent frames of evicted entries per head
            (:class:`~longroll.cache.host_tier.HostTierConfig`; any base, ``all`` and ``all_int8`` with their
            AnnSA and AnnCA); None: no host tier.
        host_top_blocks: blocks the host tier retrieves per head and chunk.
        host_block_tokens: entries per host block (None: a quarter of a frame).
        host_query_block_tokens: queries averaged into one query block of the tier's selection score (None: the
            host block's size).
        host_equal: the host tier's device slot region counts against the memory: the cache gets
            ``memory_frames`` minus the frames the slots would fill (rounded up), so that cache plus slots hold
            no more entries than the other policies' caches.
    """

    name: str
    base: str
    layout: TempCacheLayout
    top_k_blocks: int | None = None
    max_density: float | None = None
    annca: bool = True
    host_frames: int | None = None
    host_top_blocks: int = 8
    host_block_tokens: int | None = None
    host_query_block_tokens: int | None = None
    host_equal: bool = False

    def __post_init__(self) -> None:
        if not self.name or self.name in MEMORY_PRESETS or self.name in LAYOUT_BASES:
            raise ValueError(f"name must be a new non-empty label, got {self.name!r}")
        if self.base not in LAYOUT_BASES:
            raise ValueError(f"base must be one of {LAYOUT_BASES}, got {self.base!r}")
        if not isinstance(self.layout, TempCacheLayout):
            raise ValueError(f"layout must be a TempCacheLayout, got {type(self.layout).__name__}")
        sparse = self.top_k_blocks is not None or self.max_density is not None or not self.annca
        if sparse and self.base not in ("all", "all_int8"):
            raise ValueError(f"top_k_blocks, max_density and annca apply to 'all' and 'all_int8', not {self.base!r}")
        if self.top_k_blocks is not None and self.top_k_blocks < 1:
            raise ValueError(f"top_k_blocks must be >= 1 or None, got {self.top_k_blocks!r}")
        for name in ("host_frames", "host_block_tokens", "host_query_block_tokens"):
            val = getattr(self, name)
            if val is not None and (not isinstance(val, int) or val < 1):
                raise ValueError(f"{name} must be an int >= 1 or None, got {val!r}")
        if self.host_equal and self.host_frames is None:
            raise ValueError("host_equal needs a host tier (host_frames)")
        if not isinstance(self.host_top_blocks, int) or self.host_top_blocks < 1:
            raise ValueError(f"host_top_blocks must be an int >= 1, got {self.host_top_blocks!r}")
        if self.max_density is not None and not 0.0 < self.max_density <= 1.0:
            raise ValueError(f"max_density must be in (0, 1] or None, got {self.max_density!r}")


def parse_layout(text: str) -> LayoutCandidate:
    """``name=base:key=value,...`` -> a :class:`LayoutCandidate`, keys of :class:`TempCacheLayout`
    (``sinks`` for sink_frames, ``recent`` for recent_frames, ``threshold``, ``overflow``, ``group``;
    ``group=none`` for unbounded, ``evict=age|redundancy``, ``compress`` for compress_threshold), and for
    ``all``/``all_int8`` AnnSA's ``topk`` and ``density`` and ``annca=off``, and a host tier's ``host``
    (frames), ``top`` (blocks per chunk), ``block`` (tokens), ``qblock`` (queries per query block of the
    selection) and ``equal=on`` (its slot region taken from the cache's memory).

    E.g. ``tc_g4=tempcache:group=4``, ``tc_s1=tempcache:sinks=1``, ``tc_host=tempcache:host=48,top=8`` or
    ``tc_red=tempcache:evict=redundancy,compress=0.5``.
    """
    try:
        name, rest = text.split("=", 1)
        base, _, opts = rest.partition(":")
        kwargs: dict[str, Any] = {}
        sparse: dict[str, Any] = {}
        keys = {"sinks": "sink_frames", "recent": "recent_frames", "threshold": "threshold",
                "overflow": "overflow_threshold", "group": "max_group", "evict": "evict_by",
                "compress": "compress_threshold"}  # fmt: skip
        for item in filter(None, (o.strip() for o in opts.split(","))):
            key, value = item.split("=", 1)
            if key == "equal":
                if value not in ("on", "off"):
                    raise ValueError(f"equal must be on or off, got {value!r}")
                sparse["host_equal"] = value == "on"
            elif key in ("host", "top", "block", "qblock"):
                names = {"host": "host_frames", "top": "host_top_blocks", "block": "host_block_tokens",
                         "qblock": "host_query_block_tokens"}  # fmt: skip
                sparse[names[key]] = int(value)
            elif key == "topk":
                sparse["top_k_blocks"] = int(value)
            elif key == "density":
                sparse["max_density"] = float(value)
            elif key == "annca":
                if value not in ("on", "off"):
                    raise ValueError(f"annca must be on or off, got {value!r}")
                sparse["annca"] = value == "on"
            elif key not in keys:
                extra = ["annca", "block", "density", "equal", "host", "qblock", "top", "topk"]
                raise ValueError(f"unknown layout key {key!r}; use {[*sorted(keys), *extra]}")
            elif key == "evict":
                if value not in ("age", "redundancy"):
                    raise ValueError(f"evict must be age or redundancy, got {value!r}")
                kwargs[keys[key]] = value
            elif key in ("sinks", "recent", "group"):
                kwargs[keys[key]] = None if value.lower() == "none" and key == "group" else int(value)
            else:
                kwargs[keys[key]] = float(value)
    except ValueError as err:
        raise ValueError(f"layout must read name=base:key=value,..., got {text!r} ({err})") from None
    return LayoutCandidate(name.strip(), base.strip(), TempCacheLayout(**kwargs), **sparse)


@dataclass(frozen=True)
class MemoryEvalConfig:
    """What :func:`evaluate_memory` runs.

    Args:
        policies: preset names; ``dense`` and ``sink_window`` are put first when missing.
        layouts: TempCache layout candidates evaluated besides the presets.
        episodes: held-out revisit episodes (rolled out together as one batch).
        frames: frames per episode, the ground-truth context included.
        context_frames: ground-truth frames committed before generation.
        memory_frames: memory of every bounded policy, in frames (and the sink-window geometry of stale tiles).
        probe: measure per-layer recall and density (slower: an unbounded shadow cache per layer).
        query_stride, probe_every: probe sampling (see :class:`~longroll.eval.world.ProbedProcessor`).
        resamples: bootstrap resamples of each interval.
    """

    policies: tuple[str, ...] = MEMORY_PRESETS
    layouts: tuple[LayoutCandidate, ...] = ()
    episodes: int = 32
    frames: int = 48
    context_frames: int = MEMORY_CONTEXT_FRAMES
    memory_frames: int = EQUAL_MEMORY_FRAMES
    probe: bool = True
    query_stride: int = 4
    probe_every: int = 1
    resamples: int = 10_000

    def __post_init__(self) -> None:
        pols = tuple(self.policies)
        allowed = [p for p in PRESET_NAMES if p != "radial"]  # the probes do not cover radial masks
        bad = [p for p in pols if p not in allowed]
        if bad or len(set(pols)) != len(pols):
            raise ValueError(f"policies must be distinct names from {allowed}, got {list(pols)}")
        pols = ("dense", "sink_window", *(p for p in pols if p not in ("dense", "sink_window")))
        object.__setattr__(self, "policies", pols)
        layouts = tuple(self.layouts)
        names = [c.name for c in layouts]
        if any(not isinstance(c, LayoutCandidate) for c in layouts) or len(set(names)) != len(names):
            raise ValueError(f"layouts must be LayoutCandidates with distinct names, got {names}")
        if set(names) & set(pols):
            raise ValueError(f"layout names {sorted(set(names) & set(pols))} clash with policy names")
        object.__setattr__(self, "layouts", layouts)
        for name in ("episodes", "frames", "context_frames", "memory_frames", "query_stride", "probe_every",
                     "resamples"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.context_frames >= self.frames:
            raise ValueError(f"context_frames={self.context_frames} must be below frames={self.frames}")

    def policy_configs(self, model: WorldWanModel) -> list[AttentionPolicy]:
        """Every policy to run, in order, at the model's geometry (layouts renamed to their labels)."""
        spec = model.spec
        tpf, fpc, mem = spec.tokens_per_frame, spec.frames_per_chunk, self.memory_frames
        out = [preset(name, tokens_per_frame=tpf, frames_per_chunk=fpc, memory_frames=mem) for name in self.policies]
        for cand in self.layouts:
            tier, mem = None, self.memory_frames
            if cand.host_frames is not None:
                block = cand.host_block_tokens or max(1, tpf // 4)
                tier = HostTierConfig(cand.host_frames * tpf, block_tokens=block, top_blocks=cand.host_top_blocks,
                                      query_block_tokens=cand.host_query_block_tokens)  # fmt: skip
                if cand.host_equal:
                    mem -= -(-tier.slot_tokens // tpf)
                    if mem < fpc + 1:
                        raise ValueError(f"layout {cand.name!r}: a slot region of {tier.slot_tokens} entries "
                                         f"leaves {mem} of memory_frames={self.memory_frames} frames to the "
                                         "cache")  # fmt: skip
            if cand.base == "sink_window":
                sinks = min(cand.layout.sink_frames, mem - fpc)
                out.append(AttentionPolicy(cand.name, SinkWindowPolicy(sinks, mem - sinks), host_tier=tier))
                continue
            p = preset(cand.base, tokens_per_frame=tpf, frames_per_chunk=fpc, memory_frames=mem, layout=cand.layout)
            annsa = p.annsa
            if annsa is not None and cand.top_k_blocks is not None:
                annsa = dataclasses.replace(annsa, top_k_blocks=cand.top_k_blocks)
            if annsa is not None and cand.max_density is not None:
                annsa = dataclasses.replace(annsa, max_density=cand.max_density)
            annca = p.annca if cand.annca else None
            out.append(dataclasses.replace(p, name=cand.name, annsa=annsa, annca=annca, host_tier=tier))
        return out


def memory_episodes(n: int, frames: int, model: WorldWanModel) -> Episodes:
    """The held-out revisit episodes: the first ``n`` of the evaluation batch of the "revisit" family."""
    spec = model.spec
    cfg = EpisodeConfig(num_frames=frames, view_px=spec.view_px, step_px=spec.step_px, family="revisit")
    return sample_episodes(n, EVAL_SEED + FAMILIES.index("revisit"), cfg)


def _psnr(mse: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of mean squared errors on [0, 1] (inf for 0, NaN stays NaN)."""
    return -10.0 * torch.log10(mse)


def episode_scores(
    frames: torch.Tensor, dense: torch.Tensor, gt: torch.Tensor, cats: torch.Tensor, f0: int
) -> dict[str, tuple[float, list[float]]]:
    """Pooled and per-episode PSNR of a rollout.

    Args:
        frames, dense, gt: (B, F, 3, H, W) uint8: the rollout, the dense rollout and the ground truth.
        cats: (B, F - f0, H, W) long tile category of each generated pixel.
        f0: context frames (not scored).

    Returns:
        score name (:data:`SCORES`) -> (pooled over the episodes, [per episode]); NaN where nothing to score,
        inf where identical.
    """
    err = squared_error(frames, gt)[:, f0:].double()  # (B, F', H, W)
    err_dense = squared_error(frames, dense)[:, f0:].double()
    out: dict[str, tuple[float, list[float]]] = {}
    masks = {"psnr_revisited": cats == STALE, "psnr_recent": cats == RECENT, "psnr_novel": cats == NOVEL}
    for name, mask in masks.items():
        m = mask.double()
        s, n = (err * m).sum(dim=(1, 2, 3)), m.sum(dim=(1, 2, 3))
        per = torch.where(n > 0, s / n.clamp_min(1), math.nan)
        pooled = float(s.sum() / n.sum()) if float(n.sum()) > 0 else math.nan
        out[name] = (float(_psnr(torch.tensor(pooled))), _psnr(per).tolist())
    for name, e in (("psnr_vs_gt", err), ("psnr_vs_dense", err_dense)):
        out[name] = (float(_psnr(e.mean())), _psnr(e.mean(dim=(1, 2, 3))).tolist())
    return out


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def evaluate_memory(
    model: WorldWanModel,
    cfg: MemoryEvalConfig,
    *,
    device: torch.device | str,
    command: str | None = None,
    progress: Callable[[str], None] | None = None,
    time_budget_s: float = math.inf,
) -> dict[str, Any]:
    """Run the memory test (see the module docstring).

    Args:
        time_budget_s: after this many seconds no further layout candidate starts (the presets always run);
            the skipped ones are listed under ``details["skipped"]``.

    Returns:
        ``{"episodes", "families": {"revisit": {policy: {psnr_revisited, psnr_recent, psnr_vs_gt,
        psnr_vs_dense}}}, "gap_recovered": {policy: share}, "ci95": {"<policy>_minus_sink_window_revisited":
        [lo, hi]}}`` (pooled PSNRs; the gap recovered is ``(policy - sink_window) / (dense - sink_window)`` on
        revisited tiles, for every bounded policy but sink-window) and, under ``"details"``, everything else:
        config, run record, per-episode scores, paired differences against sink-window and dense on every
        score, per-layer recall and density, timings.
    """
    spec = model.spec
    f0 = cfg.context_frames
    generated = cfg.frames - f0
    if generated < spec.frames_per_chunk or generated % spec.frames_per_chunk or f0 % spec.frames_per_chunk:
        raise ValueError(
            f"frames={cfg.frames} and context_frames={f0} must both be whole chunks of {spec.frames_per_chunk}"
        )
    episodes = memory_episodes(cfg.episodes, cfg.frames, model).to(device)
    gt = episodes.render()
    sink = min(SINK_FRAMES, cfg.memory_frames - spec.frames_per_chunk)
    cats = tile_categories(
        episodes, frames_per_chunk=spec.frames_per_chunk, sink_frames=sink, window_frames=cfg.memory_frames - sink,
        context_frames=f0, tile_px=spec.token_px,
    )[:, f0:]  # fmt: skip
    cats = cats.repeat_interleave(spec.token_px, dim=-1).repeat_interleave(spec.token_px, dim=-2)
    dense: torch.Tensor | None = None
    scores: dict[str, dict[str, tuple[float, list[float]]]] = {}
    layers: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    skipped: list[str] = []
    start = time.perf_counter()
    for policy in cfg.policy_configs(model):
        t0 = time.perf_counter()
        if policy.name not in cfg.policies and t0 - start > time_budget_s:
            skipped.append(policy.name)
            continue
        proc: CachedProcessor
        if cfg.probe and policy.radial is None:
            proc = world_processor(model, policy, batch=episodes.batch, device=device, cls=ProbedProcessor,
                                   query_stride=cfg.query_stride, probe_every=cfg.probe_every)  # fmt: skip
        else:
            proc = world_processor(model, policy, batch=episodes.batch, device=device)
        out: WorldRollout = rollout_world(model, policy, episodes, device=device, seed=EVAL_SEED, context_frames=f0,
                                          memory_frames=cfg.memory_frames, processor=proc)  # fmt: skip
        if dense is None:
            dense = out.frames
        scores[policy.name] = episode_scores(out.frames, dense, gt, cats, f0)
        if isinstance(proc, ProbedProcessor):
            layers[policy.name] = {"self": proc.layer_summary("self"), "cross": proc.layer_summary("cross")}
        seconds[policy.name] = time.perf_counter() - t0
        s = scores[policy.name]
        msg = (f"memory {policy.name:<14} revisited {s['psnr_revisited'][0]:6.2f}  "
               f"recent {s['psnr_recent'][0]:6.2f}  vs gt {s['psnr_vs_gt'][0]:6.2f}  "
               f"vs dense {s['psnr_vs_dense'][0]:6.2f}  ({seconds[policy.name]:.1f} s)")  # fmt: skip
        log.info(msg)
        if progress is not None:
            progress(msg)
        del proc
    report = memory_report(cfg, scores, layers, seconds, episodes, device=device, command=command)
    report["details"]["skipped"] = skipped
    return report


def memory_report(
    cfg: MemoryEvalConfig,
    scores: dict[str, dict[str, tuple[float, list[float]]]],
    layers: dict[str, dict[str, Any]],
    seconds: dict[str, float],
    episodes: Episodes,
    *,
    device: torch.device | str,
    command: str | None = None,
) -> dict[str, Any]:
    """The report of :func:`evaluate_memory` from its measurements (``scores[policy][score] = (pooled,
    per episode)``; ``dense`` and ``sink_window`` must be among the policies)."""
    if "dense" not in scores or "sink_window" not in scores:
        raise ValueError(f"scores must hold dense and sink_window, got {sorted(scores)}")
    keys = ("psnr_revisited", "psnr_recent", "psnr_vs_gt", "psnr_vs_dense")
    families = {"revisit": {p: {k: _finite_or_none(s[k][0]) for k in keys} for p, s in scores.items()}}
    rev = {p: s["psnr_revisited"][0] for p, s in scores.items()}
    gap = rev["dense"] - rev["sink_window"]
    bounded = [p for p in scores if p not in ("dense", "sink_window")]
    gap_recovered = {p: _finite_or_none((rev[p] - rev["sink_window"]) / gap) if gap else None for p in bounded}
    ci95: dict[str, list[float | None]] = {}
    paired: dict[str, dict[str, Any]] = {}
    for p in scores:
        for ref in ("sink_window", "dense"):
            if p == ref:
                continue
            for k in ("psnr_revisited", "psnr_recent", "psnr_vs_gt"):
                d = paired_difference(scores[p][k][1], scores[ref][k][1], resamples=cfg.resamples)
                paired[f"{p}_minus_{ref}_{k.removeprefix('psnr_')}"] = d.to_json()
                if ref == "sink_window" and k == "psnr_revisited":
                    ci95[f"{p}_minus_sink_window_revisited"] = [_finite_or_none(x) for x in d.ci95]
    details = {
        **run_record(device, command),
        "config": {**asdict(cfg), "layouts": [asdict(c) for c in cfg.layouts]},
        "protocol": {
            "family": "revisit",
            "seed": EVAL_SEED + FAMILIES.index("revisit"),
            "world_ids": episodes.world_ids.tolist(),
            "episode_seeds": episodes.seeds.tolist(),
        },
        "gap_dense_minus_sink_window_revisited": _finite_or_none(gap),
        "pooled": {p: {k: _finite_or_none(v[0]) for k, v in s.items()} for p, s in scores.items()},
        "per_episode": {p: {k: [_finite_or_none(x) for x in v[1]] for k, v in s.items()} for p, s in scores.items()},
        "paired": paired,
        "layers": layers,
        "seconds": seconds,
    }
    return {"episodes": episodes.batch, "families": families, "gap_recovered": gap_recovered, "ci95": ci95,
            "details": details}  # fmt: skip


def split_report(report: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the summary with exactly the keys ``episodes``, ``families``, ``gap_recovered``, ``ci95``; the details)."""
    summary = {k: report[k] for k in ("episodes", "families", "gap_recovered", "ci95")}
    return summary, report["details"]


def memory_table(report: dict[str, Any]) -> str:
    """A Markdown table of the report: pooled PSNRs, the paired differences to sink-window and to dense on
    revisited tiles with their intervals, the gap recovered and mean self-attention recall/density."""
    fam = report["families"]["revisit"]
    det = report["details"]
    head = ["policy", "revisited tiles vs GT", "recent tiles vs GT", "all vs GT", "vs dense",
            "revisited: minus sink-window [95% CI]", "revisited: minus dense [95% CI]", "gap recovered",
            "self recall", "self density"]  # fmt: skip

    def f(x: Any, spec: str = ".2f") -> str:
        return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)

    def mean(v: list[float] | None) -> float | None:
        vals = [x for x in v or [] if x is not None and math.isfinite(x)]
        return sum(vals) / len(vals) if vals else None

    def paired(name: str) -> str:
        d = det["paired"].get(name)
        return "-" if d is None else f"{f(d['mean'], '+.2f')} [{f(d['ci95'][0], '+.2f')}, {f(d['ci95'][1], '+.2f')}]"

    rows = []
    for p, s in fam.items():
        lay = det["layers"].get(p, {}).get("self", {})
        rows.append([p, f(s["psnr_revisited"]), f(s["psnr_recent"]), f(s["psnr_vs_gt"]), f(s["psnr_vs_dense"]),
                     paired(f"{p}_minus_sink_window_revisited"), paired(f"{p}_minus_dense_revisited"),
                     f(report["gap_recovered"].get(p), ".0%"), f(mean(lay.get("recall")), ".3f"),
                     f(mean(lay.get("density")), ".3f")])  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


#: Scores two runs of the memory test are compared on.
COMPARED_SCORES: tuple[str, ...] = ("psnr_revisited", "psnr_recent", "psnr_vs_gt")
#: Config entries two compared runs must share (the episodes and what each policy holds of them).
COMPARED_CONFIG: tuple[str, ...] = ("episodes", "frames", "context_frames", "memory_frames")


def compare_runs(run: dict[str, Any], base: dict[str, Any], *, resamples: int = 10_000) -> dict[str, Any]:
    """Paired per-episode differences ``run - base`` of two memory-test runs of the same episodes (e.g. FP8
    linears against the same model without them), for every policy both ran.

    Args:
        run, base: ``details.json`` of each run (``protocol``, ``config``, ``pooled``, ``per_episode``).

    Returns:
        ``{"policies": {policy: {score: {"run", "base", "pooled_difference", "paired": {mean, ci95, episodes,
        wins, level, excludes_zero}}}}}`` (pooled PSNRs in dB; null where infinite).

    Raises:
        ValueError naming the first difference when the runs do not score the same episodes and frames, or
        share no policy.
    """
    for name, given in (("run", run), ("base", base)):
        missing = [k for k in ("protocol", "config", "pooled", "per_episode") if k not in given]
        if missing:
            raise ValueError(f"{name} must be a details.json of the memory test; it lacks {missing}")
    for key in ("world_ids", "episode_seeds", "seed", "family"):
        if run["protocol"].get(key) != base["protocol"].get(key):
            raise ValueError(f"run and base score other episodes: protocol {key!r} differs")
    for key in COMPARED_CONFIG:
        if run["config"].get(key) != base["config"].get(key):
            raise ValueError(f"run and base differ in config {key!r}: {run['config'].get(key)!r} against "
                             f"{base['config'].get(key)!r}")  # fmt: skip
    shared = [p for p in run["pooled"] if p in base["pooled"]]
    if not shared:
        raise ValueError(f"run ({sorted(run['pooled'])}) and base ({sorted(base['pooled'])}) share no policy")

    def num(x: float | None) -> float:
        return math.inf if x is None else float(x)  # null marks an infinite PSNR (identical to dense)

    out: dict[str, dict[str, Any]] = {}
    for p in shared:
        out[p] = {}
        for k in COMPARED_SCORES:
            a, b = run["pooled"][p].get(k), base["pooled"][p].get(k)
            d = paired_difference([num(x) for x in run["per_episode"][p][k]],
                                  [num(x) for x in base["per_episode"][p][k]], resamples=resamples)  # fmt: skip
            diff = None if a is None or b is None else a - b
            out[p][k] = {"run": a, "base": b, "pooled_difference": diff, "paired": json_safe(d.to_json())}
    return {"policies": out}


__all__ = [
    "COMPARED_CONFIG",
    "COMPARED_SCORES",
    "LAYOUT_BASES",
    "MEMORY_PRESETS",
    "LayoutCandidate",
    "MemoryEvalConfig",
    "compare_runs",
    "episode_scores",
    "evaluate_memory",
    "memory_episodes",
    "memory_report",
    "memory_table",
    "parse_layout",
    "split_report",
]
