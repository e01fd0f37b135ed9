"""Attention's NaN policy and masking semantics, route by route (reproducers: NaN queries or a NaN scale came
back as an all-zero finite output from ``chunked``; a fully masked row gave ordinary unmasked attention on the
SDPA routes and 0 on ``chunked``; a NaN bias gave a finite output on ``chunked``); and ``commit(queries=...)``
refusing NaN, float64 and wrong-length queries."""

import math

import pytest
import torch

from longroll.cache import BudgetPolicy, CacheConfig, LayerKVCache
from longroll.ops.attention import attention
from longroll.ops.reference import attention_ref
from longroll.ops.types import MASKED_BIAS
from tests.device import KERNEL_DEVICE

# The Triton interpreter computes in numpy, which warns about the NaN these tests feed it on purpose.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning"),
]
ROUTES = ("chunked", "sdpa", "sdpa_augmented", "triton")
B, H, HK, LQ, LK, D = 1, 4, 2, 5, 33, 16  # grouped heads, odd lengths


#: The route tests place their tensors where the Triton kernel runs (conftest then keeps them in the GPU suite).
KERNEL_DEVICE_AWARE = True


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, LQ, D, generator=g)
    k = torch.randn(B, HK, LK, D, generator=g)
    v = torch.randn(B, HK, LK, D, generator=g)
    bias = torch.randn(B, HK, LK, generator=g)
    return tuple(x.to(KERNEL_DEVICE) for x in (q, k, v, bias))


def _run(route, q, k, v, bias, **kw):
    return attention(q, k, v, bias, backend=route, **kw).out


@pytest.mark.parametrize("route", ROUTES)
def test_nan_query_gives_nan_in_its_row_only(route):
    q, k, v, bias = _inputs()
    q[0, 1, 2, 5] = float("nan")
    out = _run(route, q, k, v, bias)
    assert torch.isnan(out[0, 1, 2]).all()
    rest = torch.ones(out.shape[:3], dtype=torch.bool, device=out.device)
    rest[0, 1, 2] = False
    assert torch.isfinite(out[rest]).all()


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name", ["k", "v"])
def test_nan_key_or_value_poisons_the_rows_that_attend_it(route, name):
    q, k, v, bias = _inputs()
    {"k": k, "v": v}[name][0, 1, 7, 3] = float("nan")
    out = _run(route, q, k, v, bias)
    # Query heads 2, 3 read kv head 1; a NaN key poisons their whole rows, a NaN value its column.
    hit = out[0, 2:4] if name == "k" else out[0, 2:4, :, 3]
    assert torch.isnan(hit).all()
    assert torch.isfinite(out[0, :2]).all()


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_plus_inf_bias_is_never_a_finite_output(route, value):
    q, k, v, bias = _inputs()
    bias[0, 0, 4] = value
    out = _run(route, q, k, v, bias)
    assert torch.isnan(out[0, :2]).all()
    assert torch.isfinite(out[0, 2:]).all()


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scale_is_refused(route, scale):
    q, k, v, bias = _inputs()
    with pytest.raises(ValueError, match="scale must be finite"):
        _run(route, q, k, v, bias, scale=scale)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("masked", [float("-inf"), -1e9])
def test_fully_masked_rows_are_zero_on_every_route(route, masked):
    q, k, v, bias = _inputs()
    bias[0, 1] = masked  # every key of kv head 1: query heads 2, 3 see no key
    out = _run(route, q, k, v, bias)
    assert torch.equal(out[0, 2:], torch.zeros_like(out[0, 2:]))
    # The reference knows only -inf as masked: anything <= MASKED_BIAS is masked on every route.
    ref, lse = attention_ref(q, k, v, torch.where(bias <= MASKED_BIAS, float("-inf"), bias))
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.isinf(lse[0, 2:]).all() and (lse[0, 2:] < 0).all()
    if route in ("chunked", "triton"):
        got = attention(q, k, v, bias, backend=route, return_lse=True).lse
        assert got is not None and torch.equal(got[0, 2:], lse[0, 2:])


