"""scripts/gpu_bench_end_to_end.py: the acceptance figures from its runs (synthetic run results: the script itself
takes minutes even at tiny shapes), the honest extrapolation of dense, and the bench options it relies on."""

from __future__ import annotations

import argparse
import runpy
from pathlib import Path
from typing import Any

import pytest

from longroll.bench.rollout import RolloutBenchConfig

SCRIPT = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "gpu_bench_end_to_end.py"), run_name="e2e")


def _runner(runs: dict[str, dict[str, Any]]) -> Any:
    args = argparse.Namespace(preset="tiny", device="cpu", minutes=1.0)
    r = SCRIPT["Runner"](args)
    r.runs = runs
    return r


def test_acceptance_figures_from_runs() -> None:
    runs = {
        "all_tiny_serial": {
            "summary": {
                "median_chunk_seconds_last3": 0.4,
                "fps_video_last3": 30.0,
                "median_chunk_seconds_e2e_last3": 0.5,
                "fps_video_e2e_last3": 24.0,
                "median_decode_seconds": 0.1,
            }
        },
        "all_tiny_overlap": {"summary": {"median_chunk_seconds_e2e_last3": 0.25, "fps_video_e2e_last3": 48.0}},
        "all_wan_overlap": {"status": "not measured: diffusers is not installed"},
        # dense: 1 s + 0.01 s per cached latent frame -> 8.5 s at 750 frames
        "dense_history": {"summary": {"fit_intercept_s": 1.0, "fit_slope_s_per_frame": 0.01}},
        "dit_eager": {"summary": {"fps_video_last3": 10.0}},
        "dit_compiled_fused_fp8": {"status": "failed: ValueError: no FP8"},
    }
    out = SCRIPT["summarize"](_runner(runs), "compiled_fused", {"rel_l2": None})
    assert out["fps_e2e_tiny_decoder"] == 48.0 and out["fps_dit_only"] == 30.0
    assert out["fps_e2e_wan_vae"] is None and "diffusers" in out["fps_e2e_wan_vae_reason"]
    assert out["dense_dit_seconds_per_chunk_at_3000_extrapolated"] == pytest.approx(8.5)
    assert out["speedup_e2e_vs_dense"] == pytest.approx(8.5 / 0.25)
    assert out["speedup_e2e_vs_dense_serial"] == pytest.approx((8.5 + 0.1) / 0.5)
    assert out["speedup_dit_vs_dense"] == pytest.approx(8.5 / 0.4)
    assert out["fps_dit_only_by_variant"] == {
        "eager": 10.0, "compiled_fused_fp8": "failed: ValueError: no FP8", "compiled_fused": 30.0,
    }  # fmt: skip
    assert "measured lengths only up to 9" in out["extrapolation"]


@pytest.mark.parametrize(
    ("dense", "why"),
    [(None, "no fit"), ({"fit_intercept_s": 2.0, "fit_slope_s_per_frame": -0.01}, "not positive")],
)
def test_no_extrapolation_without_a_growing_fit(dense: dict[str, Any] | None, why: str) -> None:
    runs = {"dense_history": {"summary": dense}} if dense else {}
    out = SCRIPT["summarize"](_runner(runs), "eager", {"rel_l2": None})
    assert out["speedup_e2e_vs_dense"] is None and out["dense_dit_seconds_per_chunk_at_3000_extrapolated"] is None
    assert why in out["dense_extrapolation_note"]


def test_variants_map_to_valid_bench_configs() -> None:
    r = _runner({})
    for variant, (compile_dit, fuse, fp8) in SCRIPT["VARIANTS"].items():
        cfg = r.config(variant, decode=True, decoder="tiny", overlap_decode="auto")
        assert (cfg.compile_dit, cfg.fuse_projections, cfg.fp8) == (compile_dit, fuse, fp8)
        assert cfg.policies == ("all",) and cfg.decoder_channels_last
    with pytest.raises(ValueError, match="overlap mode must be one of"):
        RolloutBenchConfig(overlap_decode="yes")
    with pytest.raises(ValueError, match="granularity must be one of"):
        RolloutBenchConfig(fp8="col")
