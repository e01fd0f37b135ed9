import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longroll.ops.block_index import BlockSparseIndex


def _random_index(b, h, lq, lk, bq, bk, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    nqb, nkb = -(-lq // bq), -(-lk // bk)
    dense = torch.rand(b, h, nqb, nkb, generator=g) < density
    return BlockSparseIndex.from_dense(dense, bq, bk, lq, lk), dense


def test_full_lists_every_block_in_order():
    idx = BlockSparseIndex.full(2, 3, 200, 1025, 64, 128)
    assert idx.kv_num_blocks.shape == (2, 3, 4) and idx.kv_indices.shape == (2, 3, 4, 9)
    assert idx.kv_num_blocks.dtype == torch.int32 and idx.kv_indices.dtype == torch.int32
    assert torch.all(idx.kv_num_blocks == 9)
    assert torch.equal(idx.kv_indices[1, 2, 3], torch.arange(9, dtype=torch.int32))
    assert idx.to_dense().all()
    assert idx.density() == 1.0
    idx.validate_ids()


@settings(max_examples=15, deadline=None)
@given(
    b=st.integers(1, 2), h=st.integers(1, 3), lq=st.integers(1, 300), lk=st.integers(1, 700),
    bq=st.sampled_from([16, 64, 128]), bk=st.sampled_from([32, 64, 128]), density=st.floats(0.0, 1.0),
    seed=st.integers(0, 1000),
)
def test_from_dense_round_trips_and_density_is_exact(b, h, lq, lk, bq, bk, density, seed):
    idx, dense = _random_index(b, h, lq, lk, bq, bk, density, seed)
    idx.validate_ids()
    assert torch.equal(idx.to_dense(), dense)
    assert torch.equal(idx.kv_num_blocks, dense.sum(-1).int())
    # Listed ids are ascending within each row.
    for row, n in zip(idx.kv_indices.reshape(-1, idx.max_blocks), idx.kv_num_blocks.reshape(-1), strict=True):
        used = row[: int(n)]
        assert torch.all(used[1:] > used[:-1])
    km = idx.key_mask()
    assert km.shape == (b, h, lq, lk)
    assert idx.density() == pytest.approx(km.double().mean().item(), abs=1e-12)


def test_entries_past_the_count_are_ignored():
    idx, dense = _random_index(1, 2, 256, 512, 64, 64, 0.5)
    junk = idx.kv_indices.clone()
    used = torch.arange(idx.max_blocks) < idx.kv_num_blocks[..., None]
    junk[~used] = -7
    other = dataclasses.replace(idx, kv_indices=junk)
    other.validate_ids()
    assert torch.equal(other.to_dense(), dense)


def test_partial_last_blocks_counted_exactly():
    # One query block of 10 rows attending to the last key block, which holds 3 keys.
    num = torch.tensor([[[1]]], dtype=torch.int32)
    ids = torch.tensor([[[[1]]]], dtype=torch.int32)
    idx = BlockSparseIndex(num, ids, q_block_size=16, kv_block_size=64, seqlen_q=10, seqlen_k=67)
    assert idx.density() == pytest.approx(3 / 67)
    assert idx.key_mask()[0, 0].sum() == 30


def test_validate_ids_names_the_field():
    idx, _ = _random_index(1, 2, 128, 512, 64, 64, 1.0)
    bad = idx.kv_num_blocks.clone()
    bad[0, 1, 1] = idx.max_blocks + 1
    with pytest.raises(ValueError, match=r"kv_num_blocks\[0, 1, 1\] = 9"):
        dataclasses.replace(idx, kv_num_blocks=bad).validate_ids()
    bad = idx.kv_num_blocks.clone()
    bad[0, 0, 0] = -1
    with pytest.raises(ValueError, match="kv_num_blocks"):
        dataclasses.replace(idx, kv_num_blocks=bad).validate_ids()
    for value in (8, -1):
        ids = idx.kv_indices.clone()
        ids[0, 1, 0, 3] = value
        with pytest.raises(ValueError, match=rf"kv_indices\[0, 1, 0, 3\] = {value} is outside"):
            dataclasses.replace(idx, kv_indices=ids).validate_ids()
    ids = idx.kv_indices.clone()
    ids[0, 0, 1, 5] = ids[0, 0, 1, 2]
    with pytest.raises(ValueError, match=r"kv_indices\[0, 0, 1\] repeats key block 2"):
        dataclasses.replace(idx, kv_indices=ids).validate_ids()


def test_post_init_rejects_bad_fields():
    num = torch.zeros(1, 2, 3, dtype=torch.int32)
    ids = torch.zeros(1, 2, 3, 4, dtype=torch.int32)
    ok = dict(kv_num_blocks=num, kv_indices=ids, q_block_size=64, kv_block_size=64, seqlen_q=150, seqlen_k=256)
    BlockSparseIndex(**ok)
    cases = [
        (dict(kv_num_blocks=num.long()), "kv_num_blocks must have dtype torch.int32, got torch.int64"),
        (dict(kv_indices=ids.short()), "kv_indices must have dtype torch.int32"),
        (dict(kv_num_blocks=num[0]), r"kv_num_blocks must have 3 dimensions, got shape \(2, 3\)"),
        (dict(kv_indices=ids[:, :1]), r"kv_indices must have shape \(1, 2, 3\) \+ \(max_blocks,\)"),
        (dict(q_block_size=48), "q_block_size must be a positive power of two, got 48"),
        (dict(kv_block_size=0), "kv_block_size must be a positive power of two, got 0"),
        (dict(seqlen_q=100), r"kv_num_blocks has 3 query blocks .* seqlen_q=100 .* needs 2"),
        (dict(seqlen_k=-1), "seqlen_k must be a non-negative int, got -1"),
        (dict(kv_indices=ids.to("meta")), "kv_indices is on meta but kv_num_blocks is on cpu"),
        (dict(kv_num_blocks=[0, 1]), "kv_num_blocks must be a torch.Tensor"),
    ]
    for change, msg in cases:
        with pytest.raises(ValueError, match=msg):
            BlockSparseIndex(**{**ok, **change})


def test_from_dense_rejects_bad_masks():
    with pytest.raises(ValueError, match=r"mask must have dtype torch\.bool"):
        BlockSparseIndex.from_dense(torch.ones(1, 1, 2, 2), 64, 64)
    with pytest.raises(ValueError, match="mask must be a 4-d"):
        BlockSparseIndex.from_dense(torch.ones(2, 2, dtype=torch.bool), 64, 64)
    with pytest.raises(ValueError, match=r"mask has 2 key blocks .* seqlen_k=300"):
        BlockSparseIndex.from_dense(torch.ones(1, 1, 2, 2, dtype=torch.bool), 64, 64, seqlen_k=300)


def test_heads_selects_a_subset():
    idx, dense = _random_index(2, 4, 200, 300, 64, 64, 0.5)
    assert torch.equal(idx.heads(slice(1, 3)).to_dense(), dense[:, 1:3])
    assert torch.equal(idx.heads(2).to_dense(), dense[:, 2:3])
    assert torch.equal(idx.heads(-1).to_dense(), dense[:, 3:4])
    assert torch.equal(idx.heads([3, 0]).to_dense(), dense[:, [3, 0]])
    assert torch.equal(idx.heads(torch.tensor([1, 2])).to_dense(), dense[:, 1:3])
    sub = idx.heads(slice(0, 2))
    assert (sub.seqlen_q, sub.seqlen_k, sub.q_block_size) == (200, 300, 64)
    with pytest.raises(ValueError, match="sel=4 is out of range"):
        idx.heads(4)
    with pytest.raises(ValueError, match="selects no heads"):
        idx.heads(slice(2, 2))
    shared, _ = _random_index(1, 1, 200, 300, 64, 64, 0.5)
    assert shared.heads(slice(0, 2)) is shared


def test_to_device_and_frozen():
    idx, _ = _random_index(1, 2, 128, 256, 64, 64, 0.5)
    moved = idx.to("meta")
    assert moved.device == torch.device("meta") and moved.kv_indices.device == torch.device("meta")
    assert torch.equal(idx.to("cpu").to_dense(), idx.to_dense())
    with pytest.raises(dataclasses.FrozenInstanceError):
        idx.seqlen_q = 3  # type: ignore[misc]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize(("bq", "bk", "b", "h"), [(64, 128, 1, 2), (128, 64, 2, 1)])
def test_flex_block_mask_matches_the_index(bq, bk, b, h):
    from torch.nn.attention.flex_attention import flex_attention

    from longroll.ops.block_sparse import block_sparse_attention_ref

    lq, lk, d = 200, 330, 16
    idx, dense = _random_index(b, h, lq, lk, bq, bk, 0.4, seed=3)
    bm = idx.to_flex_block_mask()
    assert torch.equal(bm.to_dense().bool(), dense)
    assert (bq, bk) == tuple(bm.BLOCK_SIZE)
    g = torch.Generator().manual_seed(0)
    # Two query heads over a shared index also exercise the broadcast head axis.
    q = torch.randn(b, 2, lq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, 2, lk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, 2, lk, d, generator=g, dtype=torch.float64)
    bias = torch.randn(b, 2, lk, generator=g, dtype=torch.float64)
    ref = block_sparse_attention_ref(q, k, v, idx, bias)

    def score_mod(score, bb, hh, qi, ki):
        return score + bias[bb, hh, ki]

    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # older torch: only return_lse
        out, lse = flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, return_lse=True)
    else:
        out, aux = flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, return_aux=AuxRequest(lse=True))
        lse = aux.lse
    rows = ref.lse > float("-inf")
    assert torch.allclose(out[rows], ref.out[rows], atol=1e-10)
    assert torch.allclose(lse[rows].float(), ref.lse[rows], atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Printing


def test_repr_gives_shapes_blocks_and_density() -> None:
    dense = torch.tril(torch.ones(5, 5, dtype=torch.bool))[None, None]
    index = BlockSparseIndex.from_dense(dense, 16, 32, seqlen_q=70, seqlen_k=150)
    text = repr(index)
    assert text == (
        "BlockSparseIndex(shape=(1, 1, 70, 150), block_size=(16, 32), blocks=(5, 5), max_blocks=5, "
        f"density={index.density():.2%}, device=cpu)"
    )
    assert f"{index.density():.2%}" not in ("0.00%", "100.00%")


def test_to_string_draws_each_block_and_labels_shared_axes() -> None:
    dense = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.bool)[None, None]
    index = BlockSparseIndex.from_dense(dense, 16, 16)
    lines = index.to_string().split("\n")
    assert lines[0] == repr(index)
    assert lines[1] == f"(*, *) density {5 / 9:.2%}"
    assert lines[2:] == ["██", "████", "  ████"]


