"""AnnCA: approximate-nearest-neighbour cross-attention to the prompt, per latent frame.

Two steps:

1. **Collapse identical prompt keys (exact).** Wan pads every prompt to 512 tokens whose keys are identical; a
   group of ``m`` identical keys equals one key with logit bias ``log m`` and the mean of the group's values
   (Lemma 5.1 of the TempCache paper). :func:`collapse_duplicates` does this per (batch, head) with a
   sort-based dedupe; it reads the group count back to the host once, so call it once per (prompt, layer) and
   cache the result.
2. **Keep, per latent frame, the prompt tokens near its queries.** Queries are grouped frame-major (frame f is
   query rows ``[f * P, (f + 1) * P)``, P = tokens per frame). LSH: a prompt token is kept for frame f when it
   shares a bucket, in any table, with at least one query of the frame (queries probe their Hamming-1
   neighbours when ``probes=1``). int8: a token is kept when it is among the ``topk`` tokens of at least one
   query of the frame by int8 score. A frame that keeps nothing falls back to the whole prompt (dense
   cross-attention for that frame): dropping every token would leave its softmax undefined.

Attention over the kept tokens (``mode``):

- ``"gather"`` (default): the kept tokens of each frame are packed, best-hit first, into a padded
  (B * F, H, W, D) tensor (padding gets a -inf bias) and attended with one ``attention`` call; its cost is
  F * P * W instead of F * P * M pairs. W is the largest kept count, read back to the host (one sync per
  call) unless ``max_kept`` fixes it; with ``max_kept`` the tokens past the cap are dropped by hit count, and
  a fallback frame keeps its first ``max_kept`` valid tokens only.
- ``"mask"``: every frame attends to the whole collapsed prompt with a per-frame bias of -inf on the dropped
  tokens. No sync and no gather, but the work of dense cross-attention over the collapsed prompt.

**When selection does not pay** (``max_hit_density``, ``min_recall``): a frame of Wan2.1 at 480p has 1,560
queries, and with 8 LSH bits they land in nearly every bucket, so nearly every prompt token is a hit (measured on
the H100 at 1.3B shapes: density ~0.99, selection + packed attention 1.2–1.5 ms against 0.05 ms for dense
cross-attention). With few queries per frame the opposite happens: the world model's 64 queries per frame hit
~22 % of the prompt but miss ~39 % of the attention mass.
:meth:`AnnCA.worth_selecting` measures the hit density and the kept attention mass (recall) of one call; the
caller (``CachedProcessor``) checks them once per prompt and layer and, when selection would not save time or
would drop too much mass, runs :meth:`AnnCA.dense` (exact attention over the collapsed prompt with its log-count
bias) for the rest of the prompt. The collapse itself is always kept: it is
exact and it is where the saving is for padded prompts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch

from longroll.ann.buckets import group_bucket_hits
from longroll.ann.config import AnnConfig, Int8Config, LSHConfig
from longroll.ann.int8 import int8_scores
from longroll.ann.lsh import SignLSH
from longroll.ops._checks import check_float, check_qkv, check_rank
from longroll.ops.attention import BACKENDS, Backend, attention
from longroll.ops.probes import attention_recall
from longroll.ops.reference import attention_ref, expand_kv_heads

_NEG = float("-inf")
logger = logging.getLogger(__name__)


def _default_ann() -> AnnConfig:
    return LSHConfig(bits=8, tables=1, probes=0)


@dataclass(frozen=True)
class AnnCAConfig:
    """Configuration of ANN cross-attention.

    Args:
        ann: :class:`LSHConfig` (bucket sharing) or :class:`Int8Config` (``topk`` tokens per query).
        mode: ``"gather"`` (pack kept tokens) or ``"mask"`` (bias the whole collapsed prompt); see the module
            docstring.
        max_kept: ``"gather"`` only: fixed pack width (no host sync); None packs to the largest kept count.
        backend: dense attention backend of the per-frame call (see :func:`longroll.ops.attention.attention`).
        max_hit_density: selection is used for a prompt and layer only while the fraction of valid collapsed
            tokens hit by a frame's queries (before ``max_kept``), averaged over frames and heads, stays at or
            below this; None always selects. See the module docstring.
        min_recall: ... and only while the selection keeps at least this share of the exact cross-attention
            mass on the measured call; None skips the check. Measured on the world model: LSH selection kept
            0.61 of the mass (7.6 dB lost against the ground truth), int8 top-4 0.93 (0.2 dB).
    """

    ann: AnnConfig = field(default_factory=_default_ann)
    mode: Literal["gather", "mask"] = "gather"
    max_kept: int | None = None
    backend: Backend = "auto"
    max_hit_density: float | None = 0.5
    min_recall: float | None = 0.9

    def __post_init__(self) -> None:
        if not isinstance(self.ann, LSHConfig | Int8Config):
            raise ValueError(f"ann must be an LSHConfig or Int8Config, got {type(self.ann).__name__}")
        if self.mode not in ("gather", "mask"):
            raise ValueError(f"mode must be 'gather' or 'mask', got {self.mode!r}")
        if self.max_kept is not None and (self.max_kept < 1 or self.mode != "gather"):
            raise ValueError(f"max_kept must be None or >= 1 with mode='gather', got {self.max_kept!r} ({self.mode})")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.max_hit_density is not None and not 0.0 <= self.max_hit_density <= 1.0:
            raise ValueError(f"max_hit_density must be None or in [0, 1], got {self.max_hit_density!r}")
        if self.min_recall is not None and not 0.0 <= self.min_recall <= 1.0:
            raise ValueError(f"min_recall must be None or in [0, 1], got {self.min_recall!r}")


@dataclass(frozen=True, eq=False)
class CollapsedPrompt:
    """Prompt keys and values with identical keys merged.

    Attributes:
        k: (B, Hk, M, D) one key per group (zeros on padding).
        v: (B, Hk, M, Dv) mean value of each group, in v's dtype.
        bias: (B, Hk, M) float32 log of the group size; -inf on padding (heads with fewer groups than M).
        source_len: tokens of the original prompt.
    """

    k: torch.Tensor
    v: torch.Tensor
    bias: torch.Tensor
    source_len: int

    @staticmethod
    def uncollapsed(k: torch.Tensor, v: torch.Tensor) -> CollapsedPrompt:
        """The prompt as is (every token its own group): k (B, Hk, M, D), v (B, Hk, M, Dv)."""
        check_qkv(k, k, v)
        return CollapsedPrompt(k, v, torch.zeros(k.shape[:3], device=k.device), k.shape[2])

    @property
    def valid(self) -> torch.Tensor:
        """(B, Hk, M) bool: True on real (non-padding) groups."""
        return self.bias > _NEG


def collapse_duplicates(k: torch.Tensor, v: torch.Tensor) -> CollapsedPrompt:
    """Merge rows of k that are exactly equal, per (batch, head): exact for attention.

    Rows are sorted by a float64 random projection, so equal rows become neighbours, and a group starts
    wherever a row differs from the previous one (exact comparison). A rare projection tie between different
    rows can only split a group, which stays exact. Reads the largest group count back to the host (one sync).

    Args:
        k: (B, Hk, M, D) prompt keys; v: (B, Hk, M, Dv) prompt values.

    Returns:
        :class:`CollapsedPrompt` of width max groups over (B, Hk).
    """
    check_qkv(k, k, v)
    b, h, m, d = k.shape
    dv = v.shape[-1]
    if m == 0:
        raise ValueError("k must hold at least one prompt token, got seqlen 0")
    g = torch.Generator().manual_seed(0x5EED)
    r = torch.randn(d, generator=g, dtype=torch.float64).to(k.device)
    order = torch.sort(k.double() @ r, dim=-1, stable=True).indices  # (B, H, M)
    ks = k.gather(2, order[..., None].expand_as(k))
    vs = v.gather(2, order[..., None].expand_as(v))
    new = torch.ones(b, h, m, dtype=torch.bool, device=k.device)
    new[..., 1:] = (ks[:, :, 1:] != ks[:, :, :-1]).any(-1)
    gid = new.long().cumsum(-1) - 1  # (B, H, M) group of each sorted row
    width = int(gid[..., -1].max()) + 1
    count = torch.zeros(b, h, width, device=k.device).scatter_add_(-1, gid, torch.ones(b, h, m, device=k.device))
    # float64 sums: a float32 running sum over hundreds of pad tokens drifts by ~count * eps.
    ct = torch.float64
    vsum = torch.zeros(b, h, width, dv, dtype=ct, device=k.device).scatter_add_(
        2, gid[..., None].expand(b, h, m, dv), vs.to(ct)
    )
    kout = torch.zeros(b, h, width, d, dtype=k.dtype, device=k.device).scatter_(
        2, gid[..., None].expand(b, h, m, d), ks
    )
    bias = torch.where(count > 0, torch.log(count.clamp_min(1.0)), _NEG)
    vmean = (vsum / count.clamp_min(1.0)[..., None].to(ct)).to(v.dtype)
    return CollapsedPrompt(kout, vmean, bias, m)


@dataclass(frozen=True, eq=False)
class AnnCASelection:
    """The prompt tokens each latent frame attends to.

    Attributes:
        keep: (B, H, F, M) bool kept collapsed tokens per frame (fallback and ``max_kept`` applied).
        score: (B, H, F, M) float32 hits per token (bucket-sharing weight, or queries ranking it top-k).
        fallback: (B, H, F) bool, frames that kept nothing and attend the whole prompt.
        kept: (B, H, F) int64 kept tokens per frame.
        density: (B, H) float32 mean over frames of kept / valid collapsed tokens.
    """

    keep: torch.Tensor
    score: torch.Tensor
    fallback: torch.Tensor
    kept: torch.Tensor
    density: torch.Tensor

    def key_mask(self, tokens_per_frame: int) -> torch.Tensor:
        """(B, H, F * tokens_per_frame, M) bool per-query mask (frame-major queries)."""
        return self.keep.repeat_interleave(tokens_per_frame, dim=2)


class AnnCAOutput(NamedTuple):
    """out: (B, H, Lq, Dv) in q's dtype; selection: the per-frame kept tokens."""

    out: torch.Tensor
    selection: AnnCASelection


