"""A tensor-level API: longroll's caches and attention policies over q, k, v that any model computes itself.

A model that already has its attention projections and RoPE (Self-Forcing, CausVid, LongLive, a diffusers
transformer, a world model) keeps them, and hands the tensors of each layer to these functions::

    states = layer_states("tempcache", num_layers=30, batch=1, heads=12, head_dim=128,
                          tokens_per_frame=1560, frames_per_chunk=3, dtype=torch.bfloat16, device="cuda")
    for step in range(num_steps + 1):                    # denoising steps, then the clean pass
        begin_pass(states, frame_start=f0, step=step, num_steps=num_steps, commit=step == num_steps)
        ...                                              # in layer i, after q/k norm and RoPE:
        out = self_attention(states[i], q, k, v, k_pre_rope=k_before_rope, layout="blhd")
        ...
        ctx = cross_attention(states[i], q_text, k_text, v_text, layout="blhd")

Every pass of a chunk stages the chunk's K/V (the history is read-only); the pass declared with
``commit=True`` also commits them, so that the policy (full, sink-window, budget, TempCache; AnnSA plans,
AnnCA prompt selection; see :func:`longroll.policies.config.preset`) decides what the history keeps.

A :class:`LayerState` names one layer of a :class:`~longroll.policies.cached.CachedProcessor`: its
:class:`~longroll.policies.layer.LayerAttention` (KV cache, AnnSA plan, AnnCA prompt and gate); the layers of
one model share the processor's pass and schedule.

Layouts (``layout=``): ``"bhld"`` is (batch, heads, seqlen, head_dim), ``"blhd"`` is (batch, seqlen, heads,
head_dim) as flash-attn, diffusers and Self-Forcing lay tensors out. Outputs come back in the layout given.
:func:`attend` is the stateless biased attention as a torch custom op, which ``torch.compile`` traces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from longroll.cache.kv_cache import LayerKVCache
from longroll.ops._checks import check_rank
from longroll.ops.attention import Backend
from longroll.ops.custom_ops import attention_op
from longroll.policies.cached import CachedProcessor, PassInfo
from longroll.policies.config import EQUAL_MEMORY_FRAMES, AttentionPolicy
from longroll.policies.layer import LayerAttention

Layout = Literal["bhld", "blhd"]
LAYOUTS: tuple[str, ...] = ("bhld", "blhd")


@dataclass(frozen=True)
class LayerState:
    """The attention state of one layer: layer ``layer`` of ``processor``.

    Args:
        processor: the rollout's processor (one cache per layer, the pass, the sparse schedule).
        layer: 0-based layer index, below ``processor``'s number of layers.
    """

    processor: CachedProcessor
    layer: int

    def __post_init__(self) -> None:
        if not isinstance(self.processor, CachedProcessor):
            raise ValueError(f"processor must be a CachedProcessor, got {type(self.processor).__name__}")
        n = self.processor.num_layers
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or not 0 <= self.layer < n:
            raise ValueError(f"layer must be an int in [0, {n}), got {self.layer!r}")

    @property
    def attention(self) -> LayerAttention:
        """This layer's :class:`LayerAttention` (its cache, AnnSA plan, AnnCA prompt and gate)."""
        return self.processor.layer(self.layer)

    @property
    def cache(self) -> LayerKVCache:
        """This layer's KV cache (read-only use: stage and commit go through :func:`self_attention`)."""
        return self.processor.layer_cache(self.layer)

    @property
    def committed_frames(self) -> int:
        """Latent frames committed to this layer's cache so far."""
        return self.cache.committed_frames


@dataclass(frozen=True)
class _Geometry:
    """A model's attention geometry as :meth:`CachedProcessor.for_model` reads it."""

    num_layers: int
    num_heads: int
    head_dim: int


