"""diffusers' WanTransformer3DModel with longroll's caches attached equals longroll's causal Wan, chunk by chunk;
every preset policy runs through it; removing the adapter restores the model exactly.

Tiny random models (as tests/test_wan_oracle.py); nothing is downloaded.
"""

from __future__ import annotations

import pytest
import torch

from longroll.models.wan import CausalWanModel, WanConfig
from longroll.pipeline.rollout import RolloutConfig, RolloutEngine
from longroll.pipeline.sampler import SamplerConfig
from longroll.policies.cached import CachedProcessor, PassInfo
from longroll.policies.config import PRESET_NAMES, preset

diffusers = pytest.importorskip("diffusers")
from longroll.adapters.diffusers import LongrollWanAttnProcessor, attach  # noqa: E402

TINY = WanConfig.from_preset("tiny")
FPC, LH, LW = 2, 8, 8
P = (LH // 2) * (LW // 2)


def _perturb(model: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, CausalWanModel]:
    torch.manual_seed(0)
    ref = diffusers.WanTransformer3DModel(**TINY.diffusers_kwargs()).eval()
    _perturb(ref, 0)
    ours = CausalWanModel(TINY).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _processor(policy: str = "dense", memory_frames: int = 4) -> CachedProcessor:
    pol = preset(policy, tokens_per_frame=P, frames_per_chunk=FPC, memory_frames=memory_frames)
    return CachedProcessor.for_model(
        pol, TINY, tokens_per_frame=P, frames_per_chunk=FPC, dtype=torch.float32, device="cpu", check_finite=True
    )


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rel * scale, f"max abs err {err:.3g} vs output scale {scale:.3g}"


@torch.no_grad()
def test_dense_adapter_equals_causal_wan_pass_by_pass(models) -> None:
    ref, ours = models
    proc_d, proc_o = _processor(), _processor()
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(1, 7, TINY.text_dim, generator=g)
    with attach(ref, proc_d) as causal:
        for chunk in range(4):
            f0 = chunk * FPC
            for step in range(3):  # two denoising passes on their own inputs and timesteps, then the commit
                x = torch.randn(1, TINY.in_channels, FPC, LH, LW, generator=g)
                ts = torch.tensor([[900.0 - 300 * step, 700.0 - 300 * step]]).clamp_min(0)
                commit = step == 2
                proc_o.begin_pass(PassInfo(f0, step, 2, commit))
                expected = ours(x, ts, ctx, frame_offset=f0, processor=proc_o)
                actual = causal.forward_chunk(x, ts, ctx, frame_start=f0, step=step, num_steps=2, commit=commit)
                _close(actual, expected)
        assert proc_d.committed_frames == proc_o.committed_frames == 4 * FPC
        for a, b in zip(proc_d.caches(), proc_o.caches(), strict=True):
            _close(a.view().k, b.view().k)


def _engine_config(chunks: int = 3) -> RolloutConfig:
    return RolloutConfig(
        num_frames=chunks * FPC,
        frames_per_chunk=FPC,
        latent_shape=(TINY.in_channels, LH, LW),
        sampler=SamplerConfig(timesteps=(1000, 500)),
    )


@torch.no_grad()
def test_rollout_engine_drives_the_diffusers_model_like_causal_wan(models) -> None:
    ref, ours = models
    ctx = torch.randn(1, 5, TINY.text_dim, generator=torch.Generator().manual_seed(2))
    first = torch.randn(1, TINY.in_channels, 1, LH, LW, generator=torch.Generator().manual_seed(3))
    proc = _processor()
    expected = RolloutEngine(ours, proc, _engine_config()).run(ctx, initial_latents=first)
    proc = _processor()
    chunks: list[torch.Tensor] = []
    with attach(ref, proc) as causal:
        actual = RolloutEngine(causal, proc, _engine_config()).run(
            ctx, initial_latents=first, on_chunk=lambda i, lat, st: chunks.append(lat)
        )
    assert len(chunks) == 3
    for c, lat in enumerate(chunks):
        _close(lat, expected.latents[:, :, 1 + c * FPC : 1 + (c + 1) * FPC])
    _close(actual.latents, expected.latents)


@pytest.mark.parametrize("policy", PRESET_NAMES)
@torch.no_grad()
def test_every_preset_runs_through_the_adapter(models, policy: str) -> None:
    ref, ours = models
    ctx = torch.randn(1, 5, TINY.text_dim, generator=torch.Generator().manual_seed(4))
    cfg = _engine_config(chunks=4)
    expected = RolloutEngine(ours, _processor(policy), cfg).run(ctx)
    proc = _processor(policy)
    with attach(ref, proc) as causal:
        result = RolloutEngine(causal, proc, cfg).run(ctx)
    assert result.latents.shape == (1, TINY.in_channels, 4 * FPC, LH, LW)
    assert torch.isfinite(result.latents).all()
    sizes = [s.cache_bytes for s in result.stats]
    if policy in ("sink_window", "budget", "tempcache", "tempcache_lsh", "all", "all_int8"):
        assert sizes[-1] == sizes[1], sizes  # bounded: flat once the cap is reached
    # The same policy on longroll's own model: the same rollout, up to float rounding.
    _close(result.latents, expected.latents, rel=1e-3)


@torch.no_grad()
def test_remove_restores_the_original_processors_and_rope(models) -> None:
    ref, _ = models
    before = dict(ref.attn_processors)
    x = torch.randn(1, TINY.in_channels, 4, LH, LW, generator=torch.Generator().manual_seed(5))
    ts, ctx = torch.tensor([500.0]), torch.randn(1, 3, TINY.text_dim)
    plain = ref(x, ts, ctx, return_dict=False)[0]
    proc = _processor()
    causal = attach(ref, proc)
    assert all(isinstance(p, LongrollWanAttnProcessor) for p in ref.attn_processors.values())
    with pytest.raises(ValueError, match="already attached"):
        attach(ref, _processor())
    proc.begin_pass(PassInfo(0, 0, 1, commit=True))
    causal(x[:, :, :FPC], ts, ctx)
    causal.remove()
    causal.remove()  # idempotent
    after = ref.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    torch.testing.assert_close(ref(x, ts, ctx, return_dict=False)[0], plain, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="removed"):
        causal(x[:, :, :FPC], ts, ctx)


@torch.no_grad()
def test_bad_uses_are_refused(models) -> None:
    ref, _ = models
    with pytest.raises(ValueError, match=r"processor holds \(layers, heads, head_dim\) = \(3, 2, 32\)"):
        attach(ref, CachedProcessor.for_model(
            preset("dense", tokens_per_frame=P, frames_per_chunk=FPC), WanConfig.from_preset("tiny", num_layers=3),
            tokens_per_frame=P, frames_per_chunk=FPC, dtype=torch.float32, device="cpu",
        ))  # fmt: skip
    assert not any(isinstance(p, LongrollWanAttnProcessor) for p in ref.attn_processors.values())
    with pytest.raises(ValueError, match="must be a diffusers WanTransformer3DModel"):
        attach(CausalWanModel(TINY), _processor())
    x = torch.randn(1, TINY.in_channels, FPC, LH, LW)
    ctx = torch.randn(1, 3, TINY.text_dim)
    proc = _processor()
    with attach(ref, proc) as causal:
        with pytest.raises(RuntimeError, match="begin_pass"):
            causal(x, torch.tensor([1.0]), ctx)
        proc.begin_pass(PassInfo(0, 0, 1, commit=False))
        with pytest.raises(ValueError, match="frame_offset=2 differs from the pass's frame_start=0"):
            causal(x, torch.tensor([1.0]), ctx, frame_offset=2)
        with pytest.raises(ValueError, match="actions are not supported"):
            causal(x, torch.tensor([1.0]), ctx, actions=torch.zeros(1, FPC, dtype=torch.long))
        with pytest.raises(ValueError, match=r"timestep must be \(1,\) or \(1, 2\), got \(1, 3\)"):
            causal(x, torch.zeros(1, 3), ctx)
        with pytest.raises(ValueError, match="attention_mask is not supported"):
            ref.blocks[0].attn2.processor(ref.blocks[0].attn2, torch.zeros(1, P, TINY.dim), ctx, torch.ones(1))
