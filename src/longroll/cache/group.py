"""The TempCache caches of a model's layers over one stacked storage, committed by one batched call.

Every layer commits the same chunk at the same slots with the same host-side decisions (frames, sinks, cap,
ring), and the commit is vectorised over (batch, heads). Stacking the layers along the batch axis therefore
turns one commit per layer (a few hundred small kernels each, launch-bound even inside a CUDA graph: 2.9 ms
per layer at Wan2.1-1.3B shapes on an H200) into one commit for the model, whose kernels each do the work of
every layer. Each layer keeps its own :class:`~longroll.cache.kv_cache.LayerKVCache` (views of its rows of the
storage) for staging, attention, planning and its state dict; heads and layers stay independent (each layer
hashes with its own projections).
"""

from __future__ import annotations

import torch

from longroll.ann import Searcher, SignLSH, StackedSignLSH, make_searcher
from longroll.cache.config import CacheConfig, TempCachePolicy
from longroll.cache.graphs import StaticInputs
from longroll.cache.kv_cache import LayerKVCache
from longroll.cache.tempcache import Track


class CacheGroup:
    """TempCache caches of ``layers`` layers sharing one stacked storage and one batched commit.

    Life cycle per chunk: :meth:`begin` (before the chunk's first stage: one common host bound for every
    layer), then per pass and layer ``caches[l].stage(...)`` and attention over ``caches[l].view()``; on the
    commit pass :meth:`stage_match` hands each layer's matching keys over, and :meth:`commit` commits every
    layer at once after the last layer has staged.

    Args:
        config: geometry and a :class:`TempCachePolicy`.
        layers: number of layers (caches ``layer = 0 .. layers - 1``).
        batch, heads, head_dim, v_dim, dtype, device, head_ids: as for :class:`LayerKVCache`.
        graph_inputs: static input buffers of captured calls (shared with other captured calls).
        first_layer: model index of the group's first layer (a model's layers may form several groups of
            consecutive layers): cache ``i`` is layer ``first_layer + i`` and hashes with its projections.
    """

    def __init__(
        self,
        config: CacheConfig,
        *,
        layers: int,
        batch: int,
        heads: int,
        head_dim: int,
        v_dim: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        head_ids: tuple[int, ...] | None = None,
        graph_inputs: StaticInputs | None = None,
        first_layer: int = 0,
    ) -> None:
        if not isinstance(config.policy, TempCachePolicy):
            raise ValueError(f"config.policy must be a TempCachePolicy, got {type(config.policy).__name__}")
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        if not isinstance(first_layer, int) or isinstance(first_layer, bool) or first_layer < 0:
            raise ValueError(f"first_layer must be an int >= 0, got {first_layer!r}")
        ids = tuple(range(heads)) if head_ids is None else tuple(head_ids)
        dev = torch.empty(0, device=device).device
        self.layers, self.batch, self.first_layer = layers, batch, first_layer
        self.graph_inputs = graph_inputs if graph_inputs is not None else StaticInputs()
        own = [
            make_searcher(config.policy.ann, head_dim, layer=first_layer + i, head_ids=ids, device=dev)
            for i in range(layers)
        ]
        stacked: Searcher = (
            StackedSignLSH([s for s in own if isinstance(s, SignLSH)], batch) if isinstance(own[0], SignLSH) else own[0]
        )
        #: The whole model's cache as one cache of batch ``layers * batch`` (commits only).
        self.stacked = LayerKVCache(
            config, batch=layers * batch, heads=heads, head_dim=head_dim, v_dim=v_dim, dtype=dtype, device=dev,
            head_ids=ids, graph_inputs=self.graph_inputs, searcher=stacked,
        )  # fmt: skip
        st = self.stacked
        st.match_in_place = True
        self.caches = []
        for i in range(layers):
            rows = (i * batch, (i + 1) * batch)
            storage = (st.buffers.rows(*rows), None if st.recent is None else st.recent.rows(*rows))
            cache = LayerKVCache(
                config, batch=batch, heads=heads, head_dim=head_dim, v_dim=v_dim, dtype=dtype, device=dev,
                layer=first_layer + i, head_ids=ids, graph_inputs=self.graph_inputs, searcher=own[i], storage=storage,
            )  # fmt: skip
            self.caches.append(cache)
        # The captured commit's own static input: the staged matching keys land where it reads them. Private to
        # the group: the layers of the next group stage theirs while this group's commit may still read these.
        shape = (layers * batch, heads, config.chunk_tokens, head_dim)
        self._k_match = torch.empty(shape, dtype=dtype, device=dev)
        self._loads = [0] * layers

    # ----------------------------------------------------------------- per chunk
    def begin(self) -> None:
        """Before a chunk's first stage: one host bound for every layer (the exact one of the last commit when
        its non-blocking read-back has landed, else the upper bound), so that every layer stages its chunk at
        the same slots. A layer loaded since the last commit drops that read-back (it predates the load)."""
        st = self.stacked
        loaded = [c.loads for c in self.caches] != self._loads
        if loaded:
            st._pending_len = None
        else:
            st._refresh_bound()
            for c in self.caches:
                c.bound = st.bound
        common = max(c.bound for c in self.caches)
        for c in self.caches:
            c.bound = common
            c._pending_len = None

    def stage_match(self, layer: int, k_match: torch.Tensor) -> None:
        """Keep the matching keys of the group's cache ``layer`` (model layer ``first_layer + layer``) of the
        commit pass, (batch, heads, n, head_dim), for :meth:`commit` (after that layer's stage of the same
        pass)."""
        c = self.caches[layer]
        n = c.staged_tokens
        if n == 0 or k_match.shape != (c.batch, c.heads, n, c.head_dim):
            raise ValueError(
                f"k_match must have shape {(c.batch, c.heads, n, c.head_dim)} (stage the layer first), got "
                f"{tuple(k_match.shape)}"
            )
        rows = slice(layer * self.batch, (layer + 1) * self.batch)
        self._k_match[rows, :, :n].copy_(k_match)

    def commit(self) -> None:
        """Commit every layer's staged chunk at once (after every layer staged the commit pass and
        :meth:`stage_match` received its matching keys)."""
        cs, st, b = self.caches, self.stacked, self.batch
        n, bound, frames = cs[0].staged_tokens, cs[0].bound, cs[0].committed_frames
        if n == 0 or any((c.staged_tokens, c.bound, c.committed_frames) != (n, bound, frames) for c in cs):
            raise RuntimeError(
                "the layers of a cache group must commit the same staged chunk at the same bound and frame, got "
                f"{[(c.staged_tokens, c.bound, c.committed_frames) for c in cs]} (call begin() before staging)"
            )
        if len({c.track is None for c in cs}) != 1:
            raise RuntimeError("the layers of a cache group must all have a track or none")
        st.committed_frames, st.bound, st.staged_tokens = frames, bound, n
        st._k_match = self._k_match[:, :, :n]
        st._pending_len = None
        if cs[0].track is None:
            st.track = None
        else:
            arena = self.graph_inputs
            parts = {name: [getattr(c.track, name) for c in cs] for name in ("slots", "keys", "active")}
            stacked = {}
            for name, xs in parts.items():
                # Straight into the captured commit's static inputs (no second copy before a replay).
                shape = (self.layers * b, *xs[0].shape[1:])
                buf = arena.buffer(f"track_{name}", shape, xs[0].dtype, xs[0].device)
                stacked[name] = torch.cat(xs, dim=0, out=buf)
            st.track = Track(stacked["slots"], stacked["keys"], stacked["active"])
        st.commit()
        for i, c in enumerate(cs):
            rows = slice(i * b, (i + 1) * b)
            t = st.track
            c.track = None if t is None else Track(t.slots[rows], t.keys[rows], t.active[rows])
            c.committed_frames, c.bound, c.staged_tokens = st.committed_frames, st.bound, 0
            c._bias, c._pending_len = None, None
        self._loads = [c.loads for c in cs]


__all__ = ["CacheGroup"]
