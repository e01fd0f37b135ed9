"""longroll's attention as torch custom ops, so that ``torch.compile`` traces models that use it.

``torch.compile`` cannot look inside the Triton launcher (host-side autotuning, split-k heuristics, a
pointer-arithmetic kernel) nor through the data-independent but branchy route choice of
:func:`longroll.ops.attention.attention`. Registered as opaque custom ops with fake (meta) implementations,
both appear in a compiled graph as one node each: no graph break, and shapes that change only in the key
length (a cache that grows) stay symbolic instead of forcing a recompile.

Two ops, each a thin wrapper over the existing launchers, which it does not change:

- ``torch.ops.longroll.attention``: :func:`longroll.ops.attention.attention` (dense attention with an
  optional per-key logit bias), called through :func:`attention_op`.
- ``torch.ops.longroll.block_sparse_attention``: :func:`longroll.ops.block_sparse.block_sparse_attention`
  (the Triton kernel or its torch twin), called through :func:`block_sparse_attention_op`; the
  :class:`~longroll.ops.block_index.BlockSparseIndex` is passed as its two tensors and its sizes.

Layout contract (what the fake implementations promise): ``out`` has q's memory layout when the value head dim
equals q's (so a (B, L, H, D) tensor's ``transpose(1, 2)`` gets one back, as the Triton route gives anyway) and
is contiguous otherwise; ``lse`` is contiguous float32 (batch, heads, seqlen_q), or an empty (0,) tensor when
it was not asked for. Inputs are validated by the Python wrappers, on real and fake tensors alike, before the
op runs. The ops have no autograd formula: they serve inference (rollouts); training uses the torch routes.
"""

from __future__ import annotations

import math
from typing import cast

import torch

from longroll.ops._checks import check_bias, check_qkv
from longroll.ops.attention import BACKENDS as DENSE_BACKENDS
from longroll.ops.attention import Backend, attention
from longroll.ops.block_index import BlockSparseIndex
from longroll.ops.block_sparse import BACKENDS as SPARSE_BACKENDS
from longroll.ops.block_sparse import MAX_SPLIT_K, SCHEDULES, BlockSparseBackend, BlockSparseSchedule
from longroll.ops.block_sparse import block_sparse_attention as _block_sparse_attention
from longroll.ops.types import AttentionOutput

#: Namespace of the registered ops (``torch.ops.longroll.*``).
NAMESPACE = "longroll"


def _out_like(q: torch.Tensor, head_dim_v: int) -> torch.Tensor:
    """An empty (batch, heads, seqlen_q, head_dim_v) tensor in the op's output layout (see the module doc)."""
    if head_dim_v == q.shape[-1]:
        return torch.empty_like(q)
    return q.new_empty(*q.shape[:-1], head_dim_v)


