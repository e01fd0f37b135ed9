"""Argument validation shared by the launchers and ops.

Every check raises ``ValueError`` (or ``TypeError``) naming the argument and its offending value or shape, and
runs before any state is touched or any kernel is launched.
"""

from __future__ import annotations

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_rank(name: str, x: torch.Tensor, rank: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(x.shape)}")


def check_float(name: str, x: torch.Tensor) -> None:
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got dtype {x.dtype}")


def check_same(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, *, dtype: bool = True) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_b} is on {b.device} but {name_a} is on {a.device}")
    if dtype and a.dtype != b.dtype:
        raise ValueError(f"{name_b} has dtype {b.dtype} but {name_a} has dtype {a.dtype}")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """Validate the (batch, heads, seqlen, head_dim) layout of q, k, v.

    Returns ``(batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim)``. k and v may have fewer heads than q
    (grouped-query attention) as long as they divide the query heads.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_rank(name, x, 4)
        check_float(name, x)
    check_same("q", q, "k", k)
    check_same("q", q, "v", v)
    b, h, lq, d = q.shape
    bk, hk, lk, dk = k.shape
    if bk != b or dk != d:
        raise ValueError(
            f"k must have shape ({b}, heads_kv, seqlen_k, {d}) to match q {tuple(q.shape)}, got {tuple(k.shape)}"
        )
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must share (batch, heads, seqlen) with k {tuple(k.shape[:3])}, got {tuple(v.shape)}")
    if hk == 0 or h % hk != 0:
        raise ValueError(f"k has {hk} heads, which must divide the {h} heads of q")
    return b, h, hk, lq, lk, d


def check_bias(bias: torch.Tensor | None, k: torch.Tensor) -> None:
    """A per-key additive logit bias has shape (batch, heads_kv, seqlen_k) and a float dtype."""
    if bias is None:
        return
    check_rank("bias", bias, 3)
    if bias.shape != k.shape[:3]:
        raise ValueError(
            f"bias must have shape {tuple(k.shape[:3])} (batch, heads_kv, seqlen_k), got {tuple(bias.shape)}"
        )
    check_float("bias", bias)
    if bias.device != k.device:
        raise ValueError(f"bias is on {bias.device} but k is on {k.device}")
