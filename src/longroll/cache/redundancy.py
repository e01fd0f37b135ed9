"""Eviction by redundancy: free a capped cache's slots by merging near-duplicate old entries into one another.

When a TempCache commit needs slots at its cap, an old entry whose stored key is almost the same as another
old entry's carries little that the other does not: merging the two (count-weighted mean value, counts add,
the newer entry's key and frame stamp kept) frees a slot and changes attention only by the difference of the
two keys (nothing at all for identical keys: the merged entry's ``log(count)`` bias restores their weight).
Age eviction instead drops whole old places, which a world model revisiting them needs.

Finding each entry's nearest neighbour among all N entries is quadratic in the cap. Here the search is
linear-ish: each stored key (normalised) gets ``TABLES`` sign-LSH codes of ``BITS`` bits; sorting the
unprotected entries by each code puts keys on the same side of many hyperplanes next to each other, and each
entry's candidates are its two neighbours in each sorted order (one dot product per entry and table). Cost per
committed frame: O(T * N * (BITS + head_dim)) for codes and scores plus T sorts, O(T * N log N); no host
synchronisation, static shapes (it runs inside a captured commit). The hyperplanes are a fixed integer hash
(computed on the device, identical on every device and run), so no state is added and a resumed cache plans
exactly the same merges.

Pairing rule (the one :func:`plan_merges` vectorises and :func:`plan_merges_reference` spells out):

1. each unprotected entry ``i`` proposes the edge ``{i, nn_i}`` to its best candidate ``nn_i`` (highest
   cosine, first candidate on ties) when that cosine is at least the threshold;
2. of an edge's two entries the older one (lower eviction priority, lower slot on ties) is merged away into
   the newer one, the survivor: TempCache's representative is always the newest key of a group, and its
   frame stamp the newest member's, which keeps age eviction and temporal RoPE phases consistent;
3. an entry is merged away by at most one edge (its most similar, lowest proposer on ties), and an entry that
   could be merged away never absorbs (so no merge lands on a slot that is reused); survivors may absorb
   several entries;
4. the remaining edges free slots in order of similarity (lowest slot on ties), as many as the frame needs and
   no more than leave the age fallback enough unprotected entries (each merge uses two of them, an eviction
   one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longroll.cache.buffers import CacheBuffers

#: Sign-LSH tables (sorted orders) and bits per table. Adjacent entries of a sorted order share a long code
#: prefix; further tables rescue pairs split by a table's leading bits. Measured on clustered random keys
#: (head_dim 64, 900 entries, every entry's exact nearest neighbour at cosine >= 0.5): the share of entries that
#: find a candidate at >= 0.5 is 0.46 / 0.64 / 0.87 / 0.97 / 0.99 with 1x8 / 1x16 / 2x16 / 4x16 / 6x16
#: tables x bits (0.90 with 4x8, 0.97 with 4x12) at a moderate spread, 0.89 with 4x16 at a wide one.
TABLES = 4
BITS = 16

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


def _codes(x: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """x: (B, H, N, D) unit-norm; protected: (B, H, N). Returns (B, H, N, TABLES) int64 codes, protected
    entries at ``2**BITS`` (sorted last). NaN keys get code 0 (their scores are -inf anyway)."""
    b, h, n, d = x.shape
    bits = ((x @ hash_signs(d, x.device)) > 0).float()
    # Sums of distinct powers of two below 2**BITS <= 2**24 are exact in float32.
    weights = 2.0 ** torch.arange(BITS, device=x.device, dtype=torch.float32)
    codes = (bits.reshape(b, h, n, TABLES, BITS) @ weights).long()
    return codes.masked_fill(protected[..., None], 1 << BITS)


def pair_candidates(x: torch.Tensor, protected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each entry's best merge candidate among its neighbours in the sorted LSH orders.

    Args:
        x: (B, H, N, D) float32 unit-norm stored keys.
        protected: (B, H, N) bool; protected entries neither propose nor are proposed to.

    Returns:
        score: (B, H, N) float32 cosine with the best candidate (-inf where there is none: protected, NaN,
        or every neighbour protected); nn: (B, H, N) int64 that candidate's slot (meaningless at -inf).
        Candidates are taken in the order (table 0 left, table 0 right, table 1 left, ...), the first wins
        ties.
    """
    b, h, n, d = x.shape
    x = x.contiguous()
    codes = _codes(x, protected)
    ninf = torch.full((b, h, 1), _NEG, device=x.device)
    flat = x.reshape(b * h * n, d)
    offset = (torch.arange(b * h, device=x.device) * n).view(b, h, 1)
    scores, partners = [], []
    for t in range(TABLES):
        order = torch.sort(codes[..., t], dim=-1, stable=True).indices
        # Row gathers of one flat matrix (2x faster on the CPU than a gather with an expanded index).
        xs = flat.index_select(0, (order + offset).reshape(-1)).view(b, h, n, d)
        adj = (xs[:, :, :-1] * xs[:, :, 1:]).sum(-1)
        ps = protected.gather(2, order)
        adj = torch.where(ps[:, :, :-1] | ps[:, :, 1:] | adj.isnan(), _NEG, adj)
        # At sorted position r: the left neighbour order[r - 1] scores adj[r - 1], the right one adj[r].
        left, right = torch.cat([ninf, adj], -1), torch.cat([adj, ninf], -1)
        lp = torch.cat([order[:, :, :1], order[:, :, :-1]], -1)
        rp = torch.cat([order[:, :, 1:], order[:, :, -1:]], -1)
        for sc, pa in ((left, lp), (right, rp)):
            # order is a permutation: scattering by it moves sorted positions back to slots without collisions.
            scores.append(torch.empty_like(sc).scatter_(2, order, sc))
            partners.append(torch.empty_like(pa).scatter_(2, order, pa))
    score, which = torch.stack(scores, -1).max(-1)
    nn = torch.stack(partners, -1).gather(-1, which[..., None])[..., 0]
    return score, nn