def _in_layout(out: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``out`` in the layout :func:`_out_like` promises (a copy only when the route returned another one)."""
    target = _out_like(q, out.shape[-1])
    if out.stride() == target.stride():
        return out
    return target.copy_(out)


def _no_lse(q: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=torch.float32, device=q.device)


@torch.library.custom_op(f"{NAMESPACE}::attention", mutates_args=())
def _attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float | None,
    backend: str,
    return_lse: bool,
    max_elements: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    route = cast(Backend, backend)
    res = attention(q, k, v, bias, scale=scale, backend=route, return_lse=return_lse, max_elements=max_elements)
    out = _in_layout(res.out, q)
    lse = res.lse.contiguous() if return_lse and res.lse is not None else _no_lse(q)
    # A custom op may not return its inputs; no route does, but a copy keeps the contract if one ever did.
    return (out.clone() if out is q else out), lse


@_attention.register_fake
def _attention_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float | None,
    backend: str,
    return_lse: bool,
    max_elements: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    out = _out_like(q, v.shape[-1])
    lse = q.new_empty(q.shape[:3], dtype=torch.float32) if return_lse else _no_lse(q)
    return out, lse


@torch.library.custom_op(f"{NAMESPACE}::block_sparse_attention", mutates_args=())
def _block_sparse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    bias: torch.Tensor | None,
    q_block_size: int,
    kv_block_size: int,
    scale: float,
    backend: str,
    split_k: int,
    schedule: str,
    max_elements: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    index = BlockSparseIndex(kv_num_blocks, kv_indices, q_block_size, kv_block_size, q.shape[2], k.shape[2])
    res = _block_sparse_attention(
        q, k, v, index, bias, scale=scale, backend=cast(BlockSparseBackend, backend),
        split_k=None if split_k == 0 else split_k, schedule=cast(BlockSparseSchedule, schedule),
        max_elements=max_elements,
    )  # fmt: skip
    assert res.lse is not None  # both backends return it
    out = _in_layout(res.out, q)
    return (out.clone() if out is q else out), res.lse.contiguous()


@_block_sparse.register_fake
def _block_sparse_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    bias: torch.Tensor | None,
    q_block_size: int,
    kv_block_size: int,
    scale: float,
    backend: str,
    split_k: int,
    schedule: str,
    max_elements: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _out_like(q, v.shape[-1]), q.new_empty(q.shape[:3], dtype=torch.float32)


def attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    backend: Backend = "auto",
    return_lse: bool = False,
    max_elements: int = 1 << 25,
) -> AttentionOutput:
    """:func:`longroll.ops.attention.attention` as one traceable node (``torch.ops.longroll.attention``).

    Args:
        q: (batch, heads, seqlen_q, head_dim).
        k: (batch, heads_kv, seqlen_k, head_dim); heads_kv divides heads.
        v: (batch, heads_kv, seqlen_k, head_dim_v).
        bias: (batch, heads_kv, seqlen_k) float per-key logit bias, or None.
        scale, backend, return_lse, max_elements: as in :func:`~longroll.ops.attention.attention`.

    Returns:
        :class:`AttentionOutput`: out (batch, heads, seqlen_q, head_dim_v) in q.dtype (q's layout when
        head_dim_v == head_dim), lse (batch, heads, seqlen_q) float32 or None.
    """
    check_qkv(q, k, v)
    check_bias(bias, k)
    if backend not in DENSE_BACKENDS:
        raise ValueError(f"backend must be one of {DENSE_BACKENDS}, got {backend!r}")
    if return_lse and backend not in ("auto", "chunked", "triton"):
        raise ValueError(f"backend={backend!r} cannot return the log-sum-exp; use backend='chunked' or 'triton'")
    if scale is not None and (not isinstance(scale, int | float) or not math.isfinite(scale)):
        raise ValueError(f"scale must be None or a finite number, got {scale!r}")
    if isinstance(max_elements, bool) or not isinstance(max_elements, int) or max_elements < 1:
        raise ValueError(f"max_elements must be a positive int, got {max_elements!r}")
    out, lse = torch.ops.longroll.attention(
        q, k, v, bias, None if scale is None else float(scale), backend, return_lse, max_elements
    )
    return AttentionOutput(out, lse if return_lse else None)


def block_sparse_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: BlockSparseIndex,
    bias: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    backend: BlockSparseBackend = "auto",
    split_k: int | None = None,
    schedule: BlockSparseSchedule = "grid",
    max_elements: int = 1 << 25,
) -> AttentionOutput:
    """:func:`longroll.ops.block_sparse.block_sparse_attention` as one traceable node
    (``torch.ops.longroll.block_sparse_attention``).

    Args:
        q: (batch, heads, seqlen_q, head_dim); any strides.
        k: (batch, heads_kv, seqlen_k, head_dim); heads_kv divides heads.
        v: (batch, heads_kv, seqlen_k, head_dim_v).
        index: key blocks per query block; kv_num_blocks (B or 1, H or 1, nqb), seqlen_q/seqlen_k equal to q's
            and k's (checked eagerly; under ``torch.compile`` the op reads the lengths from q and k, so that an
            index need not be rebuilt as a traced constant for every cache length).
        bias: (batch, heads_kv, seqlen_k) float, or None.
        scale, backend, split_k, schedule, max_elements: as in
            :func:`~longroll.ops.block_sparse.block_sparse_attention` (``triton_config`` and ``check_ids``, for
            tuning sweeps and debugging, are left to the eager launcher).

    Returns:
        :class:`AttentionOutput`: out (batch, heads, seqlen_q, head_dim_v) in q.dtype (q's layout when
        head_dim_v == head_dim) and lse (batch, heads, seqlen_q) float32.
    """
    check_qkv(q, k, v)
    check_bias(bias, k)
    if not isinstance(index, BlockSparseIndex):
        raise ValueError(f"index must be a BlockSparseIndex, got {type(index).__name__}")
    # The index's lengths are host ints: comparing them under torch.compile would pin the key length of the
    # graph (one recompile per cache length). Compiled, the op takes both lengths from q and k instead.
    if not torch.compiler.is_compiling() and (index.seqlen_q != q.shape[2] or index.seqlen_k != k.shape[2]):
        raise ValueError(
            f"index covers (seqlen_q, seqlen_k) = ({index.seqlen_q}, {index.seqlen_k}) but q has seqlen_q "
            f"{q.shape[2]} and k has seqlen_k {k.shape[2]}"
        )
    if index.batch not in (1, q.shape[0]) or index.num_heads not in (1, q.shape[1]):
        raise ValueError(
            f"index.kv_num_blocks has shape {tuple(index.kv_num_blocks.shape)}; its (batch, heads) must be "
            f"({q.shape[0]} or 1, {q.shape[1]} or 1) to match q {tuple(q.shape)}"
        )
    if index.device != q.device:
        raise ValueError(f"index is on {index.device} but q is on {q.device}")
    if backend not in SPARSE_BACKENDS:
        raise ValueError(f"backend must be one of {SPARSE_BACKENDS}, got {backend!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if split_k is not None and (
        isinstance(split_k, bool) or not isinstance(split_k, int) or not 1 <= split_k <= MAX_SPLIT_K
    ):
        raise ValueError(f"split_k must be None or an int in [1, {MAX_SPLIT_K}], got {split_k!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    elif not isinstance(scale, int | float) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if isinstance(max_elements, bool) or not isinstance(max_elements, int) or max_elements < 1:
        raise ValueError(f"max_elements must be a positive int, got {max_elements!r}")
    out, lse = torch.ops.longroll.block_sparse_attention(
        q, k, v, index.kv_num_blocks, index.kv_indices, bias, index.q_block_size, index.kv_block_size,
        float(scale), backend, 0 if split_k is None else split_k, schedule, max_elements,
    )  # fmt: skip
    return AttentionOutput(out, lse)


__all__ = ["NAMESPACE", "attention_op", "block_sparse_attention_op"]
