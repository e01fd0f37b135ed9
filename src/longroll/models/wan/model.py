"""A compact causal Wan 2.1 transformer for chunk-by-chunk autoregressive video generation.

diffusers' ``WanTransformer3DModel`` denoises a whole clip at once. Autoregressive Wan variants (Self-Forcing,
CausVid, Rolling-Forcing, LongLive) instead denoise a few latent frames at a time, and need three things it
lacks: a temporal RoPE that starts at the chunk's absolute frame index (``frame_offset``), one timestep per
frame (frames of a chunk may sit at different noise levels), and attention that can see cached keys of earlier
chunks. The last is delegated: every attention call goes through an
:class:`~longroll.policies.processor.AttentionProcessor`, which owns any KV cache, mask or sparsity.

Parameter names and shapes equal diffusers' ``WanTransformer3DModel`` (text-to-video), so its state dicts load
with ``load_state_dict(strict=True)``; :mod:`longroll.models.wan.convert` handles the original Wan format.

Layout conventions: latents are (batch, channels, frames, height, width); inside the model the residual
stream is (batch, frames, tokens_per_frame, dim) with tokens of a frame in (h, w) raster order, so per-frame
modulation is a broadcast over the token axis. Attention tensors are (batch, heads, seqlen, head_dim) with
seqlen = frames * tokens_per_frame in frame-major order.

Precision follows diffusers: LayerNorms, the AdaLN modulation and the residual updates run in float32 while
matmuls run in the weights' dtype (see :meth:`CausalWanModel.to_inference_dtype`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from longroll.models.wan.config import WanConfig
from longroll.ops.fp8 import (
    Fp8Granularity,
    Fp8Linear,
    check_fp8_granularity,
    check_fp8_shape,
    fp8_unsupported_reason,
)
from longroll.policies.processor import AttentionProcessor, DenseProcessor

# Modules whose parameters stay float32 under to_inference_dtype: they feed the float32 modulation math or
# are LayerNorms, and together they are a tiny fraction of the weights.
_FP32_MODULES = ("time_embedder", "time_proj", "action_embedder", "norm1", "norm2", "norm3")

# ----------------------------------------------------------------------------------------------------------
# Norms


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm evaluated in float32 whatever the input and weight dtypes.

    Returns float32 on purpose: every caller modulates or casts the result next, so casting back here would
    only add a rounding step.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., dim) any float dtype -> (..., dim) float32."""
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


# ----------------------------------------------------------------------------------------------------------
# Rotary position embedding