def plan_merges(
    score: torch.Tensor, nn: torch.Tensor, prio: torch.Tensor, need: torch.Tensor, k: int, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose the merges that free slots (rules 1-4 of the module docstring).

    Args:
        score, nn: (B, H, N) from :func:`pair_candidates`.
        prio: (B, H, N) float64 eviction priority (lower = older), +inf on protected entries.
        need: (B, H) int64 slots the frame needs beyond the free ones (<= 0: none).
        k: most merges considered per head (the frame's tokens), static.
        threshold: cosine needed to merge.

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
    unprotected = (prio < float("inf")).sum(-1)
    # Each merge uses two unprotected entries for one slot, an eviction one: keep enough for the age fallback.
    limit = torch.minimum(need, unprotected - need)
    rank = torch.arange(kk, device=score.device)
    sel = (top > _NEG) & (rank < limit[..., None])
    return order, minto.gather(2, order), sel


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
    cadd = torch.zeros(b, h, kk, device=freed.device).scatter_add(2, key, c_f)
    vadd = torch.zeros(b, h, kk, dv, device=freed.device).scatter_add(
        2, key[..., None].expand(b, h, kk, dv), torch.where(sel[..., None], v_f * c_f[..., None], 0.0)
    )
    c_s = buf.count.gather(2, tgt)
    v_s = buf.v.gather(2, tgt[..., None].expand(b, h, kk, dv)).float()
    c_new = c_s + cadd.gather(2, key)
    v_new = (v_s * c_s[..., None] + vadd.gather(2, key[..., None].expand(b, h, kk, dv))) / c_new.clamp_min(1.0)[
        ..., None
    ]
    # Ranks naming the same survivor write the same values; unselected ranks write the trash slot.
    buf.write(tgt, None, v_new, c_new, None)


def victims(
    buf: CacheBuffers, prio: torch.Tensor, need: torch.Tensor, k: int, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge redundant entries into their survivors (in ``buf``) and list the slots to reuse.

    Args:
        buf: the layer's buffers; entries ``[0, N)`` are considered (N = ``prio.shape[-1]``, the cap).
        prio: (B, H, N) float64 eviction priority, +inf on protected entries.
        need: (B, H) int64 slots needed beyond the free ones.
        k: victims listed per head (the frame's tokens), static.
        threshold: cosine needed to merge.

    Returns:
        slots: (B, H, K) int64, the merged-away slots first (most similar first), then the age victims (oldest
        first) among the entries neither merged away nor absorbing; merged: (B, H) int64 how many of the first
        slots were freed by merging (the rest are evicted). K = min(k, N).
    """
    n = prio.shape[-1]
    x = F.normalize(buf.k[:, :, :n].float(), dim=-1)
    score, nn = pair_candidates(x, prio == float("inf"))
    freed, into, sel = plan_merges(score, nn, prio, need, k, threshold)
    apply_merges(buf, freed, into, sel)
    b, h, _ = prio.shape
    pad = torch.cat([prio, prio.new_zeros(b, h, 1)], -1)
    pad = pad.scatter(2, torch.where(sel, freed, n), float("inf")).scatter(2, torch.where(sel, into, n), float("inf"))
    kk = freed.shape[-1]
    age = pad[..., :n].topk(kk, dim=-1, largest=False).indices
    merged = sel.sum(-1)
    rank = torch.arange(kk, device=prio.device)
    from_age = age.gather(2, (rank - merged[..., None]).clamp_min(0))
    return torch.where(rank < merged[..., None], freed, from_age), merged


# ----------------------------------------------------------------------------------------------------- reference
def pair_candidates_reference(x: torch.Tensor, protected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-loop twin of :func:`pair_candidates` (same shapes and results)."""
    b, h, n, d = x.shape
    proj = hash_signs(d, x.device)
    score = torch.full((b, h, n), _NEG)
    nn = torch.zeros(b, h, n, dtype=torch.int64)
    for bi in range(b):
        for hi in range(h):
            xs, prot = x[bi, hi], protected[bi, hi].tolist()
            codes = []
            for i in range(n):
                bits = (xs[i] @ proj > 0).tolist()
                row = []
                for t in range(TABLES):
                    c = sum(1 << j for j in range(BITS) if bits[t * BITS + j])
                    row.append(1 << BITS if prot[i] else c)
                codes.append(row)
            cands: list[list[tuple[float, int]]] = [[] for _ in range(n)]
            for t in range(TABLES):
                order = sorted(range(n), key=lambda i, t=t: (codes[i][t], i))  # type: ignore[misc]
                for r, i in enumerate(order):
                    for q in (r - 1, r + 1):
                        if 0 <= q < n:
                            j = order[q]
                            cos = float((xs[i] * xs[j]).sum())
                            ok = not prot[i] and not prot[j] and cos == cos
                            cands[i].append((cos if ok else _NEG, j))
                        else:
                            cands[i].append((_NEG, i))
            for i in range(n):
                best_s, best_j = cands[i][0]
                for s_, j in cands[i][1:]:
                    if s_ > best_s:
                        best_s, best_j = s_, j
                score[bi, hi, i], nn[bi, hi, i] = best_s, best_j
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
            unprotected = sum(1 for p in pr if p < float("inf"))
            want = int(need[bi, hi])
            limit = max(0, min(want, unprotected - want, k, n))
            row.append([(f, sv) for _, f, sv in kept[:limit]])
        out.append(row)
    return out


__all__ = [
    "BITS",
    "TABLES",
    "apply_merges",
    "hash_signs",
    "pair_candidates",
    "pair_candidates_reference",
    "plan_merges",
    "plan_merges_reference",
    "victims",
]
