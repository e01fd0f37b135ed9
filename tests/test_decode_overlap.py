"""Decoding one chunk behind the DiT (DecodeQueue, generate's streaming sink): the same frames in the same order
with the overlap on, emulated and off; the decoders' channels-last layout; the compiled DiT chunk with the
attention policy outside the graphs."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch

from longroll.models.wan import CausalWanModel, WanConfig
from longroll.pipeline.compiled import CompiledChunkDenoiser
from longroll.pipeline.generate import _StreamingSink
from longroll.pipeline.overlap import DecodeQueue
from longroll.pipeline.rollout import RolloutConfig, RolloutEngine
from longroll.pipeline.tiny_decoder import TinyDecoderConfig, TinyLatentDecoder, TinyVideoDecoder
from longroll.policies.cached import CachedProcessor
from longroll.policies.config import preset

TINY = WanConfig.from_preset("tiny")
SMALL = TinyDecoderConfig(widths=(16, 8, 8, 8), blocks_per_stage=1)


def _decoder(seed: int = 0, **options: Any) -> TinyLatentDecoder:
    torch.manual_seed(seed)
    model = TinyVideoDecoder(SMALL)
    with torch.no_grad():  # outputs spread over (0, 1) rather than clamped flat
        for p in model.parameters():
            p.mul_(2.0)
    return TinyLatentDecoder(model, **options)


def _chunks(n: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 16, 3, 5, 7, generator=g) for _ in range(n)]


@pytest.mark.parametrize("mode", ["off", "emulate", "auto"])
def test_queue_hands_over_every_chunk_in_order_one_behind(mode: str) -> None:
    want = _decoder()
    expected = [want.decode_chunk(z) for z in _chunks()]
    got: list[tuple[int, np.ndarray]] = []
    queue = DecodeQueue(_decoder(), lambda i, frames: got.append((i, frames)), mode)
    assert not queue.overlapped  # no CUDA stream on the CPU
    for i, z in enumerate(_chunks()):
        queue.submit(i, z)
        # off: consumed at once; one behind otherwise (chunk i is consumed when chunk i + 1 arrives)
        assert [c for c, _ in got] == list(range(i + 1 if mode == "off" else i))
    queue.finish()
    assert [c for c, _ in got] == [0, 1, 2, 3]
    for (_, frames), ref in zip(got, expected, strict=True):
        assert frames.dtype == np.uint8 and np.array_equal(frames, ref)
    assert expected[0].shape[0] == 4 * 3 - 3 and expected[1].shape[0] == 12


def test_queue_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match=r"overlap mode must be one of \['auto', 'off', 'emulate'\], got 'on'"):
        DecodeQueue(_decoder(), lambda i, f: None, "on")


class _Frames:
    """Mp4Writer stand-in: keeps the appended frames."""

    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []

    def append(self, frames: np.ndarray) -> None:
        self.frames.append(frames.copy())


def _rollout_through_sink(mode: str) -> tuple[list[np.ndarray], list[dict], torch.Tensor]:
    torch.manual_seed(0)
    model = CausalWanModel(TINY).eval()
    h, w = 4, 6
    tpf = TINY.tokens_per_frame(h, w)
    cfg = RolloutConfig(num_frames=9, frames_per_chunk=3, latent_shape=(TINY.in_channels, h, w))
    pol = preset("sink_window", tokens_per_frame=tpf, frames_per_chunk=3, memory_frames=6)
    proc = CachedProcessor.for_model(
        pol, TINY, tokens_per_frame=tpf, frames_per_chunk=3, dtype=torch.float32, device="cpu"
    )
    writer = _Frames()
    sink = _StreamingSink(_decoder(), writer, cfg.num_chunks, None, mode)  # type: ignore[arg-type]
    ctx = torch.randn(1, 7, TINY.text_dim, generator=torch.Generator().manual_seed(2))
    latents = RolloutEngine(model, proc, cfg).run(ctx, on_chunk=sink).latents
    sink.finish()
    return writer.frames, sink.records, latents


def test_generate_sink_writes_the_same_video_with_overlap_on_emulated_and_off() -> None:
    ref_frames, ref_records, ref_latents = _rollout_through_sink("off")
    assert len(ref_frames) == 3 and [r["chunk"] for r in ref_records] == [0, 1, 2]
    for mode in ("emulate", "auto"):
        frames, records, latents = _rollout_through_sink(mode)
        assert torch.equal(latents, ref_latents), mode
        assert len(frames) == len(ref_frames)
        for a, b in zip(frames, ref_frames, strict=True):
            assert np.array_equal(a, b), mode
        assert [r["chunk"] for r in records] == [0, 1, 2]
        assert [r["video_frames"] for r in records] == [r["video_frames"] for r in ref_records] == [9, 12, 12]
        assert all(r["decode_seconds"] >= 0 and r["write_seconds"] >= 0 for r in records)


def test_tiny_decoder_channels_last_gives_the_same_video() -> None:
    base = _decoder()
    cl = TinyLatentDecoder(copy.deepcopy(base.model), channels_last=True)
    assert cl.model.decoder[1].weight.is_contiguous(memory_format=torch.channels_last)
    for z in _chunks(3):
        a, b = base.decode_chunk_float(z), cl.decode_chunk_float(z)
        # same maths, possibly another convolution algorithm: float32 rounding only
        assert float((a - b).abs().max()) <= 1e-5


@pytest.mark.slow  # ~20 s on 2 busy cores, nearly all of it Dynamo tracing: the only test of the compiled chunk
def test_compiled_chunk_matches_eager_with_a_bounded_number_of_graphs() -> None:
    """aot_eager traces the same graphs Inductor would compile; the policy (a sink-window cache that fills
    and then slides) runs outside them, and graphs stop being added once the offsets are symbolic."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = CausalWanModel(WanConfig.from_preset("tiny", num_layers=1)).eval()
    h, w = 4, 6
    tpf = TINY.tokens_per_frame(h, w)
    cfg = RolloutConfig(num_frames=9, frames_per_chunk=3, latent_shape=(TINY.in_channels, h, w))
    ctx = torch.randn(1, 7, TINY.text_dim, generator=torch.Generator().manual_seed(2))

    def run(denoiser: object, graphs: list[int]) -> torch.Tensor:
        pol = preset("sink_window", tokens_per_frame=tpf, frames_per_chunk=3, memory_frames=6)
        proc = CachedProcessor.for_model(
            pol, model.config, tokens_per_frame=tpf, frames_per_chunk=3, dtype=torch.float32, device="cpu"
        )
        on_chunk = lambda i, lat, st: graphs.append(counters["stats"]["unique_graphs"])
        return RolloutEngine(denoiser, proc, cfg).run(ctx, on_chunk=on_chunk).latents  # type: ignore[arg-type]

    torch._dynamo.reset()
    counters.clear()
    eager = run(model, [])
    graphs: list[int] = []
    compiled = run(CompiledChunkDenoiser(model, backend="aot_eager"), graphs)
    assert torch.equal(compiled, eager)
    assert graphs[-1] == graphs[-2], graphs  # chunk 2: a third frame offset  # no new graph for the last chunk
    assert 0 < graphs[-1] <= 16, graphs


