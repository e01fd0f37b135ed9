"""Turn one model instance into this rank's head-parallel shard of it."""

from __future__ import annotations

import torch.nn as nn

from longroll.models.wan.model import CausalWanModel, FeedForward, WanAttention, WanBlock
from longroll.ops.fp8 import Fp8Linear
from longroll.parallel.group import HeadParallelGroup
from longroll.parallel.layers import ShardedFeedForward, ShardedWanAttention


def shard_wan_model(model: CausalWanModel, group: HeadParallelGroup) -> CausalWanModel:
    """Replace, on this instance only, every block's self- and cross-attention and FFN by this rank's shard.

    Each rank passes the same (unsharded) weights; afterwards the instance holds its heads' q/k/v columns and
    output-projection rows and its FFN columns (the full modules are released), and its forward, called with
    a processor holding the same heads (:class:`~longroll.parallel.processor.HeadParallelProcessor`), returns
    the full prediction on every rank. Everything else (embeddings, norms, modulation, head) stays replicated.
    The model class is not changed: other instances are unaffected. Works for subclasses of
    :class:`CausalWanModel` (e.g. the world model), whose processor wrappers see the rank's heads.

    Args:
        model: a :class:`CausalWanModel` (any dtype and device), sharded in place.
        group: the ranks to shard over.

    Returns:
        ``model``.

    Raises:
        ValueError: the heads do not split over the group (see :meth:`HeadParallelGroup.head_range`), or the
            model is already sharded; nothing is changed then.
    """
    if not isinstance(model, CausalWanModel):
        raise ValueError(f"model must be a CausalWanModel, got {type(model).__name__}")
    group.head_range(model.config.num_heads)  # validate before changing anything
    blocks = list(model.blocks)
    for i, block in enumerate(blocks):
        if not isinstance(block, WanBlock) or not isinstance(block.attn1, WanAttention):
            raise ValueError(f"model.blocks[{i}] is not an unsharded WanBlock (already sharded?)")
        attns = (block.attn1, block.attn2)
        if any(isinstance(a, WanAttention) and a.fused for a in attns):
            raise ValueError(f"model.blocks[{i}] has fused projections: shard before fuse_projections()")
        if any(isinstance(m, Fp8Linear) for m in block.modules()):
            raise ValueError(f"model.blocks[{i}] has FP8 linears: shard before quantize_fp8()")
    for block in blocks:
        attn1, attn2, ffn = block.attn1, block.attn2, block.ffn
        assert isinstance(attn1, WanAttention) and isinstance(attn2, WanAttention) and isinstance(ffn, FeedForward)
        parts: dict[str, nn.Module] = {
            "attn1": ShardedWanAttention.from_dense(attn1, group),
            "attn2": ShardedWanAttention.from_dense(attn2, group),
            "ffn": ShardedFeedForward.from_dense(ffn, group),
        }
        for name, module in parts.items():
            block.register_module(name, module)  # replaces the full module, which is then freed
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether :func:`shard_wan_model` has been applied to ``model``."""
    return any(isinstance(m, ShardedWanAttention) for m in model.modules())
