"""The ``longroll`` CLI: info, bench rollout (JSON + PNG), generate on a tiny random model folder, and bad
input ending in one stderr line with exit code 2 (in-process and as a subprocess)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longroll.cli.main import main


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: tiny models are dominated by OpenMP overhead, which oversubscription under
    pytest-xdist turns into spinning (see tests/test_pipeline.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("longroll: error: ")
    return lines[0]


def test_info_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("python", "torch", "triton", "diffusers", "transformers", "CUDA", "cuDNN", "sdpa_augmented"):
        assert word in out
    assert "sdpa                ok" in out


def test_info_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["attention_backends"]["sdpa"] == "ok"
    assert set(report["versions"]) >= {"torch", "diffusers", "transformers", "triton"}


def test_bench_rollout_writes_json_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "rollout", "--preset", "tiny", "--frames", "6", "--policies", "dense,sink_window,tempcache"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench_rollout.json").read_text())
    assert (tmp_path / "bench_rollout.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data["command"].startswith("longroll bench rollout --preset tiny")
    assert data["config"]["preset"] == "tiny" and data["config"]["tokens_per_frame"] == 16
    assert list(data["summary"]) == ["dense", "sink_window", "tempcache"]
    assert len(data["chunks"]) == 3 * 2
    for rec in data["chunks"]:
        assert rec["measured"] and rec["seconds"] > 0 and rec["fps_latent"] > 0
        assert rec["frames_generated"] == 3 * (rec["chunk"] + 1)
    assert data["environment"]["versions"]["torch"]
    assert "tempcache" in capsys.readouterr().out


def test_bench_rollout_stops_dense_early(tmp_path: Path) -> None:
    args = ["bench", "rollout", "--frames", "6", "--policies", "sink_window", "--max-dense-frames", "3"]
    assert main([*args, "--no-warmup", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench_rollout.json").read_text())
    dense = [r for r in data["chunks"] if r["policy"] == "dense"]
    assert [r["measured"] for r in dense] == [True, False]
    assert dense[1]["seconds"] is None and "max-dense-frames" in dense[1]["reason"]
    assert all(r["measured"] for r in data["chunks"] if r["policy"] == "sink_window")


def test_bench_rollout_passes_the_model_and_commit_options(tmp_path: Path) -> None:
    args = ["bench", "rollout", "--frames", "6", "--policies", "tempcache", "--no-dense", "--no-warmup",
            "--fuse-projections", "--group-commits", "auto", "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    cfg = json.loads((tmp_path / "bench_rollout.json").read_text())["config"]
    assert cfg["fuse_projections"] is True and cfg["group_commits"] == "auto" and cfg["fp8"] == "off"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["generate", "a cat", "--model", "MODEL", "--policy", "nope"], "invalid choice: 'nope'"),
        (["bench", "rollout", "--policies", "dense,nope"], "unknown policy"),
        (["generate", "a cat", "--model", "/definitely/missing"], "/definitely/missing"),
        (["generate", "a cat", "--model", "MODEL", "--frames", "4"], "--frames must be a positive multiple of --fram"),
        (["bench", "rollout", "--preset", "huge"], "preset must be one of"),
        (["bench", "rollout", "--height", "100"], "multiple of 16"),
        (["frobnicate"], "invalid choice"),
        (["eval", "--policies", "dense,radial"], "not evaluated on the world model"),
        (["eval", "--families", "loops", "--checkpoint", "MODEL"], "families must be"),
        (["demo", "--policy", "dense"], "invalid choice: 'dense'"),
        ([], "required"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    argv: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(tmp_path) if a == "MODEL" else a for a in argv]
    assert main(argv) == 2
    assert needle in _one_error_line(capsys.readouterr().err)


def test_generate_end_to_end_and_mismatched_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("diffusers")
    from longroll.models.wan import CausalWanModel, WanConfig
    from tests.test_pipeline import build_tiny_folder

    folder = build_tiny_folder(tmp_path / "model", shard_size=None)
    common = ["--model", str(folder), "--frames", "3", "--height", "64", "--width", "64", "--text-len", "16"]
    out = tmp_path / "run"
    argv = ["generate", "a cat runs", *common, "--policy", "retrieval", "--timesteps", "1000,500"]
    assert main([*argv, "--memory-frames", "4", "--out", str(out)]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert (out / "video.mp4").stat().st_size > 0
    assert stats["video_frames"] == 9 and stats["policy"] == "retrieval"
    assert stats["memory"]["host_bytes"] > 0 and stats["policy_config"]["host_tier"]["top_blocks"] == 4
    assert stats["load_seconds"] > 0 and stats["command"].startswith("longroll generate 'a cat runs'")
    assert "DiT only" in capsys.readouterr().out

    bad = tmp_path / "bad.pt"
    torch.save(CausalWanModel(WanConfig.from_preset("tiny", num_layers=1)).state_dict(), bad)
    assert main(["generate", "a cat", *common, "--checkpoint", str(bad), "--out", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "missing key(s): blocks.1." in line and str(bad) in line


def test_subprocess_bad_policy_exits_2_without_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "longroll.cli.main", "bench", "rollout", "--policies", "dense,nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown policy" in _one_error_line(proc.stderr)
    assert proc.stdout == ""


@pytest.mark.parametrize("argv", [["--debug", "bench", "rollout"], ["bench", "rollout", "--debug"]])
def test_debug_reraises(argv: list[str]) -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        main([*argv, "--height", "100"])


def test_bench_rollout_at_sampled_history_lengths(tmp_path):
    from longroll.bench.rollout import bench_rollout

    report = bench_rollout(
        "tiny", ("dense", "annsa"), 2, out_dir=tmp_path, frames_per_chunk=2, history_frames=(0, 4, 8), warmup=False
    )
    recs = report.data["chunks"]
    assert [(r["policy"], r["history_frames"]) for r in recs] == [
        ("dense", 0),
        ("dense", 4),
        ("dense", 8),
        ("annsa", 0),
        ("annsa", 4),
        ("annsa", 8),
    ]
    assert all(r["measured"] and r["seconds"] > 0 for r in recs)
    fit = report.data["summary"]["dense"]
    assert fit["status"] == "ok" and fit["fit_slope_s_per_frame"] is not None
    assert report.png_path is not None and report.png_path.exists()
