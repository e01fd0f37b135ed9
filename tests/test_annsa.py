import math

import pytest
import torch

from longroll.ann import Int8Config, LSHConfig
from longroll.ann.lsh import SignLSH
from longroll.cache import BudgetPolicy, CacheConfig, FullPolicy, LayerKVCache, SinkWindowPolicy, TempCachePolicy
from longroll.eval.synthetic import clustered_qk
from longroll.ops.reference import attention_ref
from longroll.sparse import AnnSAConfig, AnnSAPlanner, annsa_reference, measure_layer
from tests.tolerance import assert_within_rule


def _data(tpf, fpc, chunks, heads=4, d=32, seed=0):
    """Clustered q/k for (chunks + 1) chunks: q (1, heads, n, d) of the last chunk, k and v of all chunks."""
    total = tpf * fpc * (chunks + 1)
    q, k = clustered_qk(total, total, heads=heads, head_dim=d, clusters=6, spread=0.5, scale=5.0, seed=seed)
    v = torch.randn(k.shape, generator=torch.Generator().manual_seed(seed + 1))
    return q[:, :, -tpf * fpc :].contiguous(), k.contiguous(), v


def _policy(name, tpf, fpc):
    if name == "full":
        return FullPolicy()
    if name == "budget":
        return BudgetPolicy(budget_tokens=3 * tpf * fpc, sink_frames=1)
    return TempCachePolicy(threshold=0.75, overflow_threshold=0.7, max_entries=64 * tpf, sink_frames=1)


def _cache(policy, tpf, fpc, chunks, data, dtype=torch.float32, head_ids=None):
    """A cache with ``chunks`` committed chunks of ``data`` (nothing staged)."""
    _, k, v = data
    cache = LayerKVCache(
        CacheConfig(tpf, fpc, policy, check_finite=False),
        batch=1,
        heads=k.shape[1],
        head_dim=k.shape[-1],
        dtype=dtype,
        head_ids=head_ids,
    )
    n = tpf * fpc
    for c in range(chunks):
        cache.stage(k[:, :, c * n : (c + 1) * n].to(dtype), v[:, :, c * n : (c + 1) * n].to(dtype), frame_start=c * fpc)
        cache.commit()
    return cache


def _stage_last(cache, data, dtype=torch.float32):
    _, k, v = data
    n = cache.config.chunk_tokens
    cache.stage(k[:, :, -n:].to(dtype), v[:, :, -n:].to(dtype), frame_start=cache.committed_frames)
    return cache.view()


def _plan(planner, cache, **kw):
    """Plan ``cache`` and apply the plan to it, as a layer does after each commit."""
    plan = planner.plan(cache, **kw)
    plan.apply_to(cache)
    return plan


def _setup(policy="full", ann=None, tpf=97, fpc=1, chunks=4, dtype=torch.float32, heads=4, **cfg):
    data = _data(tpf, fpc, chunks, heads=heads)
    cache = _cache(_policy(policy, tpf, fpc), tpf, fpc, chunks, data, dtype)
    planner = AnnSAPlanner(AnnSAConfig(ann=ann or LSHConfig(bits=3, probes=1), backend="torch", **cfg))
    plan = _plan(planner, cache)
    view = _stage_last(cache, data, dtype)
    return planner, view, data[0].to(dtype), cache, plan


CASES = [
    ("full", LSHConfig(bits=3, tables=2, probes=1), torch.float32, 97, 1, 32, 64),
    ("tempcache", LSHConfig(bits=4, probes=0), torch.float32, 97, 1, 32, 32),
    ("budget", Int8Config(), torch.float32, 97, 1, 64, 32),
    ("full", Int8Config(), torch.bfloat16, 205, 1, 64, 128),
    ("tempcache", LSHConfig(bits=5, tables=2, probes=1), torch.bfloat16, 97, 2, 128, 64),
]


