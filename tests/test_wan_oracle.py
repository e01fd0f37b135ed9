"""CausalWanModel against diffusers' WanTransformer3DModel, plus its config, RoPE, masks and checkpoints.

All models are tiny and random; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from longroll.models.wan import (
    CausalWanModel,
    WanConfig,
    apply_rope,
    block_causal_mask,
    convert_diffusers_to_original,
    convert_original_to_diffusers,
    load_checkpoint,
    load_into,
)
from longroll.policies.processor import DenseProcessor

diffusers = pytest.importorskip("diffusers")

TINY = WanConfig.from_preset("tiny")


def _perturb(model: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    """Add noise to every parameter so norms, gates and tables are all non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def _reference(config: WanConfig = TINY, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    ref = diffusers.WanTransformer3DModel(**config.diffusers_kwargs()).eval()
    _perturb(ref, seed)
    return ref


def _ours_from(ref: torch.nn.Module, config: WanConfig = TINY) -> CausalWanModel:
    model = CausalWanModel(config).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return model


def _inputs(
    batch: int = 2, frames: int = 3, size: int = 8, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, TINY.in_channels, frames, size, size, generator=gen)
    timestep = torch.tensor([999.0, 250.5, 31.0, 640.0][:batch])
    context = torch.randn(batch, 7, TINY.text_dim, generator=gen)
    return x, timestep, context


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    err = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert err <= rel * scale, f"max abs err {err:.3g} vs output scale {scale:.3g}"


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    return _reference()


@pytest.fixture(scope="module")
def model(reference: torch.nn.Module) -> CausalWanModel:
    return _ours_from(reference)


# ---------------------------------------------------------------------------------------------------------
# (a) Full-sequence forward equals diffusers


@pytest.mark.parametrize("cross_attn_norm", [True, False])
def test_state_dict_keys_and_shapes_match_diffusers(cross_attn_norm: bool) -> None:
    config = dataclasses.replace(TINY, cross_attn_norm=cross_attn_norm)
    ref = diffusers.WanTransformer3DModel(**config.diffusers_kwargs())
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in CausalWanModel(config).state_dict().items()}
    assert actual == expected


@pytest.mark.parametrize(("frames", "size"), [(3, 8), (5, 16), (4, 8)])
def test_full_sequence_matches_diffusers(
    reference: torch.nn.Module, model: CausalWanModel, frames: int, size: int
) -> None:
    x, timestep, context = _inputs(frames=frames, size=size)
    with torch.no_grad():
        expected = reference(x, timestep, context, return_dict=False)[0]
        actual = model(x, timestep, context)
    assert actual.shape == expected.shape == (2, TINY.out_channels, frames, size, size)
    _assert_close(actual, expected)


def test_non_square_latents_and_batch_one(reference: torch.nn.Module, model: CausalWanModel) -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, TINY.in_channels, 2, 8, 12, generator=gen)
    timestep, context = torch.tensor([400]), torch.randn(1, 5, TINY.text_dim, generator=gen)
    with torch.no_grad():
        _assert_close(model(x, timestep, context), reference(x, timestep, context, return_dict=False)[0])


# ---------------------------------------------------------------------------------------------------------
# (b) Per-frame timesteps and RoPE frame offsets


def test_per_frame_timesteps_match_diffusers_per_token(reference: torch.nn.Module, model: CausalWanModel) -> None:
    # diffusers accepts one timestep per token (Wan 2.2 TI2V); repeating each frame's timestep over the
    # frame's tokens is what per-frame modulation means.
    frames, size = 3, 8
    x, _, context = _inputs(frames=frames, size=size)
    per_frame = torch.tensor([[999.0, 500.0, 10.0], [0.0, 750.0, 750.0]])
    per_token = per_frame.repeat_interleave(TINY.tokens_per_frame(size, size), dim=1)
    with torch.no_grad():
        expected = reference(x, per_token, context, return_dict=False)[0]
        actual = model(x, per_frame, context)
    _assert_close(actual, expected)


def test_equal_per_frame_timesteps_equal_scalar(model: CausalWanModel) -> None:
    x, timestep, context = _inputs(frames=4)
    with torch.no_grad():
        scalar = model(x, timestep, context)
        per_frame = model(x, timestep[:, None].expand(-1, 4), context)
    torch.testing.assert_close(per_frame, scalar, rtol=1e-5, atol=1e-5)


