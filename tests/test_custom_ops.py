"""The custom ops wrap the eager launchers exactly, keep q's layout, have working fake implementations, and let
a small model over a LayerKVCache view compile with fullgraph=True without recompiling as the history grows.

The compile tests use the ``aot_eager`` backend: graph breaks are dynamo's business (fullgraph=True raises on
any), and aot_eager also runs the fake implementations through AOT autograd's functionalisation, in ~2 s.
Inductor lowers the same graph (the ops stay opaque fallback kernels) but costs ~50 s to compile on this CPU.
"""

from __future__ import annotations

import pytest
import torch

from longroll.cache import CacheConfig, LayerKVCache, TempCachePolicy
from longroll.ops.attention import MASKED_BIAS, attention
from longroll.ops.block_index import BlockSparseIndex
from longroll.ops.block_sparse import block_sparse_attention
from longroll.ops.custom_ops import attention_op, block_sparse_attention_op


def _qkv(b, h, hk, lq, lk, d, dtype, *, dv=None, layout="bhld", seed=0):
    g = torch.Generator().manual_seed(seed)
    dv = d if dv is None else dv
    if layout == "blhd":
        q = torch.randn(b, lq, h, d, generator=g).to(dtype).transpose(1, 2)
    else:
        q = torch.randn(b, h, lq, d, generator=g).to(dtype)
    k = torch.randn(b, hk, lk, d, generator=g).to(dtype)
    v = torch.randn(b, hk, lk, dv, generator=g).to(dtype)
    bias = torch.log(torch.randint(1, 6, (b, hk, lk), generator=g).float())
    bias[:, :, ::7] = MASKED_BIAS
    return q, k, v, bias


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    ("backend", "lse"), [("chunked", True), ("chunked", False), ("sdpa", False), ("sdpa_augmented", False)]
)
@pytest.mark.parametrize("with_bias", [True, False])
def test_attention_op_equals_the_launcher(dtype, backend, lse, with_bias) -> None:
    q, k, v, bias = _qkv(2, 4, 2, 97, 1025, 32, dtype)
    bias = bias if with_bias else None
    expected = attention(q, k, v, bias, backend=backend, return_lse=lse)
    actual = attention_op(q, k, v, bias, backend=backend, return_lse=lse)
    _same(actual.out, expected.out)
    assert (actual.lse is None) == (not lse)
    if lse:
        _same(actual.lse, expected.lse)


def test_attention_op_keeps_q_layout_and_makes_v_width_contiguous() -> None:
    q, k, v, bias = _qkv(1, 2, 2, 33, 70, 16, torch.float32, layout="blhd")
    out = attention_op(q, k, v, bias, backend="chunked").out
    assert out.stride() == q.stride()
    _same(out, attention(q, k, v, bias, backend="chunked").out)
    q, k, v, bias = _qkv(1, 2, 2, 33, 70, 16, torch.float32, dv=8)
    out = attention_op(q, k, v, bias).out
    assert out.shape == (1, 2, 33, 8) and out.is_contiguous()


