"""The README's main job, ``longroll demo``, at a small size: it really rolls the world model out (the bundled
checkpoint, or random weights of the same shape where none is bundled), and writes well-formed outputs."""

import json
import math

import pytest
import torch

from longroll.cli.main import main
from longroll.world.model import WorldWanModel, save_world_model, shipped_checkpoint_path, world_wan_config


@pytest.fixture(scope="module")
def checkpoint_args(tmp_path_factory):
    if shipped_checkpoint_path().exists():
        return []
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "world_model.safetensors"
    save_world_model(WorldWanModel(world_wan_config()), path)
    return ["--checkpoint", str(path)]


def test_demo_writes_its_outputs_and_prints_the_table(tmp_path, capsys, checkpoint_args):
    # The video writer is a project dependency on CPU machines (requirements); a GPU image may lack it.
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")

    # 6 frames of memory (3 sinks): the 6 generated frames overflow it, so the bounded cache differs from dense
    assert main(["demo", "--out", str(tmp_path), "--frames", "9", "--memory-frames", "6", *checkpoint_args]) == 0
    captured = capsys.readouterr()
    out = captured.out
    # On a CPU the automatic choice is TempCache alone (the sparse paths would run their torch twins), and the
    # demo says so.
    assert "dense" in out and "tempcache" in out and "PSNR vs dense" in out and "longroll policy: tempcache" in out
    for policy in ("dense", "tempcache"):  # progress while it runs, one line per chunk
        assert f"demo: {policy} chunk 1/2" in captured.err and f"demo: {policy} chunk 2/2" in captured.err
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["demo.json", "latency.png", "memory.png", "side_by_side.mp4"]
    for png in ("latency.png", "memory.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    frames, _ = imageio_ffmpeg.count_frames_and_secs(str(tmp_path / "side_by_side.mp4"))
    assert frames == 9
    data = json.loads((tmp_path / "demo.json").read_text())
    assert {"date", "command", "environment", "config", "device", "episode", "policies", "video"} <= set(data)
    assert data["command"].startswith("longroll demo") and data["config"]["frames"] == 9
    assert (data["video"]["frames"], data["video"]["height"], data["video"]["width"]) == (9, 16 + 256, 3 * 256 + 8)
    assert list(data["policies"]) == ["dense", "tempcache"]
    assert data["policy"] == "tempcache" and "CPU" in data["policy_reason"]
    for name, p in data["policies"].items():
        assert [c["frames_generated"] for c in p["chunks"]] == [3, 6]
        assert all(c["ms"] > 0 and c["cache_mib"] > 0 for c in p["chunks"])
        s = p["summary"]
        assert all(math.isfinite(s[k]) for k in ("ms_first", "ms_last", "ms_median", "cache_mib", "psnr_vs_gt"))
        assert (s["psnr_vs_dense"] is None) == (name == "dense")  # identical to itself: infinite PSNR
        assert len(p["scores"]["psnr_per_frame"]) == 6


def test_demo_policy_choice() -> None:
    from longroll.bench.demo import DemoConfig, demo_policy

    assert demo_policy("auto", torch.device("cpu"))[0] == "tempcache"
    assert demo_policy("auto", torch.device("cuda"))[0] == "all_int8"
    assert demo_policy("all", torch.device("cpu")) == ("all", "chosen with --policy")
    with pytest.raises(ValueError, match="policy"):
        DemoConfig(policy="dense")


def test_demo_rejects_frames_off_the_chunk_grid(tmp_path, capsys, checkpoint_args):
    assert main(["demo", "--out", str(tmp_path), "--frames", "10", *checkpoint_args]) == 2
    assert "frames" in capsys.readouterr().err


def test_bench_cache_writes_its_outputs_and_prints_the_table(tmp_path, capsys):
    assert main(["bench", "cache", "--out", str(tmp_path), "--frames", "8"]) == 0
    out = capsys.readouterr().out
    for name in ("full", "sink_window", "budget", "tempcache_int8", "tempcache_lsh"):
        assert name in out
    data = json.loads((tmp_path / "cache_policies.json").read_text())
    assert {"date", "command", "environment", "results"} <= set(data)
    full = next(r for r in data["results"] if r["name"] == "full")
    tc = next(r for r in data["results"] if r["name"] == "tempcache_int8")
    assert tc["probes"][-1]["entries"] < full["probes"][-1]["entries"]
    assert (tmp_path / "cache_policies.png").stat().st_size > 10_000


def test_bench_cache_rejects_bad_frames(tmp_path, capsys):
    assert main(["bench", "cache", "--out", str(tmp_path), "--frames", "3"]) == 2
    assert "--frames" in capsys.readouterr().err