def layer_states(
    policy: AttentionPolicy | str,
    *,
    num_layers: int,
    batch: int,
    heads: int,
    head_dim: int,
    tokens_per_frame: int,
    frames_per_chunk: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    memory_frames: int = EQUAL_MEMORY_FRAMES,
    **options: Any,
) -> list[LayerState]:
    """One :class:`LayerState` per layer, over one new :class:`CachedProcessor`.

    Args:
        policy: an :class:`AttentionPolicy`, or a preset name (``dense``, ``sink_window``, ``tempcache``, ... see
            :func:`longroll.policies.config.preset`) built at this geometry with ``memory_frames``.
        num_layers: attention layers of the model.
        batch, heads, head_dim: shape of one layer's keys (batch, heads, seqlen, head_dim); heads are the kv
            heads this process holds.
        tokens_per_frame: tokens of one latent frame (the model's patch grid, e.g. 1,560 for Wan at 480x832).
        frames_per_chunk: latent frames denoised and committed together.
        dtype, device: cache storage; the K/V handed over must match them.
        memory_frames: budget of the bounded presets, in latent frames (ignored for an AttentionPolicy).
        options: the other keyword arguments of :class:`CachedProcessor` (``check_finite``, ``timer``,
            ``cuda_graphs``, ``head_ids``, ``group_commits``). ``group_commits`` defaults to ``"off"`` here: a
            grouped commit waits for the last layer of the commit pass, and a foreign model's layers may be
            called in any order or skipped, so each layer commits after its own attention.

    Returns:
        ``num_layers`` states sharing one processor.
    """
    geometry = _Geometry(num_layers, heads, head_dim)
    options.setdefault("group_commits", "off")
    processor = CachedProcessor.for_model(
        policy, geometry, tokens_per_frame=tokens_per_frame, frames_per_chunk=frames_per_chunk, dtype=dtype,
        device=device, batch=batch, memory_frames=memory_frames, **options,
    )  # fmt: skip
    return [LayerState(processor, i) for i in range(num_layers)]


def _processor_of(states: LayerState | Sequence[LayerState] | CachedProcessor) -> CachedProcessor:
    if isinstance(states, CachedProcessor):
        return states
    if isinstance(states, LayerState):
        return states.processor
    if not isinstance(states, Sequence) or not states or not all(isinstance(s, LayerState) for s in states):
        raise ValueError("states must be a LayerState, a non-empty sequence of them or a CachedProcessor")
    processor = states[0].processor
    if any(s.processor is not processor for s in states):
        raise ValueError("states must share one processor (build them with one layer_states call)")
    return processor


