"""Oracle (b): the chunked autoregressive forward over the KV cache equals the block-causal full-sequence
forward, and the rollout engine runs every cache policy end to end."""

import dataclasses

import pytest
import torch

from longroll.models.wan import CausalWanModel, WanConfig, block_causal_mask
from longroll.pipeline.rollout import RolloutConfig, RolloutEngine
from longroll.pipeline.sampler import SamplerConfig
from longroll.policies.cached import CachedProcessor, PassInfo
from longroll.policies.config import PRESET_NAMES, preset
from longroll.policies.processor import DenseProcessor

CFG = WanConfig.from_preset("tiny")
FPC, CHUNKS, LH, LW = 2, 3, 8, 8
P = (LH // 2) * (LW // 2)


def _model(seed=0):
    torch.manual_seed(seed)
    return CausalWanModel(CFG).eval()


def _processor(policy="dense", memory_frames=4, **options):
    pol = preset(policy, tokens_per_frame=P, frames_per_chunk=FPC, memory_frames=memory_frames)
    return CachedProcessor.for_model(
        pol,
        CFG,
        tokens_per_frame=P,
        frames_per_chunk=FPC,
        dtype=torch.float32,
        device="cpu",
        check_finite=True,
        **options,
    )


@torch.no_grad()
def test_chunked_forward_with_cache_equals_block_causal_forward():
    model = _model()
    t = FPC * CHUNKS
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, CFG.in_channels, t, LH, LW, generator=g)
    ts = torch.rand(1, t, generator=g) * 1000
    ctx = torch.randn(1, 7, CFG.text_dim, generator=g)
    mask = block_causal_mask(t, P, FPC, device="cpu")
    full = model(x, ts, ctx, processor=DenseProcessor(self_mask=mask))
    proc = _processor()
    outs = []
    for c in range(CHUNKS):
        sl = slice(c * FPC, (c + 1) * FPC)
        # a denoising pass with other inputs first: staging must be overwritten, not accumulated
        proc.begin_pass(PassInfo(c * FPC, 0, 1, commit=False))
        model(torch.randn_like(x[:, :, sl]), ts[:, sl], ctx, frame_offset=c * FPC, processor=proc)
        proc.begin_pass(PassInfo(c * FPC, 1, 1, commit=True))
        outs.append(model(x[:, :, sl], ts[:, sl], ctx, frame_offset=c * FPC, processor=proc))
    chunked = torch.cat(outs, dim=2)
    err = (chunked - full).abs().max() / full.abs().max()
    assert err < 1e-5, err


@pytest.mark.parametrize("policy", PRESET_NAMES)
def test_engine_rolls_out_every_policy(policy):
    model = _model()
    proc = _processor(policy, memory_frames=4)
    cfg = RolloutConfig(
        num_frames=4 * FPC,
        frames_per_chunk=FPC,
        latent_shape=(CFG.in_channels, LH, LW),
        sampler=SamplerConfig(timesteps=(1000, 500)),
    )
    seen = []
    res = RolloutEngine(model, proc, cfg).run(
        torch.randn(1, 5, CFG.text_dim),
        initial_latents=torch.randn(1, CFG.in_channels, 1, LH, LW),
        on_chunk=lambda i, lat, st: seen.append((i, lat.shape[2])),
    )
    assert res.latents.shape == (1, CFG.in_channels, 1 + 4 * FPC, LH, LW)
    assert torch.isfinite(res.latents).all()
    assert seen == [(i, FPC) for i in range(4)]
    assert [s.frame_start for s in res.stats] == [1, 3, 5, 7]


def test_dense_and_bounded_policies_agree_while_history_fits():
    model = _model()
    cfg = RolloutConfig(
        num_frames=2 * FPC,
        frames_per_chunk=FPC,
        latent_shape=(CFG.in_channels, LH, LW),
        sampler=SamplerConfig(timesteps=(1000, 500)),
    )
    ctx = torch.randn(1, 5, CFG.text_dim)
    ref = RolloutEngine(model, _processor("dense"), cfg).run(ctx).latents
    for name in ("sink_window", "budget"):
        out = RolloutEngine(model, _processor(name, memory_frames=8), cfg).run(ctx).latents
        assert torch.allclose(out, ref, atol=1e-5), name