class AnnCA:
    """ANN cross-attention for one layer and a set of (global) heads.

    Args:
        config: :class:`AnnCAConfig`.
        head_dim: dimension of queries and keys.
        layer: layer id (seeds the LSH projections).
        head_ids: global ids of the kv heads served (a shard hashes exactly like the unsharded model).
        device: where the projections live.
    """

    def __init__(
        self,
        config: AnnCAConfig,
        *,
        head_dim: int,
        layer: int,
        head_ids: Sequence[int],
        device: torch.device | str = "cpu",
    ) -> None:
        if not isinstance(config, AnnCAConfig):
            raise ValueError(f"config must be an AnnCAConfig, got {type(config).__name__}")
        self.config = config
        self.searcher: SignLSH | None = None
        if isinstance(config.ann, LSHConfig):
            self.searcher = SignLSH(config.ann, head_dim, layer=layer, head_ids=head_ids, device=device)

    def select(self, q: torch.Tensor, prompt: CollapsedPrompt, *, tokens_per_frame: int) -> AnnCASelection:
        """Per-frame kept prompt tokens (no host sync).

        Args:
            q: (B, H, F * tokens_per_frame, D) frame-major queries.
            prompt: collapsed prompt, its kv heads Hk dividing H.
            tokens_per_frame: P, query tokens of one latent frame.
        """
        b, h, lq, d = q.shape
        nf = self._check(q, prompt, tokens_per_frame)
        hk, m = prompt.k.shape[1], prompt.k.shape[2]
        valid = expand_kv_heads(prompt.valid, h)[:, :, None, :]  # (B, H, 1, M)
        if self.searcher is not None:
            lsh = self.searcher.config
            qc = self.searcher.codes(q.reshape(b, hk, -1, d)).view(b, h, lq, lsh.tables)
            hits = group_bucket_hits(qc, lsh.bits, lsh.probes, tokens_per_frame)  # (B, H, F, T, nb)
            kc = expand_kv_heads(self.searcher.codes(prompt.k), h).transpose(-1, -2)  # (B, H, T, M)
            score = hits.gather(-1, kc[:, :, None].expand(b, h, nf, lsh.tables, m)).sum(3)
        else:
            assert isinstance(self.config.ann, Int8Config)
            s = int8_scores(q.reshape(b, hk, -1, d), prompt.k).view(b, h, lq, m)
            s = s.masked_fill(~expand_kv_heads(prompt.valid, h)[:, :, None, :], _NEG)
            top = s.topk(min(self.config.ann.topk, m), dim=-1)
            ones = torch.isfinite(top.values).float().view(b, h, nf, -1)
            score = torch.zeros(b, h, nf, m, device=q.device).scatter_add_(-1, top.indices.view(b, h, nf, -1), ones)
        keep = (score > 0) & valid
        fallback = ~keep.any(-1)
        keep = keep | (fallback[..., None] & valid)
        if self.config.max_kept is not None and self.config.max_kept < m:
            rank = _rank(keep, score)
            keep = keep & (rank < self.config.max_kept)
        kept = keep.sum(-1)
        density = (kept.float() / valid.sum(-1).clamp_min(1).float()).mean(-1)
        return AnnCASelection(keep, score, fallback, kept, density)

    def run(
        self, q: torch.Tensor, prompt: CollapsedPrompt, *, tokens_per_frame: int, scale: float | None = None
    ) -> AnnCAOutput:
        """Cross-attention of each frame's queries to its kept prompt tokens.

        Args:
            q: (B, H, F * tokens_per_frame, D) frame-major queries.
            prompt: :func:`collapse_duplicates` output.
            tokens_per_frame: P; scale: logit scale (1/sqrt(D)).

        Returns:
            :class:`AnnCAOutput` with out (B, H, Lq, Dv).
        """
        sel = self.select(q, prompt, tokens_per_frame=tokens_per_frame)
        if self.config.mode == "mask":
            out = _attend_masked(q, prompt, sel, scale, self.config.backend)
        else:
            m = prompt.k.shape[2]
            width = min(self.config.max_kept, m) if self.config.max_kept is not None else int(sel.kept.max())
            out = _attend_gathered(q, prompt, sel, max(width, 1), scale, self.config.backend)
        return AnnCAOutput(out, sel)

    def dense(self, q: torch.Tensor, prompt: CollapsedPrompt, *, scale: float | None = None) -> torch.Tensor:
        """Exact cross-attention of every query to the whole collapsed prompt (its log-count bias applied).

        q: (B, H, Lq, D) -> (B, H, Lq, Dv). Equal to dense cross-attention over the uncollapsed prompt.
        """
        check_qkv(q, prompt.k, prompt.v)
        if prompt.k.shape[2] == prompt.source_len:
            # Nothing collapsed: every bias is log 1 = 0, and plain SDPA is the fastest route.
            h = q.shape[1]
            k, v = expand_kv_heads(prompt.k, h), expand_kv_heads(prompt.v, h)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
        return attention(q, prompt.k, prompt.v, prompt.bias, scale=scale, backend=self.config.backend).out

    def worth_selecting(self, q: torch.Tensor, prompt: CollapsedPrompt, *, tokens_per_frame: int) -> bool:
        """Whether per-frame selection pays for this prompt: sparse enough to save time and accurate enough to
        keep the output (host syncs; call once per prompt and layer).

        q: (B, H, F * tokens_per_frame, D) frame-major queries of one call. True when the mean hit density is
        at most ``max_hit_density`` and the kept share of the exact attention mass at least ``min_recall``
        (each check skipped when None).
        """
        cfg = self.config
        if cfg.max_hit_density is None and cfg.min_recall is None:
            return True
        sel = self.select(q, prompt, tokens_per_frame=tokens_per_frame)
        if cfg.max_hit_density is not None:
            valid = expand_kv_heads(prompt.valid, q.shape[1])[:, :, None, :]
            hit = ((sel.score > 0) & valid).sum(-1).float() / valid.sum(-1).clamp_min(1).float()
            density = float(hit.mean())
            if density > cfg.max_hit_density:
                logger.debug("AnnCA: hit density %.3f > %.3f, attending the whole prompt", density, cfg.max_hit_density)
                return False
        if cfg.min_recall is not None:
            recall = annca_recall(q, prompt, sel, tokens_per_frame=tokens_per_frame)
            if recall < cfg.min_recall:
                logger.debug("AnnCA: recall %.3f < %.3f, attending the whole prompt", recall, cfg.min_recall)
                return False
        return True

    def _check(self, q: torch.Tensor, prompt: CollapsedPrompt, tokens_per_frame: int) -> int:
        if not isinstance(prompt, CollapsedPrompt):
            raise ValueError(f"prompt must be a CollapsedPrompt (collapse_duplicates), got {type(prompt).__name__}")
        check_qkv(q, prompt.k, prompt.v)
        check_rank("prompt.bias", prompt.bias, 3)
        check_float("prompt.bias", prompt.bias)
        if prompt.bias.shape != prompt.k.shape[:3]:
            raise ValueError(f"prompt.bias must have shape {tuple(prompt.k.shape[:3])}, got {tuple(prompt.bias.shape)}")
        if prompt.k.shape[2] == 0:
            raise ValueError("prompt must hold at least one token, got seqlen 0")
        lq = q.shape[2]
        if tokens_per_frame < 1 or lq % tokens_per_frame:
            raise ValueError(f"tokens_per_frame must be >= 1 and divide seqlen_q={lq}, got {tokens_per_frame}")
        if self.searcher is not None and prompt.k.shape[1] != len(self.searcher.head_ids):
            raise ValueError(
                f"prompt.k has {prompt.k.shape[1]} heads but this AnnCA serves {len(self.searcher.head_ids)}"
            )
        return lq // tokens_per_frame


