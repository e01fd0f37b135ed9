"""Faults, each from its reproducer: corrupt inputs end in one line naming the file (they used to end in raw
tracebacks), failures of the program are not usage errors (every RuntimeError used to exit 2), a missing CUDA
device and an unwritable --out fail before any work, an interrupted generate leaves a partial MP4 marked as
such, and out of memory in a rollout names the chunk and the memory in use, with a saved state resuming."""

import json
from pathlib import Path

import pytest
import torch

from longroll.cli.main import main
from longroll.models.wan import CausalWanModel, WanConfig
from longroll.pipeline.rollout import RolloutConfig, RolloutEngine, RolloutOutOfMemoryError
from longroll.pipeline.sampler import SamplerConfig
from longroll.policies.cached import CachedProcessor
from longroll.policies.config import preset


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _one_error_line(err: str, prefix: str = "longroll: error: ") -> str:
    # transformers draws its own weight-loading bar on stderr; everything else is the one line
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.lstrip("\r").startswith("Loading weights")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith(prefix), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    pytest.importorskip("diffusers")
    from tests.test_pipeline import build_tiny_folder

    return build_tiny_folder(tmp_path_factory.mktemp("tiny_wan"), shard_size=None)


GEN = ["--frames", "3", "--height", "64", "--width", "64", "--text-len", "16", "--timesteps", "1000,500"]


# ------------------------------------------------------------------------------------------- corrupt inputs
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("content", [b"garbage", b"PK\x03\x04" + b"\x00" * 64])
def test_corrupt_checkpoint_is_one_line_naming_it(tmp_path, capsys, tiny_folder, suffix, content):
    bad = tmp_path / f"ckpt{suffix}"
    bad.write_bytes(content)
    argv = ["generate", "a cat", "--model", str(tiny_folder), "--checkpoint", str(bad), *GEN]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"cannot read checkpoint '{bad}'" in line


def test_truncated_checkpoint_is_one_line_naming_it(tmp_path, capsys, tiny_folder):
    good = next((tiny_folder / "transformer").glob("*.safetensors"))
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(good.read_bytes()[:1000])
    argv = ["generate", "a cat", "--model", str(tiny_folder), "--checkpoint", str(bad), *GEN]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    assert str(bad) in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("part", ["transformer", "text_encoder", "vae"])
