"""The host tier's retrieval: selected blocks of its store copied into the device slot region.

``backend="triton"`` runs :mod:`longroll.kernels.host_gather` (CUDA outputs, the store in pinned host memory or
on the device; CPU tensors under ``TRITON_INTERPRET=1``): the GPU reads the pinned store itself, so the block ids
never travel to the host and nothing waits on them there. ``"torch"`` is the reference twin (index the store on
its device, copy). Both write the same bits.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

GatherBackend = Literal["auto", "torch", "triton"]
_BLOCK_R = 32


def _check(
    store_k: torch.Tensor, store_v: torch.Tensor, store_count: torch.Tensor, ids: torch.Tensor, ok: torch.Tensor,
    out_k: torch.Tensor, out_v: torch.Tensor, out_bias: torch.Tensor, block_tokens: int,
) -> None:  # fmt: skip
    if store_k.dim() != 5 or store_v.dim() != 5 or store_count.dim() != 4:
        raise ValueError(f"store_k, store_v must be (R, B, H, E, D) and store_count (R, B, H, E), got "
                         f"{tuple(store_k.shape)}, {tuple(store_v.shape)}, {tuple(store_count.shape)}")  # fmt: skip
    r, b, h, e, d = store_k.shape
    dv = store_v.shape[-1]
    if tuple(store_v.shape[:4]) != (r, b, h, e) or tuple(store_count.shape) != (r, b, h, e):
        raise ValueError(f"store_v and store_count must lead with {(r, b, h, e)}, got {tuple(store_v.shape)} "
                         f"and {tuple(store_count.shape)}")  # fmt: skip
    if ids.dim() != 3 or tuple(ids.shape[:2]) != (b, h) or ok.shape != ids.shape:
        raise ValueError(f"ids and ok must be ({b}, {h}, T), got {tuple(ids.shape)} and {tuple(ok.shape)}")
    t = ids.shape[2]
    if not isinstance(block_tokens, int) or block_tokens < 1 or e % block_tokens:
        raise ValueError(f"block_tokens must be an int >= 1 dividing the record's {e} entries, got {block_tokens!r}")
    n = t * block_tokens
    want = ((out_k, (b, h, n, d)), (out_v, (b, h, n, dv)), (out_bias, (b, h, n)))
    for name, (x, shape) in zip(("out_k", "out_v", "out_bias"), want, strict=True):
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} must be {shape}, got {tuple(x.shape)}")
    for name, x, dtype in (("store_count", store_count, torch.float32), ("ids", ids, torch.int64),
                           ("ok", ok, torch.bool), ("out_bias", out_bias, torch.float32),
                           ("out_k", out_k, store_k.dtype), ("out_v", out_v, store_v.dtype)):  # fmt: skip
        if x.dtype != dtype:
            raise ValueError(f"{name} must be {dtype}, got {x.dtype}")
    dev = out_k.device
    for name, x in (("out_v", out_v), ("out_bias", out_bias), ("ids", ids), ("ok", ok)):
        if x.device != dev:
            raise ValueError(f"{name} must be on {dev} with out_k, got {x.device}")
    for name, x in (("store_v", store_v), ("store_count", store_count)):
        if x.device != store_k.device:
            raise ValueError(f"{name} must be on {store_k.device} with store_k, got {x.device}")


def gather_blocks(
    store_k: torch.Tensor, store_v: torch.Tensor, store_count: torch.Tensor, ids: torch.Tensor, ok: torch.Tensor,
    out_k: torch.Tensor, out_v: torch.Tensor, out_bias: torch.Tensor, *, block_tokens: int,
    backend: GatherBackend = "auto",
) -> None:  # fmt: skip
    """Copy the selected blocks of the store into the slot region (``out_*`` in place).

    Args:
        store_k: (R, B, H, E, D), store_v: (R, B, H, E, Dv), store_count: (R, B, H, E) float32: R records of E
            entries per (batch, head) row; block ``i`` of a row is record ``i // (E // block_tokens)``, entries
            ``(i % (E // block_tokens)) * block_tokens`` on.
        ids: (B, H, T) int64 the selected blocks (clamped to the store's R * E / block_tokens blocks); ok:
            (B, H, T) bool, False where a selection names no block worth attending.
        out_k: (B, H, T * block_tokens, D), out_v: (B, H, T * block_tokens, Dv): the blocks' entries in
            selection order; out_bias: (B, H, T * block_tokens) float32 their log-count, -inf where ``ok`` is
            False or the entry is empty (count 0).
        backend: ``"triton"`` (the kernel: CUDA outputs with the store pinned on the host or on the same
            device; CPU tensors under ``TRITON_INTERPRET=1``), ``"torch"`` (the twin), ``"auto"`` (Triton for CUDA
            outputs).
    """
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    _check(store_k, store_v, store_count, ids, ok, out_k, out_v, out_bias, block_tokens)
    if backend == "auto":
        backend = "triton" if out_k.is_cuda else "torch"
    if backend == "torch":
        _gather_torch(store_k, store_v, store_count, ids, ok, out_k, out_v, out_bias, block_tokens)
        return
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if out_k.is_cuda:
        if store_k.is_cuda and store_k.device != out_k.device:
            raise ValueError(f"store_k must be pinned host memory or on {out_k.device}, got {store_k.device}")
        if not store_k.is_cuda and not store_k.is_pinned():
            raise ValueError("store_k, store_v, store_count must be pinned host memory (or on the device) for "
                             "backend='triton'")  # fmt: skip
    elif not (interpret and not store_k.is_cuda):
        raise ValueError(f"backend='triton' needs CUDA outputs (or TRITON_INTERPRET=1 on CPU), got {out_k.device}")
    for name, x in (("store_k", store_k), ("store_v", store_v), ("store_count", store_count)):
        if not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous for backend='triton'")
    from longroll.kernels.host_gather import gather_blocks_kernel

    r, b, h, e, d = store_k.shape
    dv, t = store_v.shape[-1], ids.shape[2]
    if t == 0 or b * h == 0:
        return
    ids_c, ok_c = ids.contiguous(), ok.contiguous()
    grid = (t * -(-block_tokens // _BLOCK_R), b * h)
    gather_blocks_kernel[grid](
        store_k, store_v, store_count, ids_c, ok_c, out_k, out_v, out_bias,
        b, h, e, e // block_tokens, r * (e // block_tokens), t, block_tokens,
        ids_c.stride(0), ids_c.stride(1), out_k.stride(0), out_k.stride(1), out_k.stride(2),
        out_v.stride(0), out_v.stride(1), out_v.stride(2), out_bias.stride(0), out_bias.stride(1),
        D=d, DV=dv, BLOCK_R=_BLOCK_R, BLOCK_D=_pow2(d), BLOCK_DV=_pow2(dv),
    )  # fmt: skip
    # log(0) = -inf: empty slots get no weight.
    torch.log(out_bias, out=out_bias)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _gather_torch(
    store_k: torch.Tensor, store_v: torch.Tensor, store_count: torch.Tensor, ids: torch.Tensor, ok: torch.Tensor,
    out_k: torch.Tensor, out_v: torch.Tensor, out_bias: torch.Tensor, block_tokens: int,
) -> None:  # fmt: skip
    r, b, h, e, d = store_k.shape
    bpr = e // block_tokens
    sdev = store_k.device
    i = ids.to(sdev).clamp(0, r * bpr - 1)
    rec, blk = i // bpr, i % bpr
    bi = torch.arange(b, device=sdev)[:, None, None]
    hi = torch.arange(h, device=sdev)[None, :, None]
    shape = (r, b, h, bpr, block_tokens)
    t = ids.shape[2]
    n = t * block_tokens
    gk = store_k.view(*shape, d)[rec, bi, hi, blk].reshape(b, h, n, d)
    gv = store_v.view(*shape, store_v.shape[-1])[rec, bi, hi, blk].reshape(b, h, n, store_v.shape[-1])
    gc = store_count.view(*shape)[rec, bi, hi, blk] * ok.to(sdev)[..., None]
    out_k.copy_(gk)
    out_v.copy_(gv)
    # The log on the outputs' device, as the kernel path takes it (a CPU and a CUDA log may differ by an ulp).
    out_bias.copy_(gc.reshape(b, h, n))
    torch.log(out_bias, out=out_bias)


__all__ = ["gather_blocks"]
