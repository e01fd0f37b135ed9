"""LayerAttention: one layer's cache, AnnSA plan, AnnCA prompt and gate, with one life cycle
(stage -> attend -> commit -> plan); the processor is the schedule over a list of them."""

from __future__ import annotations

import pytest
import torch

from longroll.cache.config import CacheConfig
from longroll.models.wan import WanConfig
from longroll.ops.reference import attention_ref
from longroll.policies.cached import CachedProcessor, PassInfo
from longroll.policies.config import preset
from longroll.policies.layer import LayerAttention
from longroll.sparse.radial import radial_index

P, FPC, H, D = 16, 2, 2, 16
N = P * FPC
TINY = WanConfig.from_preset("tiny")


def _layer(name: str, layer: int = 0) -> LayerAttention:
    pol = preset(name, tokens_per_frame=P, frames_per_chunk=FPC, memory_frames=5)
    cfg = CacheConfig(P, FPC, pol.cache, check_finite=True, commit_graphs="off")
    return LayerAttention(pol, cfg, layer=layer, batch=1, heads=H, head_dim=D, dtype=torch.float32, device="cpu")


def _chunk(seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, H, N, D, generator=g) * 2 for _ in range(4))  # q, k, v, k_pre_rope


def _run_chunk(lay: LayerAttention, seed: int, sparse: bool) -> torch.Tensor:
    q, k, v, kp = _chunk(seed)
    lay.stage(k, v, frame_start=lay.cache.committed_frames, k_pre_rope=kp)
    out = lay.attend(q, sparse=sparse)
    lay.commit(q)
    return out


@pytest.mark.parametrize("name", ["annsa", "annsa_int8", "all"])
def test_life_cycle_stage_attend_commit_plan(name):
    lay = _layer(name)
    assert lay.annsa_plan is None and lay.selection(torch.zeros(1, H, N, D)) is None
    for c in range(3):
        _run_chunk(lay, c, sparse=True)
        plan = lay.annsa_plan
        assert plan is not None and (plan.start, plan.bound) == (lay.cache.pinned_tokens, lay.cache.bound)
        # The layer applied its plan: planning the cache again finds it in the plan's order.
        again = lay.planner.plan(lay.cache, anchors=plan.anchors)
        assert torch.equal(again.order, torch.arange(plan.bound - plan.start).expand_as(again.order))
    q, k, v, kp = _chunk(10)
    lay.stage(k, v, frame_start=lay.cache.committed_frames, k_pre_rope=kp)
    view = lay.cache.view()
    # Dense pass: exact attention over [history ; chunk] (TempCache's log-count bias included).
    bias = None if view.bias is None else view.bias
    ref, _ = attention_ref(q, view.k, view.v, bias)
    torch.testing.assert_close(lay.attend(q, sparse=False), ref.float(), rtol=1e-4, atol=1e-5)
    # Sparse pass: the planner's run over the layer's plan, and the selection the layer reports is the one used.
    sel = lay.selection(q)
    assert sel is not None
    expect = lay.planner.run(q, view, lay.annsa_plan, staged_tokens=N).out
    assert torch.equal(lay.attend(q, sparse=True), expect)
    assert torch.equal(sel.block_mask, lay.planner.select(q, view, lay.annsa_plan, staged_tokens=N).block_mask)
    frames = lay.cache.committed_frames
    lay.commit(q)
    assert lay.cache.committed_frames == frames + FPC and lay.cache.staged_tokens == 0


def test_a_layer_without_annsa_holds_no_plan():
    lay = _layer("tempcache")
    _run_chunk(lay, 0, sparse=True)
    assert lay.planner is None and lay.annsa_plan is None and lay.annca is None
    lay.plan()
    assert lay.annsa_plan is None
    assert lay.commits.stream is None  # the CPU commits in line
    assert "LayerAttention(layer=0" in repr(lay)


def test_layer_state_round_trip_gives_the_same_plan_and_outputs():
    src = _layer("all_int8", layer=1)
    for c in range(3):
        _run_chunk(src, c, sparse=True)
    state = src.state_dict()
    assert {"annsa.anchor_codes", "annsa.anchor_scale", "k", "meta"} <= set(state)
    dst = _layer("all_int8", layer=1)
    _run_chunk(dst, 7, sparse=True)  # something else first: loading replaces it
    dst.load_state(dst.check_state(state))
    assert dst.annsa_plan is not None and src.annsa_plan is not None
    order = dst.annsa_plan.order  # the restored slots already follow the saved anchors' buckets
    assert torch.equal(order, torch.arange(order.shape[-1]).expand_as(order))
    again = dst.state_dict()
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)
    assert torch.equal(_run_chunk(dst, 4, sparse=True), _run_chunk(src, 4, sparse=True))


