import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longroll.ann.buckets import (
    OWN_HIT,
    PROBE_HIT,
    GroupHits,
    block_hits,
    block_means,
    bucket_block_cover,
    bucket_block_scores,
    bucket_sort,
    group_bucket_hits,
    int8_block_topk,
    int8_dot,
    int8_encode,
    nearest_anchor,
    probe_codes,
    strided_sample,
)
from longroll.ann.int8 import int8_scores


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 70), nb=st.integers(1, 9), seed=st.integers(0, 10_000))
def test_bucket_sort_is_stable_with_invalid_last_and_exact_offsets(n, nb, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, nb, (2, 3, n), generator=g)
    valid = torch.rand(2, 3, n, generator=g) > 0.3
    lay = bucket_sort(codes, nb, valid)
    for b in range(2):
        for h in range(3):
            keyed = [(int(c) if v else nb, i) for i, (c, v) in enumerate(zip(codes[b, h], valid[b, h], strict=True))]
            expect = [i for _, i in sorted(keyed)]  # python's sort is stable: ties keep index order
            assert lay.order[b, h].tolist() == expect
            counts = torch.bincount(codes[b, h][valid[b, h]], minlength=nb)
            offsets = [0, *torch.cumsum(counts, 0).tolist()]
            assert lay.offsets[b, h].tolist() == offsets
    assert torch.equal(lay.sorted_codes, torch.where(valid, codes, nb).gather(2, lay.order))


def test_bucket_sort_without_mask_and_errors():
    codes = torch.tensor([[[3, 1, 1, 0, 3]]])
    lay = bucket_sort(codes, 4)
    assert lay.order.tolist() == [[[3, 1, 2, 0, 4]]]
    assert lay.offsets.tolist() == [[[0, 1, 3, 3, 5]]]
    with pytest.raises(ValueError, match="codes"):
        bucket_sort(codes[0], 4)
    with pytest.raises(ValueError, match="nbuckets"):
        bucket_sort(codes, 0)
    with pytest.raises(ValueError, match="valid"):
        bucket_sort(codes, 4, torch.ones(1, 1, 4, dtype=torch.bool))


def test_probe_codes_are_the_hamming_one_neighbours():
    codes = torch.tensor([0, 5, 63])
    pc = probe_codes(codes, 6, 1)
    assert pc.shape == (3, 7)
    assert torch.equal(pc[:, 0], codes)
    for row in pc:
        dist = [bin(int(row[0]) ^ int(x)).count("1") for x in row[1:]]
        assert dist == [1] * 6 and len(set(row.tolist())) == 7
    assert torch.equal(probe_codes(codes, 6, 0), codes[:, None])
    with pytest.raises(ValueError, match="probes"):
        probe_codes(codes, 6, 2)


