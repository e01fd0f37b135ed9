"""Preallocated storage of one layer's KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CacheBuffers:
    """Slot-addressed storage shared by every policy.

    Attention is invariant to the order of keys (RoPE is applied before caching), so entries live in unordered
    slots: ``[0, length_h)`` of head ``h`` are valid, committed entries; the staged chunk sits right after the
    host-side bound of all heads' lengths; the last slot is a write-only trash slot that lets masked scatters
    stay branch-free.

    Fields (S = slots including the trash slot):
        k: (batch, heads, S, head_dim) keys, post-RoPE.
        v: (batch, heads, S, head_dim_v) values; a merged group holds the mean of its members.
        count: (batch, heads, S) float32 members per entry; 0 = empty slot (its logit bias is -inf).
        frame: (batch, heads, S) int32 latent frame of the newest member; -1 = empty.
        lengths: (batch, heads) int64 valid committed entries per head.
    """

    k: torch.Tensor
    v: torch.Tensor
    count: torch.Tensor
    frame: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def allocate(
        cls, batch: int, heads: int, slots: int, head_dim: int, v_dim: int, dtype: torch.dtype, device: torch.device
    ) -> CacheBuffers:
        # Zeros, not empty: padded slots are read by dense kernels and must stay finite.
        return cls(
            k=torch.zeros(batch, heads, slots + 1, head_dim, dtype=dtype, device=device),
            v=torch.zeros(batch, heads, slots + 1, v_dim, dtype=dtype, device=device),
            count=torch.zeros(batch, heads, slots + 1, dtype=torch.float32, device=device),
            frame=torch.full((batch, heads, slots + 1), -1, dtype=torch.int32, device=device),
            lengths=torch.zeros(batch, heads, dtype=torch.int64, device=device),
        )

    def rows(self, start: int, stop: int) -> CacheBuffers:
        """Batch rows ``[start, stop)`` as views: writes through them land in this storage (a stacked group of
        layers hands each layer its rows)."""
        if not 0 <= start < stop <= self.k.shape[0]:
            raise ValueError(f"rows [{start}, {stop}) must lie within the batch of {self.k.shape[0]}")
        return CacheBuffers(*(t[start:stop] for t in (self.k, self.v, self.count, self.frame, self.lengths)))

    @property
    def slots(self) -> int:
        """Usable slots (the trash slot excluded)."""
        return self.k.shape[2] - 1

    @property
    def trash(self) -> int:
        return self.k.shape[2] - 1

    def grown(self, slots: int) -> CacheBuffers:
        """A copy with ``slots`` usable slots, contents preserved."""
        b, h, _, d = self.k.shape
        new = CacheBuffers.allocate(b, h, slots, d, self.v.shape[-1], self.k.dtype, self.k.device)
        n = self.slots
        new.k[:, :, :n] = self.k[:, :, :n]
        new.v[:, :, :n] = self.v[:, :, :n]
        new.count[:, :, :n] = self.count[:, :, :n]
        new.frame[:, :, :n] = self.frame[:, :, :n]
        new.lengths.copy_(self.lengths)
        return new

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.count, self.frame, self.lengths))

    def write(
        self,
        slots: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        count: torch.Tensor | float | None,
        frame: torch.Tensor | int | None,
    ) -> None:
        """Scatter rows into slots (the trash slot absorbs masked rows).

        Args:
            slots: (batch, heads, n) int64 slot per row.
            k: (batch, heads, n, head_dim) or None; v: (batch, heads, n, head_dim_v) or None.
            count: (batch, heads, n) float32, a scalar, or None; frame: (batch, heads, n) int32, a scalar (int or
                0-d tensor: a captured CUDA graph takes the frame from device memory), or None.
        """
        if k is not None:
            self.k.scatter_(2, slots[..., None].expand(*slots.shape, self.k.shape[-1]), k.to(self.k.dtype))
        if v is not None:
            self.v.scatter_(2, slots[..., None].expand(*slots.shape, self.v.shape[-1]), v.to(self.v.dtype))
        if count is not None:
            src = (
                count if isinstance(count, torch.Tensor) else torch.full(slots.shape, float(count), device=slots.device)
            )
            self.count.scatter_(2, slots, src.float())
        if frame is not None:
            if isinstance(frame, torch.Tensor):
                fsrc = frame.to(torch.int32).expand(slots.shape)
            else:
                fsrc = torch.full(slots.shape, int(frame), dtype=torch.int32, device=slots.device)
            self.frame.scatter_(2, slots, fsrc)