def test_rope_matches_diffusers(reference: torch.nn.Module, model: CausalWanModel) -> None:
    frames, height, width = 5, 4, 6
    ref_cos, ref_sin = reference.rope(torch.zeros(1, 1, frames, 2 * height, 2 * width))
    cos, sin = model.rope(frames, height, width, device=torch.device("cpu"))
    # diffusers repeats each pair's cos/sin twice along head_dim.
    torch.testing.assert_close(cos, ref_cos[0, :, 0, 0::2], rtol=0, atol=0)
    torch.testing.assert_close(sin, ref_sin[0, :, 0, 1::2], rtol=0, atol=0)


@pytest.mark.parametrize(("offset", "frames"), [(0, 3), (3, 3), (9, 3), (5, 1), (20, 1)])
def test_rope_frame_offset_equals_full_sequence_slice(model: CausalWanModel, offset: int, frames: int) -> None:
    height, width = 3, 4
    tokens = height * width
    cpu = torch.device("cpu")
    full_cos, full_sin = model.rope(offset + frames, height, width, device=cpu)
    cos, sin = model.rope(frames, height, width, frame_offset=offset, device=cpu)
    torch.testing.assert_close(cos, full_cos[offset * tokens :], rtol=0, atol=0)
    torch.testing.assert_close(sin, full_sin[offset * tokens :], rtol=0, atol=0)


def test_rope_rejects_positions_past_the_table(model: CausalWanModel) -> None:
    with pytest.raises(ValueError, match="rope_max_seq_len"):
        model.rope(3, 2, 2, frame_offset=TINY.rope_max_seq_len - 2, device=torch.device("cpu"))


class _RecordingProcessor(DenseProcessor):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int, tuple[int, ...], tuple[int, ...]]] = []
        self.pre_rope_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def self_attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pre_rope: torch.Tensor
    ) -> torch.Tensor:
        self.calls.append(("self", layer, tuple(q.shape), tuple(k.shape)))
        self.pre_rope_pairs.append((k_pre_rope, k))
        return super().self_attention(layer, q, k, v, k_pre_rope)

    def cross_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.calls.append(("cross", layer, tuple(q.shape), tuple(k.shape)))
        return super().cross_attention(layer, q, k, v)