@pytest.mark.parametrize("route", ROUTES)
def test_partly_masked_rows_match_the_reference(route):
    q, k, v, bias = _inputs()
    bias[:, :, ::3] = float("-inf")
    ref, _ = attention_ref(q, k, v, bias)
    assert torch.allclose(_run(route, q, k, v, bias), ref, atol=1e-5)


@pytest.mark.parametrize("route", ["sdpa", "sdpa_augmented"])
def test_nan_query_in_a_fully_masked_row_stays_nan(route):
    q, k, v, bias = _inputs()
    bias[0, 1] = float("-inf")
    q[0, 3, 1, 0] = float("nan")
    out = _run(route, q, k, v, bias)
    assert torch.isnan(out[0, 3, 1]).all() and not torch.isnan(out[0, 3, 0]).any()
    assert math.isnan(float(attention(q, k, v, bias, backend="chunked").out[0, 3, 1, 0]))


# ------------------------------------------------------------------------------------------- commit(queries=)
P, F, HC, DC = 8, 2, 2, 16


def _budget_cache(check_finite=True):
    cfg = CacheConfig(P, F, BudgetPolicy(budget_tokens=4 * P, sink_frames=1, query_sample=4), check_finite=check_finite)
    return LayerKVCache(cfg, batch=1, heads=HC, head_dim=DC)


def _staged(cache):
    k, v = torch.randn(1, HC, F * P, DC), torch.randn(1, HC, F * P, DC)
    cache.stage(k, v, frame_start=cache.committed_frames)


@pytest.mark.parametrize(
    ("queries", "needle"),
    [
        (torch.full((1, HC, F * P, DC), float("nan")), "queries holds NaN"),
        (torch.randn(1, HC, F * P, DC, dtype=torch.float64), "queries must be torch.float32"),
        (torch.randn(1, HC, F * P - 1, DC), "the 16 staged tokens"),
        (torch.randn(1, 3, F * P, DC), "k*2"),
        (torch.randint(0, 3, (1, HC, F * P, DC)), "floating"),
    ],
)
def test_commit_refuses_bad_queries_and_changes_nothing(queries, needle):
    cache = _budget_cache()
    for _ in range(3):
        _staged(cache)
        cache.commit(queries=torch.randn(1, HC, F * P, DC))
    _staged(cache)
    before = [t.clone() for t in (cache.buffers.k, cache.buffers.count, cache.buffers.frame, cache.buffers.lengths)]
    host = (cache.bound, cache.committed_frames, cache.staged_tokens)
    with pytest.raises(ValueError) as err:
        cache.commit(queries=queries)
    assert needle in str(err.value), str(err.value)
    after = (cache.buffers.k, cache.buffers.count, cache.buffers.frame, cache.buffers.lengths)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert (cache.bound, cache.committed_frames, cache.staged_tokens) == host
    cache.commit(queries=torch.randn(1, HC, F * P, DC))  # the staged chunk is still there to commit


def test_nan_queries_pass_unchecked_only_when_checks_are_off():
    cache = _budget_cache(check_finite=False)
    _staged(cache)
    cache.commit(queries=torch.full((1, HC, F * P, DC), float("nan")))  # documented: no host sync, no check
    assert cache.committed_frames == F


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_queries_that_choose_evictions_poison_the_cache_instead_of_hiding(bad):
    cache = _budget_cache(check_finite=False)
    for _ in range(3):  # past the budget: the committing queries choose what stays
        _staged(cache)
        cache.commit(queries=torch.randn(1, HC, F * P, DC))
    assert torch.isfinite(cache.view().k).all()
    _staged(cache)
    queries = torch.randn(1, HC, F * P, DC)
    queries[0, 0, 5, 0] = bad  # one poisoned value is enough
    cache.commit(queries=queries)
    out = attention(torch.randn(1, HC, 3, DC), *cache.view()).out
    assert torch.isnan(out).all()
