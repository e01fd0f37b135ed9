"""CausalWanModel.fuse_projections: same outputs as the separate projections (one forward and a cached
rollout with the ``all`` policy), diffusers' state-dict names either way, and an exact way back."""

from __future__ import annotations

import io

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from longroll.models.wan import CausalWanModel, WanConfig
from longroll.pipeline.rollout import RolloutConfig, RolloutEngine
from longroll.policies.cached import CachedProcessor
from longroll.policies.config import preset

TINY = WanConfig.from_preset("tiny")


def _model(seed: int = 0, dtype: torch.dtype = torch.float32) -> CausalWanModel:
    torch.manual_seed(seed)
    model = CausalWanModel(TINY).eval()
    with torch.no_grad():  # non-trivial tables and biases
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.to_inference_dtype(dtype)


def _inputs(size: tuple[int, int] = (6, 10), batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, TINY.in_channels, 3, *size, generator=g)
    t = torch.tensor([[999.0, 500.0, 31.0], [250.0, 250.0, 0.0]])[:batch]
    return x, t, torch.randn(batch, 7, TINY.text_dim, generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_forward_matches_unfused(dtype: torch.dtype) -> None:
    """float32: bit-identical here (same GEMM, rows stacked); bf16: within the rounding of one extra matmul
    order, measured against the unfused model's own distance to float32."""
    x, t, ctx = _inputs()
    ref32 = _model()
    with torch.no_grad():
        y32 = ref32(x, t, ctx)
        base = _model(dtype=dtype)
        y_unfused = base(x.to(dtype), t, ctx.to(dtype))
        y_fused = base.fuse_projections()(x.to(dtype), t, ctx.to(dtype))
    err = float((y_fused.float() - y_unfused.float()).abs().max())
    if dtype == torch.float32:
        assert err <= 4 * torch.finfo(dtype).eps * float(y32.abs().max())
    else:
        own = float((y_unfused.float() - y32).abs().max())
        assert err <= 2 * own + torch.finfo(dtype).eps, (err, own)


def test_fused_rollout_with_all_policy_matches_unfused() -> None:
    """The processors see strided q/k/v views from the fused product; a cached, sparse rollout is unchanged."""
    h, w = 4, 6  # latent 4x6 -> 2x3 tokens per frame (odd width)
    tpf = TINY.tokens_per_frame(h, w)
    cfg = RolloutConfig(num_frames=6, frames_per_chunk=3, latent_shape=(TINY.in_channels, h, w))
    ctx = torch.randn(1, 7, TINY.text_dim, generator=torch.Generator().manual_seed(3))

    def run(model: CausalWanModel) -> torch.Tensor:
        pol = preset("all", tokens_per_frame=tpf, frames_per_chunk=3, memory_frames=4)
        proc = CachedProcessor.for_model(
            pol, TINY, tokens_per_frame=tpf, frames_per_chunk=3, dtype=torch.float32, device="cpu"
        )
        return RolloutEngine(model, proc, cfg).run(ctx).latents

    unfused = run(_model())
    fused = run(_model().fuse_projections())
    assert fused.shape == unfused.shape
    assert float((fused - unfused).abs().max()) <= 1e-5 * max(1.0, float(unfused.abs().max()))


def test_state_dict_keeps_separate_names_and_round_trips() -> None:
    model = _model()
    names = list(model.state_dict())
    sd_unfused = {k: v.clone() for k, v in model.state_dict().items()}
    model.fuse_projections()
    assert model.blocks[0].attn1.fused == ("to_q", "to_k", "to_v")
    assert model.blocks[0].attn2.fused == ("to_k", "to_v")
    assert not hasattr(model.blocks[0].attn1, "to_q")  # no second copy of the weights
    sd_fused = model.state_dict()
    assert sorted(sd_fused) == sorted(names)
    for k in names:
        assert torch.equal(sd_fused[k], sd_unfused[k]), k
    # safetensors refuses shared storage: the saved parts are separate tensors
    loaded = load_safetensors(save_safetensors(sd_fused))
    # a fused model loads an unfused state dict strictly (other weights, to see that they are taken)
    other = _model(seed=5).state_dict()
    model.load_state_dict(other, strict=True)
    assert torch.equal(
        model.blocks[1].attn1.to_qkv.weight[TINY.dim : 2 * TINY.dim], other["blocks.1.attn1.to_k.weight"]
    )
    assert torch.equal(model.blocks[1].attn2.to_kv.bias[TINY.dim :], other["blocks.1.attn2.to_v.bias"])
    # an unfused model loads the fused model's saved file
    back = _model(seed=9)
    back.load_state_dict(loaded, strict=True)
    for k in names:
        assert torch.equal(back.state_dict()[k], sd_unfused[k]), k
    # torch.save of the fused model's state dict also round-trips
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    assert set(torch.load(buf)) == set(names)


def test_strict_load_names_missing_projection() -> None:
    model = _model().fuse_projections()
    sd = model.state_dict()
    del sd["blocks.0.attn1.to_k.weight"]
    with pytest.raises(RuntimeError, match=r"blocks\.0\.attn1\.to_k\.weight"):
        model.load_state_dict(sd, strict=True)


def test_unfuse_is_exact_and_fuse_is_idempotent() -> None:
    x, t, ctx = _inputs(batch=1)
    model = _model()
    with torch.no_grad():
        y0 = model(x, t[:1], ctx)
        model.fuse_projections().fuse_projections()
        model.unfuse_projections().unfuse_projections()
        y1 = model(x, t[:1], ctx)
    assert torch.equal(y0, y1)
    assert model.blocks[0].attn1.fused == () and isinstance(model.blocks[0].attn1.to_q, torch.nn.Linear)
    assert list(model.state_dict()) == list(_model().state_dict())  # key order restored too


def test_bad_fuse_arguments_are_named() -> None:
    attn = _model().blocks[0].attn1
    with pytest.raises(ValueError, match=r"names must be .* got \('to_q', 'to_v'\)"):
        attn.fuse_projections(("to_q", "to_v"))
    attn.fuse_projections(("to_k", "to_v"))
    with pytest.raises(ValueError, match="already fused as"):
        attn.fuse_projections(("to_q", "to_k", "to_v"))
