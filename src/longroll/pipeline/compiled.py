"""The DiT of a chunk under ``torch.compile``, with the attention policy left outside the graphs.

A :class:`~longroll.policies.cached.CachedProcessor` manages caches on the host (chunk bookkeeping, plans,
CUDA-graph replays, side-stream commits): traced, it breaks graphs in many places and its growing host
integers force a recompile per chunk. :class:`CompiledChunkDenoiser` hands the model a thin view of the
processor whose two calls are ``torch.compiler.disable``-d, so that each transformer block compiles to the
graphs around its two attention calls (norms, AdaLN modulation, projections, RoPE, FFN: the non-attention
path, fused by Inductor) while the processor runs exactly as in eager mode. The chunk's absolute frame offset
and the block index become symbolic after their first change (Dynamo's automatic dynamic shapes), so a
rollout compiles a bounded number of times, not once per chunk.

No hand-written kernels for RoPE, RMSNorm or the AdaLN modulation: Inductor already fuses them. Its generated
code for a block (CPU backend, ``TORCH_LOGS=output_code``) has one kernel for the q/k RMS norm together with
the RoPE rotation that follows it, one for LayerNorm with the modulation ``shift + norm(x) * (1 + scale)``,
one for each gated residual update, one for the FFN's GELU; only the matmuls stay library calls.
"""

from __future__ import annotations

from typing import Any

import torch

from longroll.policies.processor import AttentionProcessor


class _EagerProcessor:
    """An :class:`AttentionProcessor` whose calls run outside any compiled graph."""

    def __init__(self, inner: AttentionProcessor) -> None:
        self.inner = inner

    @torch.compiler.disable
    def self_attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pre_rope: torch.Tensor
    ) -> torch.Tensor:
        """As :meth:`AttentionProcessor.self_attention` of the wrapped processor."""
        return self.inner.self_attention(layer, q, k, v, k_pre_rope)

    @torch.compiler.disable
    def cross_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """As :meth:`AttentionProcessor.cross_attention` of the wrapped processor."""
        return self.inner.cross_attention(layer, q, k, v)


class CompiledChunkDenoiser:
    """A :class:`~longroll.pipeline.rollout.ChunkDenoiser` that runs ``model`` under ``torch.compile``.

    Args:
        model: e.g. a :class:`~longroll.models.wan.CausalWanModel` (fused, quantized or not: compile after).
        backend, mode: passed to ``torch.compile`` (``inductor``; ``aot_eager`` checks tracing on a CPU
            without a compiler); ``mode=None`` is Inductor's default.
    """

    def __init__(self, model: torch.nn.Module, *, backend: str = "inductor", mode: str | None = None) -> None:
        self.model = model
        self._compiled: Any = torch.compile(model, backend=backend, mode=mode)

    def __call__(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        *,
        frame_offset: int = 0,
        processor: AttentionProcessor | None = None,
        actions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """As the model's forward (see :class:`~longroll.pipeline.rollout.ChunkDenoiser`)."""
        proc = None if processor is None else _EagerProcessor(processor)
        return self._compiled(x, timestep, context, frame_offset=frame_offset, processor=proc, actions=actions)


__all__ = ["CompiledChunkDenoiser"]
