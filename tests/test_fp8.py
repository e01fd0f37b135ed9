"""FP8 linears (torch._scaled_mm) against their float64 twin on the same quantized operands, their distance to
the unquantized linear, NaN handling, dtype-cast safety, and the model-level switch. Skipped where the device
cannot run FP8 matmuls."""

from __future__ import annotations

import pytest
import torch

from longroll.models.wan import CausalWanModel, WanConfig
from longroll.ops.fp8 import (
    E4M3,
    Fp8Linear,
    fp8_linear,
    fp8_linear_reference,
    fp8_unsupported_reason,
    quantize_fp8,
)
from tests.tolerance import assert_within_rule

from .device import KERNEL_DEVICE as DEVICE

REASON = fp8_unsupported_reason(DEVICE)
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no FP8 matmul on {DEVICE}: {REASON}")


def _linear(k: int, n: int, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n, device=DEVICE)
    with torch.no_grad():
        lin.weight.mul_(torch.linspace(0.2, 3.0, n, device=DEVICE)[:, None])  # rows of different scales
        lin.bias.normal_()
    return lin


@pytest.mark.parametrize("granularity", ["row", "tensor"])
@pytest.mark.parametrize(("m", "k", "n"), [(97, 64, 48), (1025, 32, 16), (1, 16, 80)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fast_path_matches_float64_twin(granularity: str, m: int, k: int, n: int, dtype: torch.dtype) -> None:
    lin = _linear(k, n)
    fp8 = Fp8Linear.from_linear(lin, granularity)
    x = torch.randn(m, k, device=DEVICE, dtype=dtype) * torch.linspace(0.1, 4, k, device=DEVICE).to(dtype)
    out = fp8(x)
    assert out.shape == (m, n) and out.dtype == dtype
    ref64 = fp8_linear_reference(x, fp8.weight_q, fp8.weight_scale, fp8.bias, fp8.granularity)
    # torch's own rounding of the same result: the product is delivered in bf16 (then cast to x.dtype)
    assert_within_rule(f"fp8 {granularity}", out.float(), ref64, ref64.to(torch.bfloat16).float())


@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_distance_to_unquantized_linear_is_e4m3_rounding(granularity: str) -> None:
    """e4m3 rounds each operand by at most 2^-4 relative; over a dot product the relative error of the output
    (Frobenius) stays well below that bound. A wrong scale or transpose gives O(1)."""
    lin = _linear(256, 128)
    x = torch.randn(3, 97, 256, device=DEVICE)
    with torch.no_grad():
        want = lin(x)
        got = Fp8Linear.from_linear(lin, granularity)(x)
    rel = float((got - want).norm() / want.norm())
    assert 0 < rel < 2**-4, rel


def test_quantize_keeps_nan_and_zero_rows() -> None:
    x = torch.zeros(3, 16, device=DEVICE)
    x[1] = torch.randn(16, device=DEVICE)
    x[2, 5] = float("nan")
    q, scale = quantize_fp8(x, "row")
    assert q.dtype == E4M3
    assert torch.isfinite(scale[:2]).all() and torch.equal(q[0].float(), torch.zeros(16, device=DEVICE))
    assert torch.isnan(q[2].float()).any()
    w = _linear(16, 16)
    fp8 = Fp8Linear.from_linear(w, "row")
    out = fp8(x)
    assert torch.isnan(out[2]).all() and torch.isfinite(out[:2]).all()
    wq, ws = fp8.weight_q, fp8.weight_scale
    assert torch.isnan(fp8_linear(x, wq, ws, None, "row")[2]).all()


def test_model_dtype_cast_leaves_fp8_payload_and_scales() -> None:
    fp8 = Fp8Linear.from_linear(_linear(32, 16), "row")
    before = fp8.dequantized_weight().clone()
    fp8.to(torch.bfloat16)
    assert fp8.weight_scale.dtype == torch.float32 and fp8.weight_q.dtype == E4M3
    assert torch.equal(fp8.dequantized_weight(), before)
    assert fp8.bias is not None and fp8.bias.dtype == torch.bfloat16


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match=r"multiples of 16, got 24->16"):
        Fp8Linear.from_linear(torch.nn.Linear(24, 16), "row")
    with pytest.raises(ValueError, match=r"granularity must be one of \['row', 'tensor'\], got 'col'"):
        Fp8Linear.from_linear(torch.nn.Linear(16, 16), "col")


def test_model_quantize_fp8_replaces_block_linears_only() -> None:
    cfg = WanConfig.from_preset("tiny")
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = CausalWanModel(cfg).eval()
        x = torch.randn(1, cfg.in_channels, 3, 4, 6)
        t, ctx = torch.full((1, 3), 500.0), torch.randn(1, 7, cfg.text_dim)
    with torch.no_grad():
        want = model(x, t, ctx)
        got = model.fuse_projections().quantize_fp8("row")(x, t, ctx)
    kinds = {type(m).__name__ for m in model.blocks.modules()}
    assert "Fp8Linear" in kinds and "Linear" not in kinds
    assert type(model.proj_out) is torch.nn.Linear and type(model.condition_embedder.time_proj) is torch.nn.Linear
    assert 0 < float((got - want).norm() / want.norm()) < 2**-4
    with pytest.raises(ValueError, match="cannot unfuse quantized projections"):
        model.unfuse_projections()
    with torch.device(DEVICE):
        unfused = CausalWanModel(cfg).quantize_fp8("tensor")
    with pytest.raises(ValueError, match=r"only plain biased nn\.Linear"):
        unfused.fuse_projections()


def test_model_quantize_refuses_bad_widths_before_changing_anything() -> None:
    cfg = WanConfig.from_preset("tiny", ffn_dim=72)
    model = CausalWanModel(cfg)
    with pytest.raises(ValueError, match=r"blocks.0.ffn.net.2: FP8 needs .* got 72->64"):
        model.quantize_fp8()
    assert not any(isinstance(m, Fp8Linear) for m in model.modules())
