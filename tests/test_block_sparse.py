"""Block-sparse attention: the Triton kernel (interpreter on CPU) and the torch backend against the float64
reference, under the project's tolerance rule (tests/tolerance.py)."""

import dataclasses
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longroll.ops.attention import MASKED_BIAS, attention
from longroll.ops.block_index import BlockSparseIndex
from longroll.ops.block_sparse import (
    TRITON_HEAD_DIMS,
    block_sparse_attention,
    block_sparse_attention_ref,
)
from longroll.ops.reference import attention_ref
from tests.device import GPU_SUITE
from tests.tolerance import assert_within_rule, dtype_atol

# The GPU suite (interpreter off) checks the compiled kernel in tests/test_gpu.py; here it keeps the torch twin.
BACKENDS = ["torch"] if GPU_SUITE else ["triton", "torch"]


def _inputs(lq, lk, dtype, h=2, hk=1, d=64, b=1, seed=0, layout="bhld"):
    g = torch.Generator().manual_seed(seed)
    if layout == "blhd":
        # A (B, L, H, D) tensor seen as (B, H, L, D): the kernel must read it through its strides.
        q = torch.randn(b, lq, h, d, generator=g).to(dtype).transpose(1, 2)
        k = torch.randn(b, lk, hk, d, generator=g).to(dtype).transpose(1, 2)
        v = torch.randn(b, lk, hk, d, generator=g).to(dtype).transpose(1, 2)
    else:
        q = torch.randn(b, h, lq, d, generator=g).to(dtype)
        k = torch.randn(b, hk, lk, d, generator=g).to(dtype)
        v = torch.randn(b, hk, lk, d, generator=g).to(dtype)
    # log of merged-key counts, with keys removed both ways the API accepts.
    bias = torch.log(torch.randint(1, 9, (b, hk, lk), generator=g).float())
    bias[:, :, ::13] = MASKED_BIAS
    bias[:, :, 5::17] = float("-inf")
    return q, k, v, bias


def _index(b, h, lq, lk, bq, bk, density, seed=0, empty_rows=True):
    g = torch.Generator().manual_seed(seed + 1)
    nqb, nkb = -(-lq // bq), -(-lk // bk)
    dense = torch.rand(b, h, nqb, nkb, generator=g) < density
    if empty_rows and nqb > 1:
        dense[:, 0, 1] = False  # one query block with no key block at all
    return BlockSparseIndex.from_dense(dense, bq, bk, lq, lk)


def _check(res, q, k, v, idx, bias, scale=None):
    """Tolerance rule on out and lse against float64, with torch at the same dtype as the yardstick."""
    ref = block_sparse_attention_ref(q, k, v, idx, bias, scale=scale)
    same = block_sparse_attention_ref(q, k, v, idx, bias, scale=scale, upcast=False)
    assert res.out.dtype == q.dtype and res.out.shape == (*q.shape[:3], v.shape[-1])
    assert res.lse.dtype == torch.float32 and res.lse.shape == q.shape[:3]
    assert_within_rule("out", res.out, ref.out, same.out)
    empty = torch.isneginf(ref.lse)
    assert torch.equal(torch.isneginf(res.lse), empty), "empty rows must give lse = -inf"
    assert torch.all(res.out[empty] == 0), "empty rows must give out = 0"
    rows = ~empty
    if rows.any():
        err = float((res.lse[rows].double() - ref.lse[rows].double()).abs().max())
        base = float((same.lse[rows].double() - ref.lse[rows].double()).abs().max())
        atol = dtype_atol(ref.lse[rows], torch.float32)
        assert err <= 2 * base + atol, f"lse: err={err:.3e} > 2*{base:.3e} + {atol:.3e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    ("lq", "lk", "h", "hk", "d", "bq", "bk"),
    [
        (97, 1025, 2, 1, 64, 64, 128),  # GQA, partial last blocks on both axes
        (200, 97, 1, 1, 128, 128, 64),  # head_dim 128, fewer keys than one query block
    ],
)
def test_matches_reference(backend, dtype, lq, lk, h, hk, d, bq, bk):
    q, k, v, bias = _inputs(lq, lk, dtype, h=h, hk=hk, d=d)
    idx = _index(1, h, lq, lk, bq, bk, 0.5)
    res = block_sparse_attention(q, k, v, idx, bias, backend=backend, check_ids=True)
    _check(res, q, k, v, idx, bias)


