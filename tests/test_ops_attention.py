import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longroll.ops.attention import MASKED_BIAS, attention, augment_qk
from longroll.ops.merge import merge_attention, merge_attentions
from longroll.ops.reference import attention_ref
from tests.tolerance import assert_within_rule


def _inputs(lq, lk, dtype, h=4, hk=2, d=64, dv=64, seed=0, masked=5):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, h, lq, d, generator=g).to(dtype)
    k = torch.randn(1, hk, lk, d, generator=g).to(dtype)
    v = torch.randn(1, hk, lk, dv, generator=g).to(dtype)
    bias = torch.log(torch.randint(1, 9, (1, hk, lk), generator=g).float())
    bias[:, :, :masked] = float("-inf")
    return q, k, v, bias


@pytest.mark.parametrize(("lq", "lk"), [(97, 1025), (1, 97), (200, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["chunked", "sdpa", "sdpa_augmented"])
def test_backends_match_reference(lq, lk, dtype, backend):
    q, k, v, bias = _inputs(lq, lk, dtype)
    ref, lse_ref = attention_ref(q, k, v, bias)
    pt, _ = attention_ref(q, k, v, bias, upcast=False)
    res = attention(q, k, v, bias, backend=backend, return_lse=backend == "chunked", max_elements=4096)
    assert res.out.dtype == dtype
    assert_within_rule(backend, res.out, ref, pt)
    if res.lse is not None:
        assert torch.allclose(res.lse, lse_ref, atol=1e-4, rtol=1e-4)


def test_chunked_memory_bound_is_respected_and_exact():
    q, k, v, bias = _inputs(33, 3000, torch.float32)
    ref, _ = attention_ref(q, k, v, bias)
    out = attention(q, k, v, bias, backend="chunked", max_elements=512).out
    assert (out - ref.float()).abs().max() < 1e-5


def test_empty_keys_and_fully_masked_rows():
    q, k, v, _ = _inputs(5, 0, torch.float32)
    res = attention(q, k, v, return_lse=True)
    assert torch.all(res.out == 0) and torch.all(torch.isneginf(res.lse))
    q, k, v, bias = _inputs(5, 7, torch.float32, masked=7)
    res = attention(q, k, v, bias, backend="chunked", return_lse=True)
    assert torch.all(res.out == 0) and torch.all(torch.isneginf(res.lse))


def test_augmented_qk_carries_bias_to_plain_dot_product():
    q, k, _v, bias = _inputs(9, 11, torch.float32, masked=0)
    scale = 1 / math.sqrt(64)
    qa, ka = augment_qk(q, k, bias, scale)
    assert qa.shape[-1] == 128 and ka.shape[-1] == 128
    logits = torch.matmul(qa, ka.repeat_interleave(2, 1).transpose(-1, -2)) * scale
    expect = (
        torch.matmul(q, k.repeat_interleave(2, 1).transpose(-1, -2)) * scale + bias.repeat_interleave(2, 1)[:, :, None]
    )
    assert (logits - expect).abs().max() < 1e-4


def test_augmented_bf16_bias_keeps_fp32_precision():
    q, k, _v, _ = _inputs(4, 6, torch.bfloat16, masked=0)
    bias = torch.full((1, 2, 6), math.log(3.0)) + torch.linspace(0, 1e-3, 6)
    _qa, ka = augment_qk(q, k, bias, 1.0)
    recon = ka[..., 64].float() + ka[..., 65].float()
    assert (recon - bias).abs().max() < 1e-5


@settings(max_examples=15, deadline=None)
@given(lk=st.integers(1, 300), split=st.floats(0, 1), lq=st.integers(1, 40))
def test_merge_of_parts_equals_whole(lk, split, lq):
    q, k, v, bias = _inputs(lq, lk, torch.float32, masked=0, seed=lk)
    cut = int(split * lk)
    whole = attention(q, k, v, bias, backend="chunked", return_lse=True)
    parts = [
        attention(q, k[:, :, s], v[:, :, s], bias[:, :, s], backend="chunked", return_lse=True)
        for s in (slice(0, cut), slice(cut, lk))
    ]
    out, lse = merge_attentions([(p.out, p.lse) for p in parts])
    assert (out - whole.out).abs().max() < 1e-5
    assert (lse - whole.lse).abs().max() < 1e-4


def test_merge_with_empty_part_is_identity():
    o = torch.randn(1, 2, 3, 4)
    lse = torch.randn(1, 2, 3)
    out, l2 = merge_attention(o, lse, torch.zeros_like(o), torch.full_like(lse, float("-inf")))
    assert torch.allclose(out, o) and torch.allclose(l2, lse)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": torch.randn(1, 3, 8, 16), "v": torch.randn(1, 3, 8, 16), "bias": torch.zeros(1, 3, 8)}, "divide"),
        ({"k": torch.randn(1, 2, 8, 8)}, "k must have shape"),
        ({"v": torch.randn(1, 2, 7, 16)}, "v must share"),
        ({"bias": torch.randn(1, 2, 9)}, "bias must have shape"),
        ({"q": torch.randn(1, 4, 8, 16, dtype=torch.float64)}, "dtype"),
        ({"q": torch.randn(4, 8, 16)}, "4 dimensions"),
        ({"backend": "flash9"}, "backend must be one of"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    args = {
        "q": torch.randn(1, 4, 8, 16),
        "k": torch.randn(1, 2, 8, 16),
        "v": torch.randn(1, 2, 8, 16),
        "bias": torch.zeros(1, 2, 8),
    } | kwargs
    backend = args.pop("backend", "auto")
    with pytest.raises((ValueError, TypeError), match=match):
        attention(args["q"], args["k"], args["v"], args["bias"], backend=backend)


def test_lse_needs_chunked():
    q, k, v, _ = _inputs(3, 5, torch.float32)
    with pytest.raises(ValueError, match="log-sum-exp"):
        attention(q, k, v, backend="sdpa", return_lse=True)


def test_masked_bias_threshold_is_zero_weight():
    q, k, v, _ = _inputs(3, 5, torch.float32)
    bias = torch.zeros(1, 2, 5)
    bias[:, :, 0] = MASKED_BIAS
    a = attention(q, k, v, bias, backend="sdpa_augmented").out
    b, _ = attention_ref(q, k[:, :, 1:], v[:, :, 1:])
    assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_backend_returns_lse_like_the_reference(dtype):
    q, k, v, bias = _inputs(97, 200, dtype, h=2, hk=1, d=64, dv=64)
    ref, lse_ref = attention_ref(q, k, v, bias)
    pt, _ = attention_ref(q, k, v, bias, upcast=False)
    res = attention(q, k, v, bias, backend="triton", return_lse=True)
    assert_within_rule("triton", res.out, ref, pt)
    assert torch.allclose(res.lse, lse_ref, atol=1e-3, rtol=1e-3)


def test_fa4_route_is_opt_in_with_a_clear_error_where_it_cannot_run():
    from longroll.ops.fa4 import fa4_available

    q, k, v, bias = _inputs(3, 5, torch.float32)
    if not fa4_available():
        with pytest.raises(ValueError, match="backend='fa4'"):
            attention(q, k, v, bias, backend="fa4")
    # "auto" never picks it: the CPU and every machine without the optional package keep their routes.
    assert torch.equal(attention(q, k, v, bias).out, attention(q, k, v, bias, backend="sdpa").out)


_FA4 = pytest.mark.skipif(
    not torch.cuda.is_available() or not __import__("longroll.ops.fa4", fromlist=["x"]).fa4_available(),
    reason="needs flash-attn-4 on a Hopper/Blackwell GPU",
)


@_FA4
@pytest.mark.parametrize(("lq", "lk"), [(97, 1025), (1, 97), (200, 128), (4680, 3000)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("d", [64, 128])
def test_fa4_route_matches_the_reference(lq, lk, dtype, with_bias, d):
    q, k, v, bias = (t.cuda() for t in _inputs(lq, lk, dtype, d=d, dv=d))
    bias = bias if with_bias else None
    ref, lse_ref = attention_ref(q, k, v, bias)
    pt, _ = attention_ref(q, k, v, bias, upcast=False)
    res = attention(q, k, v, bias, backend="fa4", return_lse=True)
    assert res.out.dtype == dtype and res.out.shape == (1, 4, lq, d)
    assert_within_rule("fa4", res.out, ref, pt)
    assert res.lse is not None and torch.allclose(res.lse, lse_ref.float(), atol=1e-3, rtol=1e-3)
    assert torch.equal(attention(q, k, v, bias, backend="fa4").out, res.out)


@_FA4
def test_fa4_route_masked_rows_and_nan_like_the_others():
    q, k, v, bias = (t.cuda() for t in _inputs(5, 7, torch.bfloat16, masked=7))
    res = attention(q, k, v, bias, backend="fa4", return_lse=True)
    assert torch.all(res.out == 0) and torch.all(torch.isneginf(res.lse))
    q, k, v, bias = (t.cuda() for t in _inputs(5, 97, torch.bfloat16))
    q[0, 1, 2, 3] = float("nan")
    out = attention(q, k, v, bias, backend="fa4").out
    assert torch.isnan(out[0, 1, 2]).all() and not torch.isnan(out[0, 0]).any()


def test_cudnn_lse_route_refuses_where_it_cannot_run_and_changes_nothing():
    q, k, v, bias = _inputs(3, 5, torch.float32)
    before = [t.clone() for t in (q, k, v, bias)]
    with pytest.raises(ValueError, match=r"sdpa_augmented.*cuDNN.*float32 on cpu"):
        attention(q, k, v, bias, backend="sdpa_augmented", return_lse=True)
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, v, bias), strict=True))
    # Off CUDA "auto" keeps its exact torch route for the log-sum-exp.
    res = attention(q, k, v, bias, return_lse=True)
    ref = attention(q, k, v, bias, backend="chunked", return_lse=True)
    assert torch.equal(res.out, ref.out) and torch.equal(res.lse, ref.lse)


_CUDNN = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0), reason="needs an Ampere+ GPU"
)