def test_layer_check_state_names_the_problem_and_changes_nothing():
    src, dst = _layer("annsa_int8"), _layer("annsa_int8")
    _run_chunk(src, 0, sparse=True)
    _run_chunk(dst, 1, sparse=True)
    before = dst.state_dict()
    bad = {k: v for k, v in src.state_dict().items() if k != "annsa.anchor_scale"}
    with pytest.raises(ValueError, match="an int8 AnnSA plan needs"):
        dst.check_state(bad)
    with pytest.raises(ValueError, match="no AnnCA"):
        dst.check_state(src.state_dict() | {"annca_gate": torch.zeros(3, dtype=torch.float64)})
    with pytest.raises(ValueError, match="this policy has none"):
        _layer("tempcache").check_state(src.state_dict())
    after = dst.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_annca_gate_is_measured_once_per_prompt_and_survives_a_prompt_reset():
    lay = _layer("annca")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, H, N, D, generator=g)
    k, v = torch.randn(1, H, 12, D, generator=g), torch.randn(1, H, 12, D, generator=g)
    dense = lay.cross_attention(q, k, v, sparse=False, tokens_per_frame=P)
    torch.testing.assert_close(dense, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert lay.prompt is None and lay.gate is None  # dense steps do not collapse the prompt
    lay.cross_attention(q, k, v, sparse=True, tokens_per_frame=P)
    assert lay.prompt is not None and lay.selecting is not None and lay.gate is not None
    gate = lay.gate
    lay.reset_prompt()
    assert lay.prompt is None and lay.selecting is None and lay.gate == gate
    lay.cross_attention(q, k, v, sparse=True, tokens_per_frame=P)
    assert lay.selecting == gate[1]


@pytest.mark.parametrize("name", ["all", "radial"])
def test_the_processor_is_the_schedule_over_its_layers(name):
    """Driving the processor equals driving layers of one's own with the schedule's decisions, bit for bit."""
    pol = preset(name, tokens_per_frame=P, frames_per_chunk=FPC, memory_frames=5)
    proc = CachedProcessor.for_model(pol, TINY, tokens_per_frame=P, frames_per_chunk=FPC, dtype=torch.float32,
                                     device="cpu", heads=H, cuda_graphs="off")  # fmt: skip
    assert [lay.index for lay in proc.layers] == list(range(TINY.num_layers))
    assert all(isinstance(lay, LayerAttention) for lay in proc.layers)
    cfg = CacheConfig(P, FPC, pol.cache, check_finite=False, commit_graphs="off")
    own = [LayerAttention(pol, cfg, layer=i, batch=1, heads=H, head_dim=TINY.head_dim, dtype=torch.float32,
                          device="cpu") for i in range(TINY.num_layers)]  # fmt: skip
    g = torch.Generator().manual_seed(0)
    for c in range(3):
        for step in range(3):  # two denoising steps (the first dense), then the commit pass
            proc.begin_pass(PassInfo(c * FPC, step, 2, commit=step == 2))
            for i, lay in enumerate(own):
                q, k, v, kp = (torch.randn(1, H, N, TINY.head_dim, generator=g) for _ in range(4))
                sparse = proc.is_sparse(i)
                assert sparse == (step >= 1)
                lay.stage(k, v, frame_start=c * FPC, k_pre_rope=kp)
                radial = None
                if pol.radial is not None:
                    radial = radial_index(pol.radial, history_frames=c * FPC, chunk_frames=FPC, tokens_per_frame=P,
                                          device="cpu")  # fmt: skip
                expect = lay.attend(q, sparse=sparse, radial=radial)
                if step == 2:
                    lay.commit(q)
                assert torch.equal(proc.self_attention(i, q, k, v, kp), expect)
    assert proc.committed_frames == 3 * FPC
    if pol.annsa is not None:
        assert all(proc.is_planned(i) for i in range(TINY.num_layers))
        assert proc.layer(0).annsa_plan is proc.layers[0].annsa_plan
    state = proc.state_dict()
    ours = {f"layer{i}.{k}": t for i, lay in enumerate(own) for k, t in lay.state_dict().items()}
    assert state.keys() == {"format"} | ours.keys() and all(torch.equal(state[k], ours[k]) for k in ours)


def test_one_factory_from_a_preset_name_or_a_policy():
    kw = {"tokens_per_frame": P, "frames_per_chunk": FPC, "dtype": torch.float32, "device": "cpu"}
    by_name = CachedProcessor.for_model("tempcache", TINY, memory_frames=5, **kw)
    pol = preset("tempcache", tokens_per_frame=P, frames_per_chunk=FPC, memory_frames=5)
    assert by_name.policy == pol == CachedProcessor.for_model(pol, TINY, **kw).policy
    assert (by_name.num_layers, by_name.heads, by_name.head_dim) == (TINY.num_layers, TINY.num_heads, TINY.head_dim)
    with pytest.raises(ValueError, match="policy must be one of"):
        CachedProcessor.for_model("fast", TINY, **kw)
    with pytest.raises(ValueError, match="policy must be an AttentionPolicy or a preset name, got int"):
        CachedProcessor.for_model(3, TINY, **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="policy must be an AttentionPolicy, got str"):
        CachedProcessor("dense", num_layers=1, batch=1, heads=1, head_dim=8, **kw)  # type: ignore[arg-type]


def test_layer_refuses_a_cache_config_of_another_policy():
    pol = preset("tempcache", tokens_per_frame=P, frames_per_chunk=FPC, memory_frames=5)
    other = CacheConfig(P, FPC, preset("dense", tokens_per_frame=P, frames_per_chunk=FPC).cache)
    with pytest.raises(ValueError, match="cache_config must be a CacheConfig of the policy's cache"):
        LayerAttention(pol, other, layer=0, batch=1, heads=H, head_dim=D, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="policy must be an AttentionPolicy, got str"):
        LayerAttention("tempcache", other, layer=0, batch=1, heads=H, head_dim=D, dtype=torch.float32,  # type: ignore[arg-type]
                       device="cpu")  # fmt: skip