def test_component_timer_reports_every_span_per_chunk():
    from longroll.policies.timing import ComponentTimer

    model = _model()
    proc = _processor("all", timer=ComponentTimer("cpu"))
    cfg = RolloutConfig(
        num_frames=3 * FPC,
        frames_per_chunk=FPC,
        latent_shape=(CFG.in_channels, LH, LW),
        sampler=SamplerConfig(timesteps=(1000, 500)),
    )
    res = RolloutEngine(model, proc, cfg).run(torch.randn(1, 5, CFG.text_dim))
    first, last = res.stats[0].components, res.stats[-1].components
    assert {"attention", "cache_commit", "ann_plan", "cross_attention"} <= set(first)
    assert "ann_select" in last  # sparse steps start once a plan exists
    assert all(v >= 0 for v in last.values())
    assert sum(last.values()) <= res.stats[-1].seconds


@pytest.mark.parametrize("policy", PRESET_NAMES)
def test_saved_and_resumed_rollout_equals_uninterrupted(tmp_path, policy):
    """Bit-identical for every policy when resumed mid-way (after 3 of 5 chunks). The int8 AnnSA plans
    (``annsa_int8``, ``all_int8``) used to continue differently: re-planning the already reordered cache drew
    other anchors; the state now carries them."""
    from safetensors.torch import load_file, save_file

    model = _model()
    ctx = torch.randn(1, 5, CFG.text_dim)
    shape = (CFG.in_channels, LH, LW)
    sampler = SamplerConfig(timesteps=(1000, 500))
    whole = RolloutEngine(model, _processor(policy), RolloutConfig(5 * FPC, FPC, shape, sampler)).run(ctx).latents
    first = _processor(policy)
    a = RolloutEngine(model, first, RolloutConfig(3 * FPC, FPC, shape, sampler)).run(ctx).latents
    save_file(first.state_dict(), tmp_path / "state.safetensors")
    resumed = _processor(policy)
    resumed.load_state_dict(load_file(tmp_path / "state.safetensors"))
    b = RolloutEngine(model, resumed, RolloutConfig(2 * FPC, FPC, shape, sampler)).run(ctx).latents
    assert torch.equal(torch.cat([a, b], dim=2), whole)


def test_annca_falls_back_to_exact_collapsed_attention_where_selection_is_dense():
    proc = _processor("annca")
    proc.begin_pass(PassInfo(0, 3, 4, commit=False))  # a late step: the schedule's sparse phase
    g = torch.Generator().manual_seed(0)
    heads, d = CFG.num_heads, CFG.head_dim
    k = torch.randn(1, heads, 512, d, generator=g)
    k[:, :, 5:] = k[:, :, 5:6]
    # Queries along the prompt's keys: every frame hits every distinct key's bucket (hit density 1).
    q = k[:, :, torch.arange(FPC * P) % 6] * 2.0
    v = torch.randn(1, heads, 512, d, generator=g)
    v[:, :, 5:] = v[:, :, 5:6]
    out = proc.cross_attention(0, q, k, v)
    assert proc.annca_selecting[0] is False and proc.annca_selecting[1] is None
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    proc.reset_prompt()
    assert proc.annca_selecting[0] is None


def test_annca_keeps_selecting_where_it_is_sparse():
    proc = _processor("annca")
    proc.begin_pass(PassInfo(0, 3, 4, commit=False))
    g = torch.Generator().manual_seed(0)
    heads, d = CFG.num_heads, CFG.head_dim
    k, v = (torch.randn(1, heads, 512, d, generator=g) for _ in range(2))
    # Queries along 3 of 512 distinct keys: they hit few buckets, and the attention mass is on those keys.
    q = 4.0 * k[:, :, torch.arange(FPC * P) % 3]
    proc.cross_attention(0, q, k, v)
    assert proc.annca_selecting[0] is True
    # The decision belongs to the prompt: the same prompt after a reset keeps it without measuring again.
    proc.reset_prompt()
    proc.cross_attention(0, torch.randn(1, heads, FPC * P, d, generator=g), k, v)
    assert proc.annca_selecting[0] is True
    # A new prompt is measured: random queries hit few buckets too, but most of their (diffuse) attention mass
    # lies elsewhere.
    proc.reset_prompt()
    proc.cross_attention(0, torch.randn(1, heads, FPC * P, d, generator=g), k + 1.0, v)
    assert proc.annca_selecting[0] is False


