"""One name per concept: the processor's public geometry, the one PSNR, the one run record, the one preset list."""

from __future__ import annotations

import datetime
import math

import pytest
import torch

from longroll.eval.metrics import psnr
from longroll.models.wan import WanConfig
from longroll.pipeline.record import run_record
from longroll.policies.cached import CachedProcessor, PassInfo
from longroll.policies.config import PRESET_NAMES, preset
from longroll.world.rollout import psnr_from_mse

TINY = WanConfig.from_preset("tiny")


def test_processor_accessors_replace_reaching_into_its_caches() -> None:
    pol = preset("sink_window", tokens_per_frame=4, frames_per_chunk=2, memory_frames=4)
    proc = CachedProcessor.for_model(pol, TINY, tokens_per_frame=4, frames_per_chunk=2, dtype=torch.float32,
                                     device="cpu", batch=3)  # fmt: skip
    assert (proc.num_layers, proc.batch, proc.heads, proc.head_dim) == (2, 3, TINY.num_heads, TINY.head_dim)
    assert (proc.frames_per_chunk, proc.committed_frames) == (2, 0)
    proc.begin_pass(PassInfo(0, 1, 1, commit=True))
    k = torch.randn(3, TINY.num_heads, 8, TINY.head_dim)
    for layer in range(2):
        proc.self_attention(layer, k, k, k, k)
    assert proc.committed_frames == 2
    assert proc.layer_cache(1) is proc.layer(1).cache is proc.caches()[1] and proc.layer_cache(1).committed_frames == 2
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 2\), got 2"):
        proc.layer_cache(2)
    with pytest.raises(ValueError, match="frame_start must be 2, got 0"):
        proc.begin_pass(PassInfo(0, 0, 1, commit=False))


def test_one_psnr_for_floats_tensors_and_videos() -> None:
    assert psnr_from_mse(0.01) == pytest.approx(20.0)
    assert psnr_from_mse(4.0, data_range=2.0) == pytest.approx(0.0)
    assert psnr_from_mse(0.0) == math.inf and math.isnan(psnr_from_mse(math.nan))
    t = psnr_from_mse(torch.tensor([0.01, 0.0, math.nan, 1e-4]))
    assert t.dtype == torch.float64
    assert t[0].item() == pytest.approx(20.0) and t[1].item() == math.inf and math.isnan(t[2].item())
    assert t[3].item() == pytest.approx(40.0)
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 3, 8, 8, generator=g)
    b = (a + 0.05 * torch.randn(3, 3, 8, 8, generator=g)).clamp(0, 1)
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(psnr(a, b), 10 * torch.log10(1.0 / mse))
    torch.testing.assert_close(psnr(255 * a, 255 * b, data_range=255.0), psnr(a, b))
    assert psnr(a, a).isinf().all()


def test_one_run_record() -> None:
    rec = run_record("cpu", command="longroll test --x 1")
    assert list(rec) == ["date", "command", "environment"]
    assert rec["command"] == "longroll test --x 1"
    assert datetime.datetime.fromisoformat(rec["date"]).tzinfo is not None
    env = rec["environment"]
    assert env["device"] == "cpu" and "cores" in env["device_name"] and env["versions"]["torch"]
    assert isinstance(run_record("cpu")["command"], str)


def test_one_preset_list() -> None:
    built = [preset(name, tokens_per_frame=16, frames_per_chunk=2, memory_frames=4).name for name in PRESET_NAMES]
    assert built == list(PRESET_NAMES)
    with pytest.raises(ValueError, match=r"policy must be one of \['all', 'all_int8', 'annca'"):
        preset("fast", tokens_per_frame=16, frames_per_chunk=2)
