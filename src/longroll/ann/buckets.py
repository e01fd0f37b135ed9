"""Bucketing on top of the ANN searchers, for block-sparse attention: all on device, no host round trips.

Two families, matching :mod:`longroll.ann.config`:

- **Sign LSH.** Keys are bucket-sorted by their table-0 code (a stable sort, invalid keys last), so each
  bucket is one contiguous range given by per-bucket offsets. Queries are cut in groups (query blocks, or
  latent frames) and each group collects the buckets its members land in: every table, plus the ``bits``
  Hamming-1 neighbours of each code when ``probes=1`` (multi-probe). A group's bucket hits are then turned
  into key-block scores by offset arithmetic on the sorted table (:func:`bucket_block_scores`) or, where
  buckets are not contiguous (other tables, unsorted ranges), through the code of each key block's mean key
  (:func:`block_hits`): at 128 keys a block holds keys of nearly every bucket of an independent table, so
  per-key presence would select every block.
- **int8.** No codes, so a key order comes from the nearest of a strided sample of "anchor" keys by int8 score
  (:func:`nearest_anchor`, a zero-iteration k-means). Key blocks are summarised by their mean key
  (:func:`block_means`) and each query group picks the top-k key blocks by the int8 score of its *mean query*
  against those centroids (:func:`int8_block_topk`). The mean query, rather than every query, keeps the cost
  at groups x blocks instead of queries x blocks; queries are sorted by anchor first, so a group's members are
  alike and its mean stands for them.

Hit weights are small integers held in float32 (own bucket 2, probed neighbour 1), so sums, differences and
cumulative sums are exact and a score of exactly 0 means "no hit".
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from longroll.ann.int8 import code_dots, quantize_int8
from longroll.ops._checks import check_rank

#: Weight of a query's own bucket and of a probed (Hamming-1) neighbour in bucket hits.
OWN_HIT, PROBE_HIT = 2.0, 1.0


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BucketLayout(NamedTuple):
    """A bucket-sorted order of vectors.

    order: (B, H, N) int64; sorted position i holds original vector ``order[..., i]``.
    sorted_codes: (B, H, N) int64 codes in sorted order; invalid vectors carry ``nbuckets`` and come last.
    offsets: (B, H, nbuckets + 1) int64; bucket b is sorted positions ``[offsets[b], offsets[b + 1])`` and
        ``offsets[nbuckets]`` is the number of valid vectors.
    """

    order: torch.Tensor
    sorted_codes: torch.Tensor
    offsets: torch.Tensor


def bucket_sort(codes: torch.Tensor, nbuckets: int, valid: torch.Tensor | None = None) -> BucketLayout:
    """Stable sort of vectors by bucket, invalid ones last, with per-bucket offsets.

    Args:
        codes: (B, H, N) int64 bucket ids in [0, nbuckets).
        nbuckets: number of buckets.
        valid: optional (B, H, N) bool; False entries (empty cache slots) sort after every bucket.

    Returns:
        :class:`BucketLayout`.
    """
    check_rank("codes", codes, 3)
    if nbuckets < 1:
        raise ValueError(f"nbuckets must be >= 1, got {nbuckets}")
    if valid is not None and valid.shape != codes.shape:
        raise ValueError(f"valid must have the shape of codes {tuple(codes.shape)}, got {tuple(valid.shape)}")
    key = codes.long() if valid is None else torch.where(valid, codes.long(), nbuckets)
    sorted_codes, order = torch.sort(key, dim=-1, stable=True)
    edges = torch.arange(nbuckets + 1, device=codes.device).expand(*codes.shape[:2], nbuckets + 1)
    # offsets[b] = number of codes < b: the first sorted position of bucket b.
    offsets = torch.searchsorted(sorted_codes.contiguous(), edges.contiguous(), right=False)
    return BucketLayout(order, sorted_codes, offsets)


def probe_codes(codes: torch.Tensor, bits: int, probes: int) -> torch.Tensor:
    """The buckets a lookup visits: the code itself, then its ``bits`` Hamming-1 neighbours when ``probes=1``.

    Args:
        codes: (...) int64 in [0, 2**bits).

    Returns:
        (..., 1 + probes * bits) int64.
    """
    if probes not in (0, 1):
        raise ValueError(f"probes must be 0 or 1, got {probes}")
    if probes == 0:
        return codes[..., None]
    flips = 2 ** torch.arange(bits, device=codes.device, dtype=torch.int64)
    return torch.cat([codes[..., None], torch.bitwise_xor(codes[..., None], flips)], dim=-1)


class GroupHits:
    """Bucket hits of consecutive groups of vectors (query blocks, latent frames), per table.

    The index arithmetic that does not depend on the codes is built once here, so a call costs four kernels
    (probe xor, offset add, zero fill, one scatter-add): this runs at every denoising step.

    Args:
        bits: bits per table (2**bits buckets).
        probes: 0 or 1 (Hamming radius of the lookup).
        group: vectors per group; group g is rows ``[g * group, (g + 1) * group)`` (the last may be partial).
        n: vectors per call; tables: hash tables per vector.
        device: where the calls run.
    """

    def __init__(self, bits: int, probes: int, group: int, n: int, tables: int, device: torch.device | str) -> None:
        if probes not in (0, 1):
            raise ValueError(f"probes must be 0 or 1, got {probes}")
        if group < 1:
            raise ValueError(f"group must be >= 1, got {group}")
        self.bits, self.group, self.n, self.tables = bits, group, n, tables
        self.nbuckets = 1 << bits
        self.groups = _cdiv(n, group)
        dev = torch.device(device)
        own = torch.zeros(1, dtype=torch.int64, device=dev)
        #: (NP,) xor masks: 0 for the own bucket, then one bit flip per probe.
        self.flips = torch.cat([own, 2 ** torch.arange(bits * probes, device=dev)]) if probes else own
        npr = self.flips.numel()
        # Flat target of (row i, table t): ((i // group) * tables + t) * nbuckets + code.
        rows = torch.arange(n, device=dev) // group
        self.base = ((rows[:, None] * tables + torch.arange(tables, device=dev)) * self.nbuckets)[..., None]
        weights = torch.full((npr,), PROBE_HIT, device=dev)
        weights[:1] = OWN_HIT
        self.weights = weights.repeat(n * tables)  # (N * T * NP,)

    def __call__(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: (B, H, N, tables) int64 -> (B, H, ceil(N / group), tables, 2**bits) float32 hit weights."""
        check_rank("codes", codes, 4)
        b, h, n, t = codes.shape
        if (n, t) != (self.n, self.tables):
            raise ValueError(f"codes must have shape (B, H, {self.n}, {self.tables}), got {tuple(codes.shape)}")
        idx = (torch.bitwise_xor(codes[..., None], self.flips) + self.base).view(b, h, -1)
        hits = torch.zeros(b, h, self.groups * t * self.nbuckets, device=codes.device)
        hits.scatter_add_(-1, idx, self.weights.expand(b, h, -1))
        return hits.view(b, h, self.groups, t, self.nbuckets)


