"""TempCache's per-frame merge into the previous frame's groups, as four fused kernels.

The rules are :func:`longroll.cache.tempcache.merge_frame`'s (whose torch ops are the reference twin): a token
merges into its top-1 match in the previous frame when the match's group is open (active, below
``max_group``) and the cosine reaches ``threshold``, one token per match (the most similar, the lowest on
ties); under the cap (``may_overflow`` and more new tokens than free slots) the other tokens at least
``overflow_threshold`` similar merge too. A merged group's value becomes the count-weighted mean of its value
and its new members', its count grows by them and its frame stamp becomes the committing frame; a winner's key
becomes the group's representative. Decisions are integer (the same as the twin's); value sums run in a fixed
order (the same bits every run; the twin's float scatter-add differs from them by rounding).
"""

from __future__ import annotations

import torch

from longroll.ops._checks import check_rank
from longroll.ops.redundancy import fused_supported

_BLOCK = 128
_FOLD_BLOCK = 32
_PLACE_BLOCK = 64


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def fused_track_merge(
    k: torch.Tensor, v: torch.Tensor, count: torch.Tensor, frame: torch.Tensor, lengths: torch.Tensor,
    idx: torch.Tensor, cos: torch.Tensor, slots: torch.Tensor, active: torch.Tensor, k_new: torch.Tensor,
    v_new: torch.Tensor, *, frame_now: torch.Tensor, cap: int, threshold: float, overflow_threshold: float,
    max_group: int | None, may_overflow: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Merge a frame's tokens into their matches' groups (``k``, ``v``, ``count``, ``frame`` in place).

    Args:
        k: (B, H, S, D), v: (B, H, S, Dv), count: (B, H, S) float32, frame: (B, H, S) int32 buffers;
            lengths: (B, H) int64 entries per head (read for the cap).
        idx: (B, H, P) int64 each token's match among the previous frame's P tokens; cos: (B, H, P) float32.
        slots: (B, H, P) int64 the previous frame's tokens' slots; active: (B, H, P) bool which of them head a
            group of their own.
        k_new: (B, H, P, D), v_new: (B, H, P, Dv) the frame's keys and values.
        frame_now: 0-d int64 tensor, the committing frame; cap: entries per head at most.
        threshold, overflow_threshold, max_group, may_overflow: as in
            :class:`~longroll.cache.config.TempCachePolicy` (``may_overflow``: host-side, the cap may be reached).

    Returns:
        win: (B, H, P) bool one-to-one merges; soft: (B, H, P) bool overflow merges; target: (B, H, P) int64
        the match's slot (the merged token's slot where it merged).
    """
    for name, x, rank in (("k", k, 4), ("v", v, 4), ("count", count, 3), ("frame", frame, 3), ("idx", idx, 3),
                          ("cos", cos, 3), ("slots", slots, 3), ("active", active, 3), ("k_new", k_new, 4),
                          ("v_new", v_new, 4), ("lengths", lengths, 2)):  # fmt: skip
        check_rank(name, x, rank)
    b, h, p = idx.shape
    d, dv = k.shape[-1], v.shape[-1]
    for name, x in (("cos", cos), ("slots", slots), ("active", active)):
        if tuple(x.shape) != (b, h, p):
            raise ValueError(f"{name} must have idx's shape {(b, h, p)}, got {tuple(x.shape)}")
    if tuple(k_new.shape) != (b, h, p, d) or tuple(v_new.shape) != (b, h, p, dv):
        raise ValueError(f"k_new and v_new must be {(b, h, p, d)} and {(b, h, p, dv)}, got "
                         f"{tuple(k_new.shape)} and {tuple(v_new.shape)}")  # fmt: skip
    for name, x, dtype in (("idx", idx, torch.int64), ("cos", cos, torch.float32), ("slots", slots, torch.int64),
                           ("active", active, torch.bool), ("count", count, torch.float32),
                           ("frame", frame, torch.int32), ("lengths", lengths, torch.int64)):  # fmt: skip
        if x.dtype != dtype:
            raise ValueError(f"{name} must be {dtype}, got {x.dtype}")
    why = fused_supported(k, v)
    if why is not None:
        raise ValueError(f"the fused merge {why}")
    from longroll.kernels import track_merge as kern

    rows, dev = b * h, idx.device
    idx_, cos_ = idx.reshape(rows, p).contiguous(), cos.reshape(rows, p).contiguous()
    slots_ = slots.reshape(rows, p).contiguous()
    active_ = active.reshape(rows, p).to(torch.uint8)
    kn, vn = k_new.contiguous(), v_new.contiguous()
    best = torch.zeros(rows, p, dtype=torch.int64, device=dev)
    cm = torch.empty(rows, p, dtype=torch.float32, device=dev)
    grid = (_cdiv(p, _BLOCK), rows)
    kern.claim_kernel[grid](
        idx_, cos_, slots_, active_, count, best, cm, p, float(threshold), float(max_group or 0), h,
        p, count.stride(0), count.stride(1),
        HAS_MAX_GROUP=max_group is not None, BLOCK=_BLOCK,
    )  # fmt: skip
    win = torch.empty(rows, p, dtype=torch.uint8, device=dev)
    nwin = torch.zeros(rows, dtype=torch.int32, device=dev)
    kern.decide_kernel[grid](idx_, cm, best, win, nwin, p, float(threshold), p, BLOCK=_BLOCK)
    soft = torch.empty(rows, p, dtype=torch.uint8, device=dev)
    target = torch.empty(rows, p, dtype=torch.int64, device=dev)
    nadd = torch.zeros(rows, p, dtype=torch.int32, device=dev)
    first = torch.full((rows, p), p, dtype=torch.int32, device=dev)
    ln = lengths.reshape(rows).contiguous()
    kern.merge_kernel[grid](
        idx_, cm, slots_, win, nwin, ln, kn, k, soft, target, nadd, first, p, cap, float(overflow_threshold), h,
        p, kn.stride(0), kn.stride(1), kn.stride(2), k.stride(0), k.stride(1), k.stride(2),
        D=d, MAY_OVERFLOW=may_overflow, BLOCK=_BLOCK,
    )  # fmt: skip
    now = frame_now.reshape(()).to(torch.int64)
    kern.fold_kernel[(p, rows)](
        idx_, win, soft, slots_, nadd, first, vn, v, count, frame, now, p, h,
        p, vn.stride(0), vn.stride(1), vn.stride(2), v.stride(0), v.stride(1), v.stride(2), count.stride(0),
        count.stride(1), frame.stride(0), frame.stride(1),
        DV=dv, BLOCK=_FOLD_BLOCK,
    )  # fmt: skip
    return win.view(b, h, p).bool(), soft.view(b, h, p).bool(), target.view(b, h, p)




def fused_place(
    k: torch.Tensor, v: torch.Tensor, count: torch.Tensor, frame: torch.Tensor, lengths: torch.Tensor,
    merged: torch.Tensor, target: torch.Tensor, victims: torch.Tensor | None, k_new: torch.Tensor,
    v_new: torch.Tensor, *, frame_now: torch.Tensor, cap: int,
) -> torch.Tensor:  # fmt: skip
    """Place a frame's unmerged tokens (``k``, ``v``, ``count``, ``frame``, ``lengths`` in place).

    The unmerged tokens take, in token order, the free slots after each head's entries and then (where
    ``victims`` is given: the cap may be reached) the slots of ``victims`` in order; each gets its key and value,
    count 1 and the frame stamp ``frame_now``; the length grows by them, at most ``cap``.

    Args:
        k, v, count, frame, lengths: the buffers, as for :func:`fused_track_merge`.
        merged: (B, H, P) bool tokens that merged (they keep ``target``); target: (B, H, P) int64.
        victims: (B, H, K) int64 slots to reuse once the free ones are taken, or None.
        k_new: (B, H, P, D), v_new: (B, H, P, Dv); frame_now: 0-d int64 tensor; cap: entries per head at most.

    Returns:
        (B, H, P) int64 the slot of each token.
    """
    for name, x, rank in (("merged", merged, 3), ("target", target, 3), ("k_new", k_new, 4), ("v_new", v_new, 4)):
        check_rank(name, x, rank)
    b, h, p = merged.shape
    d, dv = k.shape[-1], v.shape[-1]
    if tuple(target.shape) != (b, h, p) or merged.dtype != torch.bool or target.dtype != torch.int64:
        raise ValueError(f"merged and target must be ({b}, {h}, {p}) bool and int64, got {tuple(target.shape)} "
                         f"{merged.dtype} {target.dtype}")  # fmt: skip
    if tuple(k_new.shape) != (b, h, p, d) or tuple(v_new.shape) != (b, h, p, dv):
        raise ValueError(f"k_new and v_new must be {(b, h, p, d)} and {(b, h, p, dv)}, got "
                         f"{tuple(k_new.shape)} and {tuple(v_new.shape)}")  # fmt: skip
    if victims is not None and (victims.dim() != 3 or tuple(victims.shape[:2]) != (b, h) or victims.shape[2] < 1):
        raise ValueError(f"victims must be ({b}, {h}, K >= 1), got {tuple(victims.shape)}")
    from longroll.kernels import track_merge as kern

    rows, dev = b * h, merged.device
    m = merged.reshape(rows, p).to(torch.uint8)
    tg = target.reshape(rows, p).contiguous()
    vic = (victims if victims is not None else tg[:, None]).reshape(rows, -1).contiguous()
    kn, vn = k_new.contiguous(), v_new.contiguous()
    out = torch.empty(rows, p, dtype=torch.int64, device=dev)
    ln = lengths.view(rows) if lengths.is_contiguous() else None
    if ln is None:
        raise ValueError("lengths must be contiguous (it is updated in place)")
    # The blocks read the length before any of them adds to it.
    kern.place_kernel[(_cdiv(p, _PLACE_BLOCK), rows)](
        m, tg, vic, ln.clone(), ln, kn, vn, k, v, count, frame, frame_now.reshape(()).to(torch.int64), out,
        p, cap, vic.shape[1], h,
        p, vic.stride(0), kn.stride(0), kn.stride(1), kn.stride(2), vn.stride(0), vn.stride(1), vn.stride(2),
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), count.stride(0),
        count.stride(1), frame.stride(0), frame.stride(1),
        D=d, DV=dv, MAY_OVERFLOW=victims is not None, BLOCK=_PLACE_BLOCK,
    )  # fmt: skip
    return out.view(b, h, p)


__all__ = ["fused_place", "fused_track_merge"]
