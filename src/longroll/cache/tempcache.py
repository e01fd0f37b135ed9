"""TempCache: merge each new frame into the previous frame's entries by temporal correspondence.

The per-frame step below is fully vectorised over (batch, heads) and has no host synchronisation. Its only
similarity search is an ANN top-1 of the frame's P tokens against the previous frame's P entries, so its cost
is independent of the cache length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longroll.ann import Searcher
from longroll.cache.buffers import CacheBuffers
from longroll.cache.config import TempCachePolicy
from longroll.cache.host_tier import EvictionStage
from longroll.cache.redundancy import SignatureConstants
from longroll.cache.redundancy import victims as redundancy_victims
from longroll.ops.redundancy import AgeOrder, PlanBackend, age_keys, fused_supported
from longroll.ops.ring import ring_swap
from longroll.ops.track_merge import fused_place, fused_track_merge

_NEG = float("-inf")


@dataclass
class Track:
    """The previous committed frame, as seen by the next frame's correspondence search.

    Fields:
        slots: (batch, heads, P) int64 slot holding each of its tokens (after merging).
        keys: (batch, heads, P, head_dim) float32 unit-norm matching keys.
        active: (batch, heads, P) bool; False for tokens that were force-merged under the cap, so that each
            active slot appears once and a group keeps one temporal track.
    """

    slots: torch.Tensor
    keys: torch.Tensor
    active: torch.Tensor


#: A latent frame index: a host int, or a 0-d int64 device tensor (inside a captured CUDA graph).
Frame = int | torch.Tensor


@dataclass
class RecentWindow:
    """What the frames of the verbatim ring (``TempCachePolicy.recent_frames`` = W) need to merge later.

    A frame's correspondence with the frame before it is found when it is committed (both frames' matching keys
    are at hand then) and kept here until the frame leaves the ring and merges. Ring position ``r`` holds
    frame ``f`` with ``(f - sink_frames) % W == r``.

    Fields:
        idx: (batch, heads, W, P) int32 index of each token's top-1 match in the frame before it.
        cos: (batch, heads, W, P) float32 cosine similarity of that match (-inf where the frame before was a
            sink, so that the frame starts new groups).
    """

    idx: torch.Tensor
    cos: torch.Tensor

    @classmethod
    def allocate(cls, batch: int, heads: int, frames: int, tokens: int, device: torch.device) -> RecentWindow:
        return cls(
            idx=torch.zeros(batch, heads, frames, tokens, dtype=torch.int32, device=device),
            cos=torch.full((batch, heads, frames, tokens), _NEG, dtype=torch.float32, device=device),
        )

    def nbytes(self) -> int:
        return self.idx.numel() * self.idx.element_size() + self.cos.numel() * self.cos.element_size()

    def rows(self, start: int, stop: int) -> RecentWindow:
        """Batch rows ``[start, stop)`` as views (see :meth:`CacheBuffers.rows`)."""
        return RecentWindow(self.idx[start:stop], self.cos[start:stop])


def append_verbatim(buf: CacheBuffers, k: torch.Tensor, v: torch.Tensor, frame: Frame) -> torch.Tensor:
    """Append a frame without merging (sink frames). k: (B, H, P, D); v: (B, H, P, Dv). Returns slots (B, H, P)."""
    p = k.shape[2]
    slots = buf.lengths[..., None] + torch.arange(p, device=k.device)
    buf.write(slots, k, v, 1.0, frame)
    buf.lengths += p
    return slots


def _one_to_one_winners(idx: torch.Tensor, cos: torch.Tensor, threshold: float) -> torch.Tensor:
    """Among tokens that matched the same previous entry above the threshold, keep the most similar (lowest
    token index on ties). idx, cos: (B, H, P). Returns bool (B, H, P)."""
    p = idx.shape[-1]
    elig = cos >= threshold
    score = torch.where(elig, cos, _NEG)
    best = torch.full_like(score, _NEG).scatter_reduce(2, idx, score, "amax")
    win = elig & (score >= best.gather(2, idx))
    tok = torch.arange(p, device=idx.device).expand_as(idx)
    first = torch.full_like(idx, p).scatter_reduce(2, idx, torch.where(win, tok, p), "amin")
    return win & (tok == first.gather(2, idx))


def _merge_values(
    buf: CacheBuffers, track: Track, idx: torch.Tensor, merged: torch.Tensor, v: torch.Tensor, frame: Frame
) -> None:
    """Fold merged tokens' values into their groups' running means and counts (keyed by previous position,
    whose active slots are unique, so the scatters never collide)."""
    dv = v.shape[-1]
    vsum = torch.zeros(*idx.shape, dv, device=v.device).scatter_add(
        2, idx[..., None].expand(*idx.shape, dv), torch.where(merged[..., None], v.float(), 0.0)
    )
    nadd = torch.zeros(idx.shape, device=v.device).scatter_add(2, idx, merged.float())
    slots = track.slots
    c_old = buf.count.gather(2, slots)
    v_old = buf.v.gather(2, slots[..., None].expand(*slots.shape, dv)).float()
    c_new = c_old + nadd
    v_new = (v_old * c_old[..., None] + vsum) / c_new.clamp_min(1.0)[..., None]
    target = torch.where(nadd > 0, slots, buf.trash)
    # Stamping the frame marks the group as recent, so the eviction rule (oldest first) sees its newest member.
    buf.write(target, None, v_new, c_new, frame)


def _victims(
    buf: CacheBuffers,
    new: torch.Tensor,
    cap: int,
    frame: Frame,
    sink_frames: int,
    compress: float | None,
    consts: SignatureConstants | None,
    backend: PlanBackend,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The slots a frame at the cap reuses once the free ones are taken, in order: oldest frame, then smallest
    count, then lowest slot, never sinks, entries touched by this frame or entries of newer frames; with
    ``compress`` (``evict_by="redundancy"``), first the slots freed by merging redundant entries into one another
    (:mod:`longroll.cache.redundancy`, applied to ``buf`` here, its plan run by ``backend``).

    new: (B, H, P) bool. Returns victims (B, H, K) int64 and how many of them merging freed, (B, H) int64 (None
    under age eviction)."""
    k = min(new.shape[-1], cap)
    if compress is None:
        prio = age_keys(buf.frame, buf.count, buf.lengths, cap, frame, sink_frames)
        return prio.topk(k, dim=-1, largest=False).indices, None
    need = new.sum(-1) - (cap - buf.lengths)
    return redundancy_victims(buf, AgeOrder(cap, frame, sink_frames), need, k, compress, consts, backend)