@settings(max_examples=6, deadline=None)
@given(
    lq=st.integers(1, 260),
    lk=st.integers(1, 600),
    bq=st.sampled_from([64, 128]),
    bk=st.sampled_from([64, 128]),
    heads=st.sampled_from([(1, 1), (2, 1), (2, 2)]),
    density=st.floats(0.0, 1.0),
    use_bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    backend=st.sampled_from(BACKENDS),
    seed=st.integers(0, 100),
    scale=st.sampled_from([None, 0.3]),
)
def test_matches_reference_random(lq, lk, bq, bk, heads, density, use_bias, dtype, backend, seed, scale):
    h, hk = heads
    q, k, v, bias = _inputs(lq, lk, dtype, h=h, hk=hk, seed=seed)
    bias = bias if use_bias else None
    idx = _index(1, h, lq, lk, bq, bk, density, seed=seed)
    res = block_sparse_attention(q, k, v, idx, bias, scale=scale, backend=backend)
    _check(res, q, k, v, idx, bias, scale=scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_blocks_equal_dense_attention(backend):
    q, k, v, bias = _inputs(200, 333, torch.float32, h=2, hk=2)
    idx = BlockSparseIndex.full(1, 2, 200, 333, 64, 128)
    res = block_sparse_attention(q, k, v, idx, bias, backend=backend)
    ref, ref_lse = attention_ref(q, k, v, bias)
    same, _ = attention_ref(q, k, v, bias, upcast=False)
    assert_within_rule("out", res.out, ref, same)
    dense = attention(q, k, v, bias, backend="chunked", return_lse=True)
    assert torch.allclose(res.lse, ref_lse, atol=1e-5) and torch.allclose(res.lse, dense.lse, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_block_and_empty_rows(backend):
    lq, lk = 130, 300
    q, k, v, bias = _inputs(lq, lk, torch.float32, h=2, hk=1)
    num = torch.tensor([[[1, 0, 1], [0, 0, 0]]], dtype=torch.int32)  # head 1 attends to nothing
    ids = torch.tensor([[[[4], [9], [0]], [[1], [2], [3]]]], dtype=torch.int32)  # unused slots hold junk
    idx = BlockSparseIndex(num, ids, q_block_size=64, kv_block_size=64, seqlen_q=lq, seqlen_k=lk)
    res = block_sparse_attention(q, k, v, idx, bias, backend=backend, check_ids=True)
    _check(res, q, k, v, idx, bias)
    assert torch.all(res.out[:, 1] == 0) and torch.all(torch.isneginf(res.lse[:, 1]))
    assert torch.all(torch.isneginf(res.lse[:, 0, 64:128]))
    # Block 4 holds keys 256..299: the single-block row is softmax over exactly those keys.
    expect, _ = attention_ref(q[:, :1, :64], k[:, :, 256:], v[:, :, 256:], bias[:, :, 256:])
    assert torch.allclose(res.out[:, :1, :64], expect, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_keys_all_masked_by_bias_give_empty_rows(backend):
    q, k, v, bias = _inputs(64, 128, torch.float32, h=1, hk=1)
    bias[..., :64] = MASKED_BIAS
    num = torch.tensor([[[1]]], dtype=torch.int32)
    idx = BlockSparseIndex(num, torch.zeros(1, 1, 1, 1, dtype=torch.int32), 64, 64, 64, 128)
    res = block_sparse_attention(q, k, v, idx, bias, backend=backend)
    assert torch.all(res.out == 0) and torch.all(torch.isneginf(res.lse))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_blhd_layout(backend):
    q, k, v, bias = _inputs(97, 300, torch.float16, h=4, hk=2, b=2, layout="blhd")
    assert not q.is_contiguous()
    idx = _index(2, 4, 97, 300, 64, 64, 0.6)
    res = block_sparse_attention(q, k, v, idx, bias, backend=backend)
    _check(res, q, k, v, idx, bias)
    if backend == "triton":
        # The output keeps the caller's (B, L, H, D) memory layout.
        assert res.out.stride() == q.stride()


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_index_broadcasts_over_batch_and_heads(backend):
    q, k, v, bias = _inputs(130, 200, torch.float32, h=4, hk=2, b=2)
    shared = _index(1, 1, 130, 200, 64, 64, 0.5, empty_rows=False)
    full = dataclasses.replace(
        shared,
        kv_num_blocks=shared.kv_num_blocks.expand(2, 4, -1).contiguous(),
        kv_indices=shared.kv_indices.expand(2, 4, -1, -1).contiguous(),
    )
    a = block_sparse_attention(q, k, v, shared, bias, backend=backend)
    b = block_sparse_attention(q, k, v, full, bias, backend=backend)
    assert torch.equal(a.out, b.out) and torch.equal(a.lse, b.lse)
    _check(a, q, k, v, full, bias)


def test_listing_order_does_not_matter():
    q, k, v, bias = _inputs(128, 640, torch.float32, h=1, hk=1)
    idx = _index(1, 1, 128, 640, 128, 64, 0.7, empty_rows=False)
    used = torch.arange(idx.max_blocks) < idx.kv_num_blocks[..., None]
    rev = torch.where(used, idx.kv_indices.flip(-1).roll(int(idx.kv_num_blocks.max()), -1), idx.kv_indices)
    other = dataclasses.replace(idx, kv_indices=rev)
    assert torch.equal(other.to_dense(), idx.to_dense())
    a = block_sparse_attention(q, k, v, idx, bias, backend="triton")
    b = block_sparse_attention(q, k, v, other, bias, backend="triton")
    assert torch.allclose(a.out, b.out, atol=1e-6) and torch.allclose(a.lse, b.lse, atol=1e-6)


@pytest.mark.parametrize("config", [{"USE_TMA": True}, {"USE_TMA": False, "num_warps": 8, "num_stages": 3}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("use_bias", [True, False])
def test_kernel_variants(config, dtype, use_bias):
    # The copy-engine (TMA) path is what CUDA runs on Hopper; the interpreter checks its indexing here.
    from longroll.kernels.block_sparse_fwd import launch

    lq, lk = 97, 1025
    q, k, v, bias = _inputs(lq, lk, dtype, h=2, hk=1, layout="blhd")
    bias = bias if use_bias else None
    idx = _index(1, 2, lq, lk, 64, 128, 0.5)
    out = torch.empty_like(q)
    lse = torch.empty(1, 2, lq)
    launch(q, k, v, bias, idx.kv_num_blocks, idx.kv_indices, out, lse, 1 / 8, 64, 128, config=config)
    res = block_sparse_attention(q, k, v, idx, bias, backend="torch")
    _check(res._replace(out=out, lse=lse), q, k, v, idx, bias)


@pytest.mark.parametrize(
    ("tile", "split_k"),
    [((32, 64), 1), ((64, 128), 2), ((32, 32), 3), ((64, 64), 16)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("use_bias", [True, False])
def test_kernel_tiles_below_index_blocks_and_split_k(tile, split_k, dtype, use_bias):
    # Kernel tiles smaller than the index blocks (a 64-row index block served by two 32-row programs, a
    # 128-key block walked in 64-key steps) and rows split over programs merged by lse: same function.
    from longroll.kernels.block_sparse_fwd import LAST_LAUNCH

    lq, lk = 97, 1025
    q, k, v, bias = _inputs(lq, lk, dtype, h=2, hk=1, layout="blhd")
    bias = bias if use_bias else None
    idx = _index(1, 2, lq, lk, 64, 128, 0.5)  # odd lengths, partial last blocks, one empty row, GQA
    cfg = {"BLOCK_M": tile[0], "BLOCK_N": tile[1]}
    res = block_sparse_attention(q, k, v, idx, bias, backend="triton", split_k=split_k, triton_config=cfg)
    _check(res, q, k, v, idx, bias)
    assert res.out.stride() == q.stride()
    assert LAST_LAUNCH["split_k"] == min(split_k, idx.max_blocks)


@pytest.mark.parametrize("split_k", [2, 4])
def test_split_k_with_empty_shares_single_blocks_and_masked_keys(split_k):
    # Rows of 5 blocks split 4 ways leave one share empty (2 + 2 + 1 + 0); rows of one block are not split;
    # a share whose keys are all masked by the bias has lse -inf and weight 0 in the merge.
    lq, lk = 130, 300
    q, k, v, bias = _inputs(lq, lk, torch.float32, h=2, hk=1)
    bias[..., 64:128] = MASKED_BIAS
    num = torch.tensor([[[5, 1, 0], [2, 5, 5]]], dtype=torch.int32)
    head0 = [[0, 1, 2, 3, 4], [4, 0, 0, 0, 0], [1, 2, 3, 4, 0]]
    head1 = [[1, 4, 0, 0, 0], [4, 3, 2, 1, 0], [1, 0, 2, 3, 4]]
    ids = torch.tensor([[head0, head1]], dtype=torch.int32)
    idx = BlockSparseIndex(num, ids, q_block_size=64, kv_block_size=64, seqlen_q=lq, seqlen_k=lk)
    res = block_sparse_attention(q, k, v, idx, bias, backend="triton", check_ids=True, split_k=split_k)
    _check(res, q, k, v, idx, bias)
    assert torch.all(res.out[:, 0, 128:] == 0) and torch.all(torch.isneginf(res.lse[:, 0, 128:]))
    plain = block_sparse_attention(q, k, v, idx, bias, backend="triton", split_k=1)
    assert torch.allclose(res.out, plain.out, atol=1e-5) and torch.allclose(res.lse, plain.lse, atol=1e-5)


def test_split_min_blocks_splits_only_long_rows():
    # The automatic mode keeps a minimum share: rows shorter than two shares are written directly, longer
    # ones split. Both kinds in one launch, through the kernel entry point.
    from longroll.kernels import block_sparse_fwd as kernels

    lq, lk = 200, 1100
    q, k, v, bias = _inputs(lq, lk, torch.float16, h=2, hk=2)
    idx = _index(1, 2, lq, lk, 64, 64, 0.6, seed=3)
    assert int(idx.kv_num_blocks.min()) < 6 <= int(idx.kv_num_blocks.max())
    out, lse = torch.empty_like(q), torch.empty(1, 2, lq)
    num, ids = idx.kv_num_blocks, idx.kv_indices
    kernels.launch(q, k, v, bias, num, ids, out, lse, 1 / 8, 64, 64, config={"split_min_blocks": 3}, split_k=4)
    assert kernels.LAST_LAUNCH["split_k"] == 4 and kernels.LAST_LAUNCH["split_min_blocks"] == 3
    res = block_sparse_attention(q, k, v, idx, bias, backend="torch")
    _check(res._replace(out=out, lse=lse), q, k, v, idx, bias)


@pytest.mark.parametrize(
    ("tile", "programs"),
    [((64, 128), 3), ((32, 64), 5), ((64, 64), 1), ((64, 32), 64)],  # 64 programs: more than there are steps
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("use_bias", [True, False])
def test_persistent_schedule(tile, programs, dtype, use_bias):
    # A fixed set of programs shares all rows' steps: rows cut by a share boundary (at its start, its end, or
    # both when a row spans several programs) are merged by lse; empty rows are written by whoever owns
    # their position; programs with no steps at all do nothing.
    from longroll.kernels.block_sparse_fwd import LAST_LAUNCH

    lq, lk = 97, 1025
    q, k, v, bias = _inputs(lq, lk, dtype, h=2, hk=1, layout="blhd")
    bias = bias if use_bias else None
    idx = _index(1, 2, lq, lk, 64, 128, 0.5)  # odd lengths, partial last blocks, one empty row, GQA
    cfg = {"BLOCK_M": tile[0], "BLOCK_N": tile[1], "num_programs": programs}
    res = block_sparse_attention(q, k, v, idx, bias, backend="triton", schedule="persistent", triton_config=cfg)
    _check(res, q, k, v, idx, bias)
    assert res.out.stride() == q.stride()
    assert LAST_LAUNCH["schedule"] == "persistent"
    grid = block_sparse_attention(q, k, v, idx, bias, backend="triton", schedule="grid", triton_config=cfg)
    assert torch.allclose(res.out.float(), grid.out.float(), atol=2 * dtype_atol(grid.out, dtype))


@pytest.mark.parametrize("programs", [2, 7])
def test_persistent_schedule_edge_rows(programs):
    # Empty rows at the start, between and at the end of the work; a row of one block; a row of every block;
    # keys masked by the bias in a whole share (lse -inf, weight 0 in the merge); and an index with no block.
    lq, lk = 300, 300
    q, k, v, bias = _inputs(lq, lk, torch.float32, h=2, hk=2)
    bias[..., 64:128] = MASKED_BIAS
    num = torch.tensor([[[0, 1, 0, 5, 0], [5, 0, 2, 0, 0]]], dtype=torch.int32)
    head0 = [[0] * 5, [1, 0, 0, 0, 0], [0] * 5, [0, 1, 2, 3, 4], [0] * 5]
    head1 = [[4, 3, 2, 1, 0], [0] * 5, [1, 2, 0, 0, 0], [0] * 5, [0] * 5]
    ids = torch.tensor([[head0, head1]], dtype=torch.int32)
    idx = BlockSparseIndex(num, ids, q_block_size=64, kv_block_size=64, seqlen_q=lq, seqlen_k=lk)
    cfg = {"num_programs": programs}
    res = block_sparse_attention(q, k, v, idx, bias, backend="triton", check_ids=True, schedule="persistent",
                                 triton_config=cfg)
    _check(res, q, k, v, idx, bias)
    none = BlockSparseIndex(torch.zeros_like(num), ids, 64, 64, lq, lk)
    res = block_sparse_attention(q, k, v, none, bias, backend="triton", schedule="persistent", triton_config=cfg)
    assert torch.all(res.out == 0) and torch.all(torch.isneginf(res.lse))


def test_auto_split_k_heuristic():
    from longroll.kernels.block_sparse_fwd import auto_split_k

    # 12 heads x 37 index rows on 132 multiprocessors: 3.4 waves -> 2 shares (6.7 waves) for long rows.
    assert auto_split_k(444, 1024, 132, 128) == 2
    assert auto_split_k(444, 37, 132, 128) == 1  # short rows (4,680 keys) are never split
    assert auto_split_k(96, 2048, 132, 128) == 4  # under one wave: split toward full waves
    assert auto_split_k(60, 64, 132, 128) == 2  # ... but each share keeps >= 4,096 keys
    assert auto_split_k(96, 2048, 132, 128) != 2  # 2 shares: still two partly empty waves of half programs
    assert auto_split_k(1776, 2048, 132, 128) == 1  # many waves: nothing to gain
    assert auto_split_k(444, 1024, 0, 128) == 1  # no GPU


def test_autotune_configs_fit_the_index_blocks():
    from longroll.kernels.block_sparse_fwd import LEGACY_TILES, TILES, _autotuner, _fit_configs

    def fit(tiles, qb, kb, d, dtype):
        cfgs = _autotuner(tiles).configs
        kept = _fit_configs(cfgs, {"Q": torch.empty(1, dtype=dtype)}, Q_BLOCK=qb, KV_BLOCK=kb, HEAD_DIM=d)
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept]

    assert fit(TILES, 128, 128, 128, torch.bfloat16) == list(TILES)
    small = fit(TILES, 64, 32, 128, torch.bfloat16)
    assert len(small) == len(set(small)) and all(bm == 64 and bn == 32 for bm, bn, _, _ in small)
    assert fit(LEGACY_TILES, 128, 64, 128, torch.float16) == [
        (128, 64, w, st) for w, st in [(8, 2), (8, 3), (8, 4), (4, 2), (4, 3), (4, 4)]
    ]
    # float32 at head_dim 128: a 128x128 tile's buffers do not fit in shared memory; 64x64 ones do.
    f32 = fit(TILES, 128, 128, 128, torch.float32)
    assert f32 and all((bm + 4 * bn) * 128 * 4 <= 227 * 1024 for bm, bn, _, _ in f32)
    assert fit(TILES, 256, 256, 256, torch.float32)  # never empty


def test_bfloat16_triton_within_rule():
    # The interpreter's bf16 tl.dot is broken; the kernel upcasts there, so bf16 is still checkable on CPU.
    q, k, v, bias = _inputs(97, 300, torch.bfloat16, h=2, hk=1)
    idx = _index(1, 2, 97, 300, 64, 64, 0.5)
    _check(block_sparse_attention(q, k, v, idx, bias, backend="triton"), q, k, v, idx, bias)


def test_torch_backend_memory_bound_and_wider_v():
    q, k, v, bias = _inputs(300, 500, torch.float32, h=2, hk=1, d=48)
    v = torch.randn(1, 1, 500, 80)
    idx = _index(1, 2, 300, 500, 64, 64, 0.5)
    small = block_sparse_attention(q, k, v, idx, bias, backend="torch", max_elements=1)
    big = block_sparse_attention(q, k, v, idx, bias, backend="torch")
    assert torch.allclose(small.out, big.out, atol=1e-6)
    assert torch.equal(torch.isneginf(small.lse), torch.isneginf(big.lse))
    _check(small, q, k, v, idx, bias)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_sequences(backend):
    q, k, v, _ = _inputs(0, 64, torch.float32)
    res = block_sparse_attention(q, k, v, BlockSparseIndex.full(1, 2, 0, 64, 64, 64), backend=backend)
    assert res.out.shape == (1, 2, 0, 64) and res.lse.shape == (1, 2, 0)
    q, k, v, _ = _inputs(70, 0, torch.float32)
    res = block_sparse_attention(q, k, v, BlockSparseIndex.full(1, 2, 70, 0, 64, 64), backend=backend)
    assert torch.all(res.out == 0) and torch.all(torch.isneginf(res.lse))


@pytest.mark.parametrize("split_k", [1, 2])
@pytest.mark.parametrize("which", ["batch", "row"])
def test_int64_offsets_with_huge_strides(which, split_k):
    # Data 2**31+ elements past the base: int32 offsets would wrap. The storage is ~4.3 GB of virtual memory,
    # but only the few pages holding q are ever touched.
    if which == "batch":  # batch 2 starts at 2 * (2**30 + 4096) elements
        stride = 2**30 + 4096
        shape, strides, size = (3, 1, 64, 64), (stride, 64 * 64, 64, 1), 2 * stride + 64 * 64
    else:  # row 63 starts 63 * (2**25 + 2**20) > 2**31 elements in: in-tile offsets themselves pass 2**31
        row = 2**25 + 2**20
        shape, strides, size = (3, 1, 64, 64), (64, 64, row, 1), 63 * row + 3 * 64
    base = torch.empty(size, dtype=torch.float16)
    q = base.as_strided(shape, strides)
    g = torch.Generator().manual_seed(0)
    q.copy_(torch.randn(shape, generator=g))
    k = torch.randn(3, 1, 128, 64, generator=g).half()
    v = torch.randn(3, 1, 128, 64, generator=g).half()
    idx = BlockSparseIndex.full(3, 1, 64, 128, 64, 64)
    res = block_sparse_attention(q, k, v, idx, backend="triton", split_k=split_k)
    _check(res, q.contiguous(), k, v, idx, None)


# ---------------------------------------------------------------- bad inputs


def _good(lq=100, lk=200, dtype=torch.float32, d=64):
    q, k, v, bias = _inputs(lq, lk, dtype, d=d)
    return q, k, v, bias, _index(1, 2, lq, lk, 64, 64, 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rejects_mismatched_index(backend):
    q, k, v, bias, idx = _good()
    with pytest.raises(ValueError, match=r"index\.seqlen_q is 100 but q has seqlen_q 99"):
        block_sparse_attention(q[:, :, :99], k, v, idx, bias, backend=backend)
    with pytest.raises(ValueError, match=r"index\.seqlen_k is 200 but k has seqlen_k 150"):
        block_sparse_attention(q, k[:, :, :150], v[:, :, :150], idx, bias[:, :, :150], backend=backend)
    with pytest.raises(ValueError, match=r"index.kv_num_blocks has shape \(1, 2, 2\)"):
        block_sparse_attention(q[:, :1], k, v, idx, bias, backend=backend)
    with pytest.raises(ValueError, match="index must be a BlockSparseIndex"):
        block_sparse_attention(q, k, v, idx.to_dense(), bias, backend=backend)
    with pytest.raises(ValueError, match="index is on meta but q is on cpu"):
        block_sparse_attention(q, k, v, idx.to("meta"), bias, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rejects_out_of_range_ids_when_checked(backend):
    q, k, v, bias, idx = _good()
    ids = idx.kv_indices.clone()
    ids[0, 1, 0, 0] = 4
    bad = dataclasses.replace(idx, kv_num_blocks=torch.full_like(idx.kv_num_blocks, 1), kv_indices=ids)
    with pytest.raises(ValueError, match=r"kv_indices\[0, 1, 0, 0\] = 4 is outside \[0, n_kv_blocks=4\)"):
        block_sparse_attention(q, k, v, bad, bias, backend=backend, check_ids=True)
    num = idx.kv_num_blocks.clone()
    num[0, 0, 1] = 9
    with pytest.raises(ValueError, match=r"kv_num_blocks\[0, 0, 1\] = 9"):
        block_sparse_attention(
            q, k, v, dataclasses.replace(idx, kv_num_blocks=num), bias, backend=backend, check_ids=True
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_rejects_dtype_and_device_mismatch(backend):
    q, k, v, bias, idx = _good()
    with pytest.raises(ValueError, match=r"k has dtype torch\.float16 but q has dtype torch\.float32"):
        block_sparse_attention(q, k.half(), v, idx, bias, backend=backend)
    with pytest.raises(ValueError, match="bias is on meta but k is on cpu"):
        block_sparse_attention(q, k, v, idx, bias.to("meta"), backend=backend)
    with pytest.raises(ValueError, match=r"bias must have shape \(1, 1, 200\)"):
        block_sparse_attention(q, k, v, idx, bias[:, :, :100], backend=backend)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        block_sparse_attention(q, k, v, idx, bias, scale=math.inf, backend=backend)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split_k": 0}, r"split_k must be None or an int in \[1, 16\], got 0"),
        ({"split_k": 2.0}, "split_k must be None or an int"),
        ({"triton_config": {"BLOCK_K": 64}}, r"triton_config keys \['BLOCK_K'\]"),
        ({"triton_config": {"BLOCK_M": 128}}, r"triton_config\['BLOCK_M'\] must be a power of two in \[16, 64\]"),
        ({"triton_config": {"BLOCK_N": 48}}, r"triton_config\['BLOCK_N'\]"),
        ({"triton_config": {"tuning": "fast"}}, r"triton_config\['tuning'\] must be 'auto' or 'legacy'"),
        ({"triton_config": {"num_warps": 3}}, r"triton_config\['num_warps'\]"),
        ({"triton_config": "legacy"}, "triton_config must be a mapping"),
        ({"triton_config": {"num_programs": 0}}, r"triton_config\['num_programs'\] must be a positive int, got 0"),
        ({"triton_config": {"USE_TMA": 1}}, r"triton_config\['USE_TMA'\] must be a bool, got 1"),
        ({"schedule": "stream"}, r"schedule must be one of \('grid', 'persistent'\), got 'stream'"),
        ({"schedule": "persistent", "split_k": 2}, "split_k=2 applies to the grid schedule"),
    ],
)
def test_rejects_bad_split_and_config(kwargs, match):
    q, k, v, bias, idx = _good()
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(q, k, v, idx, bias, backend="triton", **kwargs)


def test_rejects_what_the_kernel_cannot_run(monkeypatch):
    q, k, v, bias, idx = _good(d=48)
    msg = re.escape(f"q has head_dim 48; the triton backend supports head_dim in {TRITON_HEAD_DIMS}")
    with pytest.raises(ValueError, match=msg):
        block_sparse_attention(q, k, v, idx, bias, backend="triton")
    block_sparse_attention(q, k, v, idx, bias, backend="torch")  # the torch twin takes any head_dim
    q, k, v, bias, idx = _good(dtype=torch.float64)
    with pytest.raises(ValueError, match=r"q has dtype torch\.float64"):
        block_sparse_attention(q, k, v, idx, bias, backend="triton")
    q, k, v, bias, _ = _good()
    idx = _index(1, 2, 100, 200, 8, 64, 0.5)
    with pytest.raises(ValueError, match=r"index\.q_block_size is 8"):
        block_sparse_attention(q, k, v, idx, bias, backend="triton")
    q, k, v, bias, _ = _good(d=256)
    with pytest.raises(ValueError, match=r"index blocks \(128, 128\) at head_dim 256 .* shared memory"):
        block_sparse_attention(q, k, v, _index(1, 2, 100, 200, 128, 128, 0.5), bias, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        block_sparse_attention(q, k, v, idx, bias, backend="cuda")  # type: ignore[arg-type]
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            block_sparse_attention(q, k, v, _good()[4], bias, backend="triton")
        # auto never picks the kernel for CPU tensors.
        assert block_sparse_attention(q, k, v, _good()[4], bias).out.shape == q.shape
