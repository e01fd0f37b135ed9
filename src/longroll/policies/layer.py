"""One attention layer's rollout state and its life cycle.

A :class:`LayerAttention` owns everything a layer keeps across a rollout: its KV cache, the AnnSA plan of its
last commit, AnnCA's collapsed prompt and the per-prompt decision whether selection pays, and its commits in
flight on a side stream. Each chunk runs one life cycle::

    for step in passes:                       # denoising steps, then the clean pass
        layer.stage(k, v, frame_start=f0, k_pre_rope=kp)  # the chunk's K/V; the history is read-only
        out = layer.attend(q, sparse=...)     # dense, AnnSA over the current plan, or a static mask
    layer.commit(q)                           # clean pass: the cache policy decides what stays, then
                                              # layer.plan(): AnnSA plans the cache (a value) and the
                                              # layer applies the plan to its cache

The :class:`~longroll.policies.cached.CachedProcessor` is the schedule (which pass, which layers run sparse)
over a list of these.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longroll.ann.buckets import Int8Codes
from longroll.cache.config import CacheConfig
from longroll.cache.graphs import StaticInputs
from longroll.cache.kv_cache import LayerKVCache, LoadedState
from longroll.ops.attention import attention, attention_union, lse_backend
from longroll.ops.block_index import BlockSparseIndex
from longroll.ops.block_sparse import block_sparse_attention
from longroll.ops.merge import merge_attention
from longroll.policies.config import AttentionPolicy
from longroll.policies.timing import ComponentTimer
from longroll.sparse.annca import AnnCA, CollapsedPrompt, collapse_duplicates
from longroll.sparse.annsa import AnnSAPlan, AnnSAPlanner, AnnSASelection

#: AnnCA's decision for one prompt: (fingerprint of the prompt's keys, whether selection pays).
Gate = tuple[tuple[float, float], bool]


def _fingerprint(k: torch.Tensor) -> tuple[float, float]:
    """Two float64 sums that tell prompts apart: k (B, Hk, M, D). One host sync."""
    x = k.double()
    w = torch.arange(1, x.shape[-2] + 1, dtype=torch.float64, device=x.device)[:, None]
    pair = torch.stack([x.sum(), (x * w).sum()]).tolist()
    return float(pair[0]), float(pair[1])


class CommitStream:
    """Where the layers of one processor run their commits: a CUDA side stream, or in line.

    On a side stream a commit's many small kernels overlap the rest of the commit pass and the next chunk's
    first layers: nothing reads a layer's committed history before the next chunk reaches that layer, which
    waits for that layer's commit only (the event :meth:`submit` returns); :meth:`join` waits for all of them
    (reports, state). Same kernels in the same order per cache either way, so results are identical.

    Args:
        device: the caches' device.
        overlap: use a side stream (only on CUDA devices; elsewhere commits run in line).
    """

    def __init__(self, device: torch.device | str, overlap: bool) -> None:
        dev = torch.empty(0, device=device).device
        self.stream = torch.cuda.Stream(dev) if overlap and dev.type == "cuda" else None
        self.pending = False

    def submit(self, work: Callable[[], None], keep: list[torch.Tensor]) -> torch.cuda.Event | None:
        """Run ``work`` after everything the current stream issued so far; the tensors of ``keep`` (made on the
        current stream) stay allocated until it is done. Returns the event that marks its end on the side
        stream (None when it ran in line)."""
        if self.stream is None:
            work()
            return None
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        for t in keep:
            t.record_stream(self.stream)
        with torch.cuda.stream(self.stream):
            work()
            done = torch.cuda.Event()
            done.record(self.stream)
        self.pending = True
        return done

    def join(self) -> None:
        """Make the current stream wait for the commits submitted so far (no host sync)."""
        if self.stream is not None and self.pending:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
            self.pending = False


@dataclass
class LoadedLayer:
    """A validated :meth:`LayerAttention.state_dict` (:meth:`LayerAttention.check_state`), ready to apply."""

    cache: LoadedState
    gate: Gate | None
    anchors: Int8Codes | None


class LayerAttention:
    """One attention layer of a rollout: its cache, AnnSA plan, AnnCA prompt and gate, and commits.

    Args:
        policy: the rollout's :class:`AttentionPolicy`.
        cache_config: geometry and commit policy of the layer's cache.
        layer: 0-based layer index (seeds the ANN projections).
        batch, heads, head_dim: K/V geometry (heads = the kv heads held by this process).
        dtype, device: cache storage.
        head_ids: global ids of the held heads (default ``range(heads)``).
        graph_inputs: static inputs shared with the other layers' captured calls.
        commits: where commits run, shared by the layers of a processor (default: in line).
        cache: the layer's cache when built elsewhere (its rows of a :class:`~longroll.cache.group.CacheGroup`);
            default: a cache of its own.
        timer: optional :class:`ComponentTimer` receiving ``attention``, ``ann_select``, ``cache_commit``,
            ``ann_plan`` and ``cross_attention`` spans.
    """

    def __init__(
        self,
        policy: AttentionPolicy,
        cache_config: CacheConfig,
        *,
        layer: int,
        batch: int,
        heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        head_ids: tuple[int, ...] | None = None,
        graph_inputs: StaticInputs | None = None,
        commits: CommitStream | None = None,
        cache: LayerKVCache | None = None,
        timer: ComponentTimer | None = None,
    ) -> None:
        if not isinstance(policy, AttentionPolicy):
            raise ValueError(f"policy must be an AttentionPolicy, got {type(policy).__name__}")
        if (
            not isinstance(cache_config, CacheConfig)
            or cache_config.policy != policy.cache
            or cache_config.host_tier != policy.host_tier
        ):
            got = getattr(cache_config, "policy", type(cache_config).__name__)
            raise ValueError(f"cache_config must be a CacheConfig of the policy's cache {policy.cache!r}, got {got!r}")
        self.policy = policy
        self.index = layer
        inputs = graph_inputs if graph_inputs is not None else StaticInputs()
        if cache is None:
            cache = LayerKVCache(
                cache_config, batch=batch, heads=heads, head_dim=head_dim, dtype=dtype, device=device, layer=layer,
                head_ids=head_ids, graph_inputs=inputs,
            )  # fmt: skip
        elif cache.config != cache_config or cache.layer != layer:
            raise ValueError(f"cache must be layer {layer}'s cache of cache_config, got layer {cache.layer}")
        self.cache = cache
        graphs = cache_config.commit_graphs
        self.planner = AnnSAPlanner(policy.annsa, graphs=graphs, graph_inputs=inputs) if policy.annsa else None
        self._plan: AnnSAPlan | None = None
        ids = self.cache.head_ids
        self.annca = (
            AnnCA(policy.annca, head_dim=head_dim, layer=layer, head_ids=ids, device=self.cache.device)
            if policy.annca
            else None
        )
        self._prompt: CollapsedPrompt | None = None
        # Measured once per prompt; kept across reset_prompt() and saved with the state, so that a resumed
        # rollout makes the decisions of the uninterrupted one.
        self._gate: Gate | None = None
        self._selecting: bool | None = None
        self.commits = commits if commits is not None else CommitStream(self.cache.device, overlap=False)
        # The end of this layer's commit still running on the side stream (None: nothing in flight).
        self._in_flight: torch.cuda.Event | None = None
        self.timer = timer

    # ------------------------------------------------------------------ what the layer holds
    @property
    def annsa_plan(self) -> AnnSAPlan | None:
        """The AnnSA plan of the last commit, applied to the cache (None before it, or without AnnSA)."""
        return self._plan

    @property
    def prompt(self) -> CollapsedPrompt | None:
        """AnnCA's collapsed prompt (None before the first cross-attention of a prompt)."""
        return self._prompt

    @property
    def gate(self) -> Gate | None:
        """AnnCA's last measured decision: (prompt fingerprint, whether selection pays), or None."""
        return self._gate

    @property
    def selecting(self) -> bool | None:
        """Whether AnnCA selection runs for the current prompt (None: not measured yet, or no AnnCA)."""
        return self._selecting

    def reset_prompt(self) -> None:
        """Forget the collapsed prompt (the gate stays: a prompt seen again is not measured again)."""
        self._prompt, self._selecting = None, None

    # ------------------------------------------------------------------ life cycle
    def stage(self, k: torch.Tensor, v: torch.Tensor, *, frame_start: int, k_pre_rope: torch.Tensor) -> None:
        """Write this pass's chunk: k (B, Hk, n, D) and k_pre_rope (B, Hk, n, D) keys, v (B, Hk, n, Dv).

        The current stream first waits for this layer's commit in flight (no host sync), so that the chunk is
        staged over, and attends, the committed history; other layers' commits may still run."""
        self.await_commit()
        self.cache.stage(k, v, frame_start=frame_start, k_match=k_pre_rope)

    def await_commit(self) -> None:
        """Make the current stream wait for this layer's commit in flight, if any (no host sync)."""
        done, self._in_flight = self._in_flight, None
        if done is not None:
            torch.cuda.current_stream(self.cache.device).wait_event(done)

    def committed_by(self, done: torch.cuda.Event | None) -> None:
        """Record that this layer's commit ends at ``done`` on the side stream (a group commit's event)."""
        self._in_flight = done

    def selection(self, q: torch.Tensor) -> AnnSASelection | None:
        """AnnSA's selection for queries q (B, H, Lq, D) over the staged cache (None without a plan)."""
        if self.planner is None or self._plan is None:
            return None
        return self.planner.select(q, self.cache.view(), self._plan, staged_tokens=self.cache.staged_tokens)

    def attend(self, q: torch.Tensor, *, sparse: bool, radial: BlockSparseIndex | None = None) -> torch.Tensor:
        """Self-attention of q (B, H, Lq, D) over [history ; staged chunk] -> (B, H, Lq, Dv).

        Args:
            sparse: the schedule lets this layer run sparse in this pass (AnnSA over the plan, or ``radial``).
            radial: the static mask of the chunk (policies with a radial config), shared by the layers.
        """
        view = self.cache.view()
        far = self.cache.retrieved()
        if sparse and self.planner is not None and self._plan is not None:
            with self._span("ann_select"):
                sel = self.planner.select(q, view, self._plan, staged_tokens=self.cache.staged_tokens)
            with self._span("attention"):
                res = self.planner.run(q, view, self._plan, staged_tokens=self.cache.staged_tokens, selection=sel)
                if far is None:
                    return res.out
                # The retrieved blocks were selected for this chunk already: all of them, densely, merged with
                # the sparse part by log-sum-exp (the two key sets are disjoint).
                assert res.lse is not None
                route = lse_backend(self.policy.attention_backend)
                back = attention(q, far.k, far.v, far.bias, backend=route, return_lse=True)
                assert back.lse is not None
                return merge_attention(res.out, res.lse, back.out, back.lse)[0]
        if sparse and radial is not None:
            with self._span("attention"):
                return block_sparse_attention(q, view.k, view.v, radial, view.bias).out
        with self._span("attention"):
            if far is None:
                return attention(q, *view, backend=self.policy.attention_backend).out
            # The host tier's blocks are disjoint from the cache: attention over the union of the two.
            parts = ((view.k, view.v, view.bias), (far.k, far.v, far.bias))
            return attention_union(q, parts, backend=self.policy.attention_backend)

    def commit(self, q: torch.Tensor, inputs: tuple[torch.Tensor, ...] = ()) -> None:
        """Commit the staged chunk (the cache policy decides what stays; ``q`` (B, H, n, D) scores importance
        for the budget policy), then :meth:`plan`; on the side stream when the layers overlap commits.

        Args:
            inputs: the pass's other tensors the staged chunk came from, kept allocated until the commit ends.
        """
        buf, track = self.cache.buffers, self.cache.track
        # Every current-stream tensor the side stream reads stays allocated until it is done: the inputs the
        # model frees after this layer, the track the commit replaces (made on the current stream after a state
        # load or a prefill), and the buffers themselves (should the layer be dropped with a commit pending).
        keep = [q, *inputs, buf.k, buf.v, buf.count, buf.frame, buf.lengths]
        if track is not None:
            keep += [track.slots, track.keys, track.active]
        self._in_flight = self.commits.submit(lambda: self._commit(q), keep)

    def _commit(self, q: torch.Tensor) -> None:
        with self._span("cache_commit"):
            self.cache.commit(queries=q)
        self.plan()

    def plan(self, anchors: Int8Codes | None = None) -> None:
        """Plan the committed cache with AnnSA and apply the plan to it (a no-op without AnnSA or history).

        The planner only reads the cache and returns a value; the layer puts the cache's slots in the plan's
        order (:meth:`AnnSAPlan.apply_to`) and keeps the plan for the next chunk's selections.

        Args:
            anchors: int8 family: the saved anchors of a restored state (see :meth:`AnnSAPlanner.plan`).
        """
        if self.planner is None or self.cache.committed_frames == 0:
            self._plan = None
            return
        with self._span("ann_plan"):
            plan = self.planner.plan(self.cache, anchors=anchors)
            plan.apply_to(self.cache)
        self._plan = plan

    def join(self) -> None:
        """Make the current stream wait for this layer's (and its siblings') commits in flight."""
        self.commits.join()
        self._in_flight = None

    # ------------------------------------------------------------------ cross-attention
    def cross_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, sparse: bool, tokens_per_frame: int
    ) -> torch.Tensor:
        """q (B, H, Lq, D) over the prompt k, v (B, H, M, D) -> (B, H, Lq, D), AnnCA-selected when ``sparse``."""
        ca = self.annca
        with self._span("cross_attention"):
            if ca is None or not sparse:
                return F.scaled_dot_product_attention(q, k, v)
            prompt = self._prompt
            if prompt is None or prompt.k.shape[0] != k.shape[0]:
                # Exact duplicate collapse (one host sync) once per prompt, not per step.
                prompt = self._prompt = collapse_duplicates(k, v)
                fp = _fingerprint(k)
                gate = self._gate
                self._selecting = gate[1] if gate is not None and gate[0] == fp else None
                if self._selecting is None:
                    # Keep selecting only where it measurably pays (host syncs, once per prompt).
                    self._selecting = ca.worth_selecting(q, prompt, tokens_per_frame=tokens_per_frame)
                    self._gate = (fp, self._selecting)
            if not self._selecting:
                return ca.dense(q, prompt)
            return ca.run(q, prompt, tokens_per_frame=tokens_per_frame).out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The layer's state: the cache's (:meth:`LayerKVCache.state_dict`), ``annca_gate`` (3,) float64
        (prompt fingerprint and decision) when measured, and the int8 plan's anchors (``annsa.anchor_codes``,
        ``annsa.anchor_scale``)."""
        self.join()
        state = self.cache.state_dict()
        if self._gate is not None:
            state["annca_gate"] = torch.tensor([*self._gate[0], float(self._gate[1])], dtype=torch.float64)
        if self._plan is not None:
            state |= {f"annsa.{k}": v for k, v in self._plan.state_dict().items()}
        return state

    def check_state(self, state: Mapping[str, torch.Tensor]) -> LoadedLayer:
        """Validate :meth:`state_dict` output against this layer, changing nothing (ValueError naming the
        first problem)."""
        cache: dict[str, torch.Tensor] = {}
        annsa: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if key.startswith("annsa."):
                annsa[key[len("annsa.") :]] = value
            elif key != "annca_gate":
                cache[key] = value
        loaded = self.cache.check_state(cache)
        gate = self._check_gate(state.get("annca_gate"))
        anchors = None
        if self.planner is None:
            if annsa:
                raise ValueError(f"state has AnnSA plan entries {sorted(annsa)}, this policy has none")
        elif loaded.committed_frames > 0:
            anchors = self.planner.check_state(self.cache, annsa)
        elif annsa:
            raise ValueError("state has AnnSA plan entries for a cache with no committed frame")
        return LoadedLayer(loaded, gate, anchors)

    def load_state(self, loaded: LoadedLayer) -> None:
        """Apply a :meth:`check_state` result: restore the cache and the gate, forget the prompt, and plan the
        restored cache with the saved anchors (int8) or its keys (LSH), which gives the plan it was saved with."""
        self.join()
        self.cache.load_state_dict(loaded.cache)
        self._gate = loaded.gate
        self.reset_prompt()
        self.plan(loaded.anchors)

    def _check_gate(self, gate: torch.Tensor | None) -> Gate | None:
        if gate is None:
            return None
        if self.annca is None:
            raise ValueError("state has an annca_gate, this policy has no AnnCA")
        if not isinstance(gate, torch.Tensor) or gate.dtype != torch.float64 or tuple(gate.shape) != (3,):
            raise ValueError("annca_gate must be a (3,) float64 tensor")
        a, b, decision = (float(x) for x in gate.tolist())
        if not (math.isfinite(a) and math.isfinite(b)) or decision not in (0.0, 1.0):
            raise ValueError(f"annca_gate must hold a finite fingerprint and a 0/1 decision, got {[a, b, decision]}")
        return (a, b), bool(decision)

    def _span(self, name: str) -> AbstractContextManager[None]:
        return nullcontext() if self.timer is None else self.timer.span(name)

    def __repr__(self) -> str:
        parts = [f"layer={self.index}", f"cache={self.cache!r}"]
        if self.planner is not None:
            parts.append(f"planned={self._plan is not None}")
        if self.annca is not None:
            parts.append(f"annca_selecting={self._selecting}")
        return f"LayerAttention({', '.join(parts)})"


__all__ = ["CommitStream", "LayerAttention", "LoadedLayer"]