def _new_slots(
    buf: CacheBuffers,
    new: torch.Tensor,
    cap: int,
    frame: Frame,
    sink_frames: int,
    may_overflow: bool,
    compress: float | None = None,
    consts: SignatureConstants | None = None,
    backend: PlanBackend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots for unmatched tokens: free slots first, then :func:`_victims` (slots freed by a redundancy merge are
    not evictions).

    new: (B, H, P) bool. Returns the slots, (B, H, P) int64 (trash where not new), and which of them evict the
    entry they hold, (B, H, P) bool."""
    rank = new.long().cumsum(-1) - 1
    slots = buf.lengths[..., None] + rank
    evict = torch.zeros_like(new)
    if may_overflow:
        free = (cap - buf.lengths)[..., None]
        victims, merged = _victims(buf, new, cap, frame, sink_frames, compress, consts, backend)
        ev = victims.gather(2, (rank - free).clamp(0, victims.shape[-1] - 1))
        evict = new & (rank >= free)
        slots = torch.where(evict, ev, slots)
        if merged is not None:
            # Slots freed by a merge hold nothing that is lost: only the rest are evictions.
            evict = evict & (rank - free >= merged[..., None])
    return torch.where(new, slots, buf.trash), evict


def _capture_victims(
    buf: CacheBuffers, slots: torch.Tensor, evict: torch.Tensor, stage: EvictionStage, offset: int
) -> None:
    """Copy the entries about to be overwritten at ``slots`` where ``evict`` (B, H, P) into the stage at
    ``[offset, offset + P)`` (count 0 and frame -1 elsewhere); static shapes, no host sync."""
    src = torch.where(evict, slots, buf.trash)
    d, dv = buf.k.shape[-1], buf.v.shape[-1]
    k = buf.k.gather(2, src[..., None].expand(*src.shape, d))
    v = buf.v.gather(2, src[..., None].expand(*src.shape, dv))
    count = torch.where(evict, buf.count.gather(2, src), 0.0)
    frame = torch.where(evict, buf.frame.gather(2, src), -1)
    stage.put(offset, k, v, count, frame)


def _capture_ranked_victims(
    buf: CacheBuffers, victims: torch.Tensor, new: torch.Tensor, free: torch.Tensor, freed: torch.Tensor | None,
    stage: EvictionStage, offset: int,
) -> None:  # fmt: skip
    """:func:`_capture_victims` before a fused placement: the r-th new token of a head takes its free slots
    first, then ``victims[r - free]``, so victim ``j`` is evicted exactly when ``freed <= j < new - free``
    (the first ``freed`` ones were emptied by redundancy merges). Written in victim order, which is the order of
    the tokens that evict them, so a record compacts to what :func:`_capture_victims` gives.

    victims: (B, H, K) int64; new: (B, H, P) bool; free: (B, H) int64 slots left below the cap before the frame;
    freed: (B, H) int64 or None."""
    p, kk = new.shape[-1], victims.shape[-1]
    j = torch.arange(kk, device=victims.device)
    evict = j < (new.sum(-1) - free)[..., None]
    if freed is not None:
        evict = evict & (j >= freed[..., None])
    if kk < p:
        pad = (0, p - kk)
        victims, evict = F.pad(victims, pad), F.pad(evict, pad)
    _capture_victims(buf, victims[..., :p], evict[..., :p], stage, offset)


def match_frame(searcher: Searcher, x: torch.Tensor, prev: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 correspondence of a frame's tokens with the frame before it.

    The previous frame's matching keys are its own keys (known before any merge), so a chunk's searches are
    independent of its merges; a frame at a time keeps the temporaries at one frame's scores, which matters
    when one call commits every layer (:class:`~longroll.cache.group.CacheGroup`).

    Args:
        searcher: the ANN family.
        x: (B, H, P, D) unit-norm matching keys of the frame.
        prev: (B, H, P, D) unit-norm matching keys of the frame before it, or None (zeros stand in; the
            caller ignores the result).

    Returns:
        idx: (B, H, P) int64 index of each token's match in the previous frame; cos: (B, H, P) float32 cosine
        similarity of the pair.
    """
    cand = torch.zeros_like(x) if prev is None else prev.to(x.dtype)
    idx = searcher.top1(x, cand)
    cos = (x * cand.gather(2, idx[..., None].expand_as(x))).sum(-1)
    return idx, cos


def _fused(policy: TempCachePolicy, buf: CacheBuffers) -> bool:
    """Whether the frame's merges run as the fused kernels of :mod:`longroll.ops.track_merge` (``plan_backend``;
    "auto": on CUDA with head dims powers of two >= 16)."""
    backend = policy.plan_backend
    if backend == "torch":
        return False
    why = fused_supported(buf.k, buf.v)
    if backend == "triton" and why is not None:
        raise ValueError(f"plan_backend='triton': the fused merge {why}")
    return why is None and (backend == "triton" or buf.k.is_cuda)


def merge_frame(
    buf: CacheBuffers,
    track: Track | None,
    k: torch.Tensor,
    v: torch.Tensor,
    x: torch.Tensor,
    match: tuple[torch.Tensor, torch.Tensor],
    frame: Frame,
    policy: TempCachePolicy,
    may_overflow: bool,
    stage: EvictionStage | None = None,
    offset: int = 0,
    consts: SignatureConstants | None = None,
) -> tuple[Track, torch.Tensor]:
    """Commit one non-sink frame with merging.

    Args:
        buf: the layer's buffers (updated in place).
        track: the previous frame's :class:`Track`, or None when there is none to match (after sinks).
        k: (B, H, P, D) post-RoPE keys to store; v: (B, H, P, Dv).
        x: (B, H, P, D) float32 unit-norm matching keys of this frame.
        match: (idx, cos), each (B, H, P), from :func:`match_frames` against ``track.keys``.
        frame: absolute latent frame index (host int or 0-d device tensor).
        may_overflow: host-side hint that the cap could be reached in this frame; when False the eviction
            search is skipped (it is provably not needed).
        stage: where the entries this frame evicts are copied before they are overwritten (a host tier), at
            ``[offset, offset + P)``; None drops them.
        consts: redundancy eviction's signature constants for the buffers' keys (built per search when None).

    Returns:
        the frame's :class:`Track` and the slot of each token, (B, H, P) int64.
    """
    cap = policy.max_entries
    idx, cos = match
    fused = track is not None and _fused(policy, buf)
    now = frame if isinstance(frame, torch.Tensor) or not fused else torch.tensor(frame, device=k.device)
    if fused:
        assert track is not None and isinstance(now, torch.Tensor)
        win, soft, target = fused_track_merge(
            buf.k, buf.v, buf.count, buf.frame, buf.lengths, idx, cos, track.slots, track.active, k, v,
            frame_now=now, cap=cap, threshold=policy.threshold, overflow_threshold=policy.overflow_threshold,
            max_group=policy.max_group, may_overflow=may_overflow,
        )  # fmt: skip
        merged = win | soft
    else:
        if track is None:
            cos = torch.full_like(cos, _NEG)
        else:
            open_ = track.active
            if policy.max_group is not None:
                # A full group stops absorbing: the tokens start a new group, so no group spans more than
                # max_group frames of temporal RoPE phase.
                open_ = open_ & (buf.count.gather(2, track.slots) < policy.max_group)
            cos = torch.where(open_.gather(2, idx), cos, _NEG)
        win = _one_to_one_winners(idx, cos, policy.threshold)
        soft = torch.zeros_like(win)
        if may_overflow:
            over = buf.lengths + (~win).sum(-1) > cap
            soft = ~win & (cos >= policy.overflow_threshold) & over[..., None]
        merged = win | soft
        if track is not None:
            _merge_values(buf, track, idx, merged, v, frame)
            target = track.slots.gather(2, idx)
            buf.write(torch.where(win, target, buf.trash), k, None, None, None)
        else:
            target = torch.zeros_like(idx)
    new = ~merged
    compress = policy.compress_threshold if policy.evict_by == "redundancy" else None
    if fused:
        assert isinstance(now, torch.Tensor)
        victims = None
        if may_overflow:
            free = cap - buf.lengths
            victims, freed = _victims(buf, new, cap, frame, policy.sink_frames, compress, consts, policy.plan_backend)
            if stage is not None:
                _capture_ranked_victims(buf, victims, new, free, freed, stage, offset)
        slots = fused_place(
            buf.k, buf.v, buf.count, buf.frame, buf.lengths, merged, target, victims, k, v, frame_now=now, cap=cap
        )
        return Track(slots=slots, keys=x, active=~soft), slots
    slots_new, evict = _new_slots(
        buf, new, cap, frame, policy.sink_frames, may_overflow, compress, consts, policy.plan_backend
    )
    if stage is not None and may_overflow:
        _capture_victims(buf, slots_new, evict, stage, offset)
    buf.write(slots_new, k, v, 1.0, frame)
    buf.lengths.copy_(torch.clamp(buf.lengths + new.sum(-1), max=cap))
    slots = torch.where(merged, target, slots_new)
    return Track(slots=slots, keys=x, active=~soft), slots


def commit_recent(
    buf: CacheBuffers,
    recent: RecentWindow,
    track: Track | None,
    k: torch.Tensor,
    v: torch.Tensor,
    x: torch.Tensor,
    match: tuple[torch.Tensor, torch.Tensor],
    frame: Frame,
    policy: TempCachePolicy,
    *,
    full: bool,
    may_overflow: bool,
    stage: EvictionStage | None = None,
    offset: int = 0,
    consts: SignatureConstants | None = None,
) -> tuple[Track, torch.Tensor]:
    """Commit one non-sink frame into the verbatim ring; the frame it displaces merges into the older entries.

    Args:
        buf: the layer's buffers (updated in place); the ring is slots ``[S * P, (S + W) * P)``.
        recent: the ring's correspondences (updated in place).
        track: :class:`Track` whose ``keys`` are the previous committed frame's matching keys and whose
            ``slots``/``active`` say where the last frame to leave the ring went (all inactive before any has);
            None right after the sinks.
        k: (B, H, P, D) post-RoPE keys; v: (B, H, P, Dv); x: (B, H, P, D) float32 unit-norm matching keys.
        match: (idx, cos), each (B, H, P), of this frame against the previous committed frame.
        frame: absolute latent frame index (host int or 0-d device tensor).
        full: host-side: the ring already holds W frames (the one at this frame's position leaves it).
        may_overflow: host-side hint passed to :func:`merge_frame` for the leaving frame.
        stage, offset: where the leaving frame's merge copies the entries it evicts (see :func:`merge_frame`).
        consts: as for :func:`merge_frame`.

    Returns:
        the new :class:`Track` (``keys`` = ``x``) and the slot of each of this frame's tokens, (B, H, P) int64.
    """
    b, h, p, _ = k.shape
    w = policy.recent_frames
    idx, cos = match
    # The ring is protected from merges and eviction, so the new frame can take its place before the leaving
    # frame merges (from copies): one pass for both.
    old, slots = ring_swap(
        buf.k, buf.v, buf.count, buf.frame, recent.idx, recent.cos, k, v, idx, cos, frame_now=frame,
        sink_frames=policy.sink_frames, full=full, has_track=track is not None,
        backend="triton" if _fused(policy, buf) else "torch",
    )  # fmt: skip
    if full:
        assert track is not None and old is not None, "a full ring always follows a committed non-sink frame"
        track, _ = merge_frame(
            buf, track, old[0], old[1], x, (old[2], old[3]), frame - w, policy, may_overflow, stage, offset, consts
        )
    else:
        buf.lengths += p
        if track is None:
            none = torch.zeros(b, h, p, dtype=torch.int64, device=k.device)
            track = Track(slots=none, keys=x, active=torch.zeros(b, h, p, dtype=torch.bool, device=k.device))
        else:
            track = Track(slots=track.slots, keys=x, active=track.active)
    return track, slots


def commit_chunk(
    buf: CacheBuffers,
    searcher: Searcher,
    policy: TempCachePolicy,
    track: Track | None,
    k_match: torch.Tensor | None,
    *,
    lo: int,
    tokens_per_frame: int,
    frames: Sequence[Frame],
    sinks: Sequence[bool],
    may_overflow: Sequence[bool],
    recent: RecentWindow | None = None,
    recent_full: Sequence[bool] | None = None,
    stage: EvictionStage | None = None,
    consts: SignatureConstants | None = None,
) -> tuple[Track | None, torch.Tensor]:
    """Commit the chunk staged at slots ``[lo, lo + n)``: sinks verbatim, every other frame merged in order
    (with ``policy.recent_frames`` > 0: into the verbatim ring, the frame it displaces merged).

    Only tensors and the host-side arguments below enter the computation, so the same call runs eagerly or
    inside a CUDA graph capture (with ``frames`` as device tensors).

    Args:
        buf: the layer's buffers (updated in place); the staged chunk sits at ``[lo, lo + n)``.
        searcher: the ANN family of the top-1 lookups.
        policy: the TempCache policy.
        track: the previous committed frame's :class:`Track`, or None.
        k_match: (B, H, n, D) matching keys of the chunk (pre-RoPE), or None with ``match_keys="post_rope"``.
        lo: first staged slot; tokens_per_frame: P (n = len(frames) * P).
        frames: absolute latent frame of each chunk frame; sinks: whether it is a sink frame (kept verbatim);
        may_overflow: whether the cap could be reached while committing it (host-side bound).
        recent: the ring's :class:`RecentWindow` (required with ``recent_frames`` > 0).
        recent_full: per frame, whether the ring is full when it is committed (host-side; required with
            ``recent_frames`` > 0).
        stage: the host tier's :class:`~longroll.cache.host_tier.EvictionStage`: cleared, then frame ``i``'s
            merge copies the entries it evicts at ``[i * P, (i + 1) * P)`` before overwriting them; None drops
            them.
        consts: redundancy eviction's signature constants for ``buf``'s keys; the cache holds them (made once,
            outside any capture); built here, once per chunk, when None.

    Returns:
        the last frame's :class:`Track` (None when it was a sink) and each staged token's slot, (B, H, n) int64.
    """
    nf, tpf = len(frames), tokens_per_frame
    n = nf * tpf
    ring = policy.recent_frames > 0
    if ring and (recent is None or recent_full is None or len(recent_full) != nf):
        raise ValueError("commit_chunk with recent_frames > 0 needs recent and one recent_full flag per frame")
    if consts is None and policy.evict_by == "redundancy" and any(may_overflow):
        consts = SignatureConstants.build(buf.k.shape[-1], buf.k.dtype, buf.k.device)
    # The staged range can be overwritten by the new slots (and scatters refuse sources that alias their
    # destination): read it out first.
    staged = slice(lo, lo + n)
    k_all = buf.k[:, :, staged].clone()
    v_all = buf.v[:, :, staged].clone()
    km_all = k_all if policy.match_keys == "post_rope" or k_match is None else k_match
    prev = None if track is None else track.keys
    buf.count[:, :, staged] = 0.0
    buf.frame[:, :, staged] = -1
    if stage is not None:
        stage.clear()
    slots = []
    for i in range(nf):
        sl = slice(i * tpf, (i + 1) * tpf)
        x = F.normalize(km_all[:, :, sl].float(), dim=-1)
        if sinks[i]:
            slots.append(append_verbatim(buf, k_all[:, :, sl], v_all[:, :, sl], frames[i]))
            track = None
        else:
            match = match_frame(searcher, x, prev)
            if ring:
                assert recent is not None and recent_full is not None
                track, s = commit_recent(
                    buf, recent, track, k_all[:, :, sl], v_all[:, :, sl], x, match, frames[i], policy,
                    full=recent_full[i], may_overflow=may_overflow[i], stage=stage, offset=i * tpf, consts=consts,
                )  # fmt: skip
            else:
                track, s = merge_frame(
                    buf, track, k_all[:, :, sl], v_all[:, :, sl], x, match, frames[i], policy, may_overflow[i],
                    stage, i * tpf, consts,
                )  # fmt: skip
            slots.append(s)
        prev = x
    return track, torch.cat(slots, dim=2)