def test_corrupt_weights_in_the_model_folder_are_one_line_naming_them(tmp_path, capsys, tiny_folder, part):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    weights = next((folder / part).glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:200])
    assert main(["generate", "a cat", "--model", str(folder), *GEN, "--out", str(tmp_path / "o")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(folder / part) in line and "cannot read" in line


@pytest.mark.parametrize("content", [b"garbage", b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}"])
def test_corrupt_demo_checkpoint_is_one_line_naming_it(tmp_path, capsys, content):
    bad = tmp_path / "world.safetensors"
    bad.write_bytes(content)
    assert main(["demo", "--checkpoint", str(bad), "--out", str(tmp_path / "o")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(bad) in line


# ------------------------------------------------------------------------------------------- before any work
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", [["demo"], ["eval"], ["bench", "rollout"]])
def test_device_cuda_without_cuda_is_a_clear_error(tmp_path, capsys, command):
    assert main([*command, "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "--device cuda: CUDA is not available here" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("command", [["demo"], ["eval"], ["bench", "rollout"], ["bench", "cache"]])
def test_unwritable_out_fails_before_any_work(tmp_path, capsys, monkeypatch, command):
    import longroll.world.model as world_model

    def no_work(*args, **kwargs):
        raise AssertionError("work started before --out was checked")

    monkeypatch.setattr(world_model, "load_world_model", no_work)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main([*command, "--out", str(blocker / "sub")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--out" in line and "not writable" in line
    assert main([*command, "--out", str(blocker)]) == 2
    assert "is a file, not a folder" in _one_error_line(capsys.readouterr().err)


def test_generate_checks_out_before_loading_the_model(tmp_path, capsys, tiny_folder, monkeypatch):
    import longroll.pipeline.loader as loader

    monkeypatch.setattr(loader, "load_pipeline", lambda *a, **k: pytest.fail("model loaded before --out check"))
    blocker = tmp_path / "f"
    blocker.write_text("")
    assert main(["generate", "a cat", "--model", str(tiny_folder), *GEN, "--out", str(blocker / "x")]) == 2
    assert "--out" in _one_error_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------------------- real failures
def test_runtime_error_is_a_failure_with_its_traceback_not_a_usage_error(tmp_path, capsys, monkeypatch):
    import longroll.bench.demo as demo

    def broken(*args, **kwargs):
        raise RuntimeError("invariant broken: lengths exceed the cap")

    monkeypatch.setattr(demo, "run_demo", broken)
    assert main(["demo", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "longroll: error:" not in err
    assert err.strip().splitlines()[-1] == "longroll: failed: RuntimeError: invariant broken: lengths exceed the cap"


def test_out_of_memory_is_one_line_and_a_failure(tmp_path, capsys, monkeypatch):
    import longroll.bench.demo as demo

    def oom(*args, **kwargs):
        raise RolloutOutOfMemoryError("out of memory in chunk 3 of 15 (latent frames 12-14): 1.00 GiB", 3, 12)

    monkeypatch.setattr(demo, "run_demo", oom)
    assert main(["demo", "--out", str(tmp_path)]) == 1
    line = _one_error_line(capsys.readouterr().err, "longroll: out of memory: ")
    assert "chunk 3 of 15" in line


# ------------------------------------------------------------------------------------------- rollout OOM
CFG = WanConfig.from_preset("tiny")
FPC, LH, LW = 2, 8, 8
P = (LH // 2) * (LW // 2)


class _OomAfter:
    """A model that runs out of memory at its n-th forward (as a CUDA allocation failure would)."""

    def __init__(self, model, n):
        self.model, self.n, self.calls = model, n, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.model(*args, **kwargs)


def _proc(policy):
    pol = preset(policy, tokens_per_frame=P, frames_per_chunk=FPC, memory_frames=4)
    return CachedProcessor.for_model(pol, CFG, tokens_per_frame=P, frames_per_chunk=FPC, dtype=torch.float32,
                                     device="cpu")  # fmt: skip


@pytest.mark.parametrize("policy", ["tempcache", "all_int8"])
def test_out_of_memory_names_the_chunk_and_a_saved_state_resumes(policy):
    torch.manual_seed(0)
    model = CausalWanModel(CFG).eval()
    ctx = torch.randn(1, 5, CFG.text_dim)
    cfg = RolloutConfig(4 * FPC, FPC, (CFG.in_channels, LH, LW), SamplerConfig(timesteps=(1000, 500)))
    whole = RolloutEngine(model, _proc(policy), cfg).run(ctx).latents
    saved = {}
    proc = _proc(policy)

    def save(chunk, latents, st):
        saved[chunk] = (proc.state_dict(), latents.clone())

    # 3 forwards per chunk (2 steps + commit): the 8th is chunk 2's second step.
    with pytest.raises(RolloutOutOfMemoryError) as err:
        RolloutEngine(_OomAfter(model, 8), proc, cfg).run(ctx, on_chunk=save)
    msg = str(err.value)
    assert "out of memory in chunk 2 of 4 (latent frames 4-5)" in msg and "KV caches hold" in msg
    assert "memory" in msg and err.value.chunk == 2 and isinstance(err.value, torch.OutOfMemoryError)
    state, _ = saved[1]
    resumed = _proc(policy)
    resumed.load_state_dict(state)
    rest = RolloutEngine(model, resumed, RolloutConfig(2 * FPC, FPC, cfg.latent_shape, cfg.sampler)).run(ctx)
    done = torch.cat([saved[0][1], saved[1][1], rest.latents], dim=2)
    assert torch.equal(done, whole)


# ------------------------------------------------------------------------------------------- interrupted generate
def test_interrupted_generate_leaves_a_partial_mp4_and_partial_stats(tmp_path, tiny_folder):
    import imageio_ffmpeg

    from longroll.pipeline.generate import generate
    from longroll.pipeline.loader import load_pipeline

    pipe = load_pipeline(tiny_folder, device="cpu", text_len=16)
    out = tmp_path / "run"
    out.mkdir()
    (out / "video.mp4").write_bytes(b"an earlier run")

    def interrupt_after_first(done, total):
        if done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate(pipe, "a cat runs", num_frames=6, preset="tempcache", seed=0, out_dir=out,
                 sampler=SamplerConfig(timesteps=(1000, 500)), height=64, width=64, memory_frames=4,
                 progress=interrupt_after_first)  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["stats.partial.json", "video.partial.mp4"]
    frames, _ = imageio_ffmpeg.count_frames_and_secs(str(out / "video.partial.mp4"))
    assert frames == 9  # the first chunk: 1 + 4 * (3 - 1) video frames, playable
    stats = json.loads((out / "stats.partial.json").read_text())
    assert stats["partial"] is True and stats["stopped_by"] == "interrupted"
    assert stats["chunks_completed"] == 1 and stats["video_frames"] == 9
    assert stats["video"] == str(out / "video.partial.mp4")


def test_empty_prompt_is_refused(tmp_path, capsys, tiny_folder):
    assert main(["generate", "  ", "--model", str(tiny_folder), *GEN, "--out", str(tmp_path)]) == 2
    assert "prompt is empty" in _one_error_line(capsys.readouterr().err)
    assert not any(Path(tmp_path).iterdir())


def test_a_refused_command_creates_no_output_folder(tmp_path, capsys):
    out = tmp_path / "new" / "folder"
    assert main(["bench", "rollout", "--height", "100", "--out", str(out)]) == 2
    assert "multiple of 16" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "new").exists()