class WanRotaryEmbedding(nn.Module):
    """3-D RoPE of Wan: head_dim split into t/h/w parts, each rotating interleaved channel pairs.

    h and w get ``2 * (head_dim // 6)`` channels each and t gets the rest (44/42/42 for head_dim 128).
    Angles are computed in float64 and rounded once to float32, as Wan and diffusers do, so that positions
    near ``max_seq_len`` keep their precision.

    The cos/sin tables are built lazily per device and are not buffers: ``model.to(torch.bfloat16)`` would
    otherwise round them to bf16, and keeping them out of the state dict matches diffusers' keys.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        spatial = 2 * (head_dim // 6)
        self.axis_dims = (head_dim - 2 * spatial, spatial, spatial)
        self.max_seq_len = max_seq_len
        self.theta = theta
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: (max_seq_len, head_dim // 2) float32; columns are the t, then h, then w frequencies."""
        table = self._tables.get(device)
        if table is None:
            positions = torch.arange(self.max_seq_len, dtype=torch.float64)
            inv_freqs = [1.0 / self.theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d) for d in self.axis_dims]
            angles = torch.outer(positions, torch.cat(inv_freqs))
            # One host-to-device copy per device for the model's lifetime; later calls only slice.
            table = (angles.cos().float().to(device), angles.sin().float().to(device))
            self._tables[device] = table
        return table

    def forward(
        self, frames: int, height: int, width: int, *, frame_offset: int = 0, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotation of every token of a (frames, height, width) patch grid whose first frame is frame_offset.

        Returns:
            cos, sin: (frames * height * width, head_dim // 2) float32, tokens in frame-major raster order;
            pair i of a head rotates by the angle in column i.
        """
        end = frame_offset + frames
        if end > self.max_seq_len or max(height, width) > self.max_seq_len:
            raise ValueError(
                f"RoPE positions up to frame {end - 1} and grid {height}x{width} exceed rope_max_seq_len="
                f"{self.max_seq_len}; raise WanConfig.rope_max_seq_len"
            )
        t, h = self.axis_dims[0] // 2, self.axis_dims[1] // 2
        shape = (frames, height, width, -1)

        def grid(table: torch.Tensor) -> torch.Tensor:
            parts = (
                table[frame_offset:end, :t][:, None, None].expand(shape),
                table[:height, t : t + h][None, :, None].expand(shape),
                table[:width, t + h :][None, None, :].expand(shape),
            )
            return torch.cat(parts, dim=-1).flatten(0, 2)

        cos, sin = self._table(device)
        return grid(cos), grid(sin)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of x by the angles whose cos/sin are given, in float32.

    Args:
        x: (..., head_dim), e.g. (batch, seqlen, heads, head_dim) or (batch, heads, seqlen, head_dim).
        cos, sin: float32, broadcastable to (..., head_dim // 2): (seqlen, 1, head_dim // 2) for the first
            layout above, (seqlen, head_dim // 2) for the second.

    Returns:
        x's shape, contiguous, in x.dtype.
    """
    pairs = x.to(torch.float32, memory_format=torch.contiguous_format).unflatten(-1, (-1, 2))
    if torch.compiler.is_compiling():
        # Inductor fuses the real form into one kernel, while it handles complex tensors poorly.
        x1, x2 = pairs.unbind(-1)
        rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    else:
        # Eager: one complex multiply instead of six real elementwise passes over the whole tensor.
        rotated = torch.view_as_real(torch.view_as_complex(pairs) * torch.complex(cos, sin))
    return rotated.flatten(-2).to(x.dtype)


def rope_self_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    layer: int,
    processor: AttentionProcessor,
) -> torch.Tensor:
    """RoPE on normalised q and k, then the processor's self-attention.

    Args:
        q, k, v: (batch, seqlen, heads, head_dim), q and k after their norms.
        rope: cos, sin (seqlen, head_dim // 2).

    Returns:
        (batch, heads, seqlen, head_dim); the processor also receives the pre-RoPE keys (for matching).
    """
    cos, sin = rope[0][:, None], rope[1][:, None]
    q_rot, k_rot = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return processor.self_attention(
        layer, q_rot.transpose(1, 2), k_rot.transpose(1, 2), v.transpose(1, 2), k.transpose(1, 2)
    )


# ----------------------------------------------------------------------------------------------------------
# Attention


_QKV = ("to_q", "to_k", "to_v")
_KV = ("to_k", "to_v")
_FUSED_NAME = {_QKV: "to_qkv", _KV: "to_kv"}


def _split_fused_on_save(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State-dict hook of a fused :class:`WanAttention`: save the separate ``to_q``/``to_k``/``to_v`` tensors
    (copies, so that formats refusing shared storage such as safetensors accept them)."""
    assert isinstance(module, WanAttention)
    names = module.fused
    if not names:
        return
    fused = prefix + _FUSED_NAME[names] + "."
    for kind in ("weight", "bias"):
        tensor = state_dict.pop(fused + kind)
        for n, part in zip(names, tensor.chunk(len(names)), strict=True):
            state_dict[f"{prefix}{n}.{kind}"] = part.clone()


def _fuse_on_load(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Load pre-hook of a fused :class:`WanAttention`: stack the saved ``to_q``/``to_k``/``to_v`` tensors into
    the fused module's. An incomplete set is left alone and its absent names are reported missing, so a strict
    load names them (besides the fused module's own key)."""
    assert isinstance(module, WanAttention)
    names = module.fused
    if not names:
        return
    for kind in ("weight", "bias"):
        keys = [f"{prefix}{n}.{kind}" for n in names]
        if all(k in state_dict for k in keys):
            state_dict[f"{prefix}{_FUSED_NAME[names]}.{kind}"] = torch.cat([state_dict.pop(k) for k in keys])
        else:
            missing_keys.extend(k for k in keys if k not in state_dict)


class WanAttention(nn.Module):
    """Projections of one Wan attention layer; the attention itself is the processor's job.

    q and k are RMS-normalised across all heads together ("rms_norm_across_heads"), before the head split.
    """

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        # Set by fuse_projections: one Linear computing [q; k; v] (self-attention) or [k; v] of the context
        # (cross-attention), in place of the separate projections. The state dict keeps diffusers' names.
        self.to_qkv: nn.Linear | None = None
        self.to_kv: nn.Linear | None = None
        self.register_state_dict_post_hook(_split_fused_on_save)
        self.register_load_state_dict_pre_hook(_fuse_on_load)

    @property
    def fused(self) -> tuple[str, ...]:
        """Names of the projections currently computed by one fused Linear: ``()`` when unfused."""
        if self.to_qkv is not None:
            return _QKV
        return _KV if self.to_kv is not None else ()

    def fuse_projections(self, names: tuple[str, ...]) -> None:
        """Replace the projections ``names`` (``("to_q", "to_k", "to_v")`` or ``("to_k", "to_v")``) by one
        Linear whose weight rows are theirs stacked; the outputs are the same up to the matmul's rounding
        order. The separate modules are removed (no second copy of the weights); :meth:`unfuse_projections`
        restores them exactly. No-op when already fused the same way."""
        if names not in (_QKV, _KV):
            raise ValueError(f"names must be {_QKV} or {_KV}, got {names!r}")
        if self.fused == names:
            return
        if self.fused:
            raise ValueError(f"already fused as {self.fused}; unfuse_projections() first")
        parts = [getattr(self, n) for n in names]
        if not all(type(m) is nn.Linear and m.bias is not None for m in parts):
            raise ValueError(
                f"only plain biased nn.Linear projections can be fused, got {[type(m).__name__ for m in parts]}"
            )
        ref = parts[0].weight
        fused = nn.Linear(ref.shape[1], sum(m.weight.shape[0] for m in parts), device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([m.weight for m in parts]))
            fused.bias.copy_(torch.cat([m.bias for m in parts]))
        for n in names:
            delattr(self, n)
        setattr(self, _FUSED_NAME[names], fused)

    def unfuse_projections(self) -> None:
        """Back to the separate ``to_q``/``to_k``/``to_v`` modules (bit-exact copies of the fused rows)."""
        names = self.fused
        if not names:
            return
        fused = getattr(self, _FUSED_NAME[names])
        if type(fused) is not nn.Linear:
            raise ValueError(f"cannot unfuse quantized projections ({type(fused).__name__}); reload the weights")
        dim = fused.weight.shape[0] // len(names)
        weights, biases = fused.weight.detach().split(dim), fused.bias.detach().split(dim)
        delattr(self, _FUSED_NAME[names])
        setattr(self, _FUSED_NAME[names], None)
        for n, w, b in zip(names, weights, biases, strict=True):
            linear = nn.Linear(w.shape[1], w.shape[0], device=w.device, dtype=w.dtype)
            with torch.no_grad():
                linear.weight.copy_(w)
                linear.bias.copy_(b)
            setattr(self, n, linear)
        # Back to the constructor's module order, so that state_dict() lists keys as before fusing.
        for name in [m for m in self._modules if m not in _QKV]:
            self._modules[name] = self._modules.pop(name)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, seqlen, dim) -> (batch, heads, seqlen, head_dim), a view."""
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def _merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, heads, seqlen, head_dim) -> projected (batch, seqlen, dim)."""
        return self.to_out[0](x.transpose(1, 2).flatten(2))

    def self_attention(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        layer: int,
        processor: AttentionProcessor,
    ) -> torch.Tensor:
        """x: (batch, seqlen, dim); rope: cos, sin (seqlen, head_dim // 2) -> (batch, seqlen, dim)."""
        # RoPE runs in the projections' own (batch, seqlen, heads, head_dim) layout, where its float32 pass reads
        # contiguous memory; the transposes to the processor's (batch, heads, seqlen, head_dim) are free views.
        if self.to_qkv is not None:
            # Column slices of one (batch, seqlen, 3 * dim) product: views, rows strided by 3 * dim.
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        q = self.norm_q(q).unflatten(-1, (self.num_heads, -1))
        k = self.norm_k(k).unflatten(-1, (self.num_heads, -1))
        v = v.unflatten(-1, (self.num_heads, -1))
        return self._merge_heads(rope_self_attention(q, k, v, rope, layer, processor))

    def cross_attention(
        self, x: torch.Tensor, context: torch.Tensor, layer: int, processor: AttentionProcessor
    ) -> torch.Tensor:
        """x: (batch, seqlen, dim); context: (batch, seqlen_ctx, dim) -> (batch, seqlen, dim)."""
        if self.to_kv is not None:
            k, v = self.to_kv(context).chunk(2, dim=-1)
        else:
            k, v = self.to_k(context), self.to_v(context)
        q = self._split_heads(self.norm_q(self.to_q(x)))
        k = self._split_heads(self.norm_k(k))
        v = self._split_heads(v)
        return self._merge_heads(processor.cross_attention(layer, q, k, v))


# ----------------------------------------------------------------------------------------------------------
# Feed-forward


class _GeluProjection(nn.Module):
    """Linear then tanh-GELU; a module of its own so the weights are named ``net.0.proj`` as in diffusers."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., dim_in) -> (..., dim_out)."""
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """dim -> ffn_dim -> dim MLP; ``net.1`` is a parameter-free placeholder (diffusers' dropout slot)."""

    def __init__(self, dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.net = nn.ModuleList([_GeluProjection(dim, ffn_dim), nn.Identity(), nn.Linear(ffn_dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., dim)."""
        return self.net[2](self.net[0](x))


# ----------------------------------------------------------------------------------------------------------
# Transformer block


class WanBlock(nn.Module):
    """Self-attention, cross-attention and FFN with AdaLN-zero modulation from the (per-frame) timestep."""

    def __init__(self, config: WanConfig) -> None:
        super().__init__()
        dim, eps = config.dim, config.eps
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = WanAttention(dim, config.num_heads, eps)
        self.attn2 = WanAttention(dim, config.num_heads, eps)
        self.norm2: nn.Module = FP32LayerNorm(dim, eps) if config.cross_attn_norm else nn.Identity()
        self.ffn = FeedForward(dim, config.ffn_dim)
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        modulation: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        layer: int,
        processor: AttentionProcessor,
    ) -> torch.Tensor:
        """One block.

        Args:
            x: (batch, frames, tokens_per_frame, dim) residual stream.
            context: (batch, seqlen_ctx, dim) projected prompt embeddings.
            modulation: (batch, frames or 1, 6, dim) float32 time projection; frame f's tokens use row f.
            rope: cos, sin (frames * tokens_per_frame, head_dim // 2) float32.
            layer: this block's index, passed to the processor.
            processor: attention policy.

        Returns:
            (batch, frames, tokens_per_frame, dim) in x.dtype.
        """
        # Each chunk is (batch, frames or 1, 1, dim): broadcasts one frame's modulation over its tokens.
        table = (self.scale_shift_table + modulation).unsqueeze(3)
        shift, scale, gate, c_shift, c_scale, c_gate = table.unbind(2)
        grid = x.shape[1:3]

        # addcmul keeps each modulation and gated residual update one float32 pass (its result type is float32
        # because the modulation is), where the spelled-out form takes three.
        h = torch.addcmul(shift, self.norm1(x), 1 + scale).to(x.dtype)
        y = self.attn1.self_attention(h.flatten(1, 2), rope, layer, processor).unflatten(1, grid)
        x = torch.addcmul(x, y, gate).to(x.dtype)

        h = self.norm2(x).to(x.dtype)
        x = x + self.attn2.cross_attention(h.flatten(1, 2), context, layer, processor).unflatten(1, grid)

        h = torch.addcmul(c_shift, self.norm3(x), 1 + c_scale).to(x.dtype)
        return torch.addcmul(x, self.ffn(h), c_gate).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# Conditioning


class _TwoLayerMLP(nn.Module):
    """linear_1 -> activation -> linear_2; diffusers' TimestepEmbedding and PixArtAlphaTextProjection."""

    def __init__(self, dim_in: int, dim: int, activation: nn.Module) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim)
        self.act = activation
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., dim_in) -> (..., dim), computed in the weights' dtype."""
        return self.linear_2(self.act(self.linear_1(x.to(self.linear_1.weight.dtype))))


class WanConditionEmbedder(nn.Module):
    """Timestep and prompt embeddings."""

    def __init__(self, config: WanConfig) -> None:
        super().__init__()
        dim = config.dim
        self.freq_dim = config.freq_dim
        self.max_period = config.timestep_max_period
        self.time_embedder = _TwoLayerMLP(config.freq_dim, dim, nn.SiLU())
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = _TwoLayerMLP(config.text_dim, dim, nn.GELU(approximate="tanh"))

    def embed_time(self, timestep: torch.Tensor) -> torch.Tensor:
        """timestep: (...) any real dtype -> (..., dim) time embedding (before the SiLU and time_proj)."""
        half = self.freq_dim // 2
        steps = torch.arange(half, dtype=torch.float32, device=timestep.device)
        angles = timestep.float()[..., None] * torch.exp(-math.log(self.max_period) * steps / half)
        return self.time_embedder(torch.cat((angles.cos(), angles.sin()), dim=-1))

    def project_time(self, temb: torch.Tensor) -> torch.Tensor:
        """temb: (..., dim) -> (..., 6, dim) float32 AdaLN modulation of every block."""
        out = self.time_proj(F.silu(temb.to(self.time_proj.weight.dtype)))
        return out.unflatten(-1, (6, -1)).float()


# ----------------------------------------------------------------------------------------------------------
# Model


class CausalWanModel(nn.Module):
    """Wan 2.1 text-to-video transformer that denoises one chunk of latent frames per call.

    Args:
        config: model shape; see :class:`~longroll.models.wan.config.WanConfig`.
    """

    def __init__(self, config: WanConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.dim
        self.rope = WanRotaryEmbedding(config.head_dim, config.rope_max_seq_len, config.rope_theta)
        self.patch_embedding = nn.Conv3d(
            config.in_channels, dim, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.condition_embedder = WanConditionEmbedder(config)
        self.action_embedder = nn.Embedding(config.num_actions, dim) if config.num_actions else None
        self.blocks = nn.ModuleList([WanBlock(config) for _ in range(config.num_layers)])
        self.norm_out = FP32LayerNorm(dim, config.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, config.out_channels * math.prod(config.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        *,
        frame_offset: int = 0,
        processor: AttentionProcessor | None = None,
        actions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Flow (velocity) prediction for one chunk of latent frames.

        Args:
            x: (batch, in_channels, frames, height, width) noisy latents of the chunk; frames, height and
                width are multiples of the patch size.
            timestep: (batch,) one timestep per sample, or (batch, frames // patch_t) one per latent frame.
            context: (batch, seqlen_ctx, text_dim) prompt embeddings.
            frame_offset: absolute (patch-)frame index of the chunk's first frame; only the temporal RoPE uses
                it, so a chunk of frames 9..11 is rotated exactly as those frames are in a full-clip forward.
            processor: attention policy (KV cache, mask, sparsity); default :class:`DenseProcessor`, i.e. full
                bidirectional attention over the chunk.
            actions: (batch, frames // patch_t) integer action ids of a world model (config.num_actions > 0);
                each frame's action embedding is added to its time embedding. None adds nothing.

        Returns:
            (batch, out_channels, frames, height, width) in the dtype of the model's matmul weights.
        """
        grid = self._check_inputs(x, timestep, context, frame_offset, actions)
        processor = DenseProcessor() if processor is None else processor
        frames, height, width = grid

        rope = self.rope(frames, height, width, frame_offset=frame_offset, device=x.device)
        h = self._patchify(x)
        context = self.condition_embedder.text_embedder(context).to(h.dtype)
        temb = self._time_embedding(timestep if timestep.dim() == 2 else timestep[:, None], actions)
        modulation = self.condition_embedder.project_time(temb)

        for layer, block in enumerate(self.blocks):
            h = block(h, context, modulation, rope, layer, processor)
        return self._unpatchify(self._head(h, temb), grid)

    def _check_inputs(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        frame_offset: int,
        actions: torch.Tensor | None,
    ) -> tuple[int, int, int]:
        """Validate forward's arguments; returns the patch grid (frames, height, width)."""
        cfg = self.config
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be (batch, {cfg.in_channels}, frames, height, width), got {_shape(x)}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating tensor, got dtype {x.dtype}")
        if any(n == 0 or n % p for n, p in zip(x.shape[2:], cfg.patch_size, strict=True)):
            raise ValueError(f"x shape {_shape(x)}: frames, height, width must be multiples of {cfg.patch_size}")
        batch = x.shape[0]
        frames, height, width = (n // p for n, p in zip(x.shape[2:], cfg.patch_size, strict=True))
        if _shape(timestep) not in ((batch,), (batch, frames)):
            raise ValueError(f"timestep must be ({batch},) or ({batch}, {frames}), got {_shape(timestep)}")
        ctx = _shape(context)
        if not (isinstance(ctx, tuple) and len(ctx) == 3 and ctx[0] == batch and ctx[2] == cfg.text_dim):
            raise ValueError(f"context must be ({batch}, seqlen_ctx, {cfg.text_dim}), got {_shape(context)}")
        if not isinstance(frame_offset, int) or isinstance(frame_offset, bool) or frame_offset < 0:
            raise ValueError(f"frame_offset must be a non-negative int, got {frame_offset!r}")
        if actions is not None:
            if cfg.num_actions == 0:
                raise ValueError(f"actions given (shape {_shape(actions)}) but config.num_actions is 0")
            if _shape(actions) != (batch, frames) or actions.is_floating_point() or actions.is_complex():
                got = f"{_shape(actions)} {getattr(actions, 'dtype', '')}"
                raise ValueError(f"actions must be integer ({batch}, {frames}), got {got}")
        return frames, height, width

    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, C, F, H, W) -> (batch, F', H' * W', dim) tokens.

        The patch conv has stride == kernel, so it is a matmul over non-overlapping patches; writing it as one
        avoids 3-D convolution kernels, which are slow for this shape in bf16.
        """
        b, c, f, hh, ww = x.shape
        pt, ph, pw = self.config.patch_size
        weight = self.patch_embedding.weight
        patches = x.to(weight.dtype).reshape(b, c, f // pt, pt, hh // ph, ph, ww // pw, pw)
        patches = patches.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, f // pt, (hh // ph) * (ww // pw), -1)
        return F.linear(patches, weight.flatten(1), self.patch_embedding.bias)

    def _time_embedding(self, timestep: torch.Tensor, actions: torch.Tensor | None) -> torch.Tensor:
        """timestep: (batch, frames or 1); actions: (batch, frames) or None -> (batch, frames or 1, dim)."""
        temb = self.condition_embedder.embed_time(timestep)
        if actions is not None and self.action_embedder is not None:
            temb = temb + self.action_embedder(actions).to(temb.dtype)
        return temb

    def _head(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """x: (batch, F', S, dim); temb: (batch, F' or 1, dim) -> (batch, F', S, pt * ph * pw * C_out)."""
        table = (self.scale_shift_table + temb.float().unsqueeze(2)).unsqueeze(3)
        shift, scale = table.unbind(2)
        return self.proj_out(torch.addcmul(shift, self.norm_out(x), 1 + scale).to(x.dtype))

    def _unpatchify(self, y: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(batch, F', H' * W', pt * ph * pw * C) -> (batch, C, F' * pt, H' * ph, W' * pw)."""
        frames, height, width = grid
        pt, ph, pw = self.config.patch_size
        y = y.reshape(y.shape[0], frames, height, width, pt, ph, pw, -1)
        y = y.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return y.reshape(y.shape[0], y.shape[1], frames * pt, height * ph, width * pw)

    def fuse_projections(self) -> CausalWanModel:
        """Fuse each block's q/k/v projections of the self-attention into one Linear, and the k/v projections of
        the context in the cross-attention (one read of the activations, one larger matmul instead of three).

        Opt-in and reversible (:meth:`unfuse_projections`); ``state_dict()`` and ``load_state_dict()`` keep
        diffusers' ``to_q``/``to_k``/``to_v`` names either way. Code that addresses ``attn.to_q`` and friends
        directly (e.g. per-head weight slicing) needs the unfused default. Returns self.
        """
        for block in self.blocks:
            assert isinstance(block, WanBlock)
            block.attn1.fuse_projections(_QKV)
            block.attn2.fuse_projections(_KV)
        return self

    def unfuse_projections(self) -> CausalWanModel:
        """Undo :meth:`fuse_projections` exactly (the separate weights are the fused rows). Returns self."""
        for block in self.blocks:
            assert isinstance(block, WanBlock)
            block.attn1.unfuse_projections()
            block.attn2.unfuse_projections()
        return self

    def quantize_fp8(self, granularity: Fp8Granularity = "row") -> CausalWanModel:
        """Replace every Linear of the blocks (attention projections, fused or not, and the FFN) by an
        :class:`~longroll.ops.fp8.Fp8Linear` (float8 e4m3 weights and activations, ``torch._scaled_mm``).

        The embedders, time projection and output head stay as they are: they are a few percent of the FLOPs
        and feed the float32 modulation. Lossy and one-way: quantize after loading (and after any
        :meth:`fuse_projections` or dtype cast); the quantized model's state dict holds the FP8 tensors.
        Raises ValueError, before changing anything, when the device cannot run FP8 matmuls or a Linear's
        widths are not multiples of 16. Returns self.
        """
        granularity = check_fp8_granularity(granularity)
        device = self.proj_out.weight.device
        reason = fp8_unsupported_reason(device)
        if reason is not None:
            raise ValueError(f"FP8 linears are not available on {device}: {reason}")
        targets = [
            (f"blocks.{path}.{name}", parent, name, child)
            for path, parent in self.blocks.named_modules()
            for name, child in parent.named_children()
            if type(child) is nn.Linear
        ]
        for full, _, _, child in targets:
            check_fp8_shape(child.in_features, child.out_features, name=full)
        for _, parent, name, child in targets:
            setattr(parent, name, Fp8Linear.from_linear(child, granularity))
        return self

    def to_inference_dtype(self, dtype: torch.dtype) -> CausalWanModel:
        """Cast matmul weights to ``dtype`` (e.g. bf16) while the time path, modulation tables and norms stay
        float32, as in Wan's own inference code. Returns self."""
        self.to(dtype)
        for name, module in self.named_modules():
            if name.rsplit(".", 1)[-1] in _FP32_MODULES:
                module.float()
        for name, param in self.named_parameters():
            if name.endswith("scale_shift_table"):
                param.data = param.data.float()
        return self


def _shape(x: object) -> tuple[int, ...] | str:
    """A tensor's shape for error messages, or the type name of a non-tensor."""
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
