"""Head-sharded replacements of the Wan block's attention and feed-forward modules (Megatron-style tensor
parallelism): q/k/v and the FFN's first linear are split by output columns, the output projections by input
rows, and one all-reduce sums the partial outputs of each.

Wan normalises q and k with an RMSNorm across all heads together, before the head split; a rank holding some
heads only sees their channels, so the sums of squares of the local channels are all-reduced (one small
all-reduce for q and k together) before the normalisation, which then equals the unsharded one.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from longroll.models.wan.model import FeedForward, WanAttention, rope_self_attention
from longroll.parallel.group import HeadParallelGroup, split_range
from longroll.policies.processor import AttentionProcessor


def _rows(t: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """A copy of rows [start, start + n) of t (the original can be freed)."""
    return t.detach().narrow(0, start, n).clone()


def _column_linear(src: nn.Linear, start: int, n: int) -> nn.Linear:
    """Output features [start, start + n) of ``src``: (in, n) linear with the matching bias."""
    out = nn.Linear(src.in_features, n, bias=src.bias is not None, device=src.weight.device, dtype=src.weight.dtype)
    out.weight = nn.Parameter(_rows(src.weight, start, n), requires_grad=False)
    if src.bias is not None:
        out.bias = nn.Parameter(_rows(src.bias, start, n), requires_grad=False)
    return out


def _row_weight(src: nn.Linear, start: int, n: int) -> nn.Parameter:
    """Input features [start, start + n) of ``src``'s weight: (out, n)."""
    return nn.Parameter(src.weight.detach().narrow(1, start, n).clone(), requires_grad=False)


def _bias(src: nn.Linear) -> nn.Parameter | None:
    return None if src.bias is None else nn.Parameter(src.bias.detach().clone(), requires_grad=False)


