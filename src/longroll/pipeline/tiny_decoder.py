"""A tiny streaming video decoder of the TAEHV architecture (Wan 2.1 latents -> RGB), for ``taew2_1``-style weights.

TAEHV is a small convolutional autoencoder for the latent spaces of Hunyuan Video and Wan. Only its decoder is
built here. Its layers (2-D convolutions, ReLU, upsampling) work on each frame on its own; time enters in two
places only:

* a *memory block* concatenates each frame's input with the previous frame's input to the same block (zeros
  before the first frame), runs three 3x3 convolutions on that and adds the frame's input back (ReLU after);
* a *temporal grow* layer (1x1 convolution to ``stride * C`` channels) turns every frame into ``stride``
  consecutive frames, channel group ``j`` becoming frame ``stride * t + j``.

The layers, in the order of :attr:`TinyVideoDecoder.decoder` (whose indices make the checkpoint's key names
``decoder.<i>.…``), are: a soft clamp ``3 tanh(x / 3)``, a 3x3 conv to ``widths[0]`` + ReLU,
then per stage ``s``: ``blocks_per_stage`` memory blocks, nearest 2x spatial upsampling (or none), a temporal grow
(stride 2 or 1), a 3x3 conv to ``widths[s + 1]`` without bias; finally ReLU and a 3x3 conv to RGB. For Wan 2.1
(``taew2_1``): 16 latent channels, widths 256/128/64/64, 8x spatial and 4x temporal upscaling (the first stage
does not grow time), 64 decoder tensors.

The decoder is causal, so the first ``temporal_factor - 1`` output frames (which precede the first real frame
in Wan's ``1 + 4 (F - 1)`` frame layout) are dropped: ``F`` latent frames give ``4 F - 3`` video frames, like
the Wan VAE. Its input is the DiT's *normalised* latents as they are (no ``latents_mean``/``latents_std``
mapping: TAEHV's Wan decoders take them so), its output RGB in [0, 1].

Streaming: :meth:`TinyVideoDecoder.forward` decodes a chunk of latent frames in parallel over its frames and
returns, with the frames, a :class:`TinyDecoderState` holding the last input frame of every memory block. Fed
back with the next chunk, it makes chunk-by-chunk decoding the same computation as decoding the whole latent
video at once (only the batching of the per-frame convolutions differs). :class:`TinyLatentDecoder` keeps that
state between calls and offers the streaming interface of :class:`longroll.pipeline.vae.LatentDecoder`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from longroll.files import read_safetensors, read_torch
from longroll.pipeline.vae import latents_to_uint8, to_channels_last

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TinyDecoderConfig:
    """Shape of a TAEHV decoder (defaults: Wan 2.1, ``taew2_1``).

    Args:
        latent_channels: channels of the input latents (16 for Wan 2.1).
        widths: channels of each stage, then of the output head (``len(space_upscale) + 1`` entries).
        blocks_per_stage: memory blocks at the start of each stage.
        space_upscale: per stage, whether it doubles height and width.
        time_upscale: per stage, whether it doubles the frame count.
        image_channels: output channels (3, RGB).
    """

    latent_channels: int = 16
    widths: tuple[int, ...] = (256, 128, 64, 64)
    blocks_per_stage: int = 3
    space_upscale: tuple[bool, ...] = (True, True, True)
    time_upscale: tuple[bool, ...] = (False, True, True)
    image_channels: int = 3

    def __post_init__(self) -> None:
        for name in ("latent_channels", "blocks_per_stage", "image_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        widths = tuple(self.widths)
        if len(widths) < 2 or any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in widths):
            raise ValueError(f"widths must hold at least 2 positive ints, got {self.widths!r}")
        stages = len(widths) - 1
        for name in ("space_upscale", "time_upscale"):
            flags = tuple(getattr(self, name))
            if len(flags) != stages or any(not isinstance(f, bool) for f in flags):
                raise ValueError(f"{name} must hold {stages} bools (one per stage of widths), got {flags!r}")
            object.__setattr__(self, name, flags)
        object.__setattr__(self, "widths", widths)

    @property
    def spatial_factor(self) -> int:
        """Video pixels per latent pixel along each axis (8 for Wan 2.1)."""
        return int(2 ** sum(self.space_upscale))

    @property
    def temporal_factor(self) -> int:
        """Raw output frames per latent frame (4 for Wan 2.1)."""
        return int(2 ** sum(self.time_upscale))

    @property
    def frames_to_trim(self) -> int:
        """Leading raw output frames dropped from the first chunk of a video."""
        return self.temporal_factor - 1

    def video_frames(self, latent_frames: int) -> int:
        """Video frames decoded from ``latent_frames`` latent frames of a new video."""
        return max(0, self.temporal_factor * latent_frames - self.frames_to_trim)


def _conv3(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class _SoftClamp(nn.Module):
    """``3 tanh(x / 3)``: bounds outlying latents smoothly (no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class _MemoryBlock(nn.Module):
    """Residual 3-conv block on (frame input, previous frame's input); keys ``conv.0``, ``conv.2``, ``conv.4``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv3(2 * channels, channels),
            nn.ReLU(),
            _conv3(channels, channels),
            nn.ReLU(),
            _conv3(channels, channels),
        )

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        """x, past: (N, C, H, W) -> (N, C, H, W)."""
        return F.relu(self.conv(torch.cat([x, past], dim=1)) + x)


class _TimeGrow(nn.Module):
    """1x1 conv ``C -> stride * C``; the caller unfolds the channel groups into ``stride`` frames."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C, H, W) -> (B, stride * T, C, H, W), frame ``stride * t + j`` from channel group ``j``."""
        b, t, c, h, w = x.shape
        y = self.conv(x.reshape(b * t, c, h, w))
        return y.reshape(b, t * self.stride, c, h, w)  # a view unless y is channels-last


@dataclass(frozen=True)
class TinyDecoderState:
    """Temporal context of one batch of videos between chunks.

    Attributes:
        memory: per layer index of the decoder, the last input frame (B, C, H, W) of a memory block (None for
            other layers).
        raw_frames: raw output frames produced so far (decides how many of the next chunk's are trimmed).
    """

    memory: tuple[torch.Tensor | None, ...]
    raw_frames: int


class TinyVideoDecoder(nn.Module):
    """TAEHV decoder: (B, latent_channels, F, h, w) latents -> (B, 3, T, 8h, 8w) RGB in [0, 1] (Wan 2.1 factors).

    Parameter names and shapes are those of the ``decoder.*`` part of a TAEHV checkpoint for ``config``
    (:func:`load_tiny_decoder` reads one). Use :meth:`forward` with the returned state to stream.
    """

    def __init__(self, config: TinyDecoderConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config if config is not None else TinyDecoderConfig()
        w = cfg.widths
        layers: list[nn.Module] = [_SoftClamp(), _conv3(cfg.latent_channels, w[0]), nn.ReLU()]
        for s in range(len(w) - 1):
            layers += [_MemoryBlock(w[s]) for _ in range(cfg.blocks_per_stage)]
            layers.append(nn.Upsample(scale_factor=2) if cfg.space_upscale[s] else nn.Identity())
            layers.append(_TimeGrow(w[s], 2 if cfg.time_upscale[s] else 1))
            layers.append(_conv3(w[s], w[s + 1], bias=False))
        layers += [nn.ReLU(), _conv3(w[-1], cfg.image_channels)]
        self.decoder = nn.Sequential(*layers)

    def _check(self, latents: torch.Tensor, state: TinyDecoderState | None) -> None:
        c = self.config.latent_channels
        if latents.dim() != 5 or latents.shape[1] != c or latents.shape[2] < 1 or min(latents.shape[3:]) < 1:
            raise ValueError(f"latents must be (batch, {c}, frames >= 1, h, w), got {tuple(latents.shape)}")
        if state is None:
            return
        if len(state.memory) != len(self.decoder):
            raise ValueError(f"state has {len(state.memory)} layers, the decoder {len(self.decoder)}")
        b, _, _, h, w = latents.shape
        first = next(m for m in state.memory if m is not None)
        # The first memory block runs at latent resolution: its frame must match this chunk's batch and size.
        if first.shape[0] != b or tuple(first.shape[2:]) != (h, w):
            raise ValueError(
                f"latents {tuple(latents.shape)} do not continue the state's videos "
                f"(batch {first.shape[0]}, latent size {tuple(first.shape[2:])})"
            )

    def forward(
        self, latents: torch.Tensor, state: TinyDecoderState | None = None
    ) -> tuple[torch.Tensor, TinyDecoderState]:
        """Decode the next chunk of latent frames.

        Args:
            latents: (B, latent_channels, F, h, w), F >= 1; cast to the decoder's dtype.
            state: what the previous chunk of the same videos returned; None starts new videos.

        Returns:
            ``(video, state)``: video (B, image_channels, T, h * spatial_factor, w * spatial_factor) in [0, 1]
            in the decoder's dtype, T = ``temporal_factor * F`` minus the trimmed leading frames
            (``4 F - 3`` for the first chunk of a Wan 2.1 video, ``4 F`` after); the state for the next chunk.
        """
        self._check(latents, state)
        param = next(self.parameters())
        x = latents.to(device=param.device, dtype=param.dtype).transpose(1, 2)  # (B, F, C, h, w)
        memory: list[torch.Tensor | None] = [None] * len(self.decoder)
        for i, layer in enumerate(self.decoder):
            b, t, c, h, w = x.shape
            if isinstance(layer, _TimeGrow):
                x = layer(x)
                continue
            flat = x.reshape(b * t, c, h, w)
            if isinstance(layer, _MemoryBlock):
                prev = state.memory[i] if state is not None else None
                prev = torch.zeros_like(x[:, 0]) if prev is None else prev
                past = torch.cat([prev[:, None], x[:, :-1]], dim=1).reshape(b * t, c, h, w)
                memory[i] = x[:, -1].clone()  # a copy: x's storage is released after this layer
                flat = layer(flat, past)
            else:
                flat = layer(flat)
            x = flat.view(b, t, *flat.shape[1:])
        raw = state.raw_frames if state is not None else 0
        skip = max(0, self.config.frames_to_trim - raw)
        video = x[:, skip:].clamp(0, 1).transpose(1, 2)  # clamp keeps NaN as NaN
        return video, TinyDecoderState(tuple(memory), raw + x.shape[1])


def _expected_shapes(config: TinyDecoderConfig) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of a :class:`TinyVideoDecoder` for ``config`` (built on the meta device)."""
    with torch.device("meta"):
        model = TinyVideoDecoder(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    what = "tiny decoder checkpoint"
    raw = read_safetensors(path, what) if path.suffix == ".safetensors" else read_torch(path, what)
    if not isinstance(raw, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in raw.items()):
        raise ValueError(f"tiny decoder checkpoint {str(path)!r} is not a flat dict of named tensors")
    return raw


def check_tiny_decoder_weights(
    weights: dict[str, torch.Tensor], config: TinyDecoderConfig, source: str
) -> dict[str, torch.Tensor]:
    """The decoder part of a TAEHV state dict, checked against ``config``; ``encoder.*`` keys are ignored.

    Raises:
        ValueError: naming ``source`` and the first missing key, unexpected key or mismatched shape (with the
            expected shape), and how many keys are wrong in all.
    """
    expected = _expected_shapes(config)
    found = {k: v for k, v in weights.items() if not k.startswith("encoder.")}
    missing = [k for k in expected if k not in found]
    unexpected = sorted(k for k in found if k not in expected)
    wrong = [k for k in expected if k in found and tuple(found[k].shape) != expected[k]]
    problems: list[str] = []
    if missing:
        k = missing[0]
        problems.append(f"missing key {k!r} (expected shape {expected[k]}; {len(missing)} missing in all)")
    if unexpected:
        problems.append(f"unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all)")
    if wrong:
        k = wrong[0]
        problems.append(
            f"key {k!r} has shape {tuple(found[k].shape)}, expected {expected[k]} ({len(wrong)} mismatched in all)"
        )
    if problems:
        raise ValueError(
            f"{source!r} does not match the tiny decoder (latent_channels={config.latent_channels}, "
            f"widths={config.widths}): {'; '.join(problems)}"
        )
    return {k: found[k] for k in expected}


def load_tiny_decoder(
    path: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    config: TinyDecoderConfig | None = None,
) -> TinyVideoDecoder:
    """Load a TAEHV decoder from a ``.pth`` (``torch.load(weights_only=True)``) or ``.safetensors`` file.

    The file may hold the whole autoencoder (its ``encoder.*`` tensors are not used) or the decoder alone;
    nothing is downloaded.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file cannot be read (:class:`longroll.files.CorruptFileError`, naming it) or does not
            fit ``config`` (see :func:`check_tiny_decoder_weights`).
    """
    cfg = config if config is not None else TinyDecoderConfig()
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"tiny decoder checkpoint {str(file)!r} does not exist")
    state = check_tiny_decoder_weights(_read_weights(file), cfg, str(file))
    with torch.device("meta"):
        model = TinyVideoDecoder(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    log.info("loaded tiny decoder %s", file)
    return model.to(device=device, dtype=dtype).eval()


class TinyLatentDecoder:
    """Streaming wrapper of a :class:`TinyVideoDecoder` with the interface of
    :class:`longroll.pipeline.vae.LatentDecoder` (one video at a time, state kept between chunks).

    Args:
        model: the decoder; it is moved to ``device``/``dtype`` when those are given.
        device, dtype: default: the model's.
        channels_last: store the convolution weights channels-last, so that the activations follow (cuDNN's
            fastest layout in bf16); same values up to the convolution algorithms' rounding.
        compile: run the decoder under ``torch.compile`` (one compilation for a video's first chunk, which has
            no state, and one for the chunks after it).
    """

    def __init__(
        self,
        model: TinyVideoDecoder,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        param = next(model.parameters())
        self.device = torch.device(device) if device is not None else param.device
        self.dtype = dtype if dtype is not None else param.dtype
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.channels_last = channels_last
        if channels_last:
            to_channels_last(self.model)
        self._run: Any = torch.compile(self.model) if compile else self.model
        cfg = model.config
        self.latent_channels: int = cfg.latent_channels
        self.spatial_factor: int = cfg.spatial_factor
        self.temporal_factor: int = cfg.temporal_factor
        self._state: TinyDecoderState | None = None
        self.frames_decoded = 0  # latent frames fed since the last reset

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> TinyLatentDecoder:
        """Wrap :func:`load_tiny_decoder` of ``path`` (Wan 2.1 shape)."""
        return cls(load_tiny_decoder(path, device, dtype))

    def reset(self) -> None:
        """Forget the temporal context: the next chunk starts a new video."""
        self._state = None
        self.frames_decoded = 0

    def video_frames(self, latent_frames: int) -> int:
        """Video frames decoded from ``latent_frames`` latent frames: ``4 n - 3`` for Wan 2.1."""
        return self.model.config.video_frames(latent_frames)

    @torch.no_grad()
    def decode_chunk_float(self, latents: torch.Tensor) -> torch.Tensor:
        """(1, C, F, h, w) or (C, F, h, w) normalised latents -> (1, 3, T, H, W) float32 in [-1, 1] (as the Wan
        VAE's), T = ``4 F - 3`` for the first chunk of a video and ``4 F`` afterwards."""
        if latents.dim() == 4:
            latents = latents[None]
        if latents.dim() != 5 or latents.shape[0] != 1:
            raise ValueError(f"latents must be (1, {self.latent_channels}, frames, h, w), got {tuple(latents.shape)}")
        video, state = self._run(latents, self._state)
        self._state = state
        self.frames_decoded += latents.shape[2]
        return video.float() * 2 - 1

    def decode_chunk(self, latents: torch.Tensor) -> np.ndarray:
        """Like :meth:`decode_chunk_float`, as (T, H, W, 3) uint8 RGB frames."""
        return latents_to_uint8(self.decode_chunk_float(latents))

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Decode a whole latent video (1, C, F, h, w) -> (4 F - 3, H, W, 3) uint8, from a fresh state."""
        self.reset()
        try:
            return self.decode_chunk(latents)
        finally:
            self.reset()


__all__ = [
    "TinyDecoderConfig",
    "TinyDecoderState",
    "TinyLatentDecoder",
    "TinyVideoDecoder",
    "check_tiny_decoder_weights",
    "load_tiny_decoder",
]
