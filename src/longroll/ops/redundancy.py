"""Redundancy eviction's merge plan as a few fused kernels, and the age keys both of its paths rank by.

The rules are those of :mod:`longroll.cache.redundancy`, whose torch ops are the reference twin of
:func:`fused_victims`: the same signatures (from the same projections), the same sorted orders and
candidates, the same winners, ranks and accepted merges, the same age victims. Every decision is made in
integers there and here, and the exact cosine check differs only by float32 rounding in the order of a sum.
Values are count-weighted means summed in float64 here (exact for a few terms) against exact fixed-point sums
in the twin: the same bits but for the last float32 rounding of many-way merges.

Age keys: one int64 per entry orders entries for eviction, oldest frame first, then smallest count, then lowest
slot (so that no two keys tie and every sort and top-k is deterministic). Entries that must not be evicted or
merged (sinks, the committing frame and newer ones, empty slots) get ``PROTECTED | slot``, above every other key.
Frames are clamped to ``2**18 - 1`` (older entries then tie on frame and go by count) and counts to
``2**24 - 1``; a row holds at most ``2**20`` entries.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch

from longroll.ops._checks import check_rank
from longroll.ops.neighbours import SIGNATURE_BITS

PlanBackend = Literal["auto", "torch", "triton"]
PLAN_BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")

#: Bit 62: an entry that is never a victim (above every age key; the slot keeps the keys distinct).
PROTECTED = 1 << 62
SLOT_BITS = 20
COUNT_BITS = 24
FRAME_BITS = 18
MAX_ENTRIES = 1 << SLOT_BITS
_TABLES = 4
_BITS = SIGNATURE_BITS // _TABLES
_BLOCK = 256
_PACK_BLOCK = 64
_COS_BLOCK = 32
_SCAN_BLOCK = 1024


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


@dataclass(frozen=True)
class AgeOrder:
    """How a row's age keys are made from its buffers (:func:`age_keys`): the first ``n`` slots, the committing
    frame ``frame_now`` (int, or 0-d int64 tensor inside a captured commit) and the sinks below ``sink_frames``."""

    n: int
    frame_now: int | torch.Tensor
    sink_frames: int

    def __post_init__(self) -> None:
        if not 0 < self.n <= MAX_ENTRIES:
            raise ValueError(f"n must be in [1, {MAX_ENTRIES}], got {self.n}")


def age_keys(
    frame: torch.Tensor, count: torch.Tensor, lengths: torch.Tensor, n: int, frame_now: int | torch.Tensor,
    sink_frames: int,
) -> torch.Tensor:  # fmt: skip
    """Eviction order of a row's first ``n`` slots (see the module docstring).

    Args:
        frame: (B, H, S) int32 newest member's frame per slot (S >= n); count: (B, H, S) float32 members.
        lengths: (B, H) int64 valid entries per head.
        n: slots considered (the cap), at most ``MAX_ENTRIES``.
        frame_now: the committing frame (int, or 0-d int64 tensor inside a captured commit): it and newer
            frames are protected, as are frames below ``sink_frames`` and slots past the length.

    Returns:
        (B, H, n) int64 keys, lower = evicted first; ``>= PROTECTED`` where protected.
    """
    if not 0 < n <= MAX_ENTRIES:
        raise ValueError(f"n must be in [1, {MAX_ENTRIES}], got {n}")
    fr = frame[:, :, :n]
    slot = torch.arange(n, device=frame.device)
    protected = (fr < sink_frames) | (fr >= frame_now) | (slot >= lengths[..., None])
    c = count[:, :, :n].clamp(0.0, float((1 << COUNT_BITS) - 1)).long()
    key = (fr.long().clamp(0, (1 << FRAME_BITS) - 1) << (COUNT_BITS + SLOT_BITS)) | (c << SLOT_BITS) | slot
    return torch.where(protected, PROTECTED | slot, key)


def fused_supported(k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the fused kernels cannot run on these buffers (None when they can)."""
    if not (k.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return f"needs CUDA tensors (or TRITON_INTERPRET=1), got {k.device}"
    for name, d in (("head_dim", k.shape[-1]), ("value head_dim", v.shape[-1])):
        if d < 16 or d & (d - 1):
            return f"{name} must be a power of two >= 16, got {d}"
    return None


def _check(
    k: torch.Tensor, v: torch.Tensor, count: torch.Tensor, prio: torch.Tensor, need: torch.Tensor, kk: int,
    signs: torch.Tensor,
) -> None:  # fmt: skip
    for name, x, rank in (("k", k, 4), ("v", v, 4), ("count", count, 3), ("prio", prio, 3), ("need", need, 2)):
        check_rank(name, x, rank)
    b, h, s, d = k.shape
    n = prio.shape[-1]
    if v.shape[:3] != k.shape[:3] or tuple(count.shape) != (b, h, s):
        raise ValueError(f"v and count must match k's (batch, heads, slots) {(b, h, s)}, got {tuple(v.shape)} and "
                         f"{tuple(count.shape)}")  # fmt: skip
    if tuple(prio.shape[:2]) != (b, h) or not 0 < n <= min(s, MAX_ENTRIES):
        raise ValueError(f"prio must have shape ({b}, {h}, n) with 0 < n <= {min(s, MAX_ENTRIES)}, got "
                         f"{tuple(prio.shape)}")  # fmt: skip
    if tuple(need.shape) != (b, h):
        raise ValueError(f"need must have shape {(b, h)}, got {tuple(need.shape)}")
    for name, x, dtype in (("prio", prio, torch.int64), ("need", need, torch.int64), ("count", count, torch.float32)):
        if x.dtype != dtype:
            raise ValueError(f"{name} must be {dtype}, got {x.dtype}")
    if tuple(signs.shape) != (d, SIGNATURE_BITS) or signs.dtype != k.dtype:
        raise ValueError(f"signs must be ({d}, {SIGNATURE_BITS}) in {k.dtype}, got {tuple(signs.shape)} {signs.dtype}")
    if not 1 <= kk <= n:
        raise ValueError(f"kk must be in [1, n={n}], got {kk}")
    if len({x.device for x in (k, v, count, prio, need, signs)}) != 1:
        raise ValueError("k, v, count, prio, need and signs must be on one device")
    for name, x in (("k", k), ("v", v), ("count", count)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension, got strides {x.stride()}")


def fused_victims(
    k: torch.Tensor, v: torch.Tensor, count: torch.Tensor, prio: torch.Tensor | AgeOrder, need: torch.Tensor,
    kk: int, threshold: float, agreement: float, signs: torch.Tensor, *, frame: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Merge redundant entries into their survivors (``v`` and ``count`` in place) and list the slots to reuse.

    The fused twin of :func:`longroll.cache.redundancy.victims` (same rules, same results).

    Args:
        k: (B, H, S, D) stored keys; v: (B, H, S, Dv) values; count: (B, H, S) float32 members. Slots
            ``[0, n)`` are considered.
        prio: (B, H, n) int64 :func:`age_keys`, or the :class:`AgeOrder` to make them from ``count``, ``frame``
            ((B, H, S) int32) and ``lengths`` ((B, H) int64) inside the first kernel.
        need: (B, H) int64 slots needed beyond the free ones.
        kk: victims listed per head (the frame's tokens, at most n).
        threshold: cosine of two stored keys needed to merge; agreement: signature bits shared needed to
            propose a merge (:func:`longroll.cache.redundancy.min_agreement` of ``threshold``).
        signs: (D, 64) +-1 hyperplanes in k's dtype.

    Returns:
        slots: (B, H, kk) int64, the merged-away slots first (in rank order), then the age victims (oldest
        first) among entries neither merged away nor absorbing; merged: (B, H) int64 how many of the first slots
        merging freed.
    """
    order_of_age = prio if isinstance(prio, AgeOrder) else None
    if order_of_age is not None:
        if frame is None or lengths is None:
            raise ValueError("an AgeOrder needs the buffers' frame and lengths")
        b_, h_, s_ = count.shape
        if frame.shape != count.shape or frame.dtype != torch.int32:
            raise ValueError(f"frame must be ({b_}, {h_}, {s_}) int32, got {tuple(frame.shape)} {frame.dtype}")
        if tuple(lengths.shape) != (b_, h_) or lengths.dtype != torch.int64:
            raise ValueError(f"lengths must be ({b_}, {h_}) int64, got {tuple(lengths.shape)} {lengths.dtype}")
        if order_of_age.n > s_:
            raise ValueError(f"AgeOrder.n={order_of_age.n} exceeds the {s_} slots")
        # Only the shape of the keys matters to the checks below; they are made in the first kernel.
        prio = torch.empty(b_, h_, order_of_age.n, dtype=torch.int64, device=count.device)
    assert isinstance(prio, torch.Tensor)
    _check(k, v, count, prio, need, kk, signs)
    why = fused_supported(k, v)
    if why is not None:
        raise ValueError(f"the fused merge plan {why}")
    from longroll.kernels import redundancy as kern
    from longroll.kernels.lsh_neighbours import lsh_neighbours_kernel

    b, h, _, d = k.shape
    n = prio.shape[-1]
    rows, dev = b * h, k.device
    proj = (k[:, :, :n] @ signs).reshape(rows, n, SIGNATURE_BITS)
    pr = prio.reshape(rows, n)
    if order_of_age is not None:
        assert frame is not None and lengths is not None
        fr, cn, ln = frame.reshape(rows, -1), count.reshape(rows, -1), lengths.reshape(rows)
        now = order_of_age.frame_now
        now_t = (now.reshape(()) if isinstance(now, torch.Tensor) else torch.tensor(now, device=dev)).to(torch.int64)
        sink = order_of_age.sink_frames
    else:
        fr, cn, ln, now_t, sink = pr, pr, pr, pr, 0
    # Sort keys of 32 bits where they fit: half the radix passes of 64-bit keys.
    code32, rank32 = n <= 1 << 15, n <= 1 << 24
    keys = torch.empty(rows, _TABLES, n, dtype=torch.int32 if code32 else torch.int64, device=dev)
    bad = torch.empty(rows, n, dtype=torch.uint8, device=dev)
    sig = torch.empty(rows, n, dtype=torch.int64, device=dev)
    age = torch.empty(rows, n, dtype=torch.int64, device=dev)
    unprot = torch.zeros(rows, dtype=torch.int32, device=dev)
    kern.pack_kernel[(_cdiv(n, _PACK_BLOCK), rows)](
        proj, pr, fr, cn, ln, now_t, keys, bad, sig, age, unprot, n, sink,
        proj.stride(0), proj.stride(1), pr.stride(0), fr.stride(0), cn.stride(0), keys.stride(0), keys.stride(1),
        bad.stride(0), sig.stride(0), age.stride(0),
        PROTECTED=PROTECTED, TABLES=_TABLES, BITS=_BITS, KEY32=code32, FROM_BUFFERS=order_of_age is not None,
        BLOCK=_PACK_BLOCK,
    )  # fmt: skip
    # Keys are distinct (the slot is in them): any sort is the stable sort of the codes.
    ordered = torch.sort(keys, dim=-1).values
    order = torch.empty(rows, _TABLES, n, dtype=torch.int64, device=dev)
    inv = torch.empty_like(order)
    kern.invert_kernel[(_cdiv(n, _BLOCK), rows, _TABLES)](
        ordered, order, inv, n,
        ordered.stride(0), ordered.stride(1), order.stride(0), order.stride(1), inv.stride(0), inv.stride(1),
        SLOT_MASK=0x7FFF if code32 else 0xFFFFFFFF, BLOCK=_BLOCK,
    )  # fmt: skip
    score = torch.empty(rows, n, dtype=torch.float32, device=dev)
    nn = torch.empty(rows, n, dtype=torch.int64, device=dev)
    grid = (_cdiv(n, _BLOCK), rows)
    lsh_neighbours_kernel[grid](
        order, inv, sig, bad, score, nn, n,
        order.stride(0), order.stride(1), inv.stride(0), inv.stride(1), sig.stride(0), bad.stride(0),
        score.stride(0), nn.stride(0),
        TABLES=_TABLES, NBITS=SIGNATURE_BITS, BLOCK=_BLOCK,
    )  # fmt: skip
    best = torch.zeros(rows, n, dtype=torch.int64, device=dev)
    into = torch.empty(rows, n, dtype=torch.int64, device=dev)
    strides = (score.stride(0), nn.stride(0), age.stride(0), best.stride(0))
    kern.propose_kernel[grid](score, nn, age, best, n, float(agreement), *strides, BLOCK=_BLOCK)
    kern.claim_kernel[grid](score, nn, age, best, into, n, float(agreement), *strides, into.stride(0), BLOCK=_BLOCK)
    # Rank keys: (bits missing, slot), int32 ``(missing << 24) | slot`` where slots fit in 24 bits.
    shift, not_kept, slot_mask = (24, 127 << 24, (1 << 24) - 1) if rank32 else (32, PROTECTED, 0xFFFFFFFF)
    rank = torch.empty(rows, n, dtype=torch.int32 if rank32 else torch.int64, device=dev)
    kern.rank_kernel[grid](
        best, into, rank, n, best.stride(0), into.stride(0), rank.stride(0),
        NBITS=SIGNATURE_BITS, KEPT_SHIFT=shift, NOT_KEPT=not_kept, BLOCK=_BLOCK,
    )  # fmt: skip
    ranked = torch.topk(rank, kk, dim=-1, largest=False).values
    ok = torch.empty(rows, kk, dtype=torch.int8, device=dev)
    nd = need.reshape(rows).contiguous()
    kern.cosine_kernel[(_cdiv(kk, _COS_BLOCK), rows)](
        ranked, into, nd, unprot, k, ok, kk, float(threshold), h,
        ranked.stride(0), into.stride(0), k.stride(0), k.stride(1), k.stride(2), ok.stride(0),
        D=d, SLOT_MASK=slot_mask, NOT_KEPT=not_kept, BLOCK=_COS_BLOCK,
    )  # fmt: skip
    first = torch.full((rows, n), 2**31 - 1, dtype=torch.int32, device=dev)
    members = torch.zeros(rows, n, dtype=torch.int32, device=dev)
    freed_out = torch.empty(rows, kk, dtype=torch.int64, device=dev)
    into_out = torch.empty(rows, kk, dtype=torch.int64, device=dev)
    merged = torch.empty(rows, dtype=torch.int64, device=dev)
    kern.verify_kernel[(rows,)](
        ranked, into, ok, age, first, members, freed_out, into_out, merged, kk,
        ranked.stride(0), into.stride(0), ok.stride(0), age.stride(0), first.stride(0), members.stride(0),
        freed_out.stride(0),
        PROTECTED=PROTECTED, SLOT_MASK=slot_mask, BLOCK=_SCAN_BLOCK,
    )  # fmt: skip
    kern.apply_kernel[(kk, rows)](
        freed_out, into_out, merged, first, members, v, count, h,
        freed_out.stride(0), first.stride(0), members.stride(0), v.stride(0), v.stride(1), v.stride(2),
        count.stride(0), count.stride(1),
        DV=v.shape[-1], BLOCK=16,
    )  # fmt: skip
    from_age = torch.topk(age, kk, dim=-1, largest=False).values & ((1 << SLOT_BITS) - 1)
    r = torch.arange(kk, device=dev)
    from_age = from_age.gather(1, (r - merged[:, None]).clamp_min(0))
    slots = torch.where(r < merged[:, None], freed_out, from_age)
    return slots.view(b, h, kk), merged.view(b, h)


__all__ = [
    "MAX_ENTRIES",
    "PLAN_BACKENDS",
    "PROTECTED",
    "AgeOrder",
    "PlanBackend",
    "age_keys",
    "fused_supported",
    "fused_victims",
]