def test_every_attention_call_goes_through_the_processor(model: CausalWanModel) -> None:
    frames, size, offset = 2, 8, 6
    x, timestep, context = _inputs(frames=frames, size=size)
    processor = _RecordingProcessor()
    with torch.no_grad():
        model(x, timestep, context, frame_offset=offset, processor=processor)
    seqlen = frames * TINY.tokens_per_frame(size, size)
    q_shape = (2, TINY.num_heads, seqlen, TINY.head_dim)
    ctx_shape = (2, TINY.num_heads, context.shape[1], TINY.head_dim)
    expected = []
    for layer in range(TINY.num_layers):
        expected += [("self", layer, q_shape, q_shape), ("cross", layer, q_shape, ctx_shape)]
    assert processor.calls == expected
    # k_pre_rope is k before the rotation of the chunk's absolute frames.
    cos, sin = model.rope(frames, size // 2, size // 2, frame_offset=offset, device=torch.device("cpu"))
    for k_pre_rope, k in processor.pre_rope_pairs:
        torch.testing.assert_close(apply_rope(k_pre_rope, cos, sin), k)


def test_first_chunk_of_block_causal_forward_equals_the_chunk_alone(model: CausalWanModel) -> None:
    frames, size, per_chunk = 6, 8, 3
    x, timestep, context = _inputs(frames=frames, size=size)
    mask = block_causal_mask(frames, TINY.tokens_per_frame(size, size), per_chunk, device="cpu")
    with torch.no_grad():
        full = model(x, timestep, context, processor=DenseProcessor(self_mask=mask))
        first = model(x[:, :, :per_chunk], timestep, context, frame_offset=0)
        bidirectional = model(x, timestep, context)
    torch.testing.assert_close(full[:, :, :per_chunk], first, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(full[:, :, :per_chunk], bidirectional[:, :, :per_chunk], atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# (c) Checkpoints in the original Wan format


def _save_checkpoints(tmp_path: Path, ema: dict[str, torch.Tensor], plain: dict[str, torch.Tensor]) -> Path:
    original_ema = {f"model.{k}": v for k, v in convert_diffusers_to_original(ema).items()}
    original_plain = {f"model._orig_mod.{k}": v for k, v in convert_diffusers_to_original(plain).items()}
    path = tmp_path / "self_forcing.pt"
    torch.save({"generator_ema": original_ema, "generator": original_plain, "step": torch.tensor(7)}, path)
    return path


def test_conversion_round_trip_and_original_names(reference: torch.nn.Module) -> None:
    sd = reference.state_dict()
    original = convert_diffusers_to_original(sd)
    assert "blocks.1.self_attn.q.weight" in original
    assert "blocks.0.cross_attn.norm_k.weight" in original
    assert "blocks.0.norm3.weight" in original  # the cross-attention norm
    assert {
        "head.head.weight",
        "head.modulation",
        "time_projection.1.bias",
        "text_embedding.2.weight",
    } <= set(original)
    assert "blocks.0.modulation" in original
    assert "blocks.0.ffn.0.weight" in original
    back = convert_original_to_diffusers(original)
    assert list(back) == list(sd)
    assert all(back[k] is sd[k] for k in sd)
    # Already-converted keys are left alone.
    assert convert_original_to_diffusers(sd).keys() == sd.keys()


def test_pt_and_safetensors_in_original_format_load_identically(
    tmp_path: Path, reference: torch.nn.Module, model: CausalWanModel
) -> None:
    ema = reference.state_dict()
    plain = _reference(seed=5).state_dict()
    pt_path = _save_checkpoints(tmp_path, ema, plain)
    st_path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in convert_diffusers_to_original(ema).items()}, str(st_path))
    x, timestep, context = _inputs(frames=3)
    with torch.no_grad():
        expected = model(x, timestep, context)
        for path in (pt_path, st_path):
            loaded = CausalWanModel(TINY).eval()
            load_into(loaded, load_checkpoint(path))
            torch.testing.assert_close(loaded(x, timestep, context), expected, rtol=0, atol=0)
        loaded = CausalWanModel(TINY).eval()
        load_into(loaded, load_checkpoint(pt_path, use_ema=False))
        torch.testing.assert_close(loaded.state_dict(), plain, rtol=0, atol=0)


def test_flat_checkpoint_with_both_networks_and_fsdp_segments(
    tmp_path: Path, reference: torch.nn.Module, caplog: pytest.LogCaptureFixture
) -> None:
    ema = convert_diffusers_to_original(reference.state_dict())
    plain = {k: torch.zeros_like(v) for k, v in ema.items()}
    flat = {f"generator_ema.model._fsdp_wrapped_module.{k}": v for k, v in ema.items()}
    flat |= {f"generator.model.{k}": v for k, v in plain.items()}
    path = tmp_path / "flat.pt"
    torch.save(flat, path)
    torch.testing.assert_close(load_checkpoint(path), reference.state_dict(), rtol=0, atol=0)
    torch.save({"generator": plain}, path)
    with caplog.at_level(logging.WARNING, logger="longroll.models.wan.convert"):
        assert all(v.count_nonzero() == 0 for v in load_checkpoint(path, use_ema=True).values())
    assert "no EMA" in caplog.text


def test_diffusers_safetensors_directory_loads(tmp_path: Path, reference: torch.nn.Module) -> None:
    sd = {k: v.contiguous() for k, v in reference.state_dict().items()}
    keys = list(sd)
    save_file({k: sd[k] for k in keys[:10]}, str(tmp_path / "part-00001.safetensors"))
    save_file({k: sd[k] for k in keys[10:]}, str(tmp_path / "part-00002.safetensors"))
    loaded = CausalWanModel(TINY)
    load_into(loaded, load_checkpoint(tmp_path))
    torch.testing.assert_close(loaded.state_dict(), sd, rtol=0, atol=0)


def _refusal(model: CausalWanModel, state_dict: dict[str, torch.Tensor]) -> str:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="does not match CausalWanModel") as info:
        load_into(model, state_dict)
    torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0)
    return str(info.value)


def test_missing_mis_shaped_and_unexpected_keys_are_refused(tmp_path: Path, reference: torch.nn.Module) -> None:
    model = CausalWanModel(TINY)
    original = convert_diffusers_to_original(reference.state_dict())

    missing = dict(original)
    del missing["blocks.1.cross_attn.v.bias"]
    torch.save({"generator_ema": missing}, tmp_path / "missing.pt")
    message = _refusal(model, load_checkpoint(tmp_path / "missing.pt"))
    assert "1 missing key(s): blocks.1.attn2.to_v.bias" in message

    misshaped = dict(original)
    misshaped["head.modulation"] = torch.zeros(1, 3, TINY.dim)
    save_file(misshaped, str(tmp_path / "misshaped.safetensors"))
    message = _refusal(model, load_checkpoint(tmp_path / "misshaped.safetensors"))
    assert f"scale_shift_table (checkpoint (1, 3, {TINY.dim}), model (1, 2, {TINY.dim}))" in message
    assert "missing" not in message

    unexpected = dict(original) | {f"blocks.0.cross_attn.k_img.{i}": torch.zeros(1) for i in range(12)}
    message = _refusal(model, convert_original_to_diffusers(unexpected))
    assert "12 unexpected key(s)" in message
    assert "(2 more)" in message