@pytest.mark.parametrize("policy", ["tempcache", "all", "all_int8"])
def test_captured_steps_give_the_eager_rollout(policy):
    """cuda_graphs='emulate' runs the capture machinery of the commit and the AnnSA selection (warm-up,
    capture, replay with static inputs shared by every layer) on the CPU: the rollout must not change."""
    model = _model()
    ctx = torch.randn(1, 5, CFG.text_dim, generator=torch.Generator().manual_seed(2))
    cfg = RolloutConfig(8 * FPC, FPC, (CFG.in_channels, LH, LW), SamplerConfig(timesteps=(1000, 750, 500, 250)))
    eager = RolloutEngine(model, _processor(policy, cuda_graphs="off"), cfg).run(ctx).latents
    proc = _processor(policy, cuda_graphs="emulate")
    graphed = RolloutEngine(model, proc, cfg).run(ctx).latents
    torch.testing.assert_close(graphed, eager, rtol=0, atol=0)
    captures = [c.commit_capture for c in proc.caches()] + [g.stacked.commit_capture for g in proc.groups]
    assert any(c.captured for c in captures), "the commit was never captured"
    if proc.policy.annsa is not None:
        planners = [lay.planner for lay in proc.layers if lay.planner is not None]
        assert any(p.select_capture.captured for p in planners), "the selection was never captured"


@pytest.mark.parametrize("policy", ["tempcache", "all", "all_int8"])
def test_grouped_commits_give_the_per_layer_rollout(policy):
    """Every layer's TempCache committed in one batched call (the default) equals per-layer commits, with a
    verbatim ring (6 frames of memory: 3 sinks, 1 recent frame) and through a resume."""
    model = _model()
    ctx = torch.randn(1, 5, CFG.text_dim, generator=torch.Generator().manual_seed(2))
    cfg = RolloutConfig(7 * FPC, FPC, (CFG.in_channels, LH, LW), SamplerConfig(timesteps=(1000, 500)))

    def run(group):
        proc = _processor(policy, memory_frames=6, group_commits=group, cuda_graphs="emulate")
        return RolloutEngine(model, proc, cfg).run(ctx).latents, proc

    alone, _ = run("off")
    layers = CFG.num_layers
    # One group, groups that split the layers unevenly (the last one shorter), one layer per group.
    for setting, sizes in (("auto", [layers]), (layers - 1, [layers - 1, 1]), (1, [1] * layers)):
        grouped, proc = run(setting)
        assert [g.layers for g in proc.groups] == sizes, setting
        assert [g.first_layer for g in proc.groups] == list(range(0, layers, sizes[0]))
        assert proc.caches()[0].recent is not None
        assert all(g.stacked.commit_capture.captured for g in proc.groups)
        torch.testing.assert_close(grouped, alone, rtol=0, atol=0, msg=f"group_commits={setting!r}")
    for bad in ("yes", 0, -2, True, 1.5):
        with pytest.raises(ValueError, match="group_commits"):
            _processor(policy, group_commits=bad)


