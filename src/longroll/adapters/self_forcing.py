"""longroll's caches behind the Self-Forcing cache interface (worked example of the tensor-level API).

Self-Forcing, CausVid and the repositories built on them call each self-attention layer as
``attn(x, ..., kv_cache=kv_cache[i], current_start=token_index)``, where ``kv_cache[i]`` is a dict holding
``k`` and ``v`` (batch, cache_tokens, heads, head_dim) and two one-element tensors, ``global_end_index`` (the
absolute end of the tokens written so far) and ``local_end_index`` (the end of the used part of ``k``/``v``).
The layer writes the chunk's roped K/V there and attends over the used part; every denoising step of a chunk
rewrites the chunk's slots, and a last pass over the clean chunk (timestep 0) leaves its final K/V behind.

:class:`SelfForcingRollout` keeps that calling convention and hands the tensors to longroll instead:

- one rollout per model, over the model's :class:`~longroll.adapters.functional.LayerState` s;
- a chunk (a ``current_start``) gets ``num_steps`` denoising passes and then the clean pass, which commits it
  (as Self-Forcing's inference loop does); :meth:`SelfForcingRollout.commit_next_chunk` makes the next chunk
  a single clean pass (initial frames of image-to-video or a world model's context);
- the K/V live in longroll's cache, so the dict's ``k`` and ``v`` are not read or written and may be
  allocated with zero tokens; its two indices are still written (``global_end_index`` the end of the
  chunk, ``local_end_index`` the entries the layer's cache uses now) for code that reads them.

:class:`SelfForcingAttention` wraps a Self-Forcing-style attention module whose projections are given as a
function: the module's own weights, RoPE and output projection stay; only the cache and the attention change.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from longroll.adapters.functional import LayerState, begin_pass, self_attention
from longroll.ops._checks import check_rank

#: ``project(module, x, current_start, *args, **kwargs) -> (q, k, v, k_pre_rope)``, each (batch, n, heads,
#: head_dim): q and k after RoPE at the chunk's absolute frames, k_pre_rope before it (None: k itself).
Projection = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]


class SelfForcingRollout:
    """Turns Self-Forcing-style per-layer calls into longroll passes over a model's layer states.

    Args:
        states: one :class:`LayerState` per self-attention layer, sharing one processor (``layer_states``).
        num_steps: denoising passes per chunk before the clean pass that commits it.
    """

    def __init__(self, states: Sequence[LayerState], num_steps: int) -> None:
        if not states or not all(isinstance(s, LayerState) for s in states):
            raise ValueError("states must be a non-empty sequence of LayerState")
        if any(s.processor is not states[0].processor for s in states):
            raise ValueError("states must share one processor (build them with one layer_states call)")
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        self.states = list(states)
        self.num_steps = num_steps
        self.tokens_per_frame = states[0].processor.tokens_per_frame
        self._chunk_start: int | None = None
        self._passes = 0
        self._passes_needed = num_steps + 1
        self._commit_next = False

    @property
    def committed_frames(self) -> int:
        """Latent frames committed so far (every layer holds the same number)."""
        return self.states[0].committed_frames

    def commit_next_chunk(self) -> None:
        """Make the next chunk a single pass that commits it (clean context frames, no denoising steps)."""
        self._check_finished()
        self._commit_next = True

    def _check_finished(self) -> None:
        if self._chunk_start is not None and self._passes != self._passes_needed:
            raise RuntimeError(
                f"the chunk at token {self._chunk_start} saw {self._passes} pass(es) of the "
                f"{self._passes_needed} it needs ({self.num_steps} denoising steps, then the clean pass)"
            )

    def _begin(self, current_start: int) -> None:
        """Layer 0's call opens the next pass of the model (a new chunk when ``current_start`` moved)."""
        if current_start != self._chunk_start:
            self._check_finished()
            tpf = self.tokens_per_frame
            if current_start % tpf or current_start // tpf != self.committed_frames:
                raise ValueError(
                    f"current_start must be the first token of the next uncommitted frame, "
                    f"{self.committed_frames * tpf} ({tpf} tokens per frame), got {current_start}"
                )
            self._chunk_start, self._passes = current_start, 0
            self._passes_needed = 1 if self._commit_next else self.num_steps + 1
            self._commit_next = False
        elif self._passes == self._passes_needed:
            raise RuntimeError(
                f"the chunk at token {current_start} is already committed; the next call must start the next chunk"
            )
        step = self.num_steps - self._passes_needed + 1 + self._passes
        begin_pass(
            self.states,
            frame_start=current_start // self.tokens_per_frame,
            step=step,
            num_steps=self.num_steps,
            commit=self._passes + 1 == self._passes_needed,
        )
        self._passes += 1

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: MutableMapping[str, Any],
        current_start: int,
        *,
        k_pre_rope: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Self-attention of one layer's chunk, in place of Self-Forcing's cache write and attention.

        Args:
            layer: the layer's index in ``states`` (layers are called in order, 0 first, once per pass).
            q: (batch, n, heads, head_dim) after RoPE at the chunk's absolute frames.
            k: (batch, n, heads_kv, head_dim) after RoPE.
            v: (batch, n, heads_kv, head_dim_v).
            kv_cache: the layer's Self-Forcing cache dict; its ``global_end_index`` and ``local_end_index``
                tensors are written, its ``k``/``v`` left alone.
            current_start: absolute index of the chunk's first token (frames * tokens_per_frame).
            k_pre_rope: (batch, n, heads_kv, head_dim) keys before RoPE, for TempCache's matching; default k.

        Returns:
            (batch, n, heads, head_dim_v) attention output (before the output projection).
        """
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(self.states):
            raise ValueError(f"layer must be an int in [0, {len(self.states)}), got {layer!r}")
        if isinstance(current_start, bool) or not isinstance(current_start, int) or current_start < 0:
            raise ValueError(f"current_start must be a non-negative int, got {current_start!r}")
        for name in ("global_end_index", "local_end_index"):
            if not isinstance(kv_cache.get(name), torch.Tensor):
                raise ValueError(f"kv_cache must hold a tensor {name!r}, got keys {sorted(kv_cache)}")
        check_rank("q", q, 4)
        if layer == 0:
            self._begin(current_start)
        elif current_start != self._chunk_start:
            raise ValueError(f"layer {layer} got current_start={current_start}, layer 0 {self._chunk_start}")
        state = self.states[layer]
        out = self_attention(state, q, k, v, k_pre_rope=k_pre_rope, layout="blhd")
        kv_cache["global_end_index"].fill_(current_start + q.shape[1])
        kv_cache["local_end_index"].fill_(state.cache.bound + state.cache.staged_tokens)
        return out


class SelfForcingAttention(nn.Module):
    """A Self-Forcing-style self-attention module whose cache and attention are longroll's.

    ``forward(x, kv_cache, current_start, *args, **kwargs)`` keeps the wrapped module's calling convention:
    ``project`` computes the roped q, k (and the pre-RoPE keys) and v with the module's own weights, the
    rollout attends, and ``output`` applies the module's output projection.

    Args:
        module: the wrapped attention module (its parameters stay registered under ``module.``).
        rollout: the model's :class:`SelfForcingRollout`.
        layer: this layer's index in the rollout.
        project: see :data:`Projection`.
        output: ``output(module, y)`` with y (batch, n, heads, head_dim_v) -> (batch, n, dim); default
            ``module.o(y.flatten(2))`` (Self-Forcing's name for the output projection).
    """

    def __init__(
        self,
        module: nn.Module,
        rollout: SelfForcingRollout,
        layer: int,
        project: Projection,
        output: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= layer < len(rollout.states):
            raise ValueError(f"layer must be in [0, {len(rollout.states)}), got {layer}")
        self.module = module
        self.rollout = rollout
        self.layer = layer
        self.project = project
        self.output = output if output is not None else lambda m, y: m.o(y.flatten(2))

    def forward(
        self, x: torch.Tensor, kv_cache: MutableMapping[str, Any], current_start: int, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """x: (batch, n, dim) the chunk's tokens -> (batch, n, dim)."""
        q, k, v, k_pre = self.project(self.module, x, current_start, *args, **kwargs)
        y = self.rollout.attend(self.layer, q, k, v, kv_cache, current_start, k_pre_rope=k_pre)
        return self.output(self.module, y)


__all__ = ["Projection", "SelfForcingAttention", "SelfForcingRollout"]
