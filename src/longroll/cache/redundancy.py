"""Eviction by redundancy: free a capped cache's slots by merging near-duplicate old entries into one another.

When a TempCache commit needs slots at its cap, an old entry whose stored key is almost the same as another
old entry's carries little that the other does not: merging the two (count-weighted mean value, counts add,
the newer entry's key and frame stamp kept) frees a slot and changes attention only by the difference of the
two keys (nothing at all for identical keys: the merged entry's ``log(count)`` bias restores their weight).
Age eviction instead drops whole old places, which a world model revisiting them needs.

Finding each entry's nearest neighbour among all N entries is quadratic in the cap. Here the search is
linear-ish and reads the keys once: each stored key gets a signature of ``TABLES * BITS`` sign-LSH bits
(SimHash: two keys agree on a bit with probability ``1 - angle / pi``); sorting the unprotected entries by each
table's ``BITS``-bit code puts keys on the same side of many hyperplanes next to each other, and each entry's
candidates are its two neighbours in each sorted order, scored by how many of the ``TABLES * BITS`` signature
bits they share (8 bytes compared per pair, not the keys). The merges are ranked by that agreement and
accepted only where the exact cosine of the two stored keys reaches the threshold (computed for the chosen
pairs alone). Cost per committed frame: one pass over the keys for the signatures, T sorts of N codes and
O(T * N) byte compares, plus O(P * head_dim) for the exact check; no host synchronisation, static shapes (it
runs inside a captured commit). The hyperplanes are a fixed integer hash (computed on the device, identical on
every device and run), so no state is added and a resumed cache plans exactly the same merges.

Pairing rule (the one :func:`plan_merges` vectorises and :func:`plan_merges_reference` spells out):

1. each unprotected entry ``i`` proposes the edge ``{i, nn_i}`` to its best candidate ``nn_i`` (most
   signature bits shared, first candidate on ties) when the bits shared reach :func:`min_agreement` of the
   threshold (the agreement expected of two keys at exactly that cosine);
2. of an edge's two entries the older one (lower eviction priority, lower slot on ties) is merged away into
   the newer one, the survivor: TempCache's representative is always the newest key of a group, and its
   frame stamp the newest member's, which keeps age eviction and temporal RoPE phases consistent;
3. an entry is merged away by at most one edge (its most similar, lowest proposer on ties), and an entry that
   could be merged away never absorbs (so no merge lands on a slot that is reused); survivors may absorb
   several entries;
4. the remaining edges free slots in order of agreement (lowest slot on ties), as many as the frame needs and
   no more than leave the age fallback enough unprotected entries (each merge uses two of them, an eviction
   one);
5. of those, a merge happens only where the exact cosine of the two stored keys is at least the threshold
   (the estimate only ranks); the accepted merges keep their order, and age eviction covers the rest.

The functions below are the rule in torch ops; :func:`victims` runs it as the fused Triton kernels of
:mod:`longroll.ops.redundancy` on CUDA (``backend="auto"``), with these ops as their reference twin. Eviction
priorities are int64 age keys (:func:`longroll.ops.redundancy.age_keys`): oldest frame, then smallest count, then
lowest slot, so that no two entries tie and both paths choose the same victims.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longroll.cache.buffers import CacheBuffers
from longroll.ops.neighbours import SIGNATURE_BITS, sorted_neighbours
from longroll.ops.redundancy import PROTECTED, AgeOrder, PlanBackend, age_keys, fused_supported, fused_victims

#: Sign-LSH tables (sorted orders) and bits per table. Adjacent entries of a sorted order share a long code
#: prefix; further tables rescue pairs split by a table's leading bits. Measured on clustered random keys
#: (head_dim 64, 900 entries, every entry's exact nearest neighbour at cosine >= 0.5): the share of entries that
#: find a candidate at >= 0.5 is 0.46 / 0.64 / 0.87 / 0.97 / 0.99 with 1x8 / 1x16 / 2x16 / 4x16 / 6x16
#: tables x bits (0.90 with 4x8, 0.97 with 4x12) at a moderate spread, 0.89 with 4x16 at a wide one.
TABLES = 4
BITS = 16
assert TABLES * BITS == SIGNATURE_BITS, "a signature is one int64"

_NEG = float("-inf")
_M32 = 1 << 32


def hash_signs(head_dim: int, device: torch.device) -> torch.Tensor:
    """(head_dim, TABLES * BITS) float32 +-1 hyperplanes from a fixed integer hash (no RNG, no state: the same
    on every device, inside a captured CUDA graph too; products stay below 2**63)."""
    x = (torch.arange(head_dim * TABLES * BITS, device=device, dtype=torch.int64) + 1) * 2_654_435_761 % _M32
    for _ in range(2):
        x = x ^ (x >> 16)
        x = x * 73_244_475 % _M32
    x = x ^ (x >> 16)
    return torch.where((x & 1) == 1, 1.0, -1.0).reshape(head_dim, TABLES * BITS)


def min_agreement(threshold: float) -> float:
    """Signature bits (of ``TABLES * BITS``) two keys at cosine ``threshold`` share in expectation."""
    return TABLES * BITS * (1.0 - math.acos(min(1.0, max(-1.0, threshold))) / math.pi)


def _packing(device: torch.device) -> torch.Tensor:
    """(TABLES * BITS, TABLES + TABLES * BITS / 8) float32: signature bits -> each table's code, then the bytes.

    One matmul packs both (sums of distinct powers of two below 2**16: exact in float32)."""
    nbits = TABLES * BITS
    w = torch.zeros(nbits, TABLES + nbits // 8, device=device)
    r = torch.arange(nbits, device=device)
    w[r, r // BITS] = (2.0 ** (r % BITS)).float()
    w[r, TABLES + r // 8] = (2.0 ** (r % 8)).float()
    return w


@dataclass(frozen=True)
class SignatureConstants:
    """The signature hash's constant tensors for one head dim, key dtype and device.

    Made once per cache, outside any captured commit (each search would otherwise rebuild them: some thirty
    small kernels per committed frame). Fields: ``signs`` (head_dim, TABLES * BITS) +-1 hyperplanes in the keys'
    dtype (:func:`hash_signs`); ``packing`` (TABLES * BITS, TABLES + TABLES * BITS / 8) float32 (:func:`_packing`);
    ``shifts`` (TABLES * BITS / 8,) int64 bit offsets of the signature's bytes.
    """

    signs: torch.Tensor
    packing: torch.Tensor
    shifts: torch.Tensor

    @classmethod
    def build(cls, head_dim: int, dtype: torch.dtype, device: torch.device) -> SignatureConstants:
        return cls(
            signs=hash_signs(head_dim, device).to(dtype),
            packing=_packing(device),
            shifts=8 * torch.arange(TABLES * BITS // 8, device=device),
        )

    def check(self, keys: torch.Tensor) -> None:
        """Raise ValueError unless these constants serve ``keys`` (B, H, N, D)."""
        want = (keys.shape[-1], keys.dtype, keys.device)
        have = (self.signs.shape[0], self.signs.dtype, self.signs.device)
        if have != want:
            raise ValueError(f"signature constants are for (head_dim, dtype, device) {have}, keys need {want}")


def _signatures(
    keys: torch.Tensor, protected: torch.Tensor, consts: SignatureConstants | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """keys: (B, H, N, D); protected: (B, H, N); consts: built for ``keys`` when not given.

    Returns bad (B, H, N) bool (protected, or a NaN key: its projections are NaN), codes (B, H, N, TABLES) int64,
    one ``BITS``-bit code per table, bad entries at ``2**BITS`` (sorted last), and the whole signature in one
    int64 per entry, (B, H, N) (bit ``j`` of byte ``k`` = signature bit ``8 k + j``)."""
    if consts is None:
        consts = SignatureConstants.build(keys.shape[-1], keys.dtype, keys.device)
    consts.check(keys)
    proj = keys @ consts.signs
    bad = protected | proj[..., 0].isnan()
    packed = ((proj > 0).float() @ consts.packing).long()
    codes = packed[..., :TABLES].masked_fill(bad[..., None], 1 << BITS)
    # Bytes at distinct offsets: the sum is their bitwise or (int64 wraps into the sign bit as intended).
    return bad, codes, (packed[..., TABLES:] << consts.shifts).sum(-1)


def pair_candidates(
    keys: torch.Tensor, protected: torch.Tensor, consts: SignatureConstants | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each entry's best merge candidate among its neighbours in the sorted LSH orders.

    Args:
        keys: (B, H, N, D) stored keys (any scale: only the signs of their projections are used).
        protected: (B, H, N) bool; protected entries neither propose nor are proposed to.
        consts: the signature hash's constants for ``keys`` (built here when not given).

    Returns:
        score: (B, H, N) float32 signature bits shared with the best candidate, in [0, TABLES * BITS] (-inf
        where there is none: protected, NaN, or every neighbour protected or NaN); nn: (B, H, N) int64 that
        candidate's slot (meaningless at -inf). Candidates are taken in the order (table 0 left, table 0 right,
        table 1 left, ...), the first wins ties.
    """
    bad, codes, sig = _signatures(keys, protected, consts)
    # Every table's order in one sort (stable: equal codes keep slot order).
    order = torch.sort(codes.transpose(-1, -2), dim=-1, stable=True).indices
    return sorted_neighbours(order, sig, bad)


