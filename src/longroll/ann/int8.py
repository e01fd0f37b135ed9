"""8-bit scalar-quantised similarity search on GPU tensors."""

from __future__ import annotations

import torch

from longroll.ann.config import Int8Config
from longroll.ops._checks import check_rank


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-vector int8 codes.

    Args:
        x: (..., d) float.

    Returns:
        codes: (..., d) int8 with x ~= codes * scale; scale: (...) float32.
    """
    scale = x.float().abs().amax(dim=-1).clamp_min(1e-12) / 127.0
    codes = torch.round(x.float() / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return codes, scale


def int8_scores(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Approximate dot products from int8 codes.

    Args:
        queries: (batch, heads, n, d); candidates: (batch, heads, m, d).

    Returns:
        (batch, heads, n, m) float32, ~= queries @ candidates^T.
    """
    qc, qs = quantize_int8(queries)
    cc, cs = quantize_int8(candidates)
    # One batched float32 product of the int8 codes: exact for d <= 1024 (|sum| < 2**24) unless TF32 is on,
    # and one launch for every (batch, head), where torch._int_mm would need a 2-D call per head.
    dots = torch.matmul(qc.float(), cc.float().transpose(-1, -2))
    return dots * qs[..., :, None] * cs[..., None, :]


class Int8Searcher:
    """Top-k nearest candidates by quantised dot product. Stateless: works on any subset of heads."""

    def __init__(self, config: Int8Config) -> None:
        self.config = config

    def topk(self, queries: torch.Tensor, candidates: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """queries: (batch, heads, n, d); candidates: (batch, heads, m, d) -> (batch, heads, n, k) int64."""
        check_rank("queries", queries, 4)
        check_rank("candidates", candidates, 4)
        if candidates.shape[2] == 0:
            raise ValueError("candidates must hold at least one vector, got seqlen 0")
        k = self.config.topk if k is None else k
        k = min(k, candidates.shape[2])
        return int8_scores(queries, candidates).topk(k, dim=-1).indices

    def top1(self, queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """queries: (batch, heads, n, d); candidates: (batch, heads, m, d) -> (batch, heads, n) int64."""
        check_rank("queries", queries, 4)
        check_rank("candidates", candidates, 4)
        if candidates.shape[2] == 0:
            raise ValueError("candidates must hold at least one vector, got seqlen 0")
        return int8_scores(queries, candidates).argmax(dim=-1)
