"""End-to-end text-to-video pipeline on tiny random components saved in diffusers layout: loading (sharded
weights, causal checkpoints, refusals), Wan-style prompt encoding, streaming VAE decode vs whole-video decode,
MP4 writing and ``generate``'s outputs."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")

from longroll.models.wan import CausalWanModel, WanConfig, convert_diffusers_to_original  # noqa: E402
from longroll.pipeline.generate import generate  # noqa: E402
from longroll.pipeline.loader import load_pipeline, load_transformer  # noqa: E402
from longroll.pipeline.sampler import SamplerConfig  # noqa: E402
from longroll.pipeline.text import TextEncoder  # noqa: E402
from longroll.pipeline.vae import LatentDecoder, latents_to_uint8  # noqa: E402
from longroll.pipeline.video import side_by_side, tile_clips, write_mp4  # noqa: E402

CFG = WanConfig.from_preset("tiny")
WORDS = ["<pad>", "</s>", "<unk>", "a", "cat", "dog", "runs", "on", "the", "beach", "at", "sunset"]
TEXT_LEN = 16
PX = 64  # video pixels -> 8x8 latents -> 16 tokens per frame
FAST = SamplerConfig(timesteps=(1000.0, 500.0))


def save_tokenizer(path: Path) -> None:
    """A word-level tokenizer that appends </s> like T5's, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)


