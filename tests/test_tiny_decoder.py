"""The TAEHV-architecture tiny decoder: taew2_1 key names and shapes, output shapes at odd latent sizes, chunked
decode equal to whole-video decode and to an independent frame-by-frame reference, the loader's errors, and its
selection in ``longroll generate`` and ``longroll bench rollout``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from longroll.files import CorruptFileError
from longroll.pipeline.tiny_decoder import (
    TinyDecoderConfig,
    TinyLatentDecoder,
    TinyVideoDecoder,
    load_tiny_decoder,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as in tests/test_cli.py: small convolutions under pytest-xdist otherwise spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: A narrow decoder of the same layout, for the numeric tests (the Wan 2.1 widths are tested for shapes).
SMALL = TinyDecoderConfig(latent_channels=4, widths=(8, 6, 4, 4), blocks_per_stage=2)


def _taew2_1_shapes() -> dict[str, tuple[int, ...]]:
    """The decoder tensors of a taew2_1 file, written out from the published layout (64 tensors)."""
    shapes: dict[str, tuple[int, ...]] = {"decoder.1.weight": (256, 16, 3, 3), "decoder.1.bias": (256,)}
    stages = [((3, 4, 5), 256, 7, 1, 8, 128), ((9, 10, 11), 128, 13, 2, 14, 64), ((15, 16, 17), 64, 19, 2, 20, 64)]
    for blocks, c, grow, stride, conv, c_next in stages:
        for b in blocks:
            for j, c_in in ((0, 2 * c), (2, c), (4, c)):
                shapes[f"decoder.{b}.conv.{j}.weight"] = (c, c_in, 3, 3)
                shapes[f"decoder.{b}.conv.{j}.bias"] = (c,)
        shapes[f"decoder.{grow}.conv.weight"] = (c * stride, c, 1, 1)
        shapes[f"decoder.{conv}.weight"] = (c_next, c, 3, 3)
    shapes["decoder.22.weight"] = (3, 64, 3, 3)
    shapes["decoder.22.bias"] = (3,)
    return shapes


def _model(cfg: TinyDecoderConfig, seed: int = 0) -> TinyVideoDecoder:
    """Random weights that keep activations O(1) through the depth: He-normal convolutions, zero biases, the
    residual branch of each memory block damped; the output conv then scaled on a probe so that most outputs
    spread over (0, 1), off the clamp (a comparison of clamped outputs would say little)."""
    torch.manual_seed(seed)
    model = TinyVideoDecoder(cfg).eval()
    head = model.decoder[-1]
    raw: list[torch.Tensor] = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight"):
                p.normal_(0, (2.0 / p[0].numel()) ** 0.5)
                if ".conv.4." in name:
                    p.mul_(0.3)
            else:
                p.zero_()
        hook = head.register_forward_hook(lambda mod, args, out: raw.append(out))
        model(torch.randn(1, cfg.latent_channels, 3, 4, 4))
        hook.remove()
        mean = raw[0].mean((0, 2, 3))
        scale = 0.15 / (raw[0] - mean[:, None, None]).abs().median()
        head.weight.mul_(scale)
        head.bias.copy_(0.5 - mean * scale)
    return model


def _reference(model: TinyVideoDecoder, latents: torch.Tensor) -> torch.Tensor:
    """Frame-by-frame decode, depth first: each frame goes through the layers; a memory block takes the previous
    frame's input to it (zeros first); a temporal grow splits a frame into ``stride`` frames that continue in
    order. (B, C, F, h, w) -> (B, 3, T, H, W) with the leading ``frames_to_trim`` frames dropped."""
    layers = list(model.decoder)
    last: dict[int, torch.Tensor] = {}
    out: list[torch.Tensor] = []

    def run(x: torch.Tensor, i: int) -> None:
        while i < len(layers):
            layer = layers[i]
            name = type(layer).__name__
            if name == "_MemoryBlock":
                past = last.get(i, torch.zeros_like(x))
                last[i] = x
                x = F.relu(layer.conv(torch.cat([x, past], 1)) + x)
            elif name == "_TimeGrow":
                y = layer.conv(x)
                for part in y.chunk(layer.stride, dim=1):
                    run(part, i + 1)
                return
            else:
                x = layer(x)
            i += 1
        out.append(x)

    for t in range(latents.shape[2]):
        run(latents[:, :, t], 0)
    video = torch.stack(out, dim=2)[:, :, model.config.frames_to_trim :]
    return video.clamp(0, 1)


def test_taew2_1_parameter_names_and_shapes() -> None:
    with torch.device("meta"):
        model = TinyVideoDecoder()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == _taew2_1_shapes()
    assert len(got) == 64
    cfg = model.config
    assert (cfg.spatial_factor, cfg.temporal_factor, cfg.frames_to_trim) == (8, 4, 3)


@pytest.mark.parametrize(("frames", "h", "w"), [(1, 1, 1), (2, 3, 5), (3, 7, 2)])
def test_wan_widths_output_shape_at_odd_sizes(frames: int, h: int, w: int) -> None:
    model = TinyVideoDecoder()
    with torch.no_grad():
        video, state = model(torch.randn(2, 16, frames, h, w))
        assert video.shape == (2, 3, 4 * frames - 3, 8 * h, 8 * w)
        assert state.raw_frames == 4 * frames
        more, _ = model(torch.randn(2, 16, 2, h, w), state)
    assert more.shape == (2, 3, 8, 8 * h, 8 * w)
    assert video.min() >= 0 and video.max() <= 1


def test_whole_decode_equals_frame_by_frame_reference() -> None:
    model = _model(SMALL)
    latents = torch.randn(2, 4, 5, 3, 5) * 2
    with torch.no_grad():
        video, _ = model(latents)
        ref = _reference(model, latents)
    assert video.shape == ref.shape == (2, 3, 17, 24, 40)
    inside = ((video > 0) & (video < 1)).float().mean()
    assert inside > 0.8, f"only {inside:.2f} of the outputs are off the clamp; the comparison would be weak"
    torch.testing.assert_close(video, ref)


@pytest.mark.parametrize("split", [(1, 1, 1, 1, 1, 1, 1), (3, 4), (2, 1, 4), (6, 1)])
def test_chunked_decode_equals_whole_decode(split: tuple[int, ...]) -> None:
    model = _model(SMALL, seed=1)
    latents = torch.randn(1, 4, 7, 5, 3)
    with torch.no_grad():
        whole, _ = model(latents)
        parts, state = [], None
        for chunk in latents.split(list(split), dim=2):
            video, state = model(chunk, state)
            parts.append(video)
    assert [p.shape[2] for p in parts] == [4 * split[0] - 3, *(4 * n for n in split[1:])]
    assert ((whole > 0) & (whole < 1)).float().mean() > 0.8
    torch.testing.assert_close(torch.cat(parts, dim=2), whole)
    # the state matters: the last chunk decoded as a new video differs from its continuation
    with torch.no_grad():
        fresh, _ = model(latents[:, :, -split[-1] :])
    assert (fresh - parts[-1][:, :, 3:]).abs().max() > 0.05


@settings(max_examples=12, deadline=None)
@given(
    splits=st.lists(st.integers(1, 3), min_size=1, max_size=4),
    batch=st.integers(1, 2),
    h=st.integers(1, 4),
    w=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_any_split_equals_whole_decode(splits: list[int], batch: int, h: int, w: int, seed: int) -> None:
    model = _model(SMALL, seed=5)
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, sum(splits), h, w, generator=g)
    with torch.no_grad():
        whole, end = model(latents)
        parts, state = [], None
        for chunk in latents.split(splits, dim=2):
            video, state = model(chunk, state)
            parts.append(video)
    assert state is not None and state.raw_frames == end.raw_frames == 4 * sum(splits)
    torch.testing.assert_close(torch.cat(parts, dim=2), whole)
    assert whole.shape == (batch, 3, 4 * sum(splits) - 3, 8 * h, 8 * w)


def test_nan_stays_nan_and_bad_input_is_named() -> None:
    model = _model(SMALL)
    latents = torch.randn(1, 4, 2, 3, 3)
    latents[0, 0, 1, 1, 1] = float("nan")
    with torch.no_grad():
        video, state = model(latents)
        assert torch.isnan(video).any()
        with pytest.raises(ValueError, match=r"latents must be \(batch, 4, frames >= 1, h, w\), got \(1, 5, 2, 3, 3\)"):
            model(torch.randn(1, 5, 2, 3, 3))
        with pytest.raises(ValueError, match="do not continue the state's videos"):
            model(torch.randn(1, 4, 2, 3, 4), state)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="space_upscale must hold 2 bools"):
        TinyDecoderConfig(widths=(8, 8, 8))
    with pytest.raises(ValueError, match="latent_channels must be a positive int, got 0"):
        TinyDecoderConfig(latent_channels=0)
    with pytest.raises(ValueError, match="widths must hold at least 2"):
        TinyDecoderConfig(widths=(8,), space_upscale=(), time_upscale=())


def test_streaming_wrapper_matches_whole_and_maps_to_minus_one_one() -> None:
    model = _model(SMALL, seed=2)
    stream = TinyLatentDecoder(model)
    latents = torch.randn(1, 4, 6, 2, 3)
    with torch.no_grad():
        whole, _ = model(latents)
    chunks = [stream.decode_chunk_float(c) for c in latents.split(3, dim=2)]
    torch.testing.assert_close(torch.cat(chunks, dim=2), whole * 2 - 1)
    assert stream.frames_decoded == 6 and stream.video_frames(6) == 21
    frames = stream.decode(latents)
    assert frames.shape == (21, 16, 24, 3) and frames.dtype.name == "uint8"
    with pytest.raises(ValueError, match="got \\(2, 4, 1, 2, 3\\)"):
        stream.decode_chunk_float(torch.randn(2, 4, 1, 2, 3))


# ----------------------------------------------------------------------------------------------- loading
@pytest.fixture(scope="module")
def taew2_1_weights() -> dict[str, torch.Tensor]:
    """A random state dict laid out like a taew2_1 file: decoder tensors plus an (ignored) encoder tensor."""
    torch.manual_seed(3)
    sd = {k: torch.randn(s) * 0.01 for k, s in _taew2_1_shapes().items()}
    sd["encoder.0.weight"] = torch.randn(64, 3, 3, 3)
    return sd


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_load_real_layout(tmp_path: Path, taew2_1_weights: dict[str, torch.Tensor], suffix: str) -> None:
    path = tmp_path / f"taew2_1{suffix}"
    if suffix == ".pth":
        torch.save(taew2_1_weights, path)
    else:
        from safetensors.torch import save_file

        save_file(taew2_1_weights, str(path))
    model = load_tiny_decoder(path, "cpu", torch.float16)
    assert next(model.parameters()).dtype == torch.float16
    torch.testing.assert_close(
        model.decoder[7].conv.weight.float(), taew2_1_weights["decoder.7.conv.weight"].half().float()
    )
    # strict load of the file's decoder keys into a fresh model also works
    fresh = TinyVideoDecoder()
    fresh.load_state_dict({k: v for k, v in taew2_1_weights.items() if k.startswith("decoder.")}, strict=True)


def _bad(sd: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    sd = dict(sd)
    if kind == "missing":
        del sd["decoder.10.conv.2.bias"]
    elif kind == "shape":
        sd["decoder.7.conv.weight"] = torch.zeros(512, 256, 1, 1)
    elif kind == "extra":
        sd["decoder.23.weight"] = torch.zeros(3)
    return sd


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("missing", r"missing key 'decoder.10.conv.2.bias' \(expected shape \(128,\); 1 missing in all\)"),
        ("shape", r"key 'decoder.7.conv.weight' has shape \(512, 256, 1, 1\), expected \(256, 256, 1, 1\)"),
        ("extra", r"unexpected key 'decoder.23.weight'"),
    ],
)
def test_mismatched_file_is_refused_naming_file_and_key(
    tmp_path: Path, taew2_1_weights: dict[str, torch.Tensor], kind: str, needle: str
) -> None:
    path = tmp_path / f"{kind}.pth"
    torch.save(_bad(taew2_1_weights, kind), path)
    with pytest.raises(ValueError, match=needle) as info:
        load_tiny_decoder(path, "cpu", torch.float32)
    assert str(path) in str(info.value) and "does not match the tiny decoder" in str(info.value)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_corrupt_or_missing_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"\x00garbage, not a checkpoint" * 7)
    with pytest.raises(CorruptFileError, match="cannot read tiny decoder checkpoint") as info:
        load_tiny_decoder(path, "cpu", torch.float32)
    assert str(path) in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"absent\.pth"):
        load_tiny_decoder(tmp_path / "absent.pth", "cpu", torch.float32)
    lst = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], lst)
    with pytest.raises(ValueError, match="not a flat dict of named tensors"):
        load_tiny_decoder(lst, "cpu", torch.float32)


# ----------------------------------------------------------------------------------- selection (CLI, bench)
def test_bench_rollout_times_the_tiny_decoder(tmp_path: Path) -> None:
    from longroll.bench.rollout import RolloutBenchConfig
    from longroll.cli.main import main

    args = ["bench", "rollout", "--frames", "6", "--policies", "sink_window", "--no-dense", "--no-warmup"]
    assert main([*args, "--decode", "tiny", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench_rollout.json").read_text())
    assert data["config"]["decode"] is True and data["config"]["decoder"] == "tiny"
    for rec in data["chunks"]:
        assert rec["decode_seconds"] > 0 and rec["e2e_seconds"] > rec["seconds"]
    assert data["summary"]["sink_window"]["median_decode_seconds"] > 0
    with pytest.raises(ValueError, match="decoder must be one of \\['wan', 'tiny'\\], got 'taesd'"):
        RolloutBenchConfig(decode=True, decoder="taesd")


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("longroll: error: "), err
    return lines[0]


def test_generate_with_the_tiny_decoder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("diffusers")
    from longroll.cli.main import main
    from tests.test_pipeline import build_tiny_folder

    folder = build_tiny_folder(tmp_path / "model", shard_size=None)
    shutil.rmtree(folder / "vae")  # not needed with the tiny decoder
    weights = tmp_path / "taew2_1.pth"
    torch.manual_seed(4)
    torch.save(TinyVideoDecoder().state_dict(), weights)
    common = ["a cat", "--model", str(folder), "--frames", "3", "--height", "64", "--width", "64"]
    common += ["--text-len", "16", "--timesteps", "1000", "--no-progress"]
    out = tmp_path / "run"
    assert main(["generate", *common, "--decoder", "tiny", "--tiny-decoder", str(weights), "--out", str(out)]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["model"]["decoder"] == "tiny" and stats["model"]["tiny_decoder"] == str(weights)
    assert stats["video_frames"] == 9 and (out / "video.mp4").stat().st_size > 0
    capsys.readouterr()

    assert main(["generate", *common, "--decoder", "tiny", "--out", str(out)]) == 2
    assert "--decoder tiny needs --tiny-decoder PATH" in _one_error_line(capsys.readouterr().err)
    assert main(["generate", *common, "--tiny-decoder", str(weights), "--out", str(out)]) == 2
    assert "only read with --decoder tiny" in _one_error_line(capsys.readouterr().err)
    bad = tmp_path / "bad.pth"
    torch.save(TinyVideoDecoder(TinyDecoderConfig(latent_channels=48)).state_dict(), bad)
    assert main(["generate", *common, "--decoder", "tiny", "--tiny-decoder", str(bad), "--out", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(bad) in line and "key 'decoder.1.weight' has shape (256, 48, 3, 3), expected (256, 16, 3, 3)" in line