@pytest.mark.parametrize(("policy", "ann", "dtype", "tpf", "fpc", "qb", "kb"), CASES)
def test_exact_given_selection(policy, ann, dtype, tpf, fpc, qb, kb):
    planner, view, q, _, plan = _setup(
        policy, ann, tpf, fpc, dtype=dtype, q_block_size=qb, kv_block_size=kb, top_k_blocks=2
    )
    if policy == "tempcache":
        assert torch.isneginf(view.bias).any(), "the TempCache view should hold empty (-inf) slots"
    res = planner.run(q, view, plan)
    sel = res.selection
    sel.index.validate_ids()
    ref, lse_ref = annsa_reference(q, view, sel)
    same, _ = annsa_reference(q, view, sel, upcast=False)
    assert res.out.dtype == dtype
    assert_within_rule(f"annsa {policy}", res.out, ref, same)
    assert torch.allclose(res.lse, lse_ref, atol=1e-3 if dtype == torch.bfloat16 else 1e-4)
    assert 0 < float(sel.density.min()) <= float(sel.density.max()) <= 1
    assert abs(float(sel.density.mean()) - sel.index.density()) < 1e-6


def test_all_blocks_selected_equals_dense_attention():
    # One bit with a probe: every query visits both buckets, so every key block with a valid key is selected.
    for policy in ("full", "tempcache"):
        planner, view, q, _, plan = _setup(policy, LSHConfig(bits=1, probes=1), q_block_size=32, kv_block_size=32)
        res = planner.run(q, view, plan)
        bias = None if view.bias is None else torch.where(torch.isneginf(view.bias), float("-inf"), view.bias)
        ref, _ = attention_ref(q, view.k, view.v, bias)
        same, _ = attention_ref(q, view.k, view.v, bias, upcast=False)
        assert_within_rule(f"dense {policy}", res.out, ref, same)
        if policy == "full":
            assert torch.all(res.selection.density == 1)


def test_first_chunk_without_history_and_single_blocks():
    data = _data(97, 1, 0)
    cache = _cache(FullPolicy(), 97, 1, 0, data)
    planner = AnnSAPlanner(AnnSAConfig(q_block_size=128, kv_block_size=256, backend="torch"))
    plan = _plan(planner, cache)
    view = _stage_last(cache, data)
    res = planner.run(data[0], view, plan)
    assert res.selection.index.kv_num_blocks.tolist() == [[[1]] * 4]
    ref, _ = attention_ref(data[0], view.k, view.v)
    assert_within_rule("own chunk", res.out, ref, attention_ref(data[0], view.k, view.v, upcast=False)[0])


def test_sinks_and_own_chunk_are_always_attended():
    planner, view, q, cache, plan = _setup("tempcache", LSHConfig(bits=6, probes=0), q_block_size=32, kv_block_size=32)
    mask = planner.select(q, view, plan).key_mask()
    sink = cache.config.tokens_per_frame
    assert mask[..., :sink].all()
    assert mask[..., -q.shape[2] :].all()
    assert not mask.all()


def test_plan_makes_buckets_contiguous_without_changing_attention():
    data = _data(97, 1, 4)
    cache = _cache(_policy("tempcache", 97, 1), 97, 1, 4, data)
    before = cache.view()
    bias = torch.where(torch.isneginf(before.bias), float("-inf"), before.bias)
    out_before, _ = attention_ref(data[0], before.k.clone(), before.v.clone(), bias.clone())
    planner = AnnSAPlanner(AnnSAConfig(ann=LSHConfig(bits=4), backend="torch"))
    _plan(planner, cache)
    after = cache.view()
    out_after, _ = attention_ref(data[0], after.k, after.v, after.bias)
    assert torch.allclose(out_before, out_after, atol=1e-10)
    sink = 97
    lsh = SignLSH(LSHConfig(bits=4), 32, layer=0, head_ids=range(4))
    codes = lsh.codes(after.k[:, :, sink:])[..., 0]
    valid = cache.buffers.count[:, :, sink : cache.bound] > 0
    for h in range(4):
        n = int(valid[0, h].sum())
        assert valid[0, h, :n].all() and not valid[0, h, n:].any()
        assert torch.all(codes[0, h, 1:n] >= codes[0, h, : n - 1])