def build_tiny_folder(root: Path, *, shard_size: str | None = "80KB") -> Path:
    """Random tiny transformer, VAE, umT5 encoder and tokenizer in diffusers' folder layout."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    WanTransformer3DModel(**CFG.diffusers_kwargs()).save_pretrained(root / "transformer", **kwargs)
    AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).save_pretrained(root / "vae")
    te = UMT5Config(
        vocab_size=len(WORDS),
        d_model=CFG.text_dim,
        d_kv=16,
        d_ff=128,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
    )
    UMT5EncoderModel(te).save_pretrained(root / "text_encoder")
    save_tokenizer(root / "tokenizer")
    return root


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for these tiny models: their ops are so small that OpenMP hand-offs dominate, and
    under pytest-xdist (two workers on two cores) two threads per worker oversubscribe the CPU and spin,
    making the VAE decode ~20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_folder(tmp_path_factory.mktemp("tiny_wan"))


@pytest.fixture(scope="module")
def pipe(tiny_folder: Path):
    return load_pipeline(tiny_folder, device="cpu", text_len=TEXT_LEN)


def _diffusers_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted((folder / "transformer").glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


# ------------------------------------------------------------------------------------------------ loading
def test_load_pipeline_reads_sharded_weights_and_config(tiny_folder: Path, pipe) -> None:
    shards = list((tiny_folder / "transformer").glob("*.safetensors"))
    assert len(shards) > 1, "the fixture should exercise sharded weights"
    assert pipe.wan_config == CFG
    ref = _diffusers_state(tiny_folder)
    got = pipe.model.state_dict()
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k].to(got[k].dtype)), k
    assert pipe.text_encoder.hidden_size == CFG.text_dim
    assert pipe.decoder.latent_channels == CFG.in_channels


def test_unsharded_transformer_loads(tmp_path: Path) -> None:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(1)
    ref = WanTransformer3DModel(**CFG.diffusers_kwargs())
    ref.save_pretrained(tmp_path)
    model = load_transformer(CFG, tmp_path, device=torch.device("cpu"), dtype=torch.float32)
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_causal_checkpoint_in_original_format_replaces_weights(tiny_folder: Path, tmp_path: Path) -> None:
    torch.manual_seed(2)
    causal = CausalWanModel(CFG)
    ckpt = tmp_path / "self_forcing.pt"
    original = convert_diffusers_to_original(causal.state_dict())
    torch.save({"generator_ema": {f"model.{k}": v for k, v in original.items()}}, ckpt)
    loaded = load_pipeline(tiny_folder, checkpoint=ckpt, device="cpu", text_len=TEXT_LEN)
    for k, v in causal.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    assert loaded.checkpoint == ckpt


def test_mismatched_checkpoint_is_refused_naming_keys(tiny_folder: Path, tmp_path: Path) -> None:
    other = CausalWanModel(WanConfig.from_preset("tiny", ffn_dim=96))
    ckpt = tmp_path / "wrong.pt"
    torch.save({"generator": convert_diffusers_to_original(other.state_dict())}, ckpt)
    with pytest.raises(ValueError, match=r"mis-shaped key\(s\): blocks\.0\.ffn\.net\.0\.proj\.weight") as err:
        load_pipeline(tiny_folder, checkpoint=ckpt, device="cpu", text_len=TEXT_LEN)
    assert str(ckpt) in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_parts_are_named(tiny_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pipeline(tmp_path / "nope", device="cpu")
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text((tiny_folder / "transformer" / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"text_encoder.*tokenizer.*vae"):
        load_pipeline(tmp_path, device="cpu")
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        load_pipeline(tiny_folder, checkpoint=tmp_path / "missing.pt", device="cpu")


# ------------------------------------------------------------------------------------------------- text
def test_text_encoder_zeroes_padding_like_wan(pipe) -> None:
    enc: TextEncoder = pipe.text_encoder
    emb = enc.encode(["a cat runs", "the dog runs on the beach at sunset"])
    assert emb.shape == (2, TEXT_LEN, CFG.text_dim)
    lengths = [4, 9]  # words + </s>
    for row, n in zip(emb, lengths, strict=True):
        assert row[:n].abs().sum(-1).gt(0).all()
        assert torch.equal(row[n:], torch.zeros_like(row[n:]))
    # Each prompt's embedding does not depend on its batch partner (padding is masked out).
    alone = enc.encode(["a cat runs"])
    torch.testing.assert_close(alone[0], emb[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="non-empty list"):
        enc.encode([])


# ------------------------------------------------------------------------------------------------- VAE
def test_streaming_decode_equals_whole_video_decode(pipe) -> None:
    """Chunked decode with the feature cache kept across calls vs diffusers' vae.decode of the whole video:
    identical (difference 0 in float32 on CPU), whatever the chunking."""
    dec: LatentDecoder = pipe.decoder
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 16, 6, PX // 8, PX // 8, generator=g)
    whole = dec.vae.decode(dec.denormalize(latents)).sample
    assert whole.shape == (1, 3, dec.video_frames(6), PX, PX)
    for split in ((3, 3), (1, 2, 3)):
        dec.reset()
        parts = [dec.decode_chunk_float(c) for c in latents.split(list(split), dim=2)]
        assert [p.shape[2] for p in parts] == [1 + 4 * (split[0] - 1), *(4 * s for s in split[1:])]
        streamed = torch.cat(parts, dim=2)
        assert (streamed - whole).abs().max().item() == 0.0
    assert np.array_equal(dec.decode(latents), latents_to_uint8(whole))
    with pytest.raises(ValueError, match="one video at a time"):
        dec.decode_chunk(torch.zeros(2, 16, 1, 8, 8))


# ------------------------------------------------------------------------------------------------ video
def test_write_mp4_pads_odd_sizes(tmp_path: Path) -> None:
    frames = np.random.default_rng(0).integers(0, 256, size=(5, 15, 17, 3), dtype=np.uint8)
    path = write_mp4(tmp_path / "odd.mp4", frames, fps=8)
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    assert meta["size"] == (18, 16)
    assert sum(1 for _ in reader) == 5
    with pytest.raises(ValueError, match="uint8"):
        write_mp4(tmp_path / "bad.mp4", frames.astype(np.float32), fps=8)


def test_side_by_side_shapes() -> None:
    a = np.full((4, 16, 20, 3), 50, np.uint8)
    b = np.full((3, 12, 10, 3), 200, np.uint8)
    out = side_by_side(a, b, ("dense", "tempcache"), gap=2, label_height=10)
    assert out.shape == (3, 26, 32, 3)
    assert (out[:, 10:, :20] == 50).all()
    assert (out[:, 10:22, 22:] == 200).all() and (out[:, 22:, 22:] == 0).all()
    assert side_by_side(a, b).shape == (3, 16, 34, 3)


def test_tile_clips_scales_and_labels_each_clip() -> None:
    clips = [np.full((5, 4, 4, 3), v, np.uint8) for v in (10, 20, 30)]
    clips[1][:, 0, 0] = 99
    out = tile_clips(clips, ("a", "b", "c"), gap=1, label_height=6, scale=2)
    assert out.shape == (5, 6 + 8, 3 * 8 + 2, 3)
    assert (out[:, 6:, :8] == 10).all() and (out[:, 6:, 8] == 0).all()
    assert (out[:, 6:8, 9:11] == 99).all() and (out[:, 8:, 11:17] == 20).all()  # pixel (0, 0) -> a 2x2 block
    assert (out[:, 6:, 18:] == 30).all()
    with pytest.raises(ValueError, match="3 captions"):
        tile_clips(clips, ("a", "b"))
    with pytest.raises(ValueError, match="scale"):
        tile_clips(clips, scale=0)
    with pytest.raises(ValueError, match="at least one"):
        tile_clips([])


# --------------------------------------------------------------------------------------------- generate
def test_generate_writes_mp4_and_stats(pipe, tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    res = generate(
        pipe,
        "a cat runs on the beach",
        num_frames=6,
        preset="sink_window",
        seed=0,
        out_dir=tmp_path,
        sampler=FAST,
        height=PX,
        width=PX,
        memory_frames=4,
        command="test",
        progress=lambda d, t: seen.append((d, t)),
    )
    assert seen == [(1, 2), (2, 2)]
    assert res.video_path.is_file() and res.stats_path.is_file()
    assert res.video_frames == 1 + 4 * 5
    assert imageio_ffmpeg.count_frames_and_secs(str(res.video_path))[0] == res.video_frames
    assert res.latents.shape == (1, 16, 6, PX // 8, PX // 8)
    stats = json.loads(res.stats_path.read_text())
    assert stats["policy"] == "sink_window" and stats["seed"] == 0 and stats["command"] == "test"
    assert stats["video_frames"] == 21 and stats["num_latent_frames"] == 6
    assert [c["video_frames"] for c in stats["chunks"]] == [9, 12]
    for c in stats["chunks"]:
        assert c["dit_seconds"] > 0 and c["decode_seconds"] > 0 and c["cache_bytes"] > 0
    t = stats["timing"]
    assert t["end_to_end_seconds"] >= t["dit_seconds"] + t["decode_seconds"]
    assert t["dit_fps_video"] > t["end_to_end_fps_video"] > 0
    assert stats["environment"]["versions"]["torch"] and stats["environment"]["device"] == "cpu"
    assert stats["sampler"]["timesteps"] == [1000.0, 500.0]


def test_generate_is_deterministic_and_rejects_bad_sizes(pipe, tmp_path: Path) -> None:
    kw = {"num_frames": 3, "preset": "dense", "seed": 5, "sampler": FAST, "height": PX, "width": PX}
    a = generate(pipe, "a dog", out_dir=tmp_path / "a", **kw)
    b = generate(pipe, "a dog", out_dir=tmp_path / "b", **kw)
    assert torch.equal(a.latents, b.latents)
    with pytest.raises(ValueError, match="multiple of 16"):
        generate(pipe, "a dog", out_dir=tmp_path / "c", **{**kw, "height": 72})
