"""An :class:`~longroll.policies.processor.AttentionProcessor` that runs self-attention over per-layer KV
caches, for chunked autoregressive rollouts: the schedule (which pass, which layers run sparse) over one
:class:`~longroll.policies.layer.LayerAttention` per layer."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from longroll.cache.config import CacheConfig, TempCachePolicy
from longroll.cache.graphs import StaticInputs
from longroll.cache.group import CacheGroup
from longroll.cache.kv_cache import STATE_FORMAT, LayerKVCache
from longroll.ops.block_index import BlockSparseIndex
from longroll.policies.config import EQUAL_MEMORY_FRAMES, AttentionPolicy, preset
from longroll.policies.layer import CommitStream, LayerAttention
from longroll.policies.timing import ComponentTimer
from longroll.sparse.annca import CollapsedPrompt
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


class CachedProcessor:
    """Self-attention over [cached history ; current chunk] with a commit policy per layer.

    Args:
        policy: the rollout's :class:`AttentionPolicy` (:meth:`for_model` also takes a preset name).
        num_layers: transformer blocks (one :class:`LayerAttention` each).
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
            that their many small kernels overlap the rest of the commit pass and the next chunk's first
            layers (each layer's next stage waits for that layer's commit only); ``"off"`` runs them
            in line. Same kernels in the same order per cache either way, so results are identical.
        group_commits: ``"auto"`` stacks every layer's TempCache over one storage and commits them all in one
            batched call after the commit pass's last layer (:class:`~longroll.cache.group.CacheGroup`: one set of
            a few hundred kernels per chunk instead of one per layer); an int ``g`` forms groups of ``g``
            consecutive layers, each committed (on the side stream with ``overlap_commit``) once its last layer
            has staged, so that a group's commit overlaps the next layers' attention and its temporaries are
            ``g`` layers' instead of the model's; ``"off"`` (the default) commits each layer after its attention.
            Identical results; other cache policies always commit per layer. Measured on an H200 at
            Wan2.1-1.3B shapes with redundancy eviction (``results/gpu/equal_memory/groups_45/``): groups of 5
            make the ``tempcache`` / ``all`` chunk x1.45 / x1.32 the sink-window's instead of x1.76 / x1.64
            per layer, at 1.19 / 1.23 times its peak memory instead of 1.06 / 1.10 (one group of all layers:
            x1.50 / x1.37 at 1.75 times): not the default, since equal memory is the point.

    Attributes:
        layers: the :class:`LayerAttention` of every layer, in order.
        groups: the :class:`~longroll.cache.group.CacheGroup` of each run of consecutive layers, in order
            (empty when commits are per layer).
    """

    def __init__(
        self,
        policy: AttentionPolicy,
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
        group_commits: Literal["auto", "off"] | int = "off",
    ) -> None:
        if not isinstance(policy, AttentionPolicy):
            raise ValueError(f"policy must be an AttentionPolicy, got {type(policy).__name__}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if overlap_commit not in ("auto", "off"):
            raise ValueError(f"overlap_commit must be 'auto' or 'off', got {overlap_commit!r}")
        size = group_size(group_commits, num_layers)
        self.policy = policy
        if size and policy.host_tier is not None:
            raise ValueError(f"group_commits={group_commits!r} does not combine with a host tier yet; use 'off'")
        cfg = CacheConfig(
            tokens_per_frame, frames_per_chunk, policy.cache, check_finite=check_finite, commit_graphs=cuda_graphs,
            host_tier=policy.host_tier,
        )  # fmt: skip
        self.graph_inputs = StaticInputs()
        self.commits = CommitStream(device, overlap=overlap_commit == "auto")
        self.groups: tuple[CacheGroup, ...] = ()
        if size and isinstance(policy.cache, TempCachePolicy):
            self.groups = tuple(
                CacheGroup(
                    cfg, layers=min(size, num_layers - first), batch=batch, heads=heads, head_dim=head_dim,
                    dtype=dtype, device=device, head_ids=head_ids, graph_inputs=self.graph_inputs,
                    first_layer=first,
                )
                for first in range(0, num_layers, size)
            )  # fmt: skip
        self._group_size = size
        self.layers: list[LayerAttention] = [
            LayerAttention(
                policy, cfg, layer=i, batch=batch, heads=heads, head_dim=head_dim, dtype=dtype, device=device,
                head_ids=head_ids, graph_inputs=self.graph_inputs, commits=self.commits, timer=timer,
                cache=None if not self.groups else self.groups[i // size].caches[i % size],
            )
            for i in range(num_layers)
        ]
        self.pass_info: PassInfo | None = None
        self.timer = timer
        self.tokens_per_frame = tokens_per_frame
        self._radial: tuple[int, BlockSparseIndex] | None = None

    @classmethod
    def for_model(
        cls,
        policy: AttentionPolicy | str,
        model: ModelGeometry,
        *,
        tokens_per_frame: int,
        frames_per_chunk: int,
        dtype: torch.dtype,
        device: torch.device | str,
        batch: int = 1,
        memory_frames: int = EQUAL_MEMORY_FRAMES,
        **options: Any,
    ) -> CachedProcessor:
        """The one way from a preset (or a policy) to a processor: one layer per layer of ``model``, holding
        all its heads (``model.num_heads`` unless ``options`` name ``heads``).

        Args:
            policy: an :class:`AttentionPolicy`, or a preset name of
                :data:`~longroll.policies.config.PRESET_NAMES` built at this geometry with ``memory_frames``.
            model: ``num_layers``, ``num_heads`` and ``head_dim`` (a ``WanConfig``, or any such object).
            memory_frames: memory of the bounded presets, in latent frames (ignored for a policy).
            options: the other keyword arguments of the constructor (``heads``, ``head_ids``, ``check_finite``,
                ``timer``, ``cuda_graphs``, ``overlap_commit``).
        """
        if isinstance(policy, str):
            policy = preset(
                policy, tokens_per_frame=tokens_per_frame, frames_per_chunk=frames_per_chunk,
                memory_frames=memory_frames,
            )  # fmt: skip
        elif not isinstance(policy, AttentionPolicy):
            raise ValueError(f"policy must be an AttentionPolicy or a preset name, got {type(policy).__name__}")
        options.setdefault("heads", model.num_heads)
        return cls(
            policy,
            num_layers=model.num_layers,
            batch=batch,
            head_dim=model.head_dim,
            tokens_per_frame=tokens_per_frame,
            frames_per_chunk=frames_per_chunk,
            dtype=dtype,
            device=device,
            **options,
        )

    @property
    def current_pass(self) -> PassInfo:
        """The pass set by :meth:`begin_pass` (raises before the first one)."""
        return self._info()

    # ------------------------------------------------------------------ geometry (every layer has the same)
    @property
    def num_layers(self) -> int:
        """Layers, one cache each."""
        return len(self.layers)

    @property
    def _first(self) -> LayerKVCache:
        return self.layers[0].cache

    @property
    def batch(self) -> int:
        """Batch size of the caches."""
        return self._first.batch

    @property
    def heads(self) -> int:
        """KV heads held by this process, per layer."""
        return self._first.heads

    @property
    def head_dim(self) -> int:
        """Channels per head of the cached keys."""
        return self._first.head_dim

    @property
    def frames_per_chunk(self) -> int:
        """Latent frames staged and committed together."""
        return self._first.config.frames_per_chunk

    @property
    def committed_frames(self) -> int:
        """Latent frames committed so far (every layer's cache holds the same number)."""
        return self._first.committed_frames

    # ------------------------------------------------------------------ per-layer accessors
    def _at(self, layer: int) -> LayerAttention:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(self.layers):
            raise ValueError(f"layer must be an int in [0, {len(self.layers)}), got {layer!r}")
        return self.layers[layer]

    def layer(self, layer: int) -> LayerAttention:
        """``layer``'s :class:`LayerAttention`; the current stream first waits for commits still running on the
        side stream, so that its cache reads committed."""
        lay = self._at(layer)
        self.join_commits()
        return lay

    def layer_cache(self, layer: int) -> LayerKVCache:
        """``layer``'s KV cache (for reports and probes; stage and commit go through :meth:`self_attention`).
        The current stream first waits for commits still running on the side stream, so what it reads is
        committed."""
        return self.layer(layer).cache

    def caches(self) -> list[LayerKVCache]:
        """Every layer's KV cache, in order (after the commits in flight, as :meth:`layer_cache`)."""
        self.join_commits()
        return [lay.cache for lay in self.layers]

    def is_sparse(self, layer: int) -> bool:
        """Whether ``layer`` runs its sparse paths in the current pass (the schedule's decision)."""
        return self._sparse(layer)

    def is_planned(self, layer: int) -> bool:
        """Whether ``layer`` holds an AnnSA plan of its committed cache."""
        return self._at(layer).annsa_plan is not None

    def collapsed_prompt(self, layer: int) -> CollapsedPrompt | None:
        """``layer``'s collapsed prompt for AnnCA (None before its first cross-attention of the prompt)."""
        return self._at(layer).prompt

    @property
    def annca_selecting(self) -> tuple[bool | None, ...]:
        """Per layer, whether AnnCA selection runs for the current prompt (None: not measured yet or no AnnCA)."""
        return tuple(lay.selecting for lay in self.layers)

    def reset_prompt(self) -> None:
        """Forget the per-layer collapsed prompts (call when the prompt changes; the engine does it per run)."""
        for lay in self.layers:
            lay.reset_prompt()

    # ------------------------------------------------------------------ the schedule
    def begin_pass(self, info: PassInfo) -> None:
        """Declare the next forward pass (called by the rollout engine before each model call). Commits still
        running on the side stream go on: each layer waits for its own when it stages (host-side state, as
        ``committed_frames``, is already current)."""
        if info.frame_start != self.committed_frames:
            raise ValueError(f"frame_start must be {self.committed_frames}, got {info.frame_start}")
        if self.groups and self.layers[0].cache.staged_tokens == 0:
            for group in self.groups:
                group.begin()
        self.pass_info = info

    def self_attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pre_rope: torch.Tensor
    ) -> torch.Tensor:
        info = self._info()
        lay = self.layers[layer]
        # The schedule is asked only by policies with a sparse path (a dense pass may declare no steps).
        pol = self.policy
        sparse = (pol.annsa is not None or pol.radial is not None) and self._sparse(layer)
        lay.stage(k, v, frame_start=info.frame_start, k_pre_rope=k_pre_rope)
        radial = self._radial_for(lay.cache) if sparse and self.policy.radial is not None else None
        out = lay.attend(q, sparse=sparse, radial=radial)
        if info.commit and self.groups:
            group = self.groups[layer // self._group_size]
            group.stage_match(layer - group.first_layer, k_pre_rope)
            if layer == group.first_layer + group.layers - 1:
                self._commit_group(group)
        elif info.commit:
            lay.commit(q, (k, v, k_pre_rope))
        return out

    def cross_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        sparse = self.policy.annca is not None and self._sparse(layer)
        return self.layers[layer].cross_attention(q, k, v, sparse=sparse, tokens_per_frame=self.tokens_per_frame)

    def _commit_group(self, group: CacheGroup) -> None:
        """The group's layers committed in one batched call, then each one's AnnSA plan (on the side stream when
        the layers overlap commits)."""
        layers = self.layers[group.first_layer : group.first_layer + group.layers]

        def work() -> None:
            with nullcontext() if self.timer is None else self.timer.span("cache_commit"):
                group.commit()
            for lay in layers:
                lay.plan()

        buf = group.stacked.buffers
        keep = [buf.k, buf.v, buf.count, buf.frame, buf.lengths]
        for lay in layers:
            t = lay.cache.track
            if t is not None:
                keep += [t.slots, t.keys, t.active]
        done = self.commits.submit(work, keep)
        for lay in layers:
            lay.committed_by(done)

    def join_commits(self) -> None:
        """Make the current stream wait for commits still running on the side stream (no host sync)."""
        self.commits.join()
        for lay in self.layers:
            lay.committed_by(None)

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
        """Device bytes of every layer's cache (a host tier's stage, index and slot region included)."""
        return sum(lay.cache.nbytes() for lay in self.layers)

    def host_bytes(self) -> int:
        """Host bytes of every layer's host tier (0 without one): allocated up front, fixed."""
        return sum(lay.cache.host_nbytes() for lay in self.layers)

    def mean_entries(self) -> float:
        """Committed entries per head, averaged over layers (host sync)."""
        self.join_commits()
        return sum(lay.cache.mean_entries() for lay in self.layers) / len(self.layers)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The rollout state, flat and ready for safetensors: ``format`` (1,) int64 :data:`STATE_FORMAT` and
        every layer's state under ``layer{i}.`` (:meth:`LayerAttention.state_dict`: its cache's
        :meth:`LayerKVCache.state_dict`, AnnCA's ``annca_gate`` (3,) float64 and the int8 AnnSA plans' anchors
        ``annsa.anchor_codes``, ``annsa.anchor_scale``)."""
        self.join_commits()
        state = {"format": torch.tensor([STATE_FORMAT], dtype=torch.int64)}
        for i, lay in enumerate(self.layers):
            state |= {f"layer{i}.{k}": v for k, v in lay.state_dict().items()}
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict` output.

        Every layer's part is validated before anything is written (:meth:`LayerAttention.check_state`:
        the cache, the AnnCA gate, the AnnSA anchors; then unknown or missing layers); on any problem a
        ``ValueError`` names it and the processor is unchanged. AnnSA plans are then rebuilt from the restored
        caches with their saved anchors (int8) or their keys (LSH), which gives the plans the rollout was saved
        with.
        """
        if not isinstance(state, Mapping):
            raise ValueError(f"state must be a mapping of tensors, got {type(state).__name__}")
        self.join_commits()
        fmt = state.get("format")
        if not isinstance(fmt, torch.Tensor) or fmt.dtype != torch.int64 or tuple(fmt.shape) != (1,):
            raise ValueError("state['format'] must be a (1,) int64 tensor (a state of CachedProcessor.state_dict)")
        if int(fmt[0]) != STATE_FORMAT:
            raise ValueError(f"state['format'] is {int(fmt[0])}; this version of longroll reads format {STATE_FORMAT}")
        n = len(self.layers)
        parts: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
        for key, value in state.items():
            if key == "format":
                continue
            head, _, name = key.partition(".")
            i = int(head[5:]) if head.startswith("layer") and head[5:].isdigit() else -1
            if not name or not 0 <= i < n:
                raise ValueError(f"state has key {key!r}, which is not of a layer of this {n}-layer processor")
            parts[i][name] = value
        loaded = []
        for i, (lay, part) in enumerate(zip(self.layers, parts, strict=True)):
            try:
                loaded.append(lay.check_state(part))
            except ValueError as e:
                raise ValueError(f"layer {i}: {e}") from None
        frames = {s.cache.committed_frames for s in loaded}
        if len(frames) != 1:
            raise ValueError(f"state's layers hold different numbers of committed frames: {sorted(frames)}")
        for lay, s in zip(self.layers, loaded, strict=True):
            lay.load_state(s)

    def replan(self) -> None:
        """Rebuild the AnnSA plans of every layer from its cache (after the caches were filled outside a
        rollout); int8 plans sample new anchors (a restored state keeps its own: :meth:`load_state_dict`)."""
        self.join_commits()
        for lay in self.layers:
            lay.plan()

    def __repr__(self) -> str:
        return (
            f"CachedProcessor(policy={self.policy.name!r}, layers={len(self.layers)}, "
            f"frames={self.committed_frames}, MiB={self.cache_bytes() / 2**20:.1f})"
        )


def group_size(group_commits: object, num_layers: int) -> int:
    """Layers per commit group of a ``group_commits`` setting (see :class:`CachedProcessor`); 0 for ``"off"``.

    Raises ValueError naming ``group_commits`` for anything but ``"auto"``, ``"off"`` or an int >= 1."""
    if group_commits == "off":
        return 0
    if group_commits == "auto":
        return num_layers
    if isinstance(group_commits, int) and not isinstance(group_commits, bool) and group_commits >= 1:
        return min(group_commits, num_layers)
    raise ValueError(f"group_commits must be 'auto', 'off' or an int >= 1 (layers per group), got {group_commits!r}")


__all__ = ["CachedProcessor", "ModelGeometry", "PassInfo", "group_size"]
