"""A typed per-layer KV cache for chunked autoregressive inference (Self-Forcing style).

Life cycle of one chunk of ``frames_per_chunk`` latent frames::

    for step in denoising_steps:          # the chunk's K/V change at every step
        cache.stage(k, v, frame_start=f0, k_match=k_pre_rope)
        view = cache.view()              # committed history + the staged chunk, one contiguous range
        out = attention(q, view.k, view.v, view.bias)
    cache.stage(k_clean, v_clean, ...)   # the clean pass
    cache.commit(queries=q_clean)        # the policy decides what of the chunk (and history) stays

Committed entries are read-only between commits. Lengths live on the host as plain ints (exact for full,
sink-window and budget; for TempCache, whose per-head lengths depend on the data, an upper bound refreshed from
a non-blocking copy of the previous commit), so nothing in stage/view/commit calls ``.item()``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch

from longroll.ann import Searcher, make_searcher
from longroll.cache.budget import compact_to_budget
from longroll.cache.buffers import CacheBuffers
from longroll.cache.config import BudgetPolicy, CacheConfig, FullPolicy, SinkWindowPolicy, TempCachePolicy
from longroll.cache.graphs import KeyedCapture, StaticInputs
from longroll.cache.host_tier import HostTier
from longroll.cache.redundancy import SignatureConstants
from longroll.cache.tempcache import RecentWindow, Track, commit_chunk
from longroll.ops._checks import check_float, check_rank

#: Version of the layout written by :meth:`LayerKVCache.state_dict` (checked on load).
STATE_FORMAT = 1


def _expect(state: Mapping[str, torch.Tensor], name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = state[name]
    if x.dtype != dtype:
        raise ValueError(f"state[{name!r}] must be {dtype}, got {x.dtype}")
    if tuple(x.shape) != shape:
        raise ValueError(f"state[{name!r}] must have shape {shape}, got {tuple(x.shape)}")


@dataclass
class LoadedState:
    """A validated cache state on the cache's device (:meth:`LayerKVCache.check_state`); n = ``bound``.

    k: (B, H, n, D); v: (B, H, n, Dv); count: (B, H, n) float32; frame: (B, H, n) int32; lengths: (B, H) int64;
    track: TempCache's track or None.
    """

    committed_frames: int
    bound: int
    k: torch.Tensor
    v: torch.Tensor
    count: torch.Tensor
    frame: torch.Tensor
    lengths: torch.Tensor
    track: Track | None = None
    recent: RecentWindow | None = None
    host: dict[str, torch.Tensor] | None = None


class CacheView(NamedTuple):
    """What attention reads.

    k: (batch, heads, n, head_dim); v: (batch, heads, n, head_dim_v); bias: (batch, heads, n) float32 log-count
    per key (-inf on empty slots), or None when every entry counts once and every slot is valid.
    """

    k: torch.Tensor
    v: torch.Tensor
    bias: torch.Tensor | None


class LayerKVCache:
    """KV cache of one attention layer with stage/commit semantics and a commit policy.

    Args:
        config: geometry and policy.
        batch, heads, head_dim, v_dim: shapes of the K/V this layer produces (heads = this process's kv heads).
        dtype, device: storage.
        layer: layer index (seeds the ANN projections).
        head_ids: global ids of the heads held here (default: ``range(heads)``); a GPU holding a shard of heads
            passes its ids and behaves exactly like the matching slice of an unsharded cache.
        graph_inputs: static input buffers shared with other layers' captured commits (saves one set of
            chunk-sized buffers per layer); default: private ones.
        storage: ``(buffers, recent)`` to use instead of allocating them: views into a stacked storage
            (:class:`~longroll.cache.group.CacheGroup`), of this cache's shapes.
        searcher: the ANN searcher of TempCache's matches instead of this layer's own (a group's stacked one).
    """

    def __init__(
        self,
        config: CacheConfig,
        *,
        batch: int,
        heads: int,
        head_dim: int,
        v_dim: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        layer: int = 0,
        head_ids: tuple[int, ...] | None = None,
        graph_inputs: StaticInputs | None = None,
        storage: tuple[CacheBuffers, RecentWindow | None] | None = None,
        searcher: Searcher | None = None,
    ) -> None:
        for name, val in (("batch", batch), ("heads", heads), ("head_dim", head_dim)):
            if val < 1:
                raise ValueError(f"{name} must be >= 1, got {val}")
        self.config = config
        self.batch, self.heads, self.head_dim = batch, heads, head_dim
        self.v_dim = head_dim if v_dim is None else v_dim
        # Resolve "cuda" to "cuda:N" so that device checks compare like with like.
        self.dtype, self.device = dtype, torch.empty(0, device=device).device
        self.layer = layer
        self.head_ids = tuple(range(heads)) if head_ids is None else tuple(head_ids)
        if len(self.head_ids) != heads:
            raise ValueError(f"head_ids must name {heads} heads, got {len(self.head_ids)}")
        p = config.policy
        ring = p.recent_frames if isinstance(p, TempCachePolicy) else 0
        if storage is None:
            self.buffers = CacheBuffers.allocate(
                batch, heads, self._initial_slots(), head_dim, self.v_dim, dtype, self.device
            )
            self.recent: RecentWindow | None = (
                RecentWindow.allocate(batch, heads, ring, config.tokens_per_frame, self.device) if ring else None
            )
        else:
            if config.host_tier is not None:
                raise ValueError("a host tier does not combine with a shared storage (grouped commits) yet")
            self.buffers, self.recent = storage
            self._check_storage(ring)
        #: The host tier of evicted entries (None without ``config.host_tier``).
        self.host: HostTier | None = None
        if config.host_tier is not None:
            self.host = HostTier(
                config.host_tier, batch=batch, heads=heads, head_dim=head_dim, v_dim=self.v_dim,
                chunk_tokens=config.chunk_tokens, dtype=dtype, device=self.device,
            )  # fmt: skip
        #: Times the state was replaced by :meth:`load_state_dict` (a group of caches watches it).
        self.loads = 0
        self.committed_frames = 0
        self.bound = 0
        self.staged_tokens = 0
        self.track: Track | None = None
        self._bias: torch.Tensor | None = None
        self._pending_len: tuple[torch.Tensor, torch.cuda.Event | None] | None = None
        # Captured steady-state TempCache commit: ((lo, n), call), the key last run eagerly, a failure flag.
        self.commit_capture = KeyedCapture("emulate" if config.commit_graphs == "emulate" else "cuda")
        self._frame0: torch.Tensor | None = None
        self._graph_inputs = graph_inputs if graph_inputs is not None else StaticInputs()
        #: The staged matching keys live in a persistent buffer that the captured commit reads in place (a
        #: :class:`~longroll.cache.group.CacheGroup`'s stacked cache) instead of a shared static input.
        self.match_in_place = False
        self._searcher: Searcher | None = None
        # Redundancy eviction's hash constants, made here once rather than inside every (captured) commit.
        self._signatures: SignatureConstants | None = None
        if isinstance(p, TempCachePolicy):
            self._searcher = (
                make_searcher(p.ann, head_dim, layer=layer, head_ids=self.head_ids, device=self.device)
                if searcher is None
                else searcher
            )
            if p.evict_by == "redundancy":
                self._signatures = SignatureConstants.build(head_dim, self.buffers.k.dtype, self.device)

    def _check_storage(self, ring: int) -> None:
        buf, want = self.buffers, self._initial_slots()
        shape = (self.batch, self.heads, want + 1)
        if (
            tuple(buf.k.shape) != (*shape, self.head_dim)
            or tuple(buf.v.shape) != (*shape, self.v_dim)
            or tuple(buf.count.shape) != shape
            or buf.k.dtype != self.dtype
            or buf.k.device != self.device
        ):
            raise ValueError(
                f"storage buffers must hold k of shape {(*shape, self.head_dim)} {self.dtype} on {self.device}, "
                f"got {tuple(buf.k.shape)} {buf.k.dtype} on {buf.k.device}"
            )
        if (self.recent is None) != (ring == 0) or (
            self.recent is not None
            and tuple(self.recent.idx.shape) != (self.batch, self.heads, ring, self.config.tokens_per_frame)
        ):
            raise ValueError(f"storage recent window must match recent_frames={ring} (None when 0)")

    # ----------------------------------------------------------------- geometry
    @property
    def policy(self) -> FullPolicy | SinkWindowPolicy | BudgetPolicy | TempCachePolicy:
        return self.config.policy

    def _initial_slots(self) -> int:
        c, p = self.config, self.config.policy
        chunk = c.chunk_tokens
        if isinstance(p, FullPolicy):
            return max(p.initial_frames * c.tokens_per_frame, chunk) + chunk
        if isinstance(p, SinkWindowPolicy):
            return (p.sink_frames + p.window_frames) * c.tokens_per_frame + chunk
        if isinstance(p, BudgetPolicy):
            return p.budget_tokens + chunk
        return p.max_entries + chunk

    @property
    def capacity(self) -> int:
        """Most committed entries a head can hold (grows only for the ``full`` policy)."""
        c, p = self.config, self.config.policy
        if isinstance(p, SinkWindowPolicy):
            return (p.sink_frames + p.window_frames) * c.tokens_per_frame
        if isinstance(p, BudgetPolicy):
            return p.budget_tokens
        if isinstance(p, TempCachePolicy):
            return p.max_entries
        return self.buffers.slots - c.chunk_tokens

    def nbytes(self) -> int:
        """Device bytes held by the cache's buffers (constant for every policy but ``full``), TempCache's
        verbatim ring's correspondences and the host tier's device part (stage, index, slot region) included."""
        extra = (self.recent.nbytes() if self.recent is not None else 0) + (
            self.host.device_nbytes() if self.host is not None else 0
        )
        return self.buffers.nbytes() + extra

    def host_nbytes(self) -> int:
        """Host bytes of the host tier (0 without one)."""
        return 0 if self.host is None else self.host.host_nbytes()

    @property
    def pinned_tokens(self) -> int:
        """Leading committed slots that never move and are always attended: the sink frames and, for TempCache
        with ``recent_frames``, its verbatim ring (fewer while they fill up)."""
        p, tpf = self.policy, self.config.tokens_per_frame
        frames = getattr(p, "sink_frames", 0) + (p.recent_frames if isinstance(p, TempCachePolicy) else 0)
        return min(frames * tpf, self.bound)

    # ----------------------------------------------------------------- stage / view
    def stage(self, k: torch.Tensor, v: torch.Tensor, *, frame_start: int, k_match: torch.Tensor | None = None) -> None:
        """Write (or overwrite) the chunk being denoised.

        Args:
            k: (batch, heads, n, head_dim) post-RoPE keys, n a multiple of tokens_per_frame, at most one chunk.
            v: (batch, heads, n, head_dim_v).
            frame_start: absolute latent frame of the first staged token; must equal ``committed_frames``.
            k_match: (batch, heads, n, head_dim) keys used to match frames (pre-RoPE keys); default ``k``.
        """
        self._check_stage(k, v, frame_start, k_match)
        n = k.shape[2]
        if self.staged_tokens == 0:
            self._refresh_bound()
            self._ensure_slots(self.bound + n)
            self._bias = None
        elif n != self.staged_tokens:
            raise ValueError(
                f"k stages {n} tokens but this chunk already staged {self.staged_tokens}; restage the same size"
            )
        lo, hi = self.bound, self.bound + n
        buf = self.buffers
        buf.k[:, :, lo:hi] = k
        buf.v[:, :, lo:hi] = v
        if self.staged_tokens == 0:
            buf.count[:, :, lo:hi] = 1.0
            p = self.config.tokens_per_frame
            frames = frame_start + torch.arange(n, device=self.device, dtype=torch.int32) // p
            buf.frame[:, :, lo:hi] = frames
        self._k_match = k if k_match is None else k_match
        self.staged_tokens = n

    def view(self) -> CacheView:
        """Committed entries followed by the staged chunk (or just the committed ones when nothing is staged)."""
        n = self.bound + self.staged_tokens
        buf = self.buffers
        bias = None
        if isinstance(self.policy, TempCachePolicy):
            if self._bias is None or self._bias.shape[-1] != n:
                self._bias = torch.log(buf.count[:, :, :n])
            bias = self._bias
        return CacheView(buf.k[:, :, :n], buf.v[:, :, :n], bias)

    def retrieved(self) -> CacheView | None:
        """The host tier's retrieved blocks for this chunk (attended besides :meth:`view`): k (B, H, S, D),
        v (B, H, S, Dv), bias (B, H, S) float32 log-count, -inf on empty slots (S = the tier's slot tokens);
        None without a host tier or before its first retrieval. Disjoint from :meth:`view`'s entries."""
        got = None if self.host is None else self.host.retrieved()
        return None if got is None else CacheView(*got)

    # ----------------------------------------------------------------- commit
    def commit(self, queries: torch.Tensor | None = None) -> torch.Tensor | None:
        """Apply the policy to the staged chunk and make it part of the history.

        Args:
            queries: (batch, heads_q, n, head_dim) queries of the committing pass (n = the staged tokens,
                heads_q a multiple of heads, the cache's dtype and device); the ``budget`` policy scores
                importance with them (default: the staged keys stand in). With ``check_finite`` a NaN or Inf
                query is refused (it would decide what is evicted); without it (no host sync), NaN queries that
                choose evictions make the kept keys NaN, so that the rollout shows it instead of hiding it.

        Returns:
            For TempCache, the slot each staged token went to, (batch, heads, n) int64; otherwise None.
        """
        if self.staged_tokens == 0:
            raise RuntimeError("commit() called with nothing staged; call stage() first")
        n = self.staged_tokens
        if queries is not None:
            self._check_queries(queries, n)
        frames = n // self.config.tokens_per_frame
        p = self.policy
        result = None
        host_q = None
        if self.host is not None:
            # Staged keys stand in for missing queries (read before the commit moves them).
            host_q = queries if queries is not None else self.buffers.k[:, :, self.bound : self.bound + n].clone()
        if isinstance(p, TempCachePolicy):
            result = self._commit_tempcache(p, n)
        elif isinstance(p, SinkWindowPolicy):
            self._commit_sink_window(p, n)
        elif isinstance(p, BudgetPolicy):
            q = self.buffers.k[:, :, self.bound : self.bound + n] if queries is None else queries
            self.bound = compact_to_budget(self.buffers, self.bound + n, n, p, self.config.tokens_per_frame, q)
            self.buffers.lengths.fill_(self.bound)
        else:
            self.bound += n
            self.buffers.lengths.fill_(self.bound)
        self.committed_frames += frames
        self.staged_tokens = 0
        self._bias = None
        if self.host is not None:
            assert host_q is not None
            self.host.select(host_q)
        return result

    def _commit_sink_window(self, p: SinkWindowPolicy, n: int) -> None:
        tpf = self.config.tokens_per_frame
        sink, window = p.sink_frames * tpf, p.window_frames * tpf
        buf = self.buffers
        host = self.host
        evicts = host is not None and self.committed_frames + n // tpf > p.sink_frames + p.window_frames
        if host is not None and evicts:
            host.stage.clear()
        if self.bound + n <= sink + window:
            self.bound += n
        else:
            # Ring buffer over the window: attention ignores slot order, so frame f reuses the slots of the
            # frame that left the window instead of shifting the whole cache.
            src = slice(self.bound, self.bound + n)
            for i in range(n // tpf):
                f = self.committed_frames + i
                if f < p.sink_frames:
                    dst = f * tpf
                else:
                    dst = sink + ((f - p.sink_frames) % p.window_frames) * tpf
                s0 = src.start + i * tpf
                if host is not None and f >= p.sink_frames + p.window_frames:
                    # The frame leaving the window: to the host tier before its slots are reused.
                    sl = slice(dst, dst + tpf)
                    host.stage.put(i * tpf, buf.k[:, :, sl], buf.v[:, :, sl], buf.count[:, :, sl], buf.frame[:, :, sl])
                if dst != s0:
                    buf.k[:, :, dst : dst + tpf] = buf.k[:, :, s0 : s0 + tpf]
                    buf.v[:, :, dst : dst + tpf] = buf.v[:, :, s0 : s0 + tpf]
                    buf.frame[:, :, dst : dst + tpf] = buf.frame[:, :, s0 : s0 + tpf]
            self.bound = sink + window
            buf.count[:, :, self.bound :] = 0.0
            buf.frame[:, :, self.bound :] = -1
            buf.count[:, :, : self.bound] = 1.0
        buf.lengths.fill_(self.bound)
        if host is not None and evicts:
            host.absorb()

    def _commit_tempcache(self, p: TempCachePolicy, n: int) -> torch.Tensor:
        tpf = self.config.tokens_per_frame
        nf = n // tpf
        lo = self.bound
        if self._searcher is None:
            raise RuntimeError("TempCache commit without an ANN searcher")
        frames = [self.committed_frames + i for i in range(nf)]
        sinks = [f < p.sink_frames for f in frames]
        full = [f - p.sink_frames >= p.recent_frames for f in frames]
        overflow, upper = [], lo
        for sink in sinks:
            overflow.append(not sink and upper + tpf > p.max_entries)
            upper = min(upper + tpf, p.max_entries)
        steady = self.track is not None and not any(sinks) and all(overflow) and all(full)
        # Only a commit that may evict fills a host record (a host-side decision, as the cap's).
        stage = self.host.stage if self.host is not None and any(overflow) else None
        if self._captures_commits() and steady:
            slots = self._commit_captured(p, lo, n)
        else:
            self.track, slots = commit_chunk(
                self.buffers, self._searcher, p, self.track, self._k_match,
                lo=lo, tokens_per_frame=tpf, frames=frames, sinks=sinks, may_overflow=overflow,
                recent=self.recent, recent_full=full if self.recent is not None else None, stage=stage,
                consts=self._signatures,
            )  # fmt: skip
        if self.host is not None and stage is not None:
            self.host.absorb()
        self.bound = upper
        self._start_length_readback()
        return slots

    def _captures_commits(self) -> bool:
        setting = self.config.commit_graphs
        if setting == "emulate":
            return True
        return setting == "auto" and self.device.type == "cuda" and not self.commit_capture.failed

    def _commit_captured(self, p: TempCachePolicy, lo: int, n: int) -> torch.Tensor:
        """The steady-state commit (at the cap, no sinks, a track to match) through a captured call.

        The first steady-state commit at a given ``(lo, n)`` runs eagerly (it warms up every kernel and
        library handle); the second captures, and later ones replay. The frame index enters as device memory.
        The track lives in the captured call's static outputs (no copy per commit); the next replay copies it
        into the shared static inputs before overwriting it.
        """
        assert self._searcher is not None and self.track is not None
        tpf, nf = self.config.tokens_per_frame, n // self.config.tokens_per_frame
        key = (lo, n)
        searcher, buf = self._searcher, self.buffers
        stage = None if self.host is None else self.host.stage
        if self._frame0 is None:
            self._frame0 = torch.zeros((), dtype=torch.int64, device=self.device)
        self._frame0.fill_(self.committed_frames)
        k_match = self._k_match if p.match_keys == "pre_rope" else buf.k[:, :, lo : lo + n]
        t = self.track
        inputs = (t.slots, t.keys, t.active, k_match, self._frame0)

        def body(
            slots: torch.Tensor, keys: torch.Tensor, active: torch.Tensor, km: torch.Tensor, frame0: torch.Tensor
        ) -> tuple[torch.Tensor, ...]:
            track, out = commit_chunk(
                buf, searcher, p, Track(slots, keys, active), km,
                lo=lo, tokens_per_frame=tpf, frames=[frame0 + i for i in range(nf)], sinks=[False] * nf,
                may_overflow=[True] * nf, recent=self.recent,
                recent_full=[True] * nf if self.recent is not None else None, stage=stage, consts=self._signatures,
            )  # fmt: skip
            assert track is not None
            return track.slots, track.keys, track.active, out

        arena = self._graph_inputs
        names = ("track_slots", "track_keys", "track_active")
        static = [arena.get(name, x) for name, x in zip(names, inputs, strict=False)]
        # A group's matching keys already sit in a buffer of its own, written before each commit: read in place.
        static.append(k_match if self.match_in_place else arena.get("k_match", k_match))
        track_slots, track_keys, track_active, out = self.commit_capture(
            key, body, inputs, static=[*static, self._frame0], copy_outputs=False
        )
        self.track = Track(track_slots, track_keys, track_active)
        return out.clone()

    def _start_length_readback(self) -> None:
        m = self.buffers.lengths.max()
        if self.device.type == "cuda":
            host = torch.empty((), dtype=torch.int64, pin_memory=True)
            host.copy_(m, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            self._pending_len = (host, ev)
        else:
            self._pending_len = (m, None)

    def _refresh_bound(self) -> None:
        """Tighten the host bound with the exact max length of the previous commit when it is already known
        (never waits: on CUDA the copy is used only once its event has completed)."""
        if self._pending_len is None:
            return
        host, ev = self._pending_len
        if ev is not None and not ev.query():
            return
        self.bound = int(host)
        self._pending_len = None

    def _ensure_slots(self, needed: int) -> None:
        if needed <= self.buffers.slots:
            return
        if not isinstance(self.policy, FullPolicy):
            raise RuntimeError(
                f"cache of policy {type(self.policy).__name__} needs {needed} slots, holds {self.buffers.slots}"
            )
        self.buffers = self.buffers.grown(max(needed, int(self.buffers.slots * 1.5)))

    def reorder_(self, order: torch.Tensor, start: int = 0) -> None:
        """Permute committed slots ``[start, start + n)`` of every head (e.g. to make ANN buckets contiguous).

        Attention ignores slot order, so outputs are unchanged; TempCache's track is remapped to follow its
        entries. Only between commits (nothing staged).

        Args:
            order: (batch, heads, n) int64; new slot ``start + i`` receives old slot ``start + order[..., i]``.
                Each row must be a permutation of ``range(n)`` that keeps a head's empty slots after its valid
                ones (sort empty slots last with a stable sort); neither is checked, as that would need a host
                sync.
            start: first permuted slot (e.g. past the sink frames).
        """
        if self.staged_tokens:
            raise RuntimeError("reorder_() with a chunk staged: commit it first")
        check_rank("order", order, 3)
        n = order.shape[-1]
        if order.shape[:2] != (self.batch, self.heads) or start < 0 or start + n > self.buffers.slots:
            raise ValueError(
                f"order must have shape ({self.batch}, {self.heads}, n) with start + n <= {self.buffers.slots}, "
                f"got {tuple(order.shape)} and start={start}"
            )
        buf = self.buffers
        src = order + start
        for name in ("k", "v"):
            t = getattr(buf, name)
            t[:, :, start : start + n] = t.gather(2, src[..., None].expand(*src.shape, t.shape[-1]))
        buf.count[:, :, start : start + n] = buf.count.gather(2, src)
        buf.frame[:, :, start : start + n] = buf.frame.gather(2, src)
        if self.track is not None:
            # new position of old slot s is start + inverse[s - start]
            inverse = torch.empty_like(order).scatter_(2, order, torch.arange(n, device=order.device).expand_as(order))
            s = self.track.slots
            inside = (s >= start) & (s < start + n)
            moved = inverse.gather(2, (s - start).clamp(0, n - 1)) + start
            self.track = Track(torch.where(inside, moved, s), self.track.keys, self.track.active)
        self._bias = None

    # ----------------------------------------------------------------- validation
    def _check_queries(self, queries: torch.Tensor, n: int) -> None:
        check_rank("queries", queries, 4)
        check_float("queries", queries)
        b, hq, lq, d = queries.shape
        if b != self.batch or d != self.head_dim or hq == 0 or hq % self.heads or lq != n:
            raise ValueError(
                f"queries must have shape ({self.batch}, k*{self.heads}, {n}, {self.head_dim}) (the {n} staged "
                f"tokens), got {tuple(queries.shape)}"
            )
        if queries.dtype != self.dtype or queries.device != self.device:
            raise ValueError(f"queries must be {self.dtype} on {self.device}, got {queries.dtype} on {queries.device}")
        if self.config.check_finite and not bool(torch.isfinite(queries).all()):
            raise ValueError("queries holds NaN or Inf values")

    def _check_stage(self, k: torch.Tensor, v: torch.Tensor, frame_start: int, k_match: torch.Tensor | None) -> None:
        check_rank("k", k, 4)
        check_rank("v", v, 4)
        check_float("k", k)
        b, h, n, d = k.shape
        if (b, h, d) != (self.batch, self.heads, self.head_dim):
            raise ValueError(
                f"k must have shape ({self.batch}, {self.heads}, n, {self.head_dim}), got {tuple(k.shape)}"
            )
        if v.shape != (b, h, n, self.v_dim):
            raise ValueError(f"v must have shape {(b, h, n, self.v_dim)}, got {tuple(v.shape)}")
        for name, x in (("k", k), ("v", v)) + ((("k_match", k_match),) if k_match is not None else ()):
            if x.dtype != self.dtype or x.device != self.device:
                raise ValueError(f"{name} must be {self.dtype} on {self.device}, got {x.dtype} on {x.device}")
        if k_match is not None and k_match.shape != k.shape:
            raise ValueError(f"k_match must have the shape of k {tuple(k.shape)}, got {tuple(k_match.shape)}")
        tpf = self.config.tokens_per_frame
        if n == 0 or n % tpf or n > self.config.chunk_tokens:
            raise ValueError(
                f"k must stage a positive multiple of tokens_per_frame={tpf} up to one chunk "
                f"({self.config.chunk_tokens}), got {n} tokens"
            )
        if frame_start != self.committed_frames:
            raise ValueError(
                f"frame_start must be {self.committed_frames} (the next uncommitted frame), got {frame_start}"
            )
        if self.config.check_finite:
            for name, x in (("k", k), ("v", v)) + ((("k_match", k_match),) if k_match is not None else ()):
                if not bool(torch.isfinite(x).all()):
                    raise ValueError(f"{name} holds NaN or Inf values")

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Explicit, serialisable state (tensors only; safetensors-ready). Staged data is not part of it.

        Keys (n = committed slots, P = tokens_per_frame): ``format`` (1,) int64 :data:`STATE_FORMAT`;
        ``meta`` (3,) int64 [committed_frames, n, layer]; ``head_ids`` (heads,) int64; ``k`` (B, H, n, D) and
        ``v`` (B, H, n, Dv) in the cache dtype; ``count`` (B, H, n) float32; ``frame`` (B, H, n) int32;
        ``lengths`` (B, H) int64; with TempCache after a non-sink frame, ``track_slots`` (B, H, P) int64,
        ``track_keys`` (B, H, P, D) float32 and ``track_active`` (B, H, P) bool; with TempCache's
        ``recent_frames`` = W > 0, ``recent_idx`` (B, H, W, P) int32 and ``recent_cos`` (B, H, W, P) float32
        (:class:`~longroll.cache.tempcache.RecentWindow`).
        """
        if self.staged_tokens:
            raise RuntimeError("state_dict() with a chunk staged: commit it first")
        self._refresh_bound_blocking()
        if isinstance(self.policy, TempCachePolicy):
            # A group of caches keeps one bound for all its layers: save this layer's exact one.
            self.bound = int(self.buffers.lengths.max())
        n = self.bound
        buf = self.buffers
        state = {
            "format": torch.tensor([STATE_FORMAT], dtype=torch.int64),
            "k": buf.k[:, :, :n].contiguous(),
            "v": buf.v[:, :, :n].contiguous(),
            "count": buf.count[:, :, :n].contiguous(),
            "frame": buf.frame[:, :, :n].contiguous(),
            "lengths": buf.lengths.clone(),
            "meta": torch.tensor([self.committed_frames, self.bound, self.layer], dtype=torch.int64),
            "head_ids": torch.tensor(self.head_ids, dtype=torch.int64),
        }
        if self.recent is not None:
            state |= {"recent_idx": self.recent.idx.clone(), "recent_cos": self.recent.cos.clone()}
        if self.host is not None:
            state |= {f"host.{k}": v for k, v in self.host.state_dict().items()}
        if self.track is not None:
            t = self.track
            # Copies: a captured commit overwrites its track in place.
            fmt = torch.contiguous_format
            state |= {
                "track_slots": t.slots.clone(memory_format=fmt),
                "track_keys": t.keys.clone(memory_format=fmt),
                "track_active": t.active.clone(memory_format=fmt),
            }
        return state

    def check_state(self, state: Mapping[str, torch.Tensor]) -> LoadedState:
        """Validate :meth:`state_dict` output against this cache without changing anything.

        Checks, in order: the key set, the format version, every tensor's dtype (exact: nothing is cast),
        shape and device (CPU or this cache's device), then the values: meta (frames, bound, layer), head ids,
        finite keys and values, lengths within the bound (the longest head at it), counts >= 1 on occupied
        slots and 0 on empty ones, frames of occupied slots within the committed frames, and the track.

        Returns:
            the state's tensors on this cache's device, ready for :meth:`load_state_dict`.

        Raises:
            ValueError naming the first problem found.
        """
        if not isinstance(state, Mapping):
            raise ValueError(f"state must be a mapping of tensors, got {type(state).__name__}")
        tempcache = isinstance(self.policy, TempCachePolicy)
        required = {"format", "meta", "head_ids", "k", "v", "count", "frame", "lengths"}
        track_keys = {"track_slots", "track_keys", "track_active"}
        if self.recent is not None:
            required |= {"recent_idx", "recent_cos"}
        missing = sorted(required - set(state))
        if missing:
            raise ValueError(f"state is missing {missing}")
        host_keys = {k for k in state if isinstance(k, str) and k.startswith("host.")}
        if host_keys and self.host is None:
            raise ValueError(f"state has host tier entries {sorted(host_keys)[:3]}..., this cache has no host tier")
        if self.host is not None and not host_keys:
            raise ValueError("state has no host tier entries (host.*), this cache has a host tier")
        unknown = sorted(set(state) - required - track_keys - host_keys)
        if unknown:
            raise ValueError(f"state has unknown keys {unknown}")
        for name, x in state.items():
            if not isinstance(x, torch.Tensor):
                raise ValueError(f"state[{name!r}] must be a tensor, got {type(x).__name__}")
            if x.device.type != "cpu" and x.device != self.device:
                raise ValueError(f"state[{name!r}] is on {x.device}; expected the CPU or {self.device}")
        _expect(state, "format", (1,), torch.int64)
        fmt = int(state["format"][0])
        if fmt != STATE_FORMAT:
            raise ValueError(f"state['format'] is {fmt}; this version of longroll reads format {STATE_FORMAT}")
        _expect(state, "meta", (3,), torch.int64)
        committed, n, layer = (int(x) for x in state["meta"].tolist())
        if committed < 0 or n < 0:
            raise ValueError(f"state['meta'] holds negative frames or entries: {[committed, n, layer]}")
        if layer != self.layer:
            raise ValueError(f"state['meta'] is of layer {layer}, this cache is layer {self.layer}")
        if n > self.capacity and not isinstance(self.policy, FullPolicy):
            raise ValueError(f"state holds {n} entries per head, more than this cache's capacity {self.capacity}")
        if n > committed * self.config.tokens_per_frame:
            raise ValueError(
                f"state holds {n} entries per head but only {committed} committed frames of "
                f"{self.config.tokens_per_frame} tokens"
            )
        b, h, d, dv = self.batch, self.heads, self.head_dim, self.v_dim
        _expect(state, "head_ids", (h,), torch.int64)
        if tuple(state["head_ids"].tolist()) != self.head_ids:
            raise ValueError(
                f"state['head_ids'] is {state['head_ids'].tolist()}, this cache holds {list(self.head_ids)}"
            )
        _expect(state, "k", (b, h, n, d), self.dtype)
        _expect(state, "v", (b, h, n, dv), self.dtype)
        _expect(state, "count", (b, h, n), torch.float32)
        _expect(state, "frame", (b, h, n), torch.int32)
        _expect(state, "lengths", (b, h), torch.int64)
        has_track = sorted(track_keys & set(state))
        wants_track = tempcache and committed > getattr(self.policy, "sink_frames", 0)
        if wants_track and len(has_track) != 3:
            raise ValueError(f"state is missing {sorted(track_keys - set(state))} (TempCache after a non-sink frame)")
        if not wants_track and has_track:
            raise ValueError(f"state has {has_track}, which this cache's policy and frame count do not use")
        p = self.config.tokens_per_frame
        if wants_track:
            _expect(state, "track_slots", (b, h, p), torch.int64)
            _expect(state, "track_keys", (b, h, p, d), torch.float32)
            _expect(state, "track_active", (b, h, p), torch.bool)
        k, v, count, frame, lengths = (
            state[name].to(self.device, copy=True) for name in ("k", "v", "count", "frame", "lengths")
        )
        loaded = LoadedState(committed, n, k, v, count, frame, lengths)
        for name in ("k", "v"):
            if not bool(torch.isfinite(getattr(loaded, name)).all()):
                raise ValueError(f"state[{name!r}] holds NaN or Inf values")
        if bool((lengths < 0).any()) or int(lengths.max()) != n:
            raise ValueError(f"state['lengths'] must lie in [0, {n}] with its longest head at {n}, got "
                             f"[{int(lengths.min())}, {int(lengths.max())}]")  # fmt: skip
        occupied = torch.arange(n, device=self.device) < lengths[..., None]
        if not bool(torch.isfinite(count).all()):
            raise ValueError("state['count'] holds NaN or Inf values")
        if not bool(torch.where(occupied, count >= 1.0, count == 0.0).all()):
            raise ValueError("state['count'] must be >= 1 on occupied slots and 0 on empty ones")
        if not tempcache and not bool((count[occupied] == 1.0).all()):
            raise ValueError(f"state['count'] must be 1 on occupied slots of a {type(self.policy).__name__} cache")
        ok = torch.where(occupied, (frame >= 0) & (frame < committed), frame == -1)
        if not bool(ok.all()):
            raise ValueError(f"state['frame'] must lie in [0, {committed}) on occupied slots and be -1 on empty ones")
        if wants_track:
            slots = state["track_slots"].to(self.device, copy=True)
            keys = state["track_keys"].to(self.device, copy=True)
            if bool((slots < 0).any()) or not bool((slots < lengths[..., None]).all()):
                raise ValueError("state['track_slots'] must point at occupied slots of its head")
            if not bool(torch.isfinite(keys).all()):
                raise ValueError("state['track_keys'] holds NaN or Inf values")
            loaded.track = Track(slots, keys, state["track_active"].to(self.device, copy=True))
        if self.recent is not None:
            shape = tuple(self.recent.idx.shape)
            _expect(state, "recent_idx", shape, torch.int32)
            _expect(state, "recent_cos", shape, torch.float32)
            ridx = state["recent_idx"].to(self.device, copy=True)
            rcos = state["recent_cos"].to(self.device, copy=True)
            if bool((ridx < 0).any()) or bool((ridx >= p).any()):
                raise ValueError(f"state['recent_idx'] must lie in [0, {p})")
            if bool(torch.isnan(rcos).any()) or bool((rcos > 1.0 + 1e-3).any()):
                raise ValueError("state['recent_cos'] must be cosines (<= 1) or -inf, without NaN")
            loaded.recent = RecentWindow(ridx, rcos)
        if self.host is not None:
            part = {k[len("host.") :]: state[k] for k in host_keys}
            loaded.host = self.host.check_state(part, committed)
        return loaded

    def load_state_dict(self, state: Mapping[str, torch.Tensor] | LoadedState) -> None:
        """Restore :meth:`state_dict` output into a cache built with the same config and shapes.

        Everything is validated first (:meth:`check_state`); on any problem a ``ValueError`` names it and the
        cache is unchanged. A :class:`LoadedState` from :meth:`check_state` is applied as is.
        """
        loaded = state if isinstance(state, LoadedState) else self.check_state(state)
        if (self.host is None) != (loaded.host is None):
            raise ValueError("the loaded state's host tier part does not match this cache (check it with this cache)")
        bound = loaded.bound
        self._ensure_slots(bound + self.config.chunk_tokens)
        buf = self.buffers
        for name in ("k", "v", "count", "frame"):
            getattr(buf, name)[:, :, :bound] = getattr(loaded, name)
        # Slots past the restored entries return to their empty state.
        buf.count[:, :, bound:] = 0.0
        buf.frame[:, :, bound:] = -1
        buf.lengths.copy_(loaded.lengths)
        self.committed_frames, self.bound, self.staged_tokens = loaded.committed_frames, bound, 0
        self.track = loaded.track
        self.loads += 1
        if self.recent is not None and loaded.recent is not None:
            # In place: a captured commit reads and writes these very tensors.
            self.recent.idx.copy_(loaded.recent.idx)
            self.recent.cos.copy_(loaded.recent.cos)
        if self.host is not None:
            assert loaded.host is not None
            self.host.load(loaded.host)
        self._pending_len, self._bias = None, None
        # A captured commit holds the previous track's buffers: capture again from the restored state.
        self.commit_capture.reset()

    def settle_bound(self) -> int:
        """Tighten the slot bound to the exact longest head of the last commit, waiting for its readback (a host
        sync on CUDA); returns the bound."""
        self._refresh_bound_blocking()
        return self.bound

    def widen_bound(self, bound: int) -> None:
        """Raise the slot bound to ``bound``, e.g. to the longest head over every shard of a head-sharded layer,
        so that each shard reads the slot range an unsharded cache reads (slots past a head's length are empty).

        Raises:
            ValueError: ``bound`` is below the current bound or beyond the buffers.
        """
        if isinstance(bound, bool) or not isinstance(bound, int) or not self.bound <= bound <= self.buffers.slots:
            raise ValueError(f"bound must be an int in [{self.bound}, {self.buffers.slots}], got {bound!r}")
        self.bound = bound

    def _refresh_bound_blocking(self) -> None:
        if self._pending_len is not None:
            host, ev = self._pending_len
            if ev is not None:
                ev.synchronize()
            self.bound = int(host)
            self._pending_len = None

    def mean_entries(self) -> float:
        """Average committed entries per head (host sync: for reports, not the hot path)."""
        return float(self.buffers.lengths.float().mean())

    def __repr__(self) -> str:
        return (
            f"LayerKVCache(policy={type(self.policy).__name__}, frames={self.committed_frames}, bound={self.bound}, "
            f"staged={self.staged_tokens}, shape=({self.batch}, {self.heads}, *, {self.head_dim}), "
            f"MiB={self.nbytes() / 2**20:.1f})"
        )


__all__ = ["STATE_FORMAT", "CacheView", "LayerKVCache", "LoadedState"]
