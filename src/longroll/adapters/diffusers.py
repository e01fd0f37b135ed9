"""longroll's causal caches and policies on diffusers' ``WanTransformer3DModel``, through its processor API.

::

    processor = CachedProcessor.for_model("tempcache", cfg, tokens_per_frame=P, frames_per_chunk=3, ...)
    with attach(transformer, processor) as causal:              # causal: a ChunkDenoiser
        result = RolloutEngine(causal, processor, RolloutConfig(num_frames=21, frames_per_chunk=3, ...)).run(ctx)
    # leaving the block (or causal.remove()) restores the model's own processors

:func:`attach` sets one :class:`LongrollWanAttnProcessor` per attention layer (``blocks.{i}.attn1`` self-,
``blocks.{i}.attn2`` cross-attention) with ``set_attn_processor``; the processors keep the model's
projections, q/k norms and output projections and hand q, k, v to the :class:`CachedProcessor`, which owns the
KV caches, the sparse schedule, AnnSA and AnnCA. The returned :class:`DiffusersWan` is a
:class:`~longroll.pipeline.rollout.ChunkDenoiser`, so longroll's rollout engine drives the model chunk by
chunk; :meth:`DiffusersWan.forward_chunk` runs one pass for loops of one's own.

What a causal rollout needs that diffusers' model lacks, and the extension used (nothing of diffusers is
patched at class level; both are undone by :meth:`DiffusersWan.remove`):

- **Frame-offset RoPE.** The model rotates every forward's tokens as frames 0..F-1. A forward hook on this
  model's ``rope`` module (``WanRotaryPosEmbed``) replaces the temporal channels of its output (the first
  ``rope.t_dim`` of the head dim) with rows ``frame_start .. frame_start + F - 1`` of the module's own
  ``freqs_cos``/``freqs_sin`` tables, where ``frame_start`` is the processor's current pass; the spatial
  channels are diffusers' own.
- **Per-frame timesteps.** None is needed: the model accepts one timestep per token (the Wan 2.2 TI2V path),
  and :class:`DiffusersWan` repeats each latent frame's timestep over the frame's tokens. The model then
  embeds the timestep per token, which costs a time-embedding MLP per token (well under 1 % of a Wan 2.1
  forward) and gives the same modulation as per-frame embedding.

Text-to-video Wan only: image conditioning (``added_kv_proj_dim``), fused projections and attention masks are
refused with a clear error.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from longroll.models.wan.model import apply_rope
from longroll.policies.cached import CachedProcessor, PassInfo

AttentionKind = Literal["self", "cross"]


class LongrollWanAttnProcessor:
    """A diffusers attention processor for one ``WanAttention`` layer that attends through longroll.

    Called by diffusers as ``processor(attn, hidden_states, encoder_hidden_states, attention_mask,
    rotary_emb)``, like ``WanAttnProcessor``.

    Args:
        processor: the rollout's :class:`CachedProcessor`.
        layer: the block index.
        kind: ``"self"`` (``attn1``: RoPE, the layer's KV cache) or ``"cross"`` (``attn2``: the prompt, AnnCA).
    """

    def __init__(self, processor: CachedProcessor, layer: int, kind: AttentionKind) -> None:
        if kind not in ("self", "cross"):
            raise ValueError(f"kind must be 'self' or 'cross', got {kind!r}")
        self.processor, self.layer, self.kind = processor, layer, kind

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """hidden_states: (batch, seqlen, dim); encoder_hidden_states: (batch, seqlen_ctx, dim) for cross-attention;
        rotary_emb: diffusers' cos, sin (1, seqlen, 1, head_dim) for self-attention -> (batch, seqlen, dim)."""
        if attention_mask is not None:
            raise ValueError(f"attention_mask is not supported (the cache decides what is seen), got {attention_mask}")
        if kwargs:
            raise ValueError(f"unexpected processor arguments {sorted(kwargs)}")
        context = hidden_states if self.kind == "self" else encoder_hidden_states
        if context is None:
            raise ValueError("cross-attention needs encoder_hidden_states")
        heads = attn.heads
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (heads, -1))
        k = attn.norm_k(attn.to_k(context)).unflatten(2, (heads, -1))
        v = attn.to_v(context).unflatten(2, (heads, -1))
        if self.kind == "self":
            if rotary_emb is None:
                raise ValueError("self-attention needs rotary_emb")
            # diffusers stores each rotation pair's cos (and sin) twice along head_dim; one copy is the angle.
            cos, sin = rotary_emb[0][..., 0::2].float(), rotary_emb[1][..., 1::2].float()
            q_rot, k_rot = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            out = self.processor.self_attention(
                self.layer, q_rot.transpose(1, 2), k_rot.transpose(1, 2), v.transpose(1, 2), k.transpose(1, 2)
            )
        else:
            out = self.processor.cross_attention(self.layer, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


class DiffusersWan:
    """A diffusers ``WanTransformer3DModel`` attached to a :class:`CachedProcessor` (see :func:`attach`).

    Calling it is the :class:`~longroll.pipeline.rollout.ChunkDenoiser` contract, so
    ``RolloutEngine(attached, processor, config)`` rolls the diffusers model out.
    """

    def __init__(self, model: Any, processor: CachedProcessor) -> None:
        # Any: diffusers' modules are reached through their own attributes, which nn.Module types loosely.
        self.model = model
        self.processor = processor
        self._original = dict(self.model.attn_processors)
        layers = processor.num_layers
        ours = {}
        for i in range(layers):
            ours[f"blocks.{i}.attn1.processor"] = LongrollWanAttnProcessor(processor, i, "self")
            ours[f"blocks.{i}.attn2.processor"] = LongrollWanAttnProcessor(processor, i, "cross")
        self.model.set_attn_processor(ours)
        self._hook: Any = self.model.rope.register_forward_hook(self._offset_rope)
        self.attached = True

    # ----------------------------------------------------------------- the extension: frame-offset RoPE
    def _offset_rope(
        self, rope: Any, args: tuple[torch.Tensor, ...], output: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate the temporal channels of ``rope``'s output at the pass's absolute frames.

        Args:
            rope: the model's ``WanRotaryPosEmbed``.
            args: (hidden_states,) the latents (batch, channels, frames, height, width).
            output: cos, sin (1, seqlen, 1, head_dim) for frames 0..F-1, frame-major.
        """
        start = self.processor.current_pass.frame_start
        if start == 0:
            return output
        frames = args[0].shape[2] // rope.patch_size[0]
        end = start + frames
        if end > rope.max_seq_len:
            raise ValueError(
                f"RoPE positions up to frame {end - 1} exceed the model's rope_max_seq_len={rope.max_seq_len}"
            )
        cos, sin = output
        tokens = cos.shape[1] // frames
        t = rope.t_dim
        out = []
        for table, full in ((rope.freqs_cos, cos), (rope.freqs_sin, sin)):
            rows = table[start:end, :t].to(full.dtype).repeat_interleave(tokens, dim=0)  # (seqlen, t_dim)
            out.append(torch.cat((rows[None, :, None], full[..., t:]), dim=-1))
        return out[0], out[1]

    # ----------------------------------------------------------------- driving
    def __call__(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        *,
        frame_offset: int = 0,
        processor: Any = None,
        actions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Flow prediction of one chunk, after ``processor.begin_pass`` declared the pass.

        Args:
            x: (batch, in_channels, frames, height, width) latents of the chunk.
            timestep: (batch,) or (batch, frames // patch_t), one per latent frame.
            context: (batch, seqlen_ctx, text_dim) prompt embeddings.
            frame_offset: the chunk's first latent frame; must be the pass's ``frame_start``.
            processor: None or the attached processor (the ChunkDenoiser contract passes it).
            actions: must be None (the diffusers model has no action input).

        Returns:
            (batch, out_channels, frames, height, width).
        """
        self._check_attached()
        if processor is not None and processor is not self.processor:
            raise ValueError("processor must be the CachedProcessor this model is attached to")
        if actions is not None:
            raise ValueError(
                f"actions are not supported by diffusers' WanTransformer3DModel, got {tuple(actions.shape)}"
            )
        if x.dim() != 5:
            raise ValueError(f"x must be (batch, channels, frames, height, width), got {tuple(x.shape)}")
        start = self.processor.current_pass.frame_start
        if frame_offset != start:
            raise ValueError(f"frame_offset={frame_offset} differs from the pass's frame_start={start}")
        pt, ph, pw = self.model.config.patch_size
        frames, tokens = x.shape[2] // pt, (x.shape[3] // ph) * (x.shape[4] // pw)
        if tuple(timestep.shape) not in ((x.shape[0],), (x.shape[0], frames)):
            b = x.shape[0]
            raise ValueError(f"timestep must be ({b},) or ({b}, {frames}), got {tuple(timestep.shape)}")
        if timestep.dim() == 2:
            timestep = timestep.repeat_interleave(tokens, dim=1)  # diffusers' per-token timesteps
        return self.model(x, timestep, context, return_dict=False)[0]

    def forward_chunk(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        *,
        frame_start: int,
        step: int,
        num_steps: int,
        commit: bool,
    ) -> torch.Tensor:
        """One pass of a chunk for loops of one's own: declares the pass, then runs the model.

        Args:
            x, timestep, context: as in :meth:`__call__`.
            frame_start: the chunk's first latent frame (the frames committed so far).
            step: denoising step (0-based); the clean pass that commits is step ``num_steps``.
            num_steps: denoising steps per chunk.
            commit: whether this pass commits the chunk's K/V to the caches.
        """
        self.processor.begin_pass(PassInfo(frame_start, step, num_steps, commit))
        return self(x, timestep, context, frame_offset=frame_start)

    # ----------------------------------------------------------------- life cycle
    def remove(self) -> None:
        """Restore the model's own attention processors and RoPE (idempotent)."""
        if not self.attached:
            return
        self.model.set_attn_processor(dict(self._original))
        self._hook.remove()
        self.attached = False

    def _check_attached(self) -> None:
        if not self.attached:
            raise RuntimeError("this adapter was removed; attach() the model again")

    def __enter__(self) -> DiffusersWan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def attach(model: Any, processor: CachedProcessor) -> DiffusersWan:
    """Route every attention layer of a diffusers ``WanTransformer3DModel`` through ``processor``.

    Args:
        model: a text-to-video ``WanTransformer3DModel`` (diffusers >= 0.42), not fused, not already attached.
        processor: a :class:`CachedProcessor` with one layer per block and the model's heads and head dim
            (e.g. ``CachedProcessor.for_model(policy, WanConfig.from_diffusers_config(model.config), ...)``).

    Returns:
        The attached model; :meth:`DiffusersWan.remove` (or leaving a ``with`` block) detaches it.

    Raises:
        ValueError naming the mismatch; nothing is changed then.
    """
    try:
        import diffusers
    except ImportError as exc:
        raise ValueError(f"attach() needs diffusers (pip install 'longroll[diffusers]'): {exc}") from exc
    wan_type: Any = diffusers.WanTransformer3DModel
    if not isinstance(model, wan_type):
        raise ValueError(f"model must be a diffusers WanTransformer3DModel, got {type(model).__name__}")
    if not isinstance(processor, CachedProcessor):
        raise ValueError(f"processor must be a CachedProcessor, got {type(processor).__name__}")
    cfg = model.config
    if cfg.added_kv_proj_dim is not None or cfg.image_dim is not None:
        raise ValueError("image-conditioned Wan models (added_kv_proj_dim or image_dim set) are not supported")
    current = model.attn_processors
    if any(isinstance(p, LongrollWanAttnProcessor) for p in current.values()):
        raise ValueError("model is already attached to a longroll processor; remove() that adapter first")
    if any(getattr(m, "fused_projections", False) for m in model.modules()):
        raise ValueError("model has fused projections; call model.unfuse_qkv_projections() first")
    expected = (cfg.num_layers, cfg.num_attention_heads, cfg.attention_head_dim)
    got = (processor.num_layers, processor.heads, processor.head_dim)
    if expected != got:
        raise ValueError(
            f"processor holds (layers, heads, head_dim) = {got}, the model has {expected}; build it with "
            "CachedProcessor.for_model(policy, WanConfig.from_diffusers_config(model.config), ...)"
        )
    return DiffusersWan(model, processor)


__all__ = ["DiffusersWan", "LongrollWanAttnProcessor", "attach"]
