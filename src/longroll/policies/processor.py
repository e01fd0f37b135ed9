"""The contract between a model's attention layers and longroll's attention policies.

A model computes q, k, v (and applies RoPE) itself, then hands them to an :class:`AttentionProcessor`. The
processor decides what the queries see: the full sequence, a block-causal mask, a KV cache compressed by
TempCache, ANN-selected key blocks, a filtered prompt. Keeping this boundary tensor-only is what lets the same
policies serve longroll's own causal Wan, diffusers processors and other repositories' attention modules.

All tensors use the (batch, heads, seqlen, head_dim) layout.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class AttentionProcessor(Protocol):
    """What a transformer calls in each block instead of computing attention itself."""

    def self_attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pre_rope: torch.Tensor
    ) -> torch.Tensor:
        """Self-attention of the current tokens.

        Args:
            layer: block index, 0-based.
            q, k, v: (batch, heads, seqlen, head_dim), RoPE already applied to q and k.
            k_pre_rope: (batch, heads, seqlen, head_dim), the keys before RoPE (after q/k norm); policies that
                match keys across frames compare these, since RoPE rotates identical content differently at
                different times.

        Returns:
            (batch, heads, seqlen, head_dim) attention output.
        """
        ...

    def cross_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Cross-attention of the current tokens to the conditioning tokens (text, image, actions).

        Args:
            q: (batch, heads, seqlen, head_dim); k, v: (batch, heads, seqlen_ctx, head_dim).

        Returns:
            (batch, heads, seqlen, head_dim).
        """
        ...


class DenseProcessor:
    """Exact attention over exactly the tokens given, with an optional boolean mask for self-attention.

    Args:
        self_mask: optional bool (seqlen, seqlen) or broadcastable to (batch, heads, seqlen, seqlen); True keeps
            the pair (e.g. a block-causal mask for teacher-forced training or an oracle forward).
    """

    def __init__(self, self_mask: torch.Tensor | None = None) -> None:
        self.self_mask = self_mask

    def self_attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pre_rope: torch.Tensor
    ) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.self_mask)

    def cross_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)
