"""An :class:`~longroll.policies.processor.AttentionProcessor` that runs self-attention over per-layer KV
caches, for chunked autoregressive rollouts."""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F

from longroll.cache.config import CacheConfig, TempCachePolicy
from longroll.cache.graphs import StaticInputs
from longroll.cache.group import CacheGroup
from longroll.cache.kv_cache import STATE_FORMAT, LayerKVCache
from longroll.ops.attention import attention
from longroll.ops.block_index import BlockSparseIndex
from longroll.ops.block_sparse import block_sparse_attention
from longroll.policies.config import PolicyConfig
from longroll.policies.timing import ComponentTimer
from longroll.sparse.annca import AnnCA, CollapsedPrompt, collapse_duplicates
from longroll.sparse.annsa import AnnSAPlanner
from longroll.sparse.radial import radial_index


@dataclass(frozen=True)
class PassInfo:
    """The forward pass being run: which frames, which denoising step, and whether it commits.

    Args:
        frame_start: absolute latent frame of the chunk's first frame.
        step: denoising step index, 0-based (the commit pass uses ``num_steps``).
        num_steps: denoising steps per chunk.
        commit: this pass writes the chunk into the caches (the clean pass).
    """

    frame_start: int
    step: int
    num_steps: int
    commit: bool


class ModelGeometry(Protocol):
    """What a processor needs to know of a model (e.g. ``WanConfig``)."""

    @property
    def num_layers(self) -> int: ...

    @property
    def num_heads(self) -> int: ...

    @property
    def head_dim(self) -> int: ...


def _fingerprint(k: torch.Tensor) -> tuple[float, float]:
    """Two float64 sums that tell prompts apart: k (B, Hk, M, D). One host sync."""
    x = k.double()
    w = torch.arange(1, x.shape[-2] + 1, dtype=torch.float64, device=x.device)[:, None]
    pair = torch.stack([x.sum(), (x * w).sum()]).tolist()
    return float(pair[0]), float(pair[1])