def test_overlap_commit_is_validated_and_off_on_the_cpu():
    with pytest.raises(ValueError, match="overlap_commit"):
        _processor("tempcache", overlap_commit="yes")
    proc = _processor("tempcache")
    assert proc.commits.stream is None  # no side stream on the CPU: commits run in line
    proc.join_commits()  # a no-op without pending side-stream work


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy", ["tempcache", "all", "all_int8", "sink_window"])
@pytest.mark.parametrize("group", ["auto", "off", 1])
def test_commits_on_a_side_stream_give_the_in_line_rollout(policy, group):
    """The commit and the AnnSA plan on a side stream (overlapping the commit pass) change nothing: the same
    kernels run in the same order per cache, and the next chunk waits for them."""
    model = _model().cuda()
    ctx = torch.randn(1, 5, CFG.text_dim, generator=torch.Generator().manual_seed(2)).cuda()
    cfg = RolloutConfig(8 * FPC, FPC, (CFG.in_channels, LH, LW), SamplerConfig(timesteps=(1000, 750, 500, 250)))

    def run(overlap):
        pol = preset(policy, tokens_per_frame=P, frames_per_chunk=FPC, memory_frames=4)
        proc = CachedProcessor.for_model(pol, CFG, tokens_per_frame=P, frames_per_chunk=FPC, dtype=torch.float32,
                                         device="cuda", overlap_commit=overlap, group_commits=group)  # fmt: skip
        return RolloutEngine(model, proc, cfg).run(ctx).latents, proc

    inline, _ = run("off")
    side, proc = run("auto")
    assert proc.commits.stream is not None
    torch.testing.assert_close(side, inline, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy", ["tempcache", "all"])
@pytest.mark.parametrize("group", ["off", 2])
def test_slow_side_stream_commits_are_waited_for_layer_by_layer(policy, group, monkeypatch):
    """Each layer's next stage waits for that layer's commit alone: with every side-stream commit held back
    by a GPU sleep, so that the next chunk's first layers would overtake an unwaited commit, the rollout is
    still the in-line one."""
    from longroll.cache.group import CacheGroup
    from longroll.policies.layer import LayerAttention

    model = _model().cuda()
    ctx = torch.randn(1, 5, CFG.text_dim, generator=torch.Generator().manual_seed(3)).cuda()
    cfg = RolloutConfig(6 * FPC, FPC, (CFG.in_channels, LH, LW), SamplerConfig(timesteps=(1000, 500)))

    def run(overlap):
        pol = preset(policy, tokens_per_frame=P, frames_per_chunk=FPC, memory_frames=4)
        proc = CachedProcessor.for_model(pol, CFG, tokens_per_frame=P, frames_per_chunk=FPC, dtype=torch.float32,
                                         device="cuda", overlap_commit=overlap, group_commits=group)  # fmt: skip
        return RolloutEngine(model, proc, cfg).run(ctx).latents

    inline = run("off")
    commit, group_commit = LayerAttention._commit, CacheGroup.commit

    def slow_commit(self, q):
        torch.cuda._sleep(20_000_000)  # ~10 ms of GPU time on the side stream, before the commit's kernels
        commit(self, q)

    def slow_group_commit(self):
        torch.cuda._sleep(20_000_000)
        group_commit(self)

    monkeypatch.setattr(LayerAttention, "_commit", slow_commit)
    monkeypatch.setattr(CacheGroup, "commit", slow_group_commit)
    torch.testing.assert_close(run("auto"), inline, rtol=0, atol=0)


def test_kept_latents_are_the_same_wherever_they_are_kept():
    model = _model()
    cfg = RolloutConfig(3 * FPC, FPC, (CFG.in_channels, LH, LW), SamplerConfig(timesteps=(1000, 500)))
    ctx = torch.randn(1, 5, CFG.text_dim)
    ref = RolloutEngine(model, _processor("sink_window"), cfg).run(ctx).latents
    host = RolloutEngine(model, _processor("sink_window"), dataclasses.replace(cfg, keep_latents="host"))
    assert torch.equal(host.run(ctx).latents, ref.cpu())
    seen: list[torch.Tensor] = []
    none = RolloutEngine(model, _processor("sink_window"), dataclasses.replace(cfg, keep_latents="none"))
    res = none.run(ctx, on_chunk=lambda i, lat, st: seen.append(lat))
    assert res.latents.shape == (*ref.shape[:2], 0, *ref.shape[3:]) and len(res.stats) == 3
    assert torch.equal(torch.cat(seen, dim=2), ref)
    with pytest.raises(ValueError, match="keep_latents"):
        dataclasses.replace(cfg, keep_latents="gpu")
