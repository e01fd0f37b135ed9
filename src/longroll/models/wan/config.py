"""Hyper-parameters of a (causal) Wan 2.1 transformer.

Every model constant lives here so that the model, the checkpoint converter and the planners read the same
numbers. Field names follow the Wan papers; :meth:`WanConfig.diffusers_kwargs` and
:meth:`WanConfig.from_diffusers_config` translate to and from ``diffusers.WanTransformer3DModel``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class WanConfig:
    """Shape of a Wan 2.1 diffusion transformer.

    Attributes:
        patch_size: (t, h, w) patch of the latent video; Wan 2.1 uses (1, 2, 2).
        num_heads: attention heads per layer.
        head_dim: channels per head; ``dim = num_heads * head_dim``.
        in_channels: latent channels of the input video.
        out_channels: latent channels of the prediction.
        text_dim: channels of the prompt embeddings (umT5-XXL: 4096).
        freq_dim: channels of the sinusoidal timestep embedding.
        ffn_dim: hidden channels of the feed-forward network.
        num_layers: transformer blocks.
        cross_attn_norm: whether a LayerNorm (with affine) precedes cross-attention.
        eps: epsilon of every LayerNorm and RMSNorm.
        rope_max_seq_len: positions per RoPE axis; a rollout's last latent frame index must stay below it.
        rope_theta: RoPE base.
        timestep_max_period: base of the sinusoidal timestep embedding.
        num_actions: size of the discrete action vocabulary of a world model; 0 means no action input.
    """

    num_heads: int
    head_dim: int
    in_channels: int
    out_channels: int
    text_dim: int
    freq_dim: int
    ffn_dim: int
    num_layers: int
    patch_size: tuple[int, int, int] = (1, 2, 2)
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_max_seq_len: int = 1024
    rope_theta: float = 10000.0
    timestep_max_period: float = 10000.0
    num_actions: int = 0

    def __post_init__(self) -> None:
        patch = tuple(self.patch_size)
        if len(patch) != 3 or not all(_is_int(p) and p > 0 for p in patch):
            raise ValueError(f"patch_size must be three positive ints (t, h, w), got {self.patch_size!r}")
        object.__setattr__(self, "patch_size", patch)
        positive = ("num_heads", "head_dim", "in_channels", "out_channels", "text_dim", "freq_dim", "ffn_dim")
        for name in (*positive, "num_layers", "rope_max_seq_len"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        # RoPE rotates channel pairs and gives each of h and w 2 * (head_dim // 6) channels.
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"head_dim must be even and >= 6 (RoPE splits it t/h/w), got {self.head_dim}")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim must be even (cos and sin halves), got {self.freq_dim}")
        if not _is_int(self.num_actions) or self.num_actions < 0:
            raise ValueError(f"num_actions must be a non-negative int, got {self.num_actions!r}")
        if not isinstance(self.cross_attn_norm, bool):
            raise ValueError(f"cross_attn_norm must be a bool, got {self.cross_attn_norm!r}")
        for name in ("eps", "rope_theta", "timestep_max_period"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")

    @property
    def dim(self) -> int:
        """Model width, ``num_heads * head_dim``."""
        return self.num_heads * self.head_dim

    def tokens_per_frame(self, height_latent: int, width_latent: int) -> int:
        """Tokens of one latent frame of size (height_latent, width_latent) after patchifying.

        Example: Wan 2.1 at 480x832 pixels has 60x104 latents, hence 30 * 52 = 1560 tokens per latent frame.
        """
        _, ph, pw = self.patch_size
        for name, value, p in (("height_latent", height_latent, ph), ("width_latent", width_latent, pw)):
            if not _is_int(value) or value < 1 or value % p:
                raise ValueError(f"{name} must be a positive multiple of the patch size {p}, got {value!r}")
        return (height_latent // ph) * (width_latent // pw)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> WanConfig:
        """The configuration of a named model, with optional field overrides (e.g. ``num_actions=8``)."""
        if name not in PRESETS:
            raise ValueError(f"unknown Wan preset {name!r}; known presets: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def diffusers_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``diffusers.WanTransformer3DModel`` with the same weights layout."""
        return {
            "patch_size": self.patch_size,
            "num_attention_heads": self.num_heads,
            "attention_head_dim": self.head_dim,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "text_dim": self.text_dim,
            "freq_dim": self.freq_dim,
            "ffn_dim": self.ffn_dim,
            "num_layers": self.num_layers,
            "cross_attn_norm": self.cross_attn_norm,
            "qk_norm": "rms_norm_across_heads",
            "eps": self.eps,
            "rope_max_seq_len": self.rope_max_seq_len,
        }

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any], **overrides: Any) -> WanConfig:
        """Build from a diffusers ``transformer/config.json`` mapping (text-to-video models only)."""
        if config.get("image_dim") is not None or config.get("added_kv_proj_dim") is not None:
            raise ValueError("image-conditioned Wan models (image_dim or added_kv_proj_dim set) are unsupported")
        qk_norm = config.get("qk_norm", "rms_norm_across_heads")
        if qk_norm != "rms_norm_across_heads":
            raise ValueError(f"only qk_norm='rms_norm_across_heads' is supported, got {qk_norm!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        renamed = {"num_attention_heads": "num_heads", "attention_head_dim": "head_dim"}
        fields = {renamed.get(k, k): v for k, v in config.items() if renamed.get(k, k) in names}
        if "patch_size" in fields:
            fields["patch_size"] = tuple(fields["patch_size"])
        if fields.get("out_channels") is None:
            fields["out_channels"] = fields.get("in_channels")
        return cls(**{**fields, **overrides})


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


#: Named configurations. The 1.3B model is the base of Self-Forcing, CausVid, Rolling-Forcing and LongLive.
PRESETS: dict[str, dict[str, Any]] = {
    "wan2.1-1.3b": {
        "num_heads": 12,
        "head_dim": 128,
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": 4096,
        "freq_dim": 256,
        "ffn_dim": 8960,
        "num_layers": 30,
    },
    "wan2.1-14b": {
        "num_heads": 40,
        "head_dim": 128,
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": 4096,
        "freq_dim": 256,
        "ffn_dim": 13824,
        "num_layers": 40,
    },
    # A random-weight model for CPU tests; head_dim 32 gives RoPE a 12/10/10 channel split.
    "tiny": {
        "num_heads": 2,
        "head_dim": 32,
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": 64,
        "freq_dim": 32,
        "ffn_dim": 128,
        "num_layers": 2,
    },
}