def _storage(cache):
    buf = cache.buffers
    t = cache.track
    track = () if t is None else (t.slots, t.keys, t.active)
    return [t.clone() for t in (buf.k, buf.v, buf.count, buf.frame, buf.lengths, *track)]


@pytest.mark.parametrize(
    ("ann", "sinks"),
    [(LSHConfig(bits=4), True), (LSHConfig(bits=3, tables=2, probes=1), True), (LSHConfig(bits=3), False),
     (Int8Config(), True)],
    ids=["lsh", "lsh2", "lsh-hashed-sinks", "int8"],
)  # fmt: skip
def test_planning_reads_the_cache_and_the_plan_is_what_the_reordered_cache_gives(ann, sinks):
    data = _data(97, 1, 4)
    cache = _cache(_policy("tempcache", 97, 1), 97, 1, 4, data)
    planner = AnnSAPlanner(AnnSAConfig(ann=ann, q_block_size=32, kv_block_size=32, attend_sinks=sinks,
                                       backend="torch"))  # fmt: skip
    before = _storage(cache)
    plan = planner.plan(cache)
    assert all(torch.equal(a, b) for a, b in zip(before, _storage(cache), strict=True)), "planning wrote storage"
    start, end = cache.pinned_tokens, cache.bound
    assert (plan.start, plan.bound) == (start, end) == (97, cache.bound)
    assert torch.equal(plan.order.sort(-1).values, torch.arange(end - start).expand_as(plan.order))
    assert any(not torch.equal(plan.order[0, h], torch.arange(end - start)) for h in range(4)), "nothing to sort"
    plan.apply_to(cache)
    # Planning the reordered cache again (same anchors) finds it in order and computes the same tensors: the
    # plan described the layout it asked for.
    again = planner.plan(cache, anchors=plan.anchors)
    assert torch.equal(again.order, torch.arange(end - start).expand_as(again.order))
    for name in ("offsets", "cover", "block_codes", "block_ok"):
        a, b = getattr(plan, name), getattr(again, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    if plan.centroids is not None:
        assert again.centroids is not None and torch.equal(plan.centroids.codes, again.centroids.codes)
        assert torch.equal(plan.centroids.scale, again.centroids.scale)
    # A plan is of one commit: applying it to the cache after another commit is refused, changing nothing.
    _, k, v = data
    cache.stage(k[:, :, -97:], v[:, :, -97:], frame_start=cache.committed_frames)
    cache.commit()
    stored = _storage(cache)
    with pytest.raises(ValueError, match="plannable slots"):
        again.apply_to(cache)
    assert all(torch.equal(a, b) for a, b in zip(stored, _storage(cache), strict=True))


def test_plans_start_past_the_pinned_slots():
    data = _data(16, 1, 4, heads=2, d=16)
    int8 = AnnSAPlanner(AnnSAConfig(ann=Int8Config(), backend="torch"))
    full = _cache(FullPolicy(), 16, 1, 3, data)
    budget = _cache(BudgetPolicy(budget_tokens=48, sink_frames=2), 16, 1, 4, data)
    assert [(p.start, p.bound) for p in (int8.plan(full), int8.plan(budget))] == [(0, 48), (32, 48)]
    young = _cache(TempCachePolicy(max_entries=64, sink_frames=2), 16, 1, 1, data)
    plan = int8.plan(young)  # fewer frames than sinks: nothing to reorder
    assert (plan.start, plan.bound) == (16, 16) and plan.order.shape == (1, 2, 0)
    plan.apply_to(young)  # an empty range moves nothing


@pytest.mark.parametrize("ann", [LSHConfig(bits=4, tables=2, probes=1), Int8Config()])
def test_heads_subset_is_the_slice_of_all_heads(ann):
    data = _data(97, 1, 3)
    sub = tuple(t[:, 2:4].contiguous() for t in data)
    outs = []
    for d, ids in ((data, None), (sub, (2, 3))):
        cache = _cache(_policy("tempcache", 97, 1), 97, 1, 3, d, head_ids=ids)
        planner = AnnSAPlanner(AnnSAConfig(ann=ann, q_block_size=32, kv_block_size=32, top_k_blocks=3, backend="torch"))
        plan = _plan(planner, cache)
        outs.append(planner.run(d[0], _stage_last(cache, d), plan))
    full, part = outs
    assert torch.equal(full.selection.index.to_dense()[:, 2:4], part.selection.index.to_dense())
    assert torch.allclose(full.out[:, 2:4], part.out, atol=1e-6)


def test_grouped_query_heads():
    planner, view, _, _, plan = _setup("full", LSHConfig(bits=3, tables=2, probes=1), q_block_size=32, kv_block_size=32)
    q = torch.randn(1, 8, 97, 32, generator=torch.Generator().manual_seed(5)) * 3
    res = planner.run(q, view, plan)
    ref, _ = annsa_reference(q, view, res.selection)
    assert_within_rule("gqa", res.out, ref, annsa_reference(q, view, res.selection, upcast=False)[0])


def test_recall_and_density_grow_with_topk_and_reach_one():
    data = _data(97, 1, 6)
    rows = []
    for k in (1, 4, 64):
        cache = _cache(FullPolicy(), 97, 1, 6, data)
        planner = AnnSAPlanner(
            AnnSAConfig(ann=Int8Config(), q_block_size=32, kv_block_size=32, top_k_blocks=k, backend="torch")
        )
        plan = _plan(planner, cache)
        rows.append(measure_layer(data[0], _stage_last(cache, data), planner, plan, query_sample=64))
    assert rows[0][0] <= rows[1][0] <= rows[2][0] and rows[0][1] < rows[1][1] < rows[2][1]
    assert rows[2] == pytest.approx((1.0, 1.0), abs=1e-6)


def test_cover_matrix_and_difference_arrays_select_the_same(monkeypatch):
    import longroll.sparse.annsa as annsa

    first, view, q, _, plan1 = _setup("tempcache", LSHConfig(bits=4, probes=1), q_block_size=32, kv_block_size=32)
    monkeypatch.setattr(annsa, "_COVER_LIMIT", 0)
    second, view2, _, _, plan2 = _setup("tempcache", LSHConfig(bits=4, probes=1), q_block_size=32, kv_block_size=32)
    assert plan1.cover is not None and plan2.cover is None
    assert torch.equal(first.select(q, view, plan1).block_mask, second.select(q, view2, plan2).block_mask)


def test_max_density_caps_the_ann_blocks():
    cap = 0.25
    planner, view, q, _, plan = _setup(
        "full", LSHConfig(bits=2, probes=1), q_block_size=32, kv_block_size=32, max_density=cap
    )
    dense = planner.select(q, view, plan).index.to_dense()
    nkb = dense.shape[-1]
    own = (view.k.shape[2] - q.shape[2]) // 32  # first block holding staged keys
    assert int(dense[..., :own].sum(-1).max()) <= math.ceil(cap * nkb)
    assert dense[..., own:].all()


def test_hashed_sinks_and_own_chunk_stay_exact():
    planner, view, q, _, plan = _setup(
        "tempcache",
        LSHConfig(bits=6, tables=2, probes=0),
        q_block_size=32,
        kv_block_size=32,
        attend_sinks=False,
        attend_own_chunk=False,
    )
    res = planner.run(q, view, plan)
    mask = res.selection.key_mask()
    assert not mask[..., -q.shape[2] :].all()
    ref, _ = annsa_reference(q, view, res.selection)
    assert_within_rule("hashed", res.out, ref, annsa_reference(q, view, res.selection, upcast=False)[0])
    planner = AnnSAPlanner(
        AnnSAConfig(
            ann=Int8Config(),
            q_block_size=32,
            kv_block_size=32,
            top_k_blocks=2,
            backend="torch",
            attend_sinks=False,
            attend_own_chunk=False,
        )
    )
    data = _data(97, 1, 3)
    cache = _cache(_policy("tempcache", 97, 1), 97, 1, 3, data)
    plan = _plan(planner, cache)
    view = _stage_last(cache, data)
    res = planner.run(data[0], view, plan)
    assert int(res.selection.index.kv_num_blocks.max()) <= 2
    ref, _ = annsa_reference(data[0], view, res.selection)
    assert_within_rule("hashed int8", res.out, ref, annsa_reference(data[0], view, res.selection, upcast=False)[0])


def test_staged_tokens_override():
    planner, view, q, _, plan = _setup("full", LSHConfig(bits=3, probes=1), q_block_size=32, kv_block_size=32)
    res = planner.run(q[:, :, :40], view, plan, staged_tokens=97)
    assert res.selection.key_mask()[..., -97:].all()
    ref, _ = annsa_reference(q[:, :, :40], view, res.selection)
    assert_within_rule("subset", res.out, ref, annsa_reference(q[:, :, :40], view, res.selection, upcast=False)[0])


def test_triton_interpreter_matches_torch_backend():
    pytest.importorskip("triton")
    data = _data(64, 1, 2, heads=2, d=32)
    cache = _cache(_policy("tempcache", 64, 1), 64, 1, 2, data)
    planner = AnnSAPlanner(
        AnnSAConfig(ann=LSHConfig(bits=3, probes=1), q_block_size=32, kv_block_size=32, backend="triton")
    )
    plan = _plan(planner, cache)
    view = _stage_last(cache, data)
    res = planner.run(data[0], view, plan)
    ref, _ = annsa_reference(data[0], view, res.selection)
    assert_within_rule("triton", res.out, ref, annsa_reference(data[0], view, res.selection, upcast=False)[0])


def test_bad_inputs_raise_naming_the_argument():
    with pytest.raises(ValueError, match="q_block_size"):
        AnnSAConfig(q_block_size=100)
    with pytest.raises(ValueError, match="max_density"):
        AnnSAConfig(max_density=0.0)
    with pytest.raises(ValueError, match="ann"):
        AnnSAConfig(ann="lsh")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend"):
        AnnSAConfig(backend="cuda")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="top_k_blocks"):
        AnnSAConfig(top_k_blocks=0)
    planner = AnnSAPlanner(AnnSAConfig(backend="torch"))
    data = _data(16, 1, 1, heads=2, d=16)
    with pytest.raises(ValueError, match="plan must be an AnnSAPlan"):
        planner.select(data[0], _cache(FullPolicy(), 16, 1, 1, data).view(), None)  # type: ignore[arg-type]
    ring = _cache(SinkWindowPolicy(sink_frames=1, window_frames=2), 16, 1, 1, data)
    with pytest.raises(ValueError, match="SinkWindowPolicy"):
        planner.plan(ring)
    cache = _cache(FullPolicy(), 16, 1, 1, data)
    _stage_last(cache, data)
    with pytest.raises(ValueError, match="staged"):
        planner.plan(cache)
    cache = _cache(FullPolicy(), 16, 1, 1, data)
    plan = _plan(planner, cache)
    view = _stage_last(cache, data)
    with pytest.raises(ValueError, match="staged_tokens"):
        planner.select(data[0], view, plan, staged_tokens=10_000)
    with pytest.raises(ValueError, match="plan"):
        planner.select(data[0], view, plan, staged_tokens=0)
    with pytest.raises(ValueError, match="k must have shape"):
        planner.select(torch.randn(1, 2, 16, 8), view, plan)
    with pytest.raises(ValueError, match="view"):
        planner.select(data[0], (view.k, view.v, None), plan)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="staged tokens"):
        plan.apply_to(cache)  # a chunk is staged: the cache is no longer the one planned
    with pytest.raises(ValueError, match="config"):
        AnnSAPlanner("lsh")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "ann", [LSHConfig(bits=3, probes=1), LSHConfig(bits=4, tables=2), Int8Config()], ids=["lsh", "lsh2", "int8"]
)
def test_captured_selection_equals_eager_selection(ann):
    """graphs='emulate' runs the capture machinery (eager warm-up, capture, replays with static inputs) on the
    CPU; over several steps of several plans it must select exactly what the eager planner selects."""
    tpf, fpc, chunks = 97, 1, 6
    data = _data(tpf, fpc, chunks)
    cache = _cache(_policy("full", tpf, fpc), tpf, fpc, 2, data)
    cfg = AnnSAConfig(ann=ann, backend="torch")
    eager, graphed = AnnSAPlanner(cfg), AnnSAPlanner(cfg, graphs="emulate")
    _, k, v = data
    n = tpf * fpc
    g = torch.Generator().manual_seed(3)
    for c in range(2, chunks):
        plan = _plan(eager, cache)  # one plan, applied once, for both planners
        cache.stage(k[:, :, c * n : (c + 1) * n], v[:, :, c * n : (c + 1) * n], frame_start=c * fpc)
        for _ in range(3):  # denoising steps: new queries each time
            q = torch.randn(1, 4, n, 32, generator=g) * 3
            a, b = eager.select(q, cache.view(), plan), graphed.select(q, cache.view(), plan)
            torch.testing.assert_close(b.block_mask, a.block_mask, rtol=0, atol=0)
            torch.testing.assert_close(b.q_order, a.q_order, rtol=0, atol=0)
            torch.testing.assert_close(b.index.kv_indices, a.index.kv_indices, rtol=0, atol=0)
            torch.testing.assert_close(b.index.kv_num_blocks, a.index.kv_num_blocks, rtol=0, atol=0)
        cache.commit()
    assert graphed.select_capture.captured