@_CUDNN
@pytest.mark.parametrize(("lq", "lk"), [(97, 1025), (1, 97), (200, 128), (4680, 3000)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize(("d", "hk"), [(64, 2), (128, 4), (20, 4)])
def test_cudnn_lse_route_matches_the_reference(lq, lk, dtype, with_bias, d, hk):
    q, k, v, bias = (t.cuda() for t in _inputs(lq, lk, dtype, hk=hk, d=d, dv=64))
    bias = bias if with_bias else None
    ref, lse_ref = attention_ref(q, k, v, bias)
    pt, _ = attention_ref(q, k, v, bias, upcast=False)
    res = attention(q, k, v, bias, backend="sdpa_augmented", return_lse=True)
    assert res.out.dtype == dtype and res.out.shape == (1, 4, lq, 64)
    assert_within_rule("sdpa_augmented", res.out, ref, pt)
    assert res.lse is not None and res.lse.dtype == torch.float32 and res.lse.shape == (1, 4, lq)
    assert torch.allclose(res.lse, lse_ref.float(), atol=1e-3, rtol=1e-3), (res.lse - lse_ref).abs().max()
    # The same output as the route without the log-sum-exp, and what "auto" picks for it on CUDA.
    auto = attention(q, k, v, bias, return_lse=True)
    assert torch.equal(auto.out, res.out) and torch.equal(auto.lse, res.lse)


@_CUDNN
def test_cudnn_lse_route_masked_rows_nan_and_merge_like_the_others():
    q, k, v, bias = (t.cuda() for t in _inputs(5, 7, torch.bfloat16, masked=7))
    res = attention(q, k, v, bias, backend="sdpa_augmented", return_lse=True)
    assert torch.all(res.out == 0) and torch.all(torch.isneginf(res.lse))
    q, k, v, bias = (t.cuda() for t in _inputs(97, 1025, torch.bfloat16))
    q[0, 1, 2, 3] = float("nan")
    res = attention(q, k, v, bias, backend="sdpa_augmented", return_lse=True)
    assert torch.isnan(res.out[0, 1, 2]).all() and torch.isnan(res.lse[0, 1, 2])
    assert not torch.isnan(res.out[0, 0]).any() and not torch.isnan(res.lse[0, 0]).any()
    # Two disjoint parts merged by their log-sum-exps are attention over the union (the host tier's use).
    q[0, 1, 2, 3] = 0.0
    ref, _ = attention_ref(q, k, v, bias)
    pt, _ = attention_ref(q, k, v, bias, upcast=False)
    a = attention(q, k[:, :, :600], v[:, :, :600], bias[:, :, :600], backend="sdpa_augmented", return_lse=True)
    b = attention(q, k[:, :, 600:], v[:, :, 600:], bias[:, :, 600:], backend="sdpa_augmented", return_lse=True)
    merged = merge_attention(a.out, a.lse, b.out, b.lse)[0]
    assert_within_rule("sdpa_augmented", merged, ref, pt)


def _union_parts(lq, lens, dtype, device="cpu", masked_all=False, seed=0):
    q, k, v, bias = _inputs(lq, sum(lens), dtype, seed=seed, masked=sum(lens) if masked_all else 5)
    q, k, v, bias = (t.to(device) for t in (q, k, v, bias))
    parts, off = [], 0
    for n in lens:
        parts.append((k[:, :, off : off + n], v[:, :, off : off + n], bias[:, :, off : off + n]))
        off += n
    return q, k, v, bias, parts


@pytest.mark.parametrize("lens", [(1025, 97), (5, 1), (200, 40, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_union_of_parts_is_attention_over_their_concatenation(lens, dtype):
    from longroll.ops.attention import attention_union

    q, k, v, bias, parts = _union_parts(97, lens, dtype)
    ref, _ = attention_ref(q, k, v, bias)
    pt, _ = attention_ref(q, k, v, bias, upcast=False)
    out = attention_union(q, parts)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_within_rule("union", out, ref, pt)
    # A part without a bias counts as one with a zero bias.
    nob = [(pk, pv, None) for pk, pv, _ in parts]
    zero = [(pk, pv, torch.zeros_like(pb)) for pk, pv, pb in parts]
    assert torch.equal(attention_union(q, nob), attention_union(q, zero))


def test_union_refuses_bad_parts():
    from longroll.ops.attention import attention_union

    q, _, _, _, parts = _union_parts(5, (7, 3), torch.float32)
    with pytest.raises(ValueError, match="at least one"):
        attention_union(q, [])
    k, v, b = parts[1]
    with pytest.raises(ValueError, match=r"parts\[1\] must have the batch, kv heads and value width"):
        attention_union(q, [parts[0], (k, v[..., :8], b)])
    with pytest.raises(ValueError, match="scale must be finite"):
        attention_union(q, parts, scale=float("inf"))


@_CUDNN
@pytest.mark.parametrize("lens", [(28080, 1920), (1025, 97), (5, 1), (200, 40, 7)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_union_on_cuda_is_one_cudnn_call_within_the_rule(lens, dtype):
    from longroll.ops.attention import attention_union

    lq = 4680 if lens[0] > 10_000 else 97
    q, k, v, bias, parts = _union_parts(lq, lens, dtype, device="cuda")
    ref, _ = attention_ref(q, k, v, bias)
    pt, _ = attention_ref(q, k, v, bias, upcast=False)
    out = attention_union(q, parts)
    assert_within_rule("union", out, ref, pt)
    merged = attention_union(q, parts, backend="triton")
    assert_within_rule("union_merged", merged, ref, pt)


@_CUDNN
def test_union_on_cuda_masked_rows_and_nan_like_the_others():
    from longroll.ops.attention import attention_union

    q, _, _, _, parts = _union_parts(5, (7, 3), torch.bfloat16, device="cuda", masked_all=True)
    assert torch.all(attention_union(q, parts) == 0)
    q, _, _, _, parts = _union_parts(97, (300, 40), torch.bfloat16, device="cuda")
    q[0, 1, 2, 3] = float("nan")
    out = attention_union(q, parts)
    assert torch.isnan(out[0, 1, 2]).all() and not torch.isnan(out[0, 0]).any()