def group_bucket_hits(codes: torch.Tensor, bits: int, probes: int, group: int) -> torch.Tensor:
    """Bucket hits of consecutive groups of vectors (query blocks, latent frames), per table.

    Args:
        codes: (B, H, N, tables) int64 LSH codes (e.g. of bucket-sorted queries).
        bits: bits per table (2**bits buckets).
        probes: 0 or 1 (Hamming radius of the lookup).
        group: vectors per group; group g is rows ``[g * group, (g + 1) * group)`` (the last may be partial).

    Returns:
        (B, H, ceil(N / group), tables, 2**bits) float32: summed weights, :data:`OWN_HIT` per member whose own
        code is the bucket and :data:`PROBE_HIT` per member that reaches it by a probe. Build a
        :class:`GroupHits` once to repeat this on same-shaped codes.
    """
    check_rank("codes", codes, 4)
    return GroupHits(bits, probes, group, codes.shape[2], codes.shape[3], codes.device)(codes)


def bucket_block_scores(
    hits: torch.Tensor, offsets: torch.Tensor, start: int, block_size: int, n_blocks: int
) -> torch.Tensor:
    """Key-block scores of bucket hits on a bucket-sorted key range, by offset arithmetic.

    Bucket b's keys sit at absolute positions ``[start + offsets[b], start + offsets[b + 1])``; it covers the
    key blocks from the block of its first key to the block of its last. A difference array over blocks adds
    each group's hit weight of b to that block range, so the cost is groups x (buckets + blocks): no key is
    touched.

    Args:
        hits: (B, H, G, nbuckets) float32 hit weights per group (one table).
        offsets: (B, H, nbuckets + 1) int64 bucket offsets relative to ``start`` (:class:`BucketLayout`).
        start: absolute position of the first sorted key.
        block_size: keys per block; block j is positions ``[j * block_size, (j + 1) * block_size)``.
        n_blocks: number of key blocks scored; blocks past it are dropped.

    Returns:
        (B, H, G, n_blocks) float32: summed hit weight of the buckets overlapping each block (0 = no hit).
    """
    b, h, g, nb = hits.shape
    if offsets.shape != (b, h, nb + 1):
        raise ValueError(
            f"offsets must have shape {(b, h, nb + 1)} to match hits {tuple(hits.shape)}, got {tuple(offsets.shape)}"
        )
    lo = start + offsets[..., :-1]
    hi = start + offsets[..., 1:]
    w = hits * (hi > lo).to(hits.dtype)[:, :, None, :]
    first = (lo // block_size).clamp(0, n_blocks)[:, :, None, :].expand(b, h, g, nb)
    past = ((hi - 1).clamp_min(0) // block_size + 1).clamp(0, n_blocks)[:, :, None, :].expand(b, h, g, nb)
    diff = torch.zeros(b, h, g, n_blocks + 1, device=hits.device, dtype=hits.dtype)
    diff.scatter_add_(-1, first, w)
    diff.scatter_add_(-1, past, -w)
    return diff.cumsum(-1)[..., :n_blocks]


def bucket_block_cover(offsets: torch.Tensor, start: int, block_size: int, n_blocks: int) -> torch.Tensor:
    """Which key blocks each bucket of a bucket-sorted key range overlaps, as a matrix.

    ``hits @ cover`` equals :func:`bucket_block_scores` in one matmul per step (groups x buckets x blocks),
    at the price of holding (B, H, nbuckets, n_blocks) floats; build it once per plan.

    Args:
        offsets: (B, H, nbuckets + 1) int64 offsets relative to ``start`` (:class:`BucketLayout`).
        start, block_size, n_blocks: as in :func:`bucket_block_scores`.

    Returns:
        (B, H, nbuckets, n_blocks) float32 of 0/1.
    """
    lo = start + offsets[..., :-1]
    hi = start + offsets[..., 1:]
    j = torch.arange(n_blocks, device=offsets.device)
    first = (lo // block_size)[..., None]
    past = ((hi - 1).clamp_min(0) // block_size + 1)[..., None]
    return ((j >= first) & (j < past) & (hi > lo)[..., None]).float()


def block_hits(hits: torch.Tensor, block_codes: torch.Tensor) -> torch.Tensor:
    """Key-block scores for blocks summarised by one code each (the code of their mean key).

    Used where keys are not bucket-contiguous (extra LSH tables, unsorted regions): a block counts as hit by a
    query group when its centroid's bucket is among the group's buckets. Cost: groups x blocks per table.

    Args:
        hits: (B, H, G, tables, nbuckets) group hit weights (:func:`group_bucket_hits`).
        block_codes: (B, H, n_blocks, tables) int64 centroid codes; ``nbuckets`` marks a block (or table) that
            must not score.

    Returns:
        (B, H, G, n_blocks) float32 summed over tables.
    """
    b, h, g, t, _ = hits.shape
    n = block_codes.shape[2]
    if block_codes.shape != (b, h, n, t):
        raise ValueError(f"block_codes must have shape {(b, h, n, t)} to match hits, got {tuple(block_codes.shape)}")
    padded = F.pad(hits, (0, 1))  # the spare bucket scores 0
    idx = block_codes.transpose(-1, -2)[:, :, None].expand(b, h, g, t, n)
    return padded.gather(-1, idx).sum(3)


def strided_sample(x: torch.Tensor, start: int, count: torch.Tensor, samples: int) -> torch.Tensor:
    """``samples`` vectors spread evenly over the valid range of each head.

    Args:
        x: (B, H, S, D); valid rows of head (b, h) are ``[start, start + count[b, h])``.
        count: (B, H) int64 valid rows per head (0 gives copies of row ``start``).
        samples: vectors drawn per head.

    Returns:
        (B, H, samples, D), rows ``start + floor((i + 1/2) * count / samples)``.
    """
    i = torch.arange(samples, device=x.device, dtype=torch.float64)
    pos = ((i + 0.5) * count[..., None].double() / samples).floor().long()
    pos = start + pos.clamp(min=0, max=x.shape[2] - 1 - start)
    return x.gather(2, pos[..., None].expand(*pos.shape, x.shape[-1]))


class Int8Codes(NamedTuple):
    """Symmetric int8 codes held in float32 (exact: |code| <= 127), for batched matmuls.

    codes: (..., D) float32 integer values; scale: (...) float32, x ~= codes * scale.
    """

    codes: torch.Tensor
    scale: torch.Tensor


def int8_encode(x: torch.Tensor) -> Int8Codes:
    """x: (..., D) -> :class:`Int8Codes` (the codes of :func:`longroll.ann.int8.quantize_int8`)."""
    codes, scale = quantize_int8(x)
    return Int8Codes(codes.float(), scale)


def int8_dot(a: Int8Codes, b: Int8Codes) -> torch.Tensor:
    """Int8 scores of (B, H, n, D) codes against (B, H, m, D) codes: (B, H, n, m) float32.

    Equal to :func:`longroll.ann.int8.int8_scores` on the same vectors: products of int8 values summed over
    D <= 1024 stay below 2**24, so one batched product (:func:`~longroll.ann.int8.code_dots`) is exact, without a
    per-head loop.
    """
    dots = code_dots(a.codes, b.codes)
    return dots * a.scale[..., :, None] * b.scale[..., None, :]


def _as_codes(x: torch.Tensor | Int8Codes) -> Int8Codes:
    return x if isinstance(x, Int8Codes) else int8_encode(x)


def nearest_anchor(x: torch.Tensor, anchors: torch.Tensor | Int8Codes, chunk: int = 32_768) -> torch.Tensor:
    """Index of the anchor with the largest int8 dot product, per vector (int8 bucketing).

    Args:
        x: (B, H, N, D); anchors: (B, H, C, D) vectors or their :class:`Int8Codes`, C >= 1.
        chunk: vectors scored at once (bounds the (B, H, chunk, C) score tile).

    Returns:
        (B, H, N) int64 in [0, C).
    """
    check_rank("x", x, 4)
    enc = _as_codes(anchors)
    check_rank("anchors", enc.codes, 4)
    if enc.codes.shape[2] == 0:
        raise ValueError("anchors must hold at least one vector, got 0")
    parts = [int8_dot(int8_encode(x[:, :, s : s + chunk]), enc).argmax(-1) for s in range(0, x.shape[2], chunk)]
    if not parts:
        return torch.zeros(*x.shape[:2], 0, dtype=torch.int64, device=x.device)
    return torch.cat(parts, dim=2)


def block_means(x: torch.Tensor, valid: torch.Tensor | None, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean vector of each block of consecutive rows, over its valid rows.

    Args:
        x: (B, H, N, D); block j is rows ``[j * block_size, (j + 1) * block_size)``, the last may be partial.
        valid: optional (B, H, N) bool.

    Returns:
        means: (B, H, ceil(N / block_size), D) float32 (zero for a block with no valid row);
        nonempty: (B, H, ceil(N / block_size)) bool.
    """
    check_rank("x", x, 4)
    b, h, n, d = x.shape
    nblk = _cdiv(n, block_size)
    w = torch.ones(b, h, n, device=x.device) if valid is None else valid.float()
    pad = nblk * block_size - n
    xs = F.pad(x.float() * w[..., None], (0, 0, 0, pad)).view(b, h, nblk, block_size, d).sum(3)
    cnt = F.pad(w, (0, pad)).view(b, h, nblk, block_size).sum(-1)
    return xs / cnt.clamp_min(1.0)[..., None], cnt > 0


def int8_block_topk(
    group_means: torch.Tensor, centroids: torch.Tensor | Int8Codes, allowed: torch.Tensor, k: int
) -> torch.Tensor:
    """Per query group, the ``k`` allowed key blocks whose centroid has the largest int8 score.

    Args:
        group_means: (B, H, G, D) mean query of each group.
        centroids: (B, H, n_blocks, D) mean key of each block, or its :class:`Int8Codes`.
        allowed: (B, H, n_blocks) bool; other blocks are never picked (empty or handled elsewhere).
        k: blocks per group (fewer when fewer are allowed).

    Returns:
        (B, H, G, n_blocks) bool selection.
    """
    enc = _as_codes(centroids)
    nblk = enc.codes.shape[2]
    sel = torch.zeros(*group_means.shape[:3], nblk, dtype=torch.bool, device=group_means.device)
    k = min(k, nblk)
    if k == 0:
        return sel
    s = int8_dot(int8_encode(group_means), enc).masked_fill(~allowed[:, :, None, :], float("-inf"))
    top = s.topk(k, dim=-1)
    return sel.scatter_(-1, top.indices, torch.isfinite(top.values))


__all__ = [
    "OWN_HIT",
    "PROBE_HIT",
    "BucketLayout",
    "GroupHits",
    "Int8Codes",
    "block_hits",
    "block_means",
    "bucket_block_cover",
    "bucket_block_scores",
    "bucket_sort",
    "group_bucket_hits",
    "int8_block_topk",
    "int8_dot",
    "int8_encode",
    "nearest_anchor",
    "probe_codes",
    "strided_sample",
]