def begin_pass(
    states: LayerState | Sequence[LayerState] | CachedProcessor,
    *,
    frame_start: int,
    step: int,
    num_steps: int,
    commit: bool,
) -> None:
    """Declare the next forward pass of the model, before its first layer runs.

    Args:
        states: the model's layer states (or one of them, or their processor).
        frame_start: absolute latent frame of the chunk's first frame; equals the frames committed so far.
        step: denoising step, 0-based; the clean (commit) pass is step ``num_steps``.
        num_steps: denoising steps per chunk (the sparse schedule keeps the first ones dense).
        commit: this pass commits the chunk's K/V to every layer's cache.
    """
    for name, value, low in (("frame_start", frame_start, 0), ("step", step, 0), ("num_steps", num_steps, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if not isinstance(commit, bool):
        raise ValueError(f"commit must be a bool, got {commit!r}")
    _processor_of(states).begin_pass(PassInfo(frame_start, step, num_steps, commit))


def _to_bhld(name: str, x: torch.Tensor, layout: str) -> torch.Tensor:
    check_rank(name, x, 4)
    return x.transpose(1, 2) if layout == "blhd" else x


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def self_attention(
    state: LayerState,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    k_pre_rope: torch.Tensor | None = None,
    layout: Layout = "bhld",
) -> torch.Tensor:
    """Self-attention of the current chunk over [this layer's cached history ; the chunk].

    Stages the chunk's K/V in the layer's cache (overwriting the previous pass's), attends with the policy's
    route (dense with TempCache's log-count bias, AnnSA's selected blocks, or a static mask), and commits the
    chunk when the pass was declared with ``commit=True``.

    Args:
        state: the layer.
        q: (batch, heads, n, head_dim) in ``"bhld"`` or (batch, n, heads, head_dim) in ``"blhd"``, after RoPE;
            n = the chunk's tokens (a multiple of tokens_per_frame, at most one chunk), frame-major.
        k: like q with the cache's kv heads, after RoPE; must match the cache's dtype and device.
        v: like k, with the cache's value head dim.
        k_pre_rope: like k, the keys before RoPE (after any q/k norm); TempCache matches frames with them, as
            RoPE rotates identical content differently at different times. Default: k itself.
        layout: ``"bhld"`` or ``"blhd"``, for q, k, v, k_pre_rope and the output.

    Returns:
        The attention output, shaped like q (q's layout).
    """
    if not isinstance(state, LayerState):
        raise ValueError(f"state must be a LayerState, got {type(state).__name__}")
    _check_layout(layout)
    qb, kb, vb = _to_bhld("q", q, layout), _to_bhld("k", k, layout), _to_bhld("v", v, layout)
    kp = kb if k_pre_rope is None else _to_bhld("k_pre_rope", k_pre_rope, layout)
    if qb.shape[0] != kb.shape[0] or qb.shape[2] != kb.shape[2] or qb.shape[-1] != kb.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, tokens and head_dim")
    out = state.processor.self_attention(state.layer, qb, kb, vb, kp)
    return out.transpose(1, 2) if layout == "blhd" else out


def cross_attention(
    state: LayerState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: Layout = "bhld"
) -> torch.Tensor:
    """Cross-attention of the chunk's tokens to the conditioning tokens, with the policy's AnnCA selection.

    Args:
        state: the layer.
        q: (batch, heads, n, head_dim) in ``"bhld"`` or (batch, n, heads, head_dim) in ``"blhd"``.
        k, v: (batch, heads, n_ctx, head_dim) (or their ``"blhd"`` form), the projected prompt tokens.
        layout: ``"bhld"`` or ``"blhd"``, for q, k, v and the output.

    Returns:
        The attention output, shaped like q (q's layout).
    """
    if not isinstance(state, LayerState):
        raise ValueError(f"state must be a LayerState, got {type(state).__name__}")
    _check_layout(layout)
    qb, kb, vb = _to_bhld("q", q, layout), _to_bhld("k", k, layout), _to_bhld("v", v, layout)
    if qb.shape[0] != kb.shape[0] or qb.shape[-1] != kb.shape[-1] or kb.shape[:3] != vb.shape[:3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} do not fit together")
    out = state.processor.cross_attention(state.layer, qb, kb, vb)
    return out.transpose(1, 2) if layout == "blhd" else out


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    layout: Layout = "bhld",
    scale: float | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Stateless attention with an optional per-key logit bias, as one ``torch.compile``-traceable op.

    Args:
        q: (batch, heads, seqlen_q, head_dim) in ``"bhld"`` or (batch, seqlen_q, heads, head_dim) in ``"blhd"``.
        k, v: (batch, heads_kv, seqlen_k, head_dim) (or their ``"blhd"`` form); heads_kv divides heads.
        bias: (batch, heads_kv, seqlen_k) float added to every query's logit of the key (TempCache's log-count;
            <= ``MASKED_BIAS`` or -inf removes the key), or None. The same in both layouts.
        layout, scale, backend: as above and in :func:`longroll.ops.attention.attention`.

    Returns:
        Shaped like q, in q's layout and dtype.
    """
    _check_layout(layout)
    qb, kb, vb = _to_bhld("q", q, layout), _to_bhld("k", k, layout), _to_bhld("v", v, layout)
    out = attention_op(qb, kb, vb, bias, scale=scale, backend=backend).out
    return out.transpose(1, 2) if layout == "blhd" else out


__all__ = [
    "LAYOUTS",
    "LayerState",
    "Layout",
    "attend",
    "begin_pass",
    "cross_attention",
    "layer_states",
    "self_attention",
]
