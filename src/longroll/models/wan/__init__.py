"""Causal Wan 2.1 transformer: config, model, checkpoint conversion and attention masks."""

from longroll.models.wan.config import PRESETS, WanConfig
from longroll.models.wan.convert import (
    convert_diffusers_to_original,
    convert_original_to_diffusers,
    load_checkpoint,
    load_into,
)
from longroll.models.wan.masks import block_causal_mask
from longroll.models.wan.model import CausalWanModel, WanRotaryEmbedding, apply_rope

__all__ = [
    "PRESETS",
    "CausalWanModel",
    "WanConfig",
    "WanRotaryEmbedding",
    "apply_rope",
    "block_causal_mask",
    "convert_diffusers_to_original",
    "convert_original_to_diffusers",
    "load_checkpoint",
    "load_into",
]
