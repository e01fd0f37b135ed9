"""TempCache's verbatim ring: a committed frame written at its ring position, the frame it displaces read out.

``backend="triton"`` runs :mod:`longroll.kernels.ring` (CUDA tensors, or CPU ones under ``TRITON_INTERPRET=1``,
head dims powers of two >= 16); ``"torch"`` the reference twin below (index selects and copies). Both copy the
same bits.

The ring is slots ``[S * P, (S + W) * P)`` of a row's buffers (S sink frames, W ring frames of P tokens): frame
``f`` sits at position ``(f - S) % W``, and its correspondences with the frame before it at the same position of
``ridx`` / ``rcos``.
"""

from __future__ import annotations

from typing import Literal

import torch

from longroll.ops._checks import check_rank
from longroll.ops.redundancy import fused_supported

RingBackend = Literal["torch", "triton"]
#: The leaving frame's keys (B, H, P, D), values (B, H, P, Dv), match index (B, H, P) int64 and cosine (B, H, P).
Leaving = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
_BLOCK = 64


def _check(
    k: torch.Tensor, v: torch.Tensor, count: torch.Tensor, frame: torch.Tensor, ridx: torch.Tensor,
    rcos: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, idx_new: torch.Tensor, cos_new: torch.Tensor,
    sink_frames: int,
) -> None:  # fmt: skip
    for name, x, rank in (("k", k, 4), ("v", v, 4), ("count", count, 3), ("frame", frame, 3), ("ridx", ridx, 4),
                          ("rcos", rcos, 4), ("k_new", k_new, 4), ("v_new", v_new, 4), ("idx_new", idx_new, 3),
                          ("cos_new", cos_new, 3)):  # fmt: skip
        check_rank(name, x, rank)
    b, h, s, d = k.shape
    p, w = k_new.shape[2], ridx.shape[2]
    if tuple(k_new.shape) != (b, h, p, d) or tuple(v_new.shape) != (b, h, p, v.shape[-1]):
        raise ValueError(f"k_new and v_new must be {(b, h, p, d)} and {(b, h, p, v.shape[-1])}, got "
                         f"{tuple(k_new.shape)} and {tuple(v_new.shape)}")  # fmt: skip
    if tuple(ridx.shape) != (b, h, w, p) or rcos.shape != ridx.shape or w < 1:
        raise ValueError(f"ridx and rcos must be ({b}, {h}, W >= 1, {p}), got {tuple(ridx.shape)} and "
                         f"{tuple(rcos.shape)}")  # fmt: skip
    if tuple(idx_new.shape) != (b, h, p) or tuple(cos_new.shape) != (b, h, p):
        raise ValueError(f"idx_new and cos_new must be {(b, h, p)}, got {tuple(idx_new.shape)} and "
                         f"{tuple(cos_new.shape)}")  # fmt: skip
    if not isinstance(sink_frames, int) or sink_frames < 0 or (sink_frames + w) * p > s:
        raise ValueError(f"sink_frames must be an int >= 0 with (sink_frames + W) * P <= {s} slots, got "
                         f"{sink_frames!r} (W={w}, P={p})")  # fmt: skip
    for name, x, dtype in (("ridx", ridx, torch.int32), ("rcos", rcos, torch.float32), ("count", count, torch.float32),
                           ("frame", frame, torch.int32), ("idx_new", idx_new, torch.int64)):  # fmt: skip
        if x.dtype != dtype:
            raise ValueError(f"{name} must be {dtype}, got {x.dtype}")