@pytest.mark.parametrize("probes", [0, 1])
def test_group_bucket_hits_matches_a_loop_with_partial_group(probes):
    g = torch.Generator().manual_seed(1)
    bits, group, n, tables = 3, 4, 10, 2
    codes = torch.randint(0, 1 << bits, (1, 2, n, tables), generator=g)
    hits = group_bucket_hits(codes, bits, probes, group)
    assert hits.shape == (1, 2, 3, tables, 8)
    expect = torch.zeros_like(hits)
    for h in range(2):
        for i in range(n):
            for t in range(tables):
                c = int(codes[0, h, i, t])
                expect[0, h, i // group, t, c] += OWN_HIT
                if probes:
                    for bit in range(bits):
                        expect[0, h, i // group, t, c ^ (1 << bit)] += PROBE_HIT
    assert torch.equal(hits, expect)


def test_bucket_block_scores_matches_per_key_scan_with_empty_buckets():
    g = torch.Generator().manual_seed(2)
    nb, bs, start, n = 8, 4, 3, 29
    codes = torch.randint(0, nb, (1, 2, n), generator=g)
    codes[codes == 5] = 4  # bucket 5 is empty
    valid = torch.ones(1, 2, n, dtype=torch.bool)
    valid[..., -3:] = False
    lay = bucket_sort(codes, nb, valid)
    hits = torch.randint(0, 3, (1, 2, 5, nb), generator=g).float()
    n_blocks = -(-(start + n) // bs)
    score = bucket_block_scores(hits, lay.offsets, start, bs, n_blocks)
    expect = torch.zeros(1, 2, 5, n_blocks)
    for h in range(2):
        for b in range(nb):
            blocks = {(start + i) // bs for i in range(n) if int(lay.sorted_codes[0, h, i]) == b}
            for j in blocks:
                expect[0, h, :, j] += hits[0, h, :, b]
    assert torch.equal(score, expect)
    assert torch.equal(torch.matmul(hits, bucket_block_cover(lay.offsets, start, bs, n_blocks)), expect)
    with pytest.raises(ValueError, match="offsets"):
        bucket_block_scores(hits, lay.offsets[..., :-1], start, bs, n_blocks)


def test_block_hits_gathers_centroid_codes_and_skips_the_spare_bucket():
    hits = torch.arange(3 * 2 * 4, dtype=torch.float32).view(1, 1, 3, 2, 4).expand(1, 2, 3, 2, 4).clone()
    codes = torch.tensor([[[0, 4], [3, 1], [4, 4]]]).expand(1, 2, 3, 2)
    out = block_hits(hits, codes)
    assert out.shape == (1, 2, 3, 3)
    for g in range(3):
        assert out[0, 0, g, 0] == hits[0, 0, g, 0, 0]
        assert out[0, 0, g, 1] == hits[0, 0, g, 0, 3] + hits[0, 0, g, 1, 1]
        assert out[0, 0, g, 2] == 0
    with pytest.raises(ValueError, match="block_codes"):
        block_hits(hits, codes[..., :1])


def test_block_means_strided_sample_and_nearest_anchor():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 10, 8, generator=g)
    valid = torch.ones(1, 2, 10, dtype=torch.bool)
    valid[:, :, 4:8] = False
    means, ok = block_means(x, valid, 4)
    assert ok.tolist() == [[[True, False, True], [True, False, True]]]
    assert torch.allclose(means[:, :, 0], x[:, :, :4].mean(2))
    assert torch.allclose(means[:, :, 2], x[:, :, 8:].mean(2))
    assert torch.all(means[:, :, 1] == 0)
    count = torch.tensor([[6, 0]])
    s = strided_sample(x, 2, count, 3)
    assert torch.equal(s[0, 0], x[0, 0, [3, 5, 7]])
    assert torch.equal(s[0, 1], x[0, 1, [2, 2, 2]])
    anchors = torch.randn(1, 2, 5, 8, generator=g)
    expect = int8_scores(x, anchors).argmax(-1)
    assert torch.equal(nearest_anchor(x, anchors), expect)
    assert torch.equal(nearest_anchor(x, anchors, chunk=3), expect)
    with pytest.raises(ValueError, match="anchors"):
        nearest_anchor(x, anchors[:, :, :0])


def test_int8_block_topk_respects_allowed_and_small_pools():
    g = torch.Generator().manual_seed(4)
    qm = torch.randn(1, 1, 2, 16, generator=g)
    cent = torch.randn(1, 1, 6, 16, generator=g)
    allowed = torch.tensor([[[True, False, True, True, False, False]]])
    sel = int8_block_topk(qm, cent, allowed, 2)
    assert sel.sum(-1).tolist() == [[[2, 2]]]
    assert not sel[..., ~allowed[0, 0]].any()
    scores = int8_scores(qm, cent).masked_fill(~allowed[:, :, None], float("-inf"))
    assert torch.equal(sel, torch.zeros_like(sel).scatter_(-1, scores.topk(2, -1).indices, True))
    # Asking for more blocks than are allowed picks exactly the allowed ones.
    assert torch.equal(int8_block_topk(qm, cent, allowed, 5), allowed[:, :, None].expand(1, 1, 2, 6))


def test_group_hits_object_is_reusable_and_checks_shapes():
    g = torch.Generator().manual_seed(5)
    hits = GroupHits(4, 1, 8, 20, 2, "cpu")
    for _ in range(2):
        codes = torch.randint(0, 16, (1, 3, 20, 2), generator=g)
        assert torch.equal(hits(codes), group_bucket_hits(codes, 4, 1, 8))
    with pytest.raises(ValueError, match="codes"):
        hits(torch.zeros(1, 3, 21, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="group"):
        GroupHits(4, 1, 0, 20, 2, "cpu")


def test_batched_int8_dot_equals_int8_scores():
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(2, 3, 17, 64, generator=g), torch.randn(2, 3, 29, 64, generator=g)
    assert torch.equal(int8_dot(int8_encode(a), int8_encode(b)), int8_scores(a, b))
