"""Values shared by every attention op."""

from __future__ import annotations

from typing import NamedTuple

import torch

#: A bias at or below this value removes the key. Finite so that augmented bf16 columns stay finite:
#: exp(-30000) is exactly 0 in float32 while the value is representable in fp16 and bf16.
MASKED_BIAS = -30000.0


class AttentionOutput(NamedTuple):
    """out: (batch, heads, seqlen_q, head_dim_v); lse: (batch, heads, seqlen_q) float32, or None."""

    out: torch.Tensor
    lse: torch.Tensor | None