def ring_swap(
    k: torch.Tensor, v: torch.Tensor, count: torch.Tensor, frame: torch.Tensor, ridx: torch.Tensor,
    rcos: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, idx_new: torch.Tensor, cos_new: torch.Tensor,
    *, frame_now: int | torch.Tensor, sink_frames: int, full: bool, has_track: bool, backend: RingBackend,
) -> tuple[Leaving | None, torch.Tensor]:  # fmt: skip
    """Write frame ``frame_now`` into the ring (``k``, ``v``, ``count``, ``frame``, ``ridx``, ``rcos`` in place).

    Args:
        k: (B, H, S, D), v: (B, H, S, Dv), count: (B, H, S) float32, frame: (B, H, S) int32 buffers.
        ridx: (B, H, W, P) int32, rcos: (B, H, W, P) float32 the ring frames' correspondences.
        k_new: (B, H, P, D), v_new: (B, H, P, Dv) the frame's keys and values; idx_new: (B, H, P) int64 and
            cos_new: (B, H, P) float32 its correspondence with the frame before it.
        frame_now: the frame (>= sink_frames; host int, or 0-d int64 tensor inside a captured commit).
        full: host-side: the position holds a frame, which is read out first.
        has_track: False right after the sinks (the correspondences are stored as -inf: it starts new groups).
        backend: ``"triton"`` (the fused kernel) or ``"torch"`` (the twin).

    Returns:
        the leaving frame (None unless ``full``): copies of its keys, values and correspondences; and the new
        frame's slots, (B, H, P) int64.
    """
    if backend not in ("torch", "triton"):
        raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
    _check(k, v, count, frame, ridx, rcos, k_new, v_new, idx_new, cos_new, sink_frames)
    b, h, p, _ = k_new.shape
    w, dev = ridx.shape[2], k.device
    if backend == "triton":
        why = fused_supported(k, v)
        if why is not None:
            raise ValueError(f"backend='triton': the ring swap {why}")
        return _fused(k, v, count, frame, ridx, rcos, k_new, v_new, idx_new, cos_new, frame_now, sink_frames,
                      full, has_track)  # fmt: skip
    rel = frame_now - sink_frames
    if isinstance(rel, torch.Tensor):
        pos = (rel % w).reshape(1).long()
    else:
        pos = torch.tensor([rel % w], dtype=torch.int64, device=dev)
    slots = sink_frames * p + pos * p + torch.arange(p, device=dev)
    old = None
    if full:
        old = (k.index_select(2, slots), v.index_select(2, slots), ridx.index_select(2, pos)[:, :, 0].long(),
               rcos.index_select(2, pos)[:, :, 0])  # fmt: skip
    k.index_copy_(2, slots, k_new.to(k.dtype))
    v.index_copy_(2, slots, v_new.to(v.dtype))
    count.index_fill_(2, slots, 1.0)
    if isinstance(frame_now, torch.Tensor):
        frame.index_copy_(2, slots, frame_now.to(torch.int32).expand(b, h, p).contiguous())
    else:
        frame.index_fill_(2, slots, int(frame_now))
    cos = cos_new.float() if has_track else torch.full_like(cos_new, float("-inf"), dtype=torch.float32)
    ridx.index_copy_(2, pos, idx_new.to(torch.int32)[:, :, None])
    rcos.index_copy_(2, pos, cos[:, :, None])
    return old, slots.expand(b, h, p)


def _fused(
    k: torch.Tensor, v: torch.Tensor, count: torch.Tensor, frame: torch.Tensor, ridx: torch.Tensor,
    rcos: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, idx_new: torch.Tensor, cos_new: torch.Tensor,
    frame_now: int | torch.Tensor, sink_frames: int, full: bool, has_track: bool,
) -> tuple[Leaving | None, torch.Tensor]:  # fmt: skip
    from longroll.kernels.ring import ring_swap_kernel

    b, h, p, d = k_new.shape
    dv, w, rows, dev = v.shape[-1], ridx.shape[2], b * h, k.device
    for name, x in (("k", k), ("v", v), ("ridx", ridx), ("rcos", rcos)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension, got strides {x.stride()}")
    if count.stride(-1) != 1 or frame.stride(-1) != 1:
        raise ValueError("count and frame must be contiguous in their last dimension")
    now = (frame_now if isinstance(frame_now, torch.Tensor) else torch.tensor(frame_now, device=dev)).reshape(())
    kn = k_new if k_new.stride(-1) == 1 else k_new.contiguous()
    vn = v_new if v_new.stride(-1) == 1 else v_new.contiguous()
    inew = idx_new.reshape(rows, p).contiguous()
    cnew = cos_new.reshape(rows, p).float().contiguous()
    kold = torch.empty(b, h, p, d, dtype=k.dtype, device=dev) if full else kn
    vold = torch.empty(b, h, p, dv, dtype=v.dtype, device=dev) if full else vn
    iold = torch.empty(rows, p, dtype=torch.int64, device=dev) if full else inew
    cold = torch.empty(rows, p, dtype=torch.float32, device=dev) if full else cnew
    slots = torch.empty(rows, p, dtype=torch.int64, device=dev)
    ring_swap_kernel[((p + _BLOCK - 1) // _BLOCK, rows)](
        k, v, count, frame, ridx, rcos, now, kn, vn, inew, cnew, kold, vold, iold, cold, slots,
        p, h, sink_frames, w,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), count.stride(0),
        count.stride(1), frame.stride(0), frame.stride(1), ridx.stride(0), ridx.stride(1), ridx.stride(2),
        rcos.stride(0), rcos.stride(1), rcos.stride(2), kn.stride(0), kn.stride(1), kn.stride(2), vn.stride(0),
        vn.stride(1), vn.stride(2), p,
        D=d, DV=dv, FULL=full, HAS_TRACK=has_track, BLOCK=_BLOCK,
    )  # fmt: skip
    old = (kold, vold, iold.view(b, h, p), cold.view(b, h, p)) if full else None
    return old, slots.view(b, h, p)


__all__ = ["Leaving", "RingBackend", "ring_swap"]