class CachedProcessor:
    """Self-attention over [cached history ; current chunk] with a commit policy per layer.

    Args:
        policy: the rollout's :class:`PolicyConfig`.
        num_layers: transformer blocks (one cache each).
        batch, heads, head_dim: K/V geometry of one layer (heads = the heads held by this process).
        tokens_per_frame, frames_per_chunk: rollout geometry.
        dtype, device: cache storage.
        head_ids: global ids of the held heads (for head-sharded multi-GPU runs).
        check_finite: validate staged K/V (one host sync per stage; off for timed runs).
        timer: optional :class:`ComponentTimer` that receives the time of self-attention (``attention``), ANN
            block selection (``ann_select``), cache commits (``cache_commit``), AnnSA planning (``ann_plan``) and
            cross-attention (``cross_attention``).
        cuda_graphs: CUDA-graph capture of the launch-bound steps (TempCache's steady-state commit, AnnSA's
            per-step block selection): ``"auto"`` on CUDA devices, ``"off"``, or ``"emulate"`` (the capture
            machinery without a graph, for tests). Every layer's captured calls share one set of static inputs.
        overlap_commit: ``"auto"`` (CUDA devices) runs each layer's commit and AnnSA plan on a side stream, so
            that their many small kernels overlap the rest of the commit pass (nothing reads a committed
            history before the next chunk, whose first pass waits for the side stream); ``"off"`` runs them
            in line. Same kernels in the same order per cache either way, so results are identical.
        group_commits: ``"auto"`` stacks every layer's TempCache over one storage and commits them all in one
            batched call after the commit pass's last layer (:class:`~longroll.cache.group.CacheGroup`: one set of
            a few hundred kernels per chunk instead of one per layer); ``"off"`` commits each layer after its
            attention. Identical results; other cache policies always commit per layer.
    """

    def __init__(
        self,
        policy: PolicyConfig,
        *,
        num_layers: int,
        batch: int,
        heads: int,
        head_dim: int,
        tokens_per_frame: int,
        frames_per_chunk: int,
        dtype: torch.dtype,
        device: torch.device | str,
        head_ids: tuple[int, ...] | None = None,
        check_finite: bool = False,
        timer: ComponentTimer | None = None,
        cuda_graphs: Literal["auto", "off", "emulate"] = "auto",
        overlap_commit: Literal["auto", "off"] = "auto",
        group_commits: Literal["auto", "off"] = "auto",
    ) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if overlap_commit not in ("auto", "off"):
            raise ValueError(f"overlap_commit must be 'auto' or 'off', got {overlap_commit!r}")
        if group_commits not in ("auto", "off"):
            raise ValueError(f"group_commits must be 'auto' or 'off', got {group_commits!r}")
        self.policy = policy
        cfg = CacheConfig(
            tokens_per_frame, frames_per_chunk, policy.cache, check_finite=check_finite, commit_graphs=cuda_graphs
        )
        self.graph_inputs = StaticInputs()
        self.group: CacheGroup | None = None
        if group_commits == "auto" and isinstance(policy.cache, TempCachePolicy):
            self.group = CacheGroup(
                cfg, layers=num_layers, batch=batch, heads=heads, head_dim=head_dim, dtype=dtype, device=device,
                head_ids=head_ids, graph_inputs=self.graph_inputs,
            )  # fmt: skip
            self.caches = self.group.caches
        else:
            self.caches = []
            for i in range(num_layers):
                cache = LayerKVCache(
                    cfg, batch=batch, heads=heads, head_dim=head_dim, dtype=dtype, device=device, layer=i,
                    head_ids=head_ids, graph_inputs=self.graph_inputs,
                )  # fmt: skip
                self.caches.append(cache)
        self.pass_info: PassInfo | None = None
        self.timer = timer
        self.tokens_per_frame = tokens_per_frame
        self.planners = [
            AnnSAPlanner(policy.annsa, graphs=cuda_graphs, graph_inputs=self.graph_inputs) if policy.annsa else None
            for _ in range(num_layers)
        ]
        self._planned = [False] * num_layers
        ids = tuple(range(heads)) if head_ids is None else head_ids
        self.annca = [
            AnnCA(policy.annca, head_dim=head_dim, layer=i, head_ids=ids, device=device) if policy.annca else None
            for i in range(num_layers)
        ]
        self._prompts: list[CollapsedPrompt | None] = [None] * num_layers
        # Per layer: (fingerprint of the prompt's keys, whether AnnCA selection pays for that prompt), measured
        # once per prompt; kept across reset_prompt() and saved with the state, so that a resumed rollout makes
        # the decisions of the uninterrupted one.
        self._gate: list[tuple[tuple[float, float], bool] | None] = [None] * num_layers
        self._select_prompt: list[bool | None] = [None] * num_layers
        self._radial: tuple[int, BlockSparseIndex] | None = None
        dev = torch.empty(0, device=device).device
        self._side = torch.cuda.Stream(dev) if overlap_commit == "auto" and dev.type == "cuda" else None
        self._side_pending = False

    @property
    def current_pass(self) -> PassInfo:
        """The pass set by :meth:`begin_pass` (raises before the first one)."""
        return self._info()

    # ------------------------------------------------------------------ geometry (every layer has the same)
    @property
    def num_layers(self) -> int:
        """Layers, one cache each."""
        return len(self.caches)

    @property
    def batch(self) -> int:
        """Batch size of the caches."""
        return self.caches[0].batch

    @property
    def heads(self) -> int:
        """KV heads held by this process, per layer."""
        return self.caches[0].heads

    @property
    def head_dim(self) -> int:
        """Channels per head of the cached keys."""
        return self.caches[0].head_dim

    @property
    def frames_per_chunk(self) -> int:
        """Latent frames staged and committed together."""
        return self.caches[0].config.frames_per_chunk

    @property
    def committed_frames(self) -> int:
        """Latent frames committed so far (every layer's cache holds the same number)."""
        return self.caches[0].committed_frames

    def layer_cache(self, layer: int) -> LayerKVCache:
        """``layer``'s KV cache (for reports and probes; stage and commit go through :meth:`self_attention`).
        The current stream first waits for commits still running on the side stream, so what it reads is
        committed."""
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(self.caches):
            raise ValueError(f"layer must be an int in [0, {len(self.caches)}), got {layer!r}")
        self.join_commits()
        return self.caches[layer]

    def is_sparse(self, layer: int) -> bool:
        """Whether ``layer`` runs its sparse paths in the current pass (the schedule's decision)."""
        return self._sparse(layer)

    def is_planned(self, layer: int) -> bool:
        """Whether ``layer``'s AnnSA planner holds a plan of the committed cache."""
        return self._planned[layer]

    def collapsed_prompt(self, layer: int) -> CollapsedPrompt | None:
        """``layer``'s collapsed prompt for AnnCA (None before its first cross-attention of the prompt)."""
        return self._prompts[layer]

    @property
    def annca_selecting(self) -> tuple[bool | None, ...]:
        """Per layer, whether AnnCA selection runs for the current prompt (None: not measured yet or no AnnCA)."""
        return tuple(self._select_prompt)

    def reset_prompt(self) -> None:
        """Forget the per-layer collapsed prompts (call when the prompt changes; the engine does it per run)."""
        self._prompts = [None] * len(self._prompts)
        self._select_prompt = [None] * len(self._prompts)

    @classmethod
    def for_model(
        cls,
        policy: PolicyConfig,
        model: ModelGeometry,
        *,
        tokens_per_frame: int,
        frames_per_chunk: int,
        dtype: torch.dtype,
        device: torch.device | str,
        batch: int = 1,
        **options: Any,
    ) -> CachedProcessor:
        """A processor with one cache per layer of ``model``, holding all its heads; ``options`` are the other
        keyword arguments of the constructor (``head_ids``, ``check_finite``, ``timer``, ``cuda_graphs``)."""
        return cls(
            policy,
            num_layers=model.num_layers,
            batch=batch,
            heads=model.num_heads,
            head_dim=model.head_dim,
            tokens_per_frame=tokens_per_frame,
            frames_per_chunk=frames_per_chunk,
            dtype=dtype,
            device=device,
            **options,
        )

    def begin_pass(self, info: PassInfo) -> None:
        """Declare the next forward pass (called by the rollout engine before each model call)."""
        self.join_commits()
        if info.frame_start != self.committed_frames:
            raise ValueError(f"frame_start must be {self.committed_frames}, got {info.frame_start}")
        if self.group is not None and self.caches[0].staged_tokens == 0:
            self.group.begin()
        self.pass_info = info

    def self_attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pre_rope: torch.Tensor
    ) -> torch.Tensor:
        info = self._info()
        cache = self.caches[layer]
        cache.stage(k, v, frame_start=info.frame_start, k_match=k_pre_rope)
        view = cache.view()
        planner = self.planners[layer]
        if planner is not None and self._planned[layer] and self._sparse(layer):
            with self._span("ann_select"):
                sel = planner.select(q, view, staged_tokens=cache.staged_tokens)
            with self._span("attention"):
                out = planner.run(q, view, staged_tokens=cache.staged_tokens, selection=sel).out
        elif self.policy.radial is not None and self._sparse(layer):
            with self._span("attention"):
                out = block_sparse_attention(q, *view[:2], self._radial_for(cache), view.bias).out
        else:
            with self._span("attention"):
                out = attention(q, *view, backend=self.policy.attention_backend).out
        if info.commit and self.group is not None:
            self.group.stage_match(layer, k_pre_rope)
            if layer == len(self.caches) - 1:
                self._commit_group()
        elif info.commit:
            if self._side is None:
                self._commit(layer, q)
            else:
                # The side stream starts after everything the main stream issued so far (the staged K/V). Every
                # main-stream tensor it reads stays allocated until it is done: the inputs the model frees after
                # this layer, the track the commit replaces (made on the main stream after a state load or a
                # prefill), and the buffers themselves (should the processor be dropped with a commit pending).
                self._side.wait_stream(torch.cuda.current_stream(self._side.device))
                buf, track = cache.buffers, cache.track
                keep = [q, k, v, k_pre_rope, buf.k, buf.v, buf.count, buf.frame, buf.lengths]
                if track is not None:
                    keep += [track.slots, track.keys, track.active]
                for t in keep:
                    t.record_stream(self._side)
                with torch.cuda.stream(self._side):
                    self._commit(layer, q)
                self._side_pending = True
        return out

    def _commit(self, layer: int, q: torch.Tensor) -> None:
        cache, planner = self.caches[layer], self.planners[layer]
        with self._span("cache_commit"):
            cache.commit(queries=q)
        if planner is not None:
            with self._span("ann_plan"):
                planner.plan(cache)
            self._planned[layer] = True

    def _commit_group(self) -> None:
        """Every layer's commit in one batched call, then the AnnSA plans (on the side stream when it is on)."""
        group = self.group
        assert group is not None

        def run() -> None:
            with self._span("cache_commit"):
                group.commit()
            for i, planner in enumerate(self.planners):
                if planner is not None:
                    with self._span("ann_plan"):
                        planner.plan(self.caches[i])
                    self._planned[i] = True

        if self._side is None:
            run()
            return
        self._side.wait_stream(torch.cuda.current_stream(self._side.device))
        buf = group.stacked.buffers
        keep = [buf.k, buf.v, buf.count, buf.frame, buf.lengths]
        for c in self.caches:
            if c.track is not None:
                keep += [c.track.slots, c.track.keys, c.track.active]
        for t in keep:
            t.record_stream(self._side)
        with torch.cuda.stream(self._side):
            run()
        self._side_pending = True

    def join_commits(self) -> None:
        """Make the current stream wait for commits still running on the side stream (no host sync)."""
        if self._side is not None and self._side_pending:
            torch.cuda.current_stream(self._side.device).wait_stream(self._side)
            self._side_pending = False

    def cross_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ca = self.annca[layer]
        with self._span("cross_attention"):
            if ca is None or not self._sparse(layer):
                return F.scaled_dot_product_attention(q, k, v)
            prompt = self._prompts[layer]
            if prompt is None or prompt.k.shape[0] != k.shape[0]:
                # Exact duplicate collapse (one host sync) once per prompt and layer, not per step.
                prompt = self._prompts[layer] = collapse_duplicates(k, v)
                fp = _fingerprint(k)
                gate = self._gate[layer]
                self._select_prompt[layer] = gate[1] if gate is not None and gate[0] == fp else None
                if self._select_prompt[layer] is None:
                    # Keep selecting only where it measurably pays (host syncs, once per prompt and layer).
                    decision = ca.worth_selecting(q, prompt, tokens_per_frame=self.tokens_per_frame)
                    self._select_prompt[layer] = decision
                    self._gate[layer] = (fp, decision)
            if not self._select_prompt[layer]:
                return ca.dense(q, prompt)
            return ca.run(q, prompt, tokens_per_frame=self.tokens_per_frame).out

    def _radial_for(self, cache: LayerKVCache) -> BlockSparseIndex:
        """The static mask of the current chunk, built once and shared by every layer and step."""
        cfg = self.policy.radial
        if cfg is None:
            raise RuntimeError("no radial config")
        if self._radial is None or self._radial[0] != cache.committed_frames:
            index = radial_index(
                cfg,
                history_frames=cache.committed_frames,
                chunk_frames=cache.staged_tokens // self.tokens_per_frame,
                tokens_per_frame=self.tokens_per_frame,
                device=cache.device,
            )
            self._radial = (cache.committed_frames, index)
        return self._radial[1]

    def _span(self, name: str) -> AbstractContextManager[None]:
        return nullcontext() if self.timer is None else self.timer.span(name)

    def _sparse(self, layer: int) -> bool:
        info = self._info()
        # The commit pass (step == num_steps) is the cleanest pass: it follows the last step's schedule.
        return self.policy.schedule.is_sparse(min(info.step, info.num_steps - 1), info.num_steps, layer)

    def _info(self) -> PassInfo:
        if self.pass_info is None:
            raise RuntimeError("begin_pass() must be called before the model's forward")
        return self.pass_info

    # ------------------------------------------------------------------ reports and state
    def cache_bytes(self) -> int:
        return sum(c.nbytes() for c in self.caches)

    def mean_entries(self) -> float:
        """Committed entries per head, averaged over layers (host sync)."""
        self.join_commits()
        return sum(c.mean_entries() for c in self.caches) / len(self.caches)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The rollout state, flat and ready for safetensors: ``format`` (1,) int64 :data:`STATE_FORMAT`, every
        layer's cache state (``layer{i}.{name}``, see :meth:`LayerKVCache.state_dict`), AnnCA's per-prompt
        decisions (``layer{i}.annca_gate`` (3,) float64: prompt fingerprint and decision) and the int8 AnnSA
        plans' anchors (``layer{i}.annsa.anchor_codes``, ``layer{i}.annsa.anchor_scale``)."""
        self.join_commits()
        state = {"format": torch.tensor([STATE_FORMAT], dtype=torch.int64)}
        state |= {f"layer{i}.{k}": v for i, c in enumerate(self.caches) for k, v in c.state_dict().items()}
        for i, gate in enumerate(self._gate):
            if gate is not None:
                state[f"layer{i}.annca_gate"] = torch.tensor([*gate[0], float(gate[1])], dtype=torch.float64)
        for i, planner in enumerate(self.planners):
            if planner is not None and self._planned[i]:
                state |= {f"layer{i}.annsa.{k}": v for k, v in planner.state_dict().items()}
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict` output.

        Every layer's part is validated before anything is written (:meth:`LayerKVCache.check_state`, the
        AnnCA gates, the AnnSA anchors, unknown or missing layers); on any problem a ``ValueError`` names it
        and the processor is unchanged. AnnSA plans are then rebuilt from the restored caches with their saved
        anchors (int8) or their keys (LSH), which gives the plans the rollout was saved with.
        """
        if not isinstance(state, Mapping):
            raise ValueError(f"state must be a mapping of tensors, got {type(state).__name__}")
        self.join_commits()
        fmt = state.get("format")
        if not isinstance(fmt, torch.Tensor) or fmt.dtype != torch.int64 or tuple(fmt.shape) != (1,):
            raise ValueError("state['format'] must be a (1,) int64 tensor (a state of CachedProcessor.state_dict)")
        if int(fmt[0]) != STATE_FORMAT:
            raise ValueError(f"state['format'] is {int(fmt[0])}; this version of longroll reads format {STATE_FORMAT}")
        n = len(self.caches)
        parts: list[dict[str, dict[str, torch.Tensor]]] = [{"cache": {}, "annsa": {}, "annca": {}} for _ in range(n)]
        for key, value in state.items():
            if key == "format":
                continue
            head, _, name = key.partition(".")
            i = int(head[5:]) if head.startswith("layer") and head[5:].isdigit() else -1
            if not name or not 0 <= i < n:
                raise ValueError(f"state has key {key!r}, which is not of a layer of this {n}-layer processor")
            if name == "annca_gate":
                parts[i]["annca"][name] = value
            elif name.startswith("annsa."):
                parts[i]["annsa"][name[len("annsa.") :]] = value
            else:
                parts[i]["cache"][name] = value
        loaded = []
        for i, (c, part) in enumerate(zip(self.caches, parts, strict=True)):
            try:
                cache_state = c.check_state(part["cache"])
                gate = self._check_gate(i, part["annca"].get("annca_gate"))
                planner = self.planners[i]
                if planner is None:
                    if part["annsa"]:
                        raise ValueError(f"state has AnnSA plan entries {sorted(part['annsa'])}, this policy has none")
                    anchors = None
                elif cache_state.committed_frames > 0:
                    anchors = planner.check_state(c, part["annsa"])
                elif part["annsa"]:
                    raise ValueError("state has AnnSA plan entries for a cache with no committed frame")
                else:
                    anchors = None
            except ValueError as e:
                raise ValueError(f"layer {i}: {e}") from None
            loaded.append((cache_state, gate, anchors))
        frames = {s.committed_frames for s, _, _ in loaded}
        if len(frames) != 1:
            raise ValueError(f"state's layers hold different numbers of committed frames: {sorted(frames)}")
        for i, (c, (cache_state, gate, anchors)) in enumerate(zip(self.caches, loaded, strict=True)):
            c.load_state_dict(cache_state)
            self._gate[i] = gate
            planner = self.planners[i]
            self._planned[i] = planner is not None and c.committed_frames > 0
            if planner is not None and self._planned[i]:
                planner.plan(c, anchors=anchors)
        self._prompts = [None] * n
        self._select_prompt = [None] * n

    def _check_gate(self, layer: int, gate: torch.Tensor | None) -> tuple[tuple[float, float], bool] | None:
        if gate is None:
            return None
        if self.annca[layer] is None:
            raise ValueError("state has an annca_gate, this policy has no AnnCA")
        if not isinstance(gate, torch.Tensor) or gate.dtype != torch.float64 or tuple(gate.shape) != (3,):
            raise ValueError("annca_gate must be a (3,) float64 tensor")
        a, b, decision = (float(x) for x in gate.tolist())
        if not (math.isfinite(a) and math.isfinite(b)) or decision not in (0.0, 1.0):
            raise ValueError(f"annca_gate must hold a finite fingerprint and a 0/1 decision, got {[a, b, decision]}")
        return (a, b), bool(decision)

    def replan(self) -> None:
        """Rebuild the AnnSA plans of every layer from its cache (after the caches were filled outside a
        rollout); int8 plans sample new anchors (a restored state keeps its own: :meth:`load_state_dict`)."""
        self.join_commits()
        for i, c in enumerate(self.caches):
            planner = self.planners[i]
            self._planned[i] = planner is not None and c.committed_frames > 0
            if planner is not None and self._planned[i]:
                planner.plan(c)