# ---------------------------------------------------------------------------------------------------------
# Config, validation, actions, dtypes, masks


def test_presets_and_config_validation() -> None:
    base = WanConfig.from_preset("wan2.1-1.3b")
    assert (base.dim, base.num_layers, base.ffn_dim, base.text_dim) == (1536, 30, 8960, 4096)
    assert base.tokens_per_frame(60, 104) == 1560
    assert WanConfig.from_preset("tiny", num_actions=4).num_actions == 4
    with pytest.raises(ValueError, match=r"unknown Wan preset 'wan9'.*tiny"):
        WanConfig.from_preset("wan9")
    with pytest.raises(ValueError, match="head_dim"):
        dataclasses.replace(TINY, head_dim=7)
    with pytest.raises(ValueError, match="num_layers must be a positive int, got 0"):
        dataclasses.replace(TINY, num_layers=0)
    with pytest.raises(ValueError, match="patch_size"):
        dataclasses.replace(TINY, patch_size=(1, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="height_latent"):
        base.tokens_per_frame(61, 104)
    ref = diffusers.WanTransformer3DModel(**TINY.diffusers_kwargs())
    assert WanConfig.from_diffusers_config(dict(ref.config)) == TINY


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            {"x": torch.zeros(2, 16, 3, 8)},
            r"x must be \(batch, 16, frames, height, width\), got \(2, 16, 3, 8\)",
        ),
        ({"x": torch.zeros(2, 4, 3, 8, 8)}, r"x must be .* got \(2, 4, 3, 8, 8\)"),
        ({"x": torch.zeros(2, 16, 3, 7, 8)}, "multiples of"),
        ({"timestep": torch.zeros(2, 2)}, r"timestep must be \(2,\) or \(2, 3\), got \(2, 2\)"),
        ({"timestep": torch.zeros(3)}, r"timestep .* got \(3,\)"),
        ({"context": torch.zeros(2, 7, 32)}, r"context must be \(2, seqlen_ctx, 64\), got \(2, 7, 32\)"),
        ({"actions": torch.zeros(2, 3, dtype=torch.long)}, "num_actions is 0"),
        ({"frame_offset": -1}, "frame_offset"),
    ],
)
def test_bad_inputs_are_rejected(model: CausalWanModel, change: dict[str, object], match: str) -> None:
    x, timestep, context = _inputs(frames=3)
    args: dict[str, object] = {"x": x, "timestep": timestep, "context": context} | change
    with pytest.raises(ValueError, match=match):
        model(**args)  # type: ignore[arg-type]


def test_actions_are_added_per_frame() -> None:
    config = dataclasses.replace(TINY, num_actions=5)
    model = CausalWanModel(config).eval()
    assert tuple(model.state_dict()["action_embedder.weight"].shape) == (5, config.dim)
    x, timestep, context = _inputs(frames=3)
    actions = torch.tensor([[0, 1, 4], [2, 2, 3]])
    with torch.no_grad():
        none = model(x, timestep, context)
        acted = model(x, timestep, context, actions=actions)
        assert not torch.allclose(none, acted)
        model.action_embedder.weight.zero_()  # type: ignore[union-attr]
        torch.testing.assert_close(model(x, timestep, context, actions=actions), none, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"actions must be integer \(2, 3\)"):
        model(x, timestep, context, actions=actions.float())


def test_bf16_inference_stays_close_to_fp32(model: CausalWanModel) -> None:
    bf16 = CausalWanModel(TINY).eval()
    bf16.load_state_dict(model.state_dict())
    bf16.to_inference_dtype(torch.bfloat16)
    assert bf16.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert bf16.blocks[0].scale_shift_table.dtype == torch.float32
    assert bf16.condition_embedder.time_proj.weight.dtype == torch.float32
    x, timestep, context = _inputs(frames=3)
    with torch.no_grad():
        expected = model(x, timestep, context)
        actual = bf16(x, timestep, context.bfloat16())
    assert actual.dtype == torch.bfloat16
    _assert_close(actual, expected, rel=5e-2)


def test_block_causal_mask() -> None:
    mask = block_causal_mask(num_frames=5, tokens_per_frame=2, frames_per_chunk=2)
    chunk = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    assert mask.dtype == torch.bool
    assert mask.shape == (10, 10)
    assert torch.equal(mask, chunk[:, None] >= chunk[None, :])
    assert mask[3, :4].all()
    assert not mask[3, 4:].any()
    assert mask[9].all()
    assert block_causal_mask(3, 4, 3).all()
    with pytest.raises(ValueError, match="frames_per_chunk must be a positive int, got 0"):
        block_causal_mask(3, 4, 0)