def _wan_vae() -> object:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )


def test_wan_vae_channels_last_gives_the_same_video() -> None:
    """The streaming Wan VAE decode in channels-last(-3d) against the default layout, chunk after chunk (the
    feature cache carries)."""
    from longroll.pipeline.vae import LatentDecoder

    vae = _wan_vae()
    base = LatentDecoder(copy.deepcopy(vae))
    cl = LatentDecoder(copy.deepcopy(vae), channels_last=True)
    assert any(p.dim() == 5 and p.is_contiguous(memory_format=torch.channels_last_3d) for p in cl.vae.parameters())
    for z in _chunks(2):
        assert float((cl.decode_chunk_float(z) - base.decode_chunk_float(z)).abs().max()) <= 1e-5


@pytest.mark.slow  # 10-20 s on 2 busy cores: Dynamo traces the VAE per-frame step twice (first frame, later)
def test_wan_vae_compiled_gives_the_same_video() -> None:
    """Under torch.compile (aot_eager: the traced graphs, without building kernels), one frame per chunk."""
    from longroll.pipeline.vae import LatentDecoder

    vae = _wan_vae()
    base = LatentDecoder(copy.deepcopy(vae))
    compiled = LatentDecoder(copy.deepcopy(vae), compile=True, compile_backend="aot_eager")
    for z in _chunks(3):
        z1 = z[:, :, :1]
        assert float((compiled.decode_chunk_float(z1) - base.decode_chunk_float(z1)).abs().max()) <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_side_stream_decode_equals_in_line_decode_on_cuda(dtype: torch.dtype) -> None:
    """The side-stream path: the chunk is produced on the main stream right before submit (the side stream must
    wait for it), and freed right after (record_stream keeps its memory from the main stream's next chunk)."""
    want = _decoder(device="cuda", dtype=dtype, channels_last=True)
    expected = [want.decode_chunk(z.cuda()) for z in _chunks(5)]
    got: list[np.ndarray] = []
    queue = DecodeQueue(_decoder(device="cuda", dtype=dtype, channels_last=True), lambda i, f: got.append(f))
    assert queue.overlapped
    for i, z in enumerate(_chunks(5)):
        lat = (z.cuda() * 2.0) / 2.0  # written by a kernel on the main stream just now
        queue.submit(i, lat)
        del lat
        torch.cuda._sleep(1_000_000)  # main-stream work that would overwrite a recycled chunk meanwhile
        torch.randn(1, 16, 3, 5, 7, device="cuda")
    queue.finish()
    assert len(got) == 5
    for a, b in zip(got, expected, strict=True):
        assert np.array_equal(a, b)