def test_attention_op_propagates_nan_and_handles_empty_keys() -> None:
    q, k, v, bias = _qkv(1, 2, 1, 17, 40, 16, torch.float32)
    v[0, 0, 3, 0] = float("nan")
    assert torch.isnan(attention_op(q, k, v, backend="chunked").out[..., 0]).all()
    empty = attention_op(q, k[:, :, :0], v[:, :, :0], bias[:, :, :0], return_lse=True)
    assert torch.equal(empty.out, torch.zeros_like(q)) and torch.isneginf(empty.lse).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_block_sparse_op_equals_the_launcher(dtype, backend) -> None:
    lq, lk = (97, 1025) if backend == "torch" else (70, 150)
    q, k, v, bias = _qkv(1, 2, 1, lq, lk, 32, dtype, layout="blhd")
    bs = 64 if backend == "triton" else 32
    g = torch.Generator().manual_seed(3)
    dense = torch.rand(1, 2, -(-lq // bs), -(-lk // bs), generator=g) < 0.5
    index = BlockSparseIndex.from_dense(dense, bs, bs, lq, lk)
    expected = block_sparse_attention(q, k, v, index, bias, backend=backend)
    actual = block_sparse_attention_op(q, k, v, index, bias, backend=backend)
    _same(actual.out, expected.out)
    _same(actual.lse, expected.lse)
    assert actual.out.stride() == q.stride()


def test_bad_inputs_are_refused_before_the_op_runs() -> None:
    q, k, v, bias = _qkv(1, 2, 1, 16, 40, 16, torch.float32)
    with pytest.raises(ValueError, match=r"bias must have shape \(1, 1, 40\)"):
        attention_op(q, k, v, bias[:, :, :39])
    with pytest.raises(ValueError, match="backend must be one of"):
        attention_op(q, k, v, backend="flash")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot return the log-sum-exp"):
        attention_op(q, k, v, backend="sdpa", return_lse=True)
    index = BlockSparseIndex.full(1, 1, 16, 32, 16, 16)
    with pytest.raises(ValueError, match=r"index covers \(seqlen_q, seqlen_k\) = \(16, 32\)"):
        block_sparse_attention_op(q, k, v, index)
    index = BlockSparseIndex.full(1, 1, 16, 40, 16, 16)
    with pytest.raises(ValueError, match="split_k must be None or an int"):
        block_sparse_attention_op(q, k, v, index, split_k=0)


def test_opcheck_schema_and_fake_tensors() -> None:
    q, k, v, bias = _qkv(1, 2, 1, 19, 45, 16, torch.float32, layout="blhd")
    tests = ("test_schema", "test_faketensor")
    for args in ((q, k, v, bias, None, "chunked", True, 1 << 20), (q, k, v, None, 0.3, "sdpa", False, 1 << 20)):
        torch.library.opcheck(torch.ops.longroll.attention, args, test_utils=tests)
    index = BlockSparseIndex.full(1, 1, 19, 45, 16, 16)
    args = (q, k, v, index.kv_num_blocks, index.kv_indices, bias, 16, 16, 0.25, "torch", 0, "grid", 1 << 20)
    torch.library.opcheck(torch.ops.longroll.block_sparse_attention, args, test_utils=tests)


class _CachedAttention(torch.nn.Module):
    """One attention layer over [cache view ; current chunk]: projections, dense biased attention of the chunk's
    queries over the view, and a block-sparse pass of the same queries over the same keys."""

    def __init__(self, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = torch.nn.Linear(heads * head_dim, 3 * heads * head_dim)
        self.out = torch.nn.Linear(heads * head_dim, heads * head_dim)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (batch, n, dim) -> q, k, v (batch, heads, n, head_dim)."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, self.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k.contiguous(), v.contiguous()

    def forward(
        self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, index: BlockSparseIndex
    ) -> torch.Tensor:
        """x: (batch, n, dim); k, v: (batch, heads, L, head_dim) the cache view; bias (batch, heads, L)."""
        q, _, _ = self.project(x)
        dense = attention_op(q, k, v, bias, backend="chunked").out
        sparse = block_sparse_attention_op(q, k, v, index, bias, backend="torch").out
        return self.out((dense + sparse).transpose(1, 2).flatten(2))


def test_model_over_a_cache_view_compiles_fullgraph_without_recompiling_as_history_grows() -> None:
    torch.manual_seed(0)
    b, h, d, tpf, fpc = 1, 2, 16, 8, 2
    cfg = CacheConfig(tpf, fpc, TempCachePolicy(max_entries=5 * tpf, sink_frames=1), commit_graphs="off")
    cache = LayerKVCache(cfg, batch=b, heads=h, head_dim=d)
    model = _CachedAttention(h, d).eval()
    graphs: list[torch.fx.GraphModule] = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=counting_backend)
    lengths = []
    with torch.no_grad():
        for _ in range(4):
            x = torch.randn(b, tpf * fpc, h * d)
            _, k, v = model.project(x)
            cache.stage(k, v, frame_start=cache.committed_frames)
            view = cache.view()
            assert view.bias is not None
            n = view.k.shape[2]
            lengths.append(n)
            index = BlockSparseIndex.from_dense(torch.rand(1, h, 2, -(-n // 8)) < 0.7, 8, 8, tpf * fpc, n)
            for t in (view.k, view.v, view.bias):
                torch._dynamo.mark_dynamic(t, 2)
            torch._dynamo.mark_dynamic(index.kv_indices, 3)
            actual = compiled(x, view.k, view.v, view.bias, index)
            torch.testing.assert_close(actual, model(x, view.k, view.v, view.bias, index), rtol=0, atol=0)
            cache.commit()
    assert len(set(lengths)) >= 3, lengths  # the view did grow (16, 32, 40, ...)
    assert len(graphs) == 1, f"{len(graphs)} compilations for view lengths {lengths}"
    targets = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    for op in ("longroll.attention", "longroll.block_sparse_attention"):
        assert any(t.split(".default")[0] == op for t in targets), targets


def test_gpu_compile_script_smoke(tmp_path, monkeypatch) -> None:
    """scripts/gpu_compile_chunk.py end to end on the CPU: one compilation per policy as the view grows."""
    import json
    import runpy
    import sys
    from pathlib import Path

    monkeypatch.setattr(sys, "argv", ["gpu_compile_chunk.py", "--out", str(tmp_path), "--smoke"])
    runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "gpu_compile_chunk.py"), run_name="__main__")
    report = json.loads((tmp_path / "compile.json").read_text())
    assert report["command"] and report["environment"]["device"] == "cpu"
    for result in report["results"]:
        assert result["compilations"] == 1, result
        assert len(result["view_keys"]) >= 3
        assert all(r["max_abs_diff"] == 0.0 for r in result["chunks"])
