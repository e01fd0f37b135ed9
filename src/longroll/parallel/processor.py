"""The attention processor of one rank of a head-parallel run: its own caches, plans and policies for its
heads only, and the few cross-head decisions agreed over the group."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from longroll.cache.config import TempCachePolicy
from longroll.ops.probes import attention_recall
from longroll.ops.reference import expand_kv_heads
from longroll.parallel.group import HeadParallelGroup
from longroll.policies.cached import CachedProcessor, PassInfo
from longroll.policies.config import AttentionPolicy
from longroll.sparse.annca import AnnCA, AnnCAConfig, CollapsedPrompt


class GroupAnnCA(AnnCA):
    """:class:`~longroll.sparse.annca.AnnCA` of some heads whose per-prompt decision, whether selection pays
    (:meth:`worth_selecting`), is taken over all heads of the group: the hit density and recall are averaged
    over every rank's heads, so all ranks decide as one unsharded layer does.

    Args:
        config, head_dim, layer, head_ids, device: as for :class:`AnnCA`.
        group: the ranks that hold the layer's other heads.
    """

    def __init__(
        self,
        config: AnnCAConfig,
        *,
        head_dim: int,
        layer: int,
        head_ids: Sequence[int],
        device: torch.device | str,
        group: HeadParallelGroup,
    ) -> None:
        super().__init__(config, head_dim=head_dim, layer=layer, head_ids=head_ids, device=device)
        self.group = group

    def worth_selecting(self, q: torch.Tensor, prompt: CollapsedPrompt, *, tokens_per_frame: int) -> bool:
        """As :meth:`AnnCA.worth_selecting`, with both measures averaged over the heads of every rank (one
        all-reduce and one host sync; once per prompt and layer). q: (B, H_rank, F * tokens_per_frame, D)."""
        cfg = self.config
        if cfg.max_hit_density is None and cfg.min_recall is None:
            return True
        sel = self.select(q, prompt, tokens_per_frame=tokens_per_frame)
        heads = q.shape[1]
        # Per-rank means weighted by the rank's heads (every head has the same number of queries and frames).
        stats = torch.zeros(3, dtype=torch.float64, device=q.device)
        stats[2] = heads
        if cfg.max_hit_density is not None:
            valid = expand_kv_heads(prompt.valid, heads)[:, :, None, :]
            hit = ((sel.score > 0) & valid).sum(-1).double() / valid.sum(-1).clamp_min(1).double()
            stats[0] = hit.mean() * heads
        if cfg.min_recall is not None:
            stats[1] = attention_recall(q, prompt.k, sel.key_mask(tokens_per_frame), bias=prompt.bias) * heads
        density, recall, total = self.group.all_reduce(stats).tolist()
        if cfg.max_hit_density is not None and density / total > cfg.max_hit_density:
            return False
        return not (cfg.min_recall is not None and recall / total < cfg.min_recall)


class HeadParallelProcessor(CachedProcessor):
    """A :class:`~longroll.policies.cached.CachedProcessor` holding one rank's heads of every layer.

    Its caches, AnnSA plans and AnnCA searchers are those of an unsharded processor restricted to the heads
    ``group.head_ids(heads)`` (projections are seeded per global head id), so the rank's attention equals the
    matching heads of an unsharded run. Two decisions need the other heads and are agreed over the group: AnnCA's
    per-prompt gate (:class:`GroupAnnCA`), and a TempCache layer's slot bound (the longest head's length, which
    the sparse paths' block layout follows), taken as the maximum over the ranks at every pass (one small
    all-reduce and host sync per pass). ``state_dict`` / ``load_state_dict`` save and restore this rank's part (each
    rank saves its own file; a state of other heads is refused).

    Attributes:
        parallel: the :class:`HeadParallelGroup` (``group`` is the base class's cache group of grouped commits).

    Args:
        policy: the rollout's :class:`AttentionPolicy`.
        group: the ranks sharing the model.
        heads: heads of the *model* per layer (this rank holds its share of them).
        num_layers, batch, head_dim, tokens_per_frame, frames_per_chunk, dtype, device, and ``options``: as
            for :class:`CachedProcessor` (``head_ids`` is set here and may not be passed).
    """

    def __init__(
        self,
        policy: AttentionPolicy,
        *,
        group: HeadParallelGroup,
        num_layers: int,
        batch: int,
        heads: int,
        head_dim: int,
        tokens_per_frame: int,
        frames_per_chunk: int,
        dtype: torch.dtype,
        device: torch.device | str,
        **options: Any,
    ) -> None:
        if not isinstance(group, HeadParallelGroup):
            raise ValueError(f"group must be a HeadParallelGroup, got {type(group).__name__}")
        if "head_ids" in options:
            raise ValueError("head_ids is set by the group; do not pass it")
        ids = group.head_ids(heads)
        super().__init__(
            policy,
            num_layers=num_layers,
            batch=batch,
            heads=len(ids),
            head_dim=head_dim,
            tokens_per_frame=tokens_per_frame,
            frames_per_chunk=frames_per_chunk,
            dtype=dtype,
            device=device,
            head_ids=ids,
            **options,
        )
        self.parallel = group
        self.model_heads = heads
        ca = policy.annca
        if ca is not None:
            for i, lay in enumerate(self.layers):
                lay.annca = GroupAnnCA(ca, head_dim=head_dim, layer=i, head_ids=ids, device=device, group=group)

    def begin_pass(self, info: PassInfo) -> None:
        super().begin_pass(info)
        self._agree_bounds()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """As :meth:`CachedProcessor.load_state_dict` (this rank's state); then the TempCache slot bounds are
        agreed over the group (each rank saved its own longest head), and the AnnSA plans of the layers whose
        bound grew are rebuilt over the agreed range with their restored anchors. Every rank must call it."""
        super().load_state_dict(state)
        for i in self._agree_bounds():
            lay, plan = self.layers[i], self.layers[i].annsa_plan
            if lay.planner is not None and plan is not None:
                lay.plan(anchors=plan.anchors)  # the restored anchors (int8), or None (LSH: from the keys)

    def _agree_bounds(self) -> list[int]:
        """Raise every TempCache layer's slot bound to the longest head over the group (one all-reduce, one host
        sync); returns the layers whose bound grew. The unsharded cache's bound is its longest head: the
        block layout of the sparse paths follows it, so every rank must read the same slot range."""
        caches = [lay.cache for lay in self.layers]
        # Only between chunks (nothing staged): a bound moved under staged tokens would misplace them.
        if self.parallel.size == 1 or not isinstance(self.policy.cache, TempCachePolicy) or caches[0].staged_tokens:
            return []
        local = [c.settle_bound() for c in caches]
        agreed = torch.tensor(local, dtype=torch.int64, device=caches[0].device)
        self.parallel.all_reduce_max(agreed)
        grown = []
        for i, (cache, bound) in enumerate(zip(caches, agreed.tolist(), strict=True)):
            if bound != local[i]:
                cache.widen_bound(int(bound))
                grown.append(i)
        return grown

    @property
    def head_ids(self) -> tuple[int, ...]:
        """Global ids of the heads this rank holds."""
        return self.layers[0].cache.head_ids