class _FailOnChunk:
    """A denoiser that raises once the rollout reaches latent frame ``frame``."""

    def __init__(self, model: CausalWanModel, frame: int) -> None:
        self.model, self.frame = model, frame

    def __call__(self, x: torch.Tensor, *args: Any, frame_offset: int = 0, **kw: Any) -> torch.Tensor:
        if frame_offset >= self.frame:
            raise RuntimeError("DiT failed")
        return self.model(x, *args, frame_offset=frame_offset, **kw)


@pytest.mark.parametrize("fail_in", ["dit", "progress"])
def test_failure_keeps_the_finished_chunks_being_decoded(fail_in: str) -> None:
    """A DiT failure in chunk 1 still writes chunk 0 (decoded behind the DiT); a failure inside the sink (a
    write or the progress callback, e.g. an interrupt) writes nothing more."""
    from longroll.pipeline.generate import _flush_after_failure

    torch.manual_seed(0)
    model = CausalWanModel(TINY).eval()
    tpf = TINY.tokens_per_frame(4, 6)
    cfg = RolloutConfig(num_frames=9, frames_per_chunk=3, latent_shape=(TINY.in_channels, 4, 6))
    pol = preset("sink_window", tokens_per_frame=tpf, frames_per_chunk=3, memory_frames=6)
    proc = CachedProcessor.for_model(
        pol, TINY, tokens_per_frame=tpf, frames_per_chunk=3, dtype=torch.float32, device="cpu"
    )

    def progress(done: int, total: int) -> None:
        if fail_in == "progress" and done == 1:
            raise KeyboardInterrupt

    writer = _Frames()
    sink = _StreamingSink(_decoder(), writer, cfg.num_chunks, progress, "emulate")  # type: ignore[arg-type]
    denoiser = _FailOnChunk(model, 3 if fail_in == "dit" else 6)
    ctx = torch.randn(1, 7, TINY.text_dim)

    def run() -> None:  # what generate does around the rollout
        try:
            RolloutEngine(denoiser, proc, cfg).run(ctx, on_chunk=sink)  # type: ignore[arg-type]
        except BaseException:
            _flush_after_failure(sink)
            raise

    with pytest.raises(RuntimeError if fail_in == "dit" else KeyboardInterrupt):
        run()
    assert [f.shape[0] for f in writer.frames] == [9]  # chunk 0 only, either way
    assert [r["chunk"] for r in sink.records] == [0] and sink.records[0]["decode_seconds"] is not None