def test_graphs_setting_is_validated():
    with pytest.raises(ValueError, match="graphs"):
        AnnSAPlanner(AnnSAConfig(), graphs="always")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("ann", [LSHConfig(bits=6, probes=1), Int8Config()], ids=["lsh", "int8"])
def test_cuda_graph_selection_equals_eager_on_gpu(ann):
    tpf, n_hist = 1560, 9
    g = torch.Generator(device="cuda").manual_seed(0)
    policy = TempCachePolicy(max_entries=n_hist * tpf, sink_frames=1)
    cache = LayerKVCache(CacheConfig(tpf, 3, policy, check_finite=False), batch=1, heads=4, head_dim=128,
                         dtype=torch.bfloat16, device="cuda")  # fmt: skip
    cfg = AnnSAConfig(ann=ann)
    eager, graphed = AnnSAPlanner(cfg, graphs="off"), AnnSAPlanner(cfg, graphs="auto")
    plan = None
    for c in range(6):
        k = torch.randn(1, 4, 3 * tpf, 128, device="cuda", generator=g, dtype=torch.bfloat16)
        cache.stage(k, torch.randn_like(k), frame_start=3 * c)
        if c >= 3:  # the cache is at its cap: static shapes, so the selection is captured and replayed
            for _ in range(3):
                q = torch.randn(1, 4, 3 * tpf, 128, device="cuda", generator=g, dtype=torch.bfloat16)
                a, b = eager.select(q, cache.view(), plan), graphed.select(q, cache.view(), plan)
                torch.testing.assert_close(b.block_mask, a.block_mask, rtol=0, atol=0)
                torch.testing.assert_close(b.index.kv_indices, a.index.kv_indices, rtol=0, atol=0)
        cache.commit()
        plan = _plan(eager, cache)
    assert graphed.select_capture.captured and not graphed.select_capture.failed
