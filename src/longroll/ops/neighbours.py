"""Best neighbour of every entry in several sorted LSH orders: the fused Triton kernel and its torch twin.

Given, per (batch, head) row, ``T`` permutations of its ``N`` entries (each sorting them by one table's LSH
code) and a 64-bit signature per entry, every entry's candidates are its left and right neighbours in each
order, scored by the signature bits they share; the best one is kept, candidates taken in the order (table 0
left, table 0 right, table 1 left, ...), the first winning ties. Entries marked bad neither score nor are
scored (-inf).

``backend="triton"`` runs :mod:`longroll.kernels.lsh_neighbours` (CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``); ``"torch"`` the reference twin; ``"auto"`` the kernel on CUDA and the twin elsewhere.
Both compute in integers and return the same scores and partners.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

from longroll.ops._checks import check_rank

NeighboursBackend = Literal["auto", "torch", "triton"]
NEIGHBOURS_BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")
#: Bits of a signature (one int64).
SIGNATURE_BITS = 64
_BLOCK = 256
_M1, _M2, _M4, _H01 = 0x5555555555555555, 0x3333333333333333, 0x0F0F0F0F0F0F0F0F, 0x0101010101010101
_NEG = float("-inf")


def popcount64(x: torch.Tensor) -> torch.Tensor:
    """Set bits of each int64 (SWAR; every shift is masked, so the arithmetic shift of negative values and the
    wrapping product are harmless: the count sits in the top byte, at most 64)."""
    x = x - ((x >> 1) & _M1)
    x = (x & _M2) + ((x >> 2) & _M2)
    x = (x + (x >> 4)) & _M4
    return (x * _H01) >> 56


def sorted_neighbours_reference(
    order: torch.Tensor, sig: torch.Tensor, bad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference twin of :func:`sorted_neighbours` (same arguments and results), in torch ops over all
    tables at once."""
    b, h, t, n = order.shape
    ps = sig[:, :, None].expand(b, h, t, n).gather(3, order)  # signatures in each sorted order
    bs = bad[:, :, None].expand(b, h, t, n).gather(3, order)
    adj = (SIGNATURE_BITS - popcount64(ps[..., :-1] ^ ps[..., 1:])).float()
    adj = torch.where(bs[..., :-1] | bs[..., 1:], _NEG, adj)
    ninf = adj.new_full((b, h, t, 1), _NEG)
    # At sorted position r the left neighbour order[r - 1] scores adj[r - 1], the right one adj[r]; off either
    # end the candidate is the entry itself.
    sc = torch.stack([torch.cat([ninf, adj], -1), torch.cat([adj, ninf], -1)], 3)  # (B, H, T, 2, N)
    pa = torch.stack(
        [torch.cat([order[..., :1], order[..., :-1]], -1), torch.cat([order[..., 1:], order[..., -1:]], -1)], 3
    )
    # Each order is a permutation: scattering by it moves sorted positions back to entries without collisions.
    at = order[:, :, :, None].expand(b, h, t, 2, n)
    sc = torch.empty_like(sc).scatter_(4, at, sc).permute(0, 1, 4, 2, 3).reshape(b, h, n, 2 * t)
    pa = torch.empty_like(pa).scatter_(4, at, pa).permute(0, 1, 4, 2, 3).reshape(b, h, n, 2 * t)
    score, which = sc.max(-1)  # the first maximum: candidates in (table, side) order
    return score, pa.gather(-1, which[..., None])[..., 0]


def _check(order: torch.Tensor, sig: torch.Tensor, bad: torch.Tensor) -> None:
    check_rank("order", order, 4)
    check_rank("sig", sig, 3)
    check_rank("bad", bad, 3)
    b, h, t, n = order.shape
    if t < 1 or n < 1:
        raise ValueError(f"order must hold at least one table and one entry, got shape {tuple(order.shape)}")
    if tuple(sig.shape) != (b, h, n) or tuple(bad.shape) != (b, h, n):
        raise ValueError(
            f"sig and bad must have shape {(b, h, n)} (order's batch, heads, entries), got {tuple(sig.shape)} "
            f"and {tuple(bad.shape)}"
        )
    for name, x, dtype in (("order", order, torch.int64), ("sig", sig, torch.int64), ("bad", bad, torch.bool)):
        if x.dtype != dtype:
            raise ValueError(f"{name} must be {dtype}, got {x.dtype}")
    if len({x.device for x in (order, sig, bad)}) != 1:
        raise ValueError(f"order, sig and bad must be on one device, got {order.device}, {sig.device}, {bad.device}")


def _kernel_ok(x: torch.Tensor) -> bool:
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def sorted_neighbours(
    order: torch.Tensor, sig: torch.Tensor, bad: torch.Tensor, *, backend: NeighboursBackend = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each entry's best candidate among its neighbours in ``T`` sorted orders.

    Args:
        order: (B, H, T, N) int64; ``order[b, h, t]`` lists the row's entries in table ``t``'s sorted order (a
            permutation of ``range(N)``; not checked, as that would need a host sync).
        sig: (B, H, N) int64 signatures (64 bits each).
        bad: (B, H, N) bool entries that neither score nor are scored.
        backend: see the module docstring.

    Returns:
        score: (B, H, N) float32 signature bits shared with the best candidate, in [0, 64], -inf where no
        candidate qualifies; nn: (B, H, N) int64 the candidate (meaningless at -inf).
    """
    if backend not in NEIGHBOURS_BACKENDS:
        raise ValueError(f"backend must be one of {NEIGHBOURS_BACKENDS}, got {backend!r}")
    _check(order, sig, bad)
    if backend == "auto":
        backend = "triton" if order.is_cuda else "torch"
    if backend == "torch":
        return sorted_neighbours_reference(order, sig, bad)
    if not _kernel_ok(order):
        raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {order.device}")
    from longroll.kernels.lsh_neighbours import lsh_neighbours_kernel

    b, h, t, n = order.shape
    o = order.reshape(b * h, t, n).contiguous()
    # Each entry's position in every order: the kernel reads its neighbours there.
    inv = torch.empty_like(o).scatter_(2, o, torch.arange(n, device=o.device).expand(b * h, t, n))
    s = sig.reshape(b * h, n).contiguous()
    bd = bad.reshape(b * h, n).to(torch.uint8)
    score = torch.empty(b * h, n, dtype=torch.float32, device=o.device)
    nn = torch.empty(b * h, n, dtype=torch.int64, device=o.device)
    grid = ((n + _BLOCK - 1) // _BLOCK, b * h)
    lsh_neighbours_kernel[grid](
        o, inv, s, bd, score, nn, n,
        o.stride(0), o.stride(1), inv.stride(0), inv.stride(1), s.stride(0), bd.stride(0), score.stride(0),
        nn.stride(0),
        TABLES=t, NBITS=SIGNATURE_BITS, BLOCK=_BLOCK,
    )  # fmt: skip
    return score.view(b, h, n), nn.view(b, h, n)


__all__ = [
    "NEIGHBOURS_BACKENDS",
    "SIGNATURE_BITS",
    "NeighboursBackend",
    "popcount64",
    "sorted_neighbours",
    "sorted_neighbours_reference",
]