def test_to_string_groups_large_grids_and_shades_partial_cells() -> None:
    dense = torch.tril(torch.ones(8, 8, dtype=torch.bool))
    dense = torch.stack([dense, torch.zeros_like(dense), torch.ones_like(dense)])[None]  # (1, 3, 8, 8)
    index = BlockSparseIndex.from_dense(dense, 16, 16)
    text = index.to_string(grid_size=4, limit=2)
    lines = text.split("\n")
    # 8 blocks in cells of 2: the diagonal cells hold 3 of 4 blocks (partial), those below it all 4.
    assert lines[1] == "(*, 0) density 56.25%"
    assert lines[2:6] == ["░░", "██░░", "████░░", "██████░░"]
    assert lines[6] == "(*, 1) density 0.00%"
    assert lines[7:11] == ["", "", "", ""]
    assert lines[11].startswith("... 1 more")
    assert len(index.to_string(grid_size=-1).split("\n")) == 1 + 3 * 9
    assert index.to_string(grid_size=(8, 2), limit=3).split("\n")[-8:] == ["████"] * 8


def test_to_string_counts_partial_last_blocks_exactly() -> None:
    # Two key blocks of which the last holds 1 key: a cell grouping both is 17/32 computed when only the
    # first is kept, yet drawn partial, and a grid of only that last block is full.
    dense = torch.tensor([[[[True, False]]]])
    index = BlockSparseIndex.from_dense(dense, 16, 16, seqlen_q=16, seqlen_k=17)
    assert index.to_string().split("\n")[1:] == [f"(*, *) density {16 / 17:.2%}", "██"]
    assert index.to_string(grid_size=1).split("\n")[2] == "░░"


@pytest.mark.parametrize("bad", [0, (3,), (2, 0), 1.5, True])
def test_to_string_rejects_bad_grid_sizes(bad: object) -> None:
    index = BlockSparseIndex.full(1, 1, 32, 32, 16, 16)
    with pytest.raises(ValueError, match="grid_size"):
        index.to_string(grid_size=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="limit must be positive"):
        index.to_string(limit=0)