def verify_merges(
    keys: torch.Tensor, freed: torch.Tensor, into: torch.Tensor, sel: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the planned merges whose two stored keys have cosine >= ``threshold``, in their order, first.

    keys: (B, H, N, D); freed, into, sel: (B, H, K) from :func:`plan_merges`. Returns them reordered so that the
    accepted merges are a prefix of ``sel`` (a stable reorder: the rejected and unselected ranks follow)."""
    b, h, kk = freed.shape
    d = keys.shape[-1]
    xf = F.normalize(keys.gather(2, freed[..., None].expand(b, h, kk, d)).float(), dim=-1)
    xs = F.normalize(keys.gather(2, into[..., None].expand(b, h, kk, d)).float(), dim=-1)
    ok = sel & ((xf * xs).sum(-1) >= threshold)
    perm = torch.sort((~ok).to(torch.uint8), dim=-1, stable=True).indices
    return freed.gather(2, perm), into.gather(2, perm), ok.gather(2, perm)


def plan_merges(
    score: torch.Tensor, nn: torch.Tensor, prio: torch.Tensor, need: torch.Tensor, k: int, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose the merges that free slots (rules 1-4 of the module docstring).

    Args:
        score, nn: (B, H, N) from :func:`pair_candidates`.
        prio: (B, H, N) eviction priority (lower = older, no two alike): int64
            :func:`~longroll.ops.redundancy.age_keys`, ``>= PROTECTED`` on protected entries.
        need: (B, H) int64 slots the frame needs beyond the free ones (<= 0: none).
        k: most merges considered per head (the frame's tokens), static.
        threshold: score needed to propose a merge (signature bits shared: :func:`min_agreement`).

    Returns:
        freed: (B, H, K) int64 slot merged away at each rank; into: (B, H, K) int64 its survivor; sel:
        (B, H, K) bool which ranks merge (a prefix), K = min(k, N).
    """
    b, h, n = score.shape
    kk = min(k, n)
    slot = torch.arange(n, device=score.device).expand(b, h, n)
    elig = score >= threshold
    p_nn = prio.gather(2, nn)
    i_older = (prio < p_nn) | ((prio == p_nn) & (slot < nn))
    freed = torch.where(i_older, slot, nn)
    surv = torch.where(i_older, nn, slot)
    s = torch.where(elig, score, _NEG)
    at = torch.where(elig, freed, n)
    best = torch.full((b, h, n + 1), _NEG, device=score.device).scatter_reduce(2, at, s, "amax")
    win = elig & (s >= best.gather(2, freed))
    at = torch.where(win, freed, n)
    first = torch.full((b, h, n + 1), n, device=score.device).scatter_reduce(2, at, torch.where(win, slot, n), "amin")
    win = win & (slot == first.gather(2, freed))
    at = torch.where(win, freed, n)
    freeable = torch.zeros(b, h, n + 1, dtype=torch.bool, device=score.device).scatter(
        2, at, win
    )  # winners' freed slots are unique: the trash column n takes every other row
    keep = win & ~freeable.gather(2, surv)
    at = torch.where(keep, freed, n)
    mscore = torch.full((b, h, n + 1), _NEG, device=score.device).scatter(2, at, torch.where(keep, s, _NEG))[..., :n]
    minto = torch.zeros(b, h, n + 1, dtype=torch.int64, device=score.device).scatter(2, at, surv)
    order = torch.sort(mscore, dim=-1, descending=True, stable=True).indices[..., :kk]
    top = mscore.gather(2, order)
    unprotected = (prio < PROTECTED).sum(-1)
    # Each merge uses two unprotected entries for one slot, an eviction one: keep enough for the age fallback.
    limit = torch.minimum(need, unprotected - need)
    rank = torch.arange(kk, device=score.device)
    sel = (top > _NEG) & (rank < limit[..., None])
    return order, minto.gather(2, order), sel


def _sum_by_key(key: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` (B, H, K, C) float summed by ``key`` (B, H, K) int64 in [0, K) -> (B, H, K, C) float64.

    Several freed entries may merge into one survivor, so keys collide, and CUDA's float ``scatter_add`` adds
    colliding rows with atomics in whatever order the threads arrive: the merged values, and every later chunk,
    would change from run to run. Integer addition does not depend on the order, so the rows are added as
    int64 fixed-point numbers with a scale that leaves room for K of the largest one (absolute error below
    ``K * max|x| * 2**-62``, far under float32's rounding of the same sum); the same sums every run, on every
    device. Non-finite rows keep their float sum (inf or NaN whatever the order): NaN stays NaN.
    """
    b, h, kk, c = x.shape
    idx = key[..., None].expand(b, h, kk, c)
    finite = x.isfinite()
    top = torch.where(finite, x, 0.0).abs().amax().double()
    # The scale is a power of two, so scaling and unscaling are exact.
    scale = torch.exp2(62.0 - torch.ceil(torch.log2(top * kk + 1e-300)).clamp_min(-900.0))
    fixed = torch.round(torch.where(finite, x, 0.0).double() * scale).long()
    out = torch.zeros(b, h, kk, c, dtype=torch.int64, device=x.device).scatter_add_(2, idx, fixed).double() / scale
    bad = torch.zeros(b, h, kk, c, dtype=torch.int32, device=x.device).scatter_add_(2, idx, (~finite).int())
    floats = torch.zeros(b, h, kk, c, dtype=x.dtype, device=x.device).scatter_add_(2, idx, torch.where(finite, 0.0, x))
    return torch.where(bad > 0, floats.double(), out)


def apply_merges(buf: CacheBuffers, freed: torch.Tensor, into: torch.Tensor, sel: torch.Tensor) -> None:
    """Fold each selected freed entry into its survivor: count-weighted mean value, counts add; the survivor's
    key and frame stamp stay. freed, into, sel: (B, H, K). The freed slots are left as they are (the caller
    overwrites them). Several entries merging into one survivor accumulate by rank order."""
    b, h, kk = freed.shape
    dv = buf.v.shape[-1]
    # Key the sums by the first rank that names each survivor, so that the temporaries stay (B, H, K).
    rank = torch.arange(kk, device=freed.device).expand(b, h, kk)
    tgt = torch.where(sel, into, buf.trash)
    first = torch.full(buf.count.shape, kk, dtype=torch.int64, device=freed.device).scatter_reduce(
        2, tgt, torch.where(sel, rank, kk), "amin"
    )
    key = first.gather(2, tgt).clamp_max(kk - 1)
    c_f = torch.where(sel, buf.count.gather(2, freed), 0.0)
    v_f = buf.v.gather(2, freed[..., None].expand(b, h, kk, dv)).float()
    # Counts are whole numbers (below 2**24): their float sums are exact in any order.
    cadd = torch.zeros(b, h, kk, device=freed.device).scatter_add(2, key, c_f)
    vadd = _sum_by_key(key, torch.where(sel[..., None], v_f * c_f[..., None], 0.0)).float()
    c_s = buf.count.gather(2, tgt)
    v_s = buf.v.gather(2, tgt[..., None].expand(b, h, kk, dv)).float()
    c_new = c_s + cadd.gather(2, key)
    v_new = (v_s * c_s[..., None] + vadd.gather(2, key[..., None].expand(b, h, kk, dv))) / c_new.clamp_min(1.0)[
        ..., None
    ]
    # Ranks naming the same survivor write the same values; unselected ranks write the trash slot.
    buf.write(tgt, None, v_new, c_new, None)


def victims(
    buf: CacheBuffers,
    prio: torch.Tensor | AgeOrder,
    need: torch.Tensor,
    k: int,
    threshold: float,
    consts: SignatureConstants | None = None,
    backend: PlanBackend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge redundant entries into their survivors (in ``buf``) and list the slots to reuse.

    Args:
        buf: the layer's buffers; entries ``[0, N)`` are considered (N = ``prio.shape[-1]``, the cap).
        prio: (B, H, N) int64 :func:`~longroll.ops.redundancy.age_keys` (``>= PROTECTED`` on protected entries),
            or the :class:`~longroll.ops.redundancy.AgeOrder` to make them from ``buf`` (inside the first fused
            kernel).
        need: (B, H) int64 slots needed beyond the free ones.
        k: victims listed per head (the frame's tokens), static.
        threshold: cosine needed to merge.
        consts: the signature hash's constants for the buffers' keys (built here when not given).
        backend: ``"triton"`` runs the fused kernels of :func:`~longroll.ops.redundancy.fused_victims`,
            ``"torch"`` the torch ops below (its reference twin), ``"auto"`` the kernels on CUDA where they
            apply (head dims powers of two) and the torch ops elsewhere.

    Returns:
        slots: (B, H, K) int64, the merged-away slots first (most similar first), then the age victims (oldest
        first) among the entries neither merged away nor absorbing; merged: (B, H) int64 how many of the first
        slots were freed by merging (the rest are evicted). K = min(k, N).
    """
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    n = prio.n if isinstance(prio, AgeOrder) else prio.shape[-1]
    kk = min(k, n)
    if backend != "torch":
        why = fused_supported(buf.k, buf.v)
        if why is None and (backend == "triton" or buf.k.is_cuda):
            if consts is None:
                consts = SignatureConstants.build(buf.k.shape[-1], buf.k.dtype, buf.k.device)
            consts.check(buf.k)
            return fused_victims(
                buf.k, buf.v, buf.count, prio, need, kk, threshold, min_agreement(threshold), consts.signs,
                frame=buf.frame, lengths=buf.lengths,
            )  # fmt: skip
        if backend == "triton":
            raise ValueError(f"backend='triton': the fused merge plan {why}")
    if isinstance(prio, AgeOrder):
        prio = age_keys(buf.frame, buf.count, buf.lengths, prio.n, prio.frame_now, prio.sink_frames)
    keys = buf.k[:, :, :n]
    score, nn = pair_candidates(keys, prio >= PROTECTED, consts)
    freed, into, sel = plan_merges(score, nn, prio, need, k, min_agreement(threshold))
    freed, into, sel = verify_merges(keys, freed, into, sel, threshold)
    apply_merges(buf, freed, into, sel)
    b, h, _ = prio.shape
    # Entries merged away or absorbing leave the age order (above every key; the slot keeps keys distinct).
    slot = torch.arange(n + 1, device=prio.device).expand(b, h, n + 1)
    pad = torch.cat([prio, prio.new_zeros(b, h, 1)], -1)
    for idx in (torch.where(sel, freed, n), torch.where(sel, into, n)):
        pad = pad.scatter(2, idx, (PROTECTED | slot.gather(2, idx)).to(pad.dtype))
    age = pad[..., :n].topk(kk, dim=-1, largest=False).indices
    merged = sel.sum(-1)
    rank = torch.arange(kk, device=prio.device)
    from_age = age.gather(2, (rank - merged[..., None]).clamp_min(0))
    return torch.where(rank < merged[..., None], freed, from_age), merged


# ----------------------------------------------------------------------------------------------------- reference
def pair_candidates_reference(keys: torch.Tensor, protected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-loop twin of :func:`pair_candidates` (same shapes and results)."""
    b, h, n, d = keys.shape
    proj = hash_signs(d, keys.device).to(keys.dtype)
    nbits = TABLES * BITS
    score = torch.full((b, h, n), _NEG)
    nn = torch.zeros(b, h, n, dtype=torch.int64)
    for bi in range(b):
        for hi in range(h):
            ks = keys[bi, hi]
            bad = [bool(protected[bi, hi, i]) or bool(ks[i].isnan().any()) for i in range(n)]
            sig = [(ks[i] @ proj > 0).tolist() for i in range(n)]
            codes = [
                [1 << BITS if bad[i] else sum(1 << j for j in range(BITS) if sig[i][t * BITS + j])
                 for t in range(TABLES)]
                for i in range(n)
            ]  # fmt: skip
            cands: list[list[tuple[float, int]]] = [[] for _ in range(n)]
            for t in range(TABLES):
                order = sorted(range(n), key=lambda i, t=t: (codes[i][t], i))  # type: ignore[misc]
                for r, i in enumerate(order):
                    for q in (r - 1, r + 1):
                        if 0 <= q < n and not bad[i] and not bad[order[q]]:
                            j = order[q]
                            cands[i].append((float(sum(a == c for a, c in zip(sig[i], sig[j], strict=True))), j))
                        else:
                            cands[i].append((_NEG, i if not 0 <= q < n else order[q]))
            for i in range(n):
                best_s, best_j = cands[i][0]
                for s_, j in cands[i][1:]:
                    if s_ > best_s:
                        best_s, best_j = s_, j
                score[bi, hi, i], nn[bi, hi, i] = best_s, best_j
            assert all(s_ <= nbits for s_ in score[bi, hi].tolist())
    return score, nn


def plan_merges_reference(
    score: torch.Tensor, nn: torch.Tensor, prio: torch.Tensor, need: torch.Tensor, k: int, threshold: float
) -> list[list[list[tuple[int, int]]]]:
    """Plain-loop twin of :func:`plan_merges`: per (batch, head) the list of (freed, survivor) merges in rank
    order."""
    b, h, n = score.shape
    out: list[list[list[tuple[int, int]]]] = []
    for bi in range(b):
        row: list[list[tuple[int, int]]] = []
        for hi in range(h):
            sc, nb, pr = score[bi, hi].tolist(), nn[bi, hi].tolist(), prio[bi, hi].tolist()
            edges: dict[int, tuple[float, int, int]] = {}  # freed -> (score, proposer, survivor)
            for i in range(n):
                if not sc[i] >= threshold:
                    continue
                j = nb[i]
                older_i = (pr[i], i) < (pr[j], j)
                freed, surv = (i, j) if older_i else (j, i)
                if freed not in edges or sc[i] > edges[freed][0]:
                    edges[freed] = (sc[i], i, surv)
            kept = [(s_, f, sv) for f, (s_, _, sv) in edges.items() if sv not in edges]
            kept.sort(key=lambda e: (-e[0], e[1]))
            unprotected = sum(1 for p in pr if p < PROTECTED)
            want = int(need[bi, hi])
            limit = max(0, min(want, unprotected - want, k, n))
            row.append([(f, sv) for _, f, sv in kept[:limit]])
        out.append(row)
    return out


__all__ = [
    "BITS",
    "TABLES",
    "SignatureConstants",
    "apply_merges",
    "hash_signs",
    "min_agreement",
    "pair_candidates",
    "pair_candidates_reference",
    "plan_merges",
    "plan_merges_reference",
    "verify_merges",
    "victims",
]