class ShardedWanAttention(nn.Module):
    """The heads ``[start, start + heads)`` of a :class:`~longroll.models.wan.model.WanAttention`, with its
    ``self_attention`` / ``cross_attention`` interface; the returned output is the full (all heads) projection,
    identical on every rank of the group.

    Build with :meth:`from_dense`. Parameters: ``to_q``, ``to_k``, ``to_v`` (dim -> heads * head_dim),
    ``norm_q_weight``, ``norm_k_weight`` (heads * head_dim,), ``out_weight`` (dim, heads * head_dim) and
    ``out_bias`` (dim,).
    """

    def __init__(
        self,
        to_q: nn.Linear,
        to_k: nn.Linear,
        to_v: nn.Linear,
        norm_q_weight: nn.Parameter,
        norm_k_weight: nn.Parameter,
        out_weight: nn.Parameter,
        out_bias: nn.Parameter | None,
        *,
        heads: int,
        full_dim: int,
        eps: float,
        group: HeadParallelGroup,
    ) -> None:
        super().__init__()
        self.to_q, self.to_k, self.to_v = to_q, to_k, to_v
        self.norm_q_weight, self.norm_k_weight = norm_q_weight, norm_k_weight
        self.out_weight, self.out_bias = out_weight, out_bias
        self.num_heads = heads
        self.full_dim = full_dim
        self.eps = eps
        self.group = group

    @classmethod
    def from_dense(cls, attn: WanAttention, group: HeadParallelGroup) -> ShardedWanAttention:
        """This rank's shard of ``attn`` (weights copied; ``attn`` is left as it is)."""
        start, heads = group.head_range(attn.num_heads)
        dim = attn.to_q.in_features
        head_dim = attn.to_q.out_features // attn.num_heads
        lo, n = start * head_dim, heads * head_dim
        eps = attn.norm_q.eps
        if eps is None or attn.norm_q.weight is None or attn.norm_k.weight is None or attn.norm_k.eps != eps:
            raise ValueError("attn's q/k RMSNorms must have affine weights and one explicit eps")
        out = attn.to_out[0]
        assert isinstance(out, nn.Linear)
        return cls(
            _column_linear(attn.to_q, lo, n),
            _column_linear(attn.to_k, lo, n),
            _column_linear(attn.to_v, lo, n),
            nn.Parameter(_rows(attn.norm_q.weight, lo, n), requires_grad=False),
            nn.Parameter(_rows(attn.norm_k.weight, lo, n), requires_grad=False),
            _row_weight(out, lo, n),
            _bias(out),
            heads=heads,
            full_dim=dim,
            eps=eps,
            group=group,
        )

    def _norm_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RMSNorm over all heads' channels of q (B, S, heads * head_dim) and k (B, S_k, heads * head_dim): the
        local sums of squares are summed over the group (one all-reduce), then each rank normalises its own
        channels. Computed in float32, cast back, then scaled by the weight, as ``nn.RMSNorm`` does."""
        ss_q, ss_k = q.float().square().sum(-1), k.float().square().sum(-1)
        ss = self.group.all_reduce(torch.cat((ss_q.flatten(), ss_k.flatten())))
        inv_q = torch.rsqrt(ss[: ss_q.numel()].view_as(ss_q) / self.full_dim + self.eps)
        inv_k = torch.rsqrt(ss[ss_q.numel() :].view_as(ss_k) / self.full_dim + self.eps)
        q_n = (q.float() * inv_q[..., None]).to(q.dtype) * self.norm_q_weight
        k_n = (k.float() * inv_k[..., None]).to(k.dtype) * self.norm_k_weight
        return q_n, k_n

    def _merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, heads, seqlen, head_dim) of this rank -> (batch, seqlen, dim) summed over the group."""
        out = self.group.all_reduce(F.linear(x.transpose(1, 2).flatten(2), self.out_weight))
        return out if self.out_bias is None else out + self.out_bias

    def self_attention(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        layer: int,
        processor: AttentionProcessor,
    ) -> torch.Tensor:
        """x: (batch, seqlen, dim); rope: cos, sin (seqlen, head_dim // 2) -> (batch, seqlen, dim).

        The processor receives this rank's heads only: (batch, heads, seqlen, head_dim).
        """
        q, k = self._norm_qk(self.to_q(x), self.to_k(x))
        q, k = q.unflatten(-1, (self.num_heads, -1)), k.unflatten(-1, (self.num_heads, -1))
        v = self.to_v(x).unflatten(-1, (self.num_heads, -1))
        return self._merge_heads(rope_self_attention(q, k, v, rope, layer, processor))

    def cross_attention(
        self, x: torch.Tensor, context: torch.Tensor, layer: int, processor: AttentionProcessor
    ) -> torch.Tensor:
        """x: (batch, seqlen, dim); context: (batch, seqlen_ctx, dim) -> (batch, seqlen, dim)."""
        q, k = self._norm_qk(self.to_q(x), self.to_k(context))
        q = q.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        k = k.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        v = self.to_v(context).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        return self._merge_heads(processor.cross_attention(layer, q, k, v))


class ShardedFeedForward(nn.Module):
    """Hidden columns ``[start, start + n)`` of a :class:`~longroll.models.wan.model.FeedForward`: (..., dim) ->
    (..., dim), the full output summed over the group. Parameters: ``proj_in`` (dim -> n), ``out_weight``
    (dim, n), ``out_bias`` (dim,)."""

    def __init__(
        self, proj_in: nn.Linear, out_weight: nn.Parameter, out_bias: nn.Parameter | None, group: HeadParallelGroup
    ) -> None:
        super().__init__()
        self.proj_in, self.out_weight, self.out_bias = proj_in, out_weight, out_bias
        self.group = group

    @classmethod
    def from_dense(cls, ffn: FeedForward, group: HeadParallelGroup) -> ShardedFeedForward:
        """This rank's shard of ``ffn`` (balanced contiguous hidden columns; weights copied)."""
        proj_in, proj_out = ffn.net[0].proj, ffn.net[2]
        assert isinstance(proj_in, nn.Linear) and isinstance(proj_out, nn.Linear)
        start, n = split_range(proj_in.out_features, group.size, group.rank)
        if n == 0:
            raise ValueError(f"ffn_dim={proj_in.out_features} cannot be split over {group.size} ranks")
        return cls(_column_linear(proj_in, start, n), _row_weight(proj_out, start, n), _bias(proj_out), group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., dim)."""
        h = F.gelu(self.proj_in(x), approximate="tanh")
        out = self.group.all_reduce(F.linear(h, self.out_weight))
        return out if self.out_bias is None else out + self.out_bias
