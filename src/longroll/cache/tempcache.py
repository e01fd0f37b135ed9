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
        2, idx[..., None].expand(*idx.shape, dv), v.float() * merged[..., None]
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


def _new_slots(
    buf: CacheBuffers, new: torch.Tensor, cap: int, frame: Frame, sink_frames: int, may_overflow: bool
) -> torch.Tensor:
    """Slots for unmatched tokens: free slots first, then victims (oldest frame, then smallest count), never
    sinks or entries touched by this frame. new: (B, H, P) bool. Returns (B, H, P) int64 (trash where not new)."""
    rank = new.long().cumsum(-1) - 1
    slots = buf.lengths[..., None] + rank
    if may_overflow:
        free = (cap - buf.lengths)[..., None]
        fr = buf.frame[:, :, :cap]
        prio = fr.double() * 16_777_216.0 + buf.count[:, :, :cap].double().clamp_max(16_777_215.0)
        valid = torch.arange(cap, device=fr.device) < buf.lengths[..., None]
        protected = (fr < sink_frames) | (fr == frame) | ~valid
        prio = prio.masked_fill(protected, float("inf"))
        victims = prio.topk(min(new.shape[-1], cap), dim=-1, largest=False).indices
        ev = victims.gather(2, (rank - free).clamp(0, victims.shape[-1] - 1))
        slots = torch.where(rank >= free, ev, slots)
    return torch.where(new, slots, buf.trash)


def match_frames(searcher: Searcher, x: torch.Tensor, prev: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 correspondence of every frame of a chunk with the frame before it, in one ANN call.

    The previous frame's matching keys are known before any merge (they are that frame's own keys), so the
    searches of all frames are independent and run batched; only the merges must be sequential.

    Args:
        searcher: the ANN family.
        x: (B, H, F, P, D) unit-norm matching keys of the chunk's frames.
        prev: (B, H, P, D) unit-norm matching keys of the frame before the chunk, or None.

    Returns:
        idx: (F, B, H, P) int64 index of each token's match in its previous frame; cos: (F, B, H, P) float32
        cosine similarity of the pair (meaningless for frame 0 when ``prev`` is None).
    """
    b, h, nf, p, d = x.shape
    first = torch.zeros_like(x[:, :, 0]) if prev is None else prev.to(x.dtype)
    cand = torch.cat([first[:, :, None], x[:, :, :-1]], dim=2)
    # frames go to the batch axis: (F * B, H, P, D); heads stay put so per-head projections still apply
    qf = x.permute(2, 0, 1, 3, 4).reshape(nf * b, h, p, d)
    cf = cand.permute(2, 0, 1, 3, 4).reshape(nf * b, h, p, d)
    idx = searcher.top1(qf, cf)
    cos = (qf * cf.gather(2, idx[..., None].expand_as(qf))).sum(-1)
    return idx.view(nf, b, h, p), cos.view(nf, b, h, p)


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

    Returns:
        the frame's :class:`Track` and the slot of each token, (B, H, P) int64.
    """
    cap = policy.max_entries
    idx, cos = match
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
    slots_new = _new_slots(buf, new, cap, frame, policy.sink_frames, may_overflow)
    buf.write(slots_new, k, v, 1.0, frame)
    buf.lengths.copy_(torch.clamp(buf.lengths + new.sum(-1), max=cap))
    slots = torch.where(merged, target, slots_new)
    return Track(slots=slots, keys=x, active=~soft), slots


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
) -> tuple[Track | None, torch.Tensor]:
    """Commit the chunk staged at slots ``[lo, lo + n)``: sinks verbatim, every other frame merged in order.

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

    Returns:
        the last frame's :class:`Track` (None when it was a sink) and each staged token's slot, (B, H, n) int64.
    """
    nf, tpf = len(frames), tokens_per_frame
    n = nf * tpf
    # The staged range can be overwritten by the new slots: read it out first.
    k_all = buf.k[:, :, lo : lo + n].clone()
    v_all = buf.v[:, :, lo : lo + n].clone()
    km_all = k_all if policy.match_keys == "post_rope" or k_match is None else k_match
    x = F.normalize(km_all.float(), dim=-1).unflatten(2, (nf, tpf))
    idx, cos = match_frames(searcher, x, None if track is None else track.keys)
    buf.count[:, :, lo : lo + n] = 0.0
    buf.frame[:, :, lo : lo + n] = -1
    slots = []
    for i in range(nf):
        sl = slice(i * tpf, (i + 1) * tpf)
        if sinks[i]:
            slots.append(append_verbatim(buf, k_all[:, :, sl], v_all[:, :, sl], frames[i]))
            track = None
        else:
            track, s = merge_frame(
                buf, track, k_all[:, :, sl], v_all[:, :, sl], x[:, :, i], (idx[i], cos[i]), frames[i], policy,
                may_overflow[i],
            )  # fmt: skip
            slots.append(s)
    return track, torch.cat(slots, dim=2)