def _rank(keep: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """(B, H, F, M) int64 position of each token when kept ones are listed by hits, highest first (stable)."""
    order = torch.sort(torch.where(keep, -score, float("inf")), dim=-1, stable=True).indices
    pos = torch.arange(keep.shape[-1], device=keep.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, pos)


def _frames_first(x: torch.Tensor, nf: int) -> torch.Tensor:
    """(B, H, F * P, D) -> (B * F, H, P, D)."""
    b, h, lq, d = x.shape
    return x.view(b, h, nf, lq // nf, d).transpose(1, 2).reshape(b * nf, h, lq // nf, d)


def _frames_back(x: torch.Tensor, b: int) -> torch.Tensor:
    """(B * F, H, P, D) -> (B, H, F * P, D)."""
    bf, h, p, d = x.shape
    return x.view(b, bf // b, h, p, d).transpose(1, 2).reshape(b, h, (bf // b) * p, d)


def _attend_gathered(
    q: torch.Tensor,
    prompt: CollapsedPrompt,
    sel: AnnCASelection,
    width: int,
    scale: float | None,
    backend: Backend,
) -> torch.Tensor:
    b, h, _, d = q.shape
    nf = sel.keep.shape[2]
    dv = prompt.v.shape[-1]
    idx = torch.sort(torch.where(sel.keep, -sel.score, float("inf")), dim=-1, stable=True).indices[..., :width]
    ok = torch.arange(idx.shape[-1], device=q.device) < sel.kept[..., None]  # (B, H, F, W)
    k = expand_kv_heads(prompt.k, h)[:, :, None].expand(b, h, nf, -1, d)
    v = expand_kv_heads(prompt.v, h)[:, :, None].expand(b, h, nf, -1, dv)
    kg = k.gather(3, idx[..., None].expand(*idx.shape, d)).transpose(1, 2).reshape(b * nf, h, -1, d)
    vg = v.gather(3, idx[..., None].expand(*idx.shape, dv)).transpose(1, 2).reshape(b * nf, h, -1, dv)
    bias = expand_kv_heads(prompt.bias, h)[:, :, None].expand(b, h, nf, -1).gather(3, idx)
    bias = torch.where(ok, bias, _NEG).transpose(1, 2).reshape(b * nf, h, -1)
    out = attention(_frames_first(q, nf), kg, vg, bias, scale=scale, backend=backend).out
    return _frames_back(out, b)


def _attend_masked(
    q: torch.Tensor, prompt: CollapsedPrompt, sel: AnnCASelection, scale: float | None, backend: Backend
) -> torch.Tensor:
    b, h, _, d = q.shape
    nf, m = sel.keep.shape[2], sel.keep.shape[3]
    dv = prompt.v.shape[-1]
    k = expand_kv_heads(prompt.k, h)[:, None].expand(b, nf, h, m, d).reshape(b * nf, h, m, d)
    v = expand_kv_heads(prompt.v, h)[:, None].expand(b, nf, h, m, dv).reshape(b * nf, h, m, dv)
    bias = torch.where(sel.keep, expand_kv_heads(prompt.bias, h)[:, :, None], _NEG)
    out = attention(
        _frames_first(q, nf), k, v, bias.transpose(1, 2).reshape(b * nf, h, m), scale=scale, backend=backend
    ).out
    return _frames_back(out, b)


def annca_reference(
    q: torch.Tensor,
    prompt: CollapsedPrompt,
    selection: AnnCASelection,
    *,
    tokens_per_frame: int,
    upcast: bool = True,
) -> torch.Tensor:
    """``attention_ref`` over the collapsed prompt with the selection as a dense key mask: (B, H, Lq, Dv)."""
    mask = selection.key_mask(tokens_per_frame)
    return attention_ref(q, prompt.k, prompt.v, prompt.bias, upcast=upcast, key_mask=mask)[0]


def annca_recall(
    q: torch.Tensor, prompt: CollapsedPrompt, selection: AnnCASelection, *, tokens_per_frame: int
) -> float:
    """Mean exact attention mass on the kept prompt tokens (host sync; for probes). q: (B, H, Lq, D)."""
    return attention_recall(q, prompt.k, selection.key_mask(tokens_per_frame), bias=prompt.bias)


__all__ = [
    "AnnCA",
    "AnnCAConfig",
    "AnnCAOutput",
    "AnnCASelection",
    "CollapsedPrompt",
    "annca_recall",
    "annca_reference",
    "collapse_duplicates",
]
