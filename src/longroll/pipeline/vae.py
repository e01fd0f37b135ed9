"""Streaming decode of Wan latents to RGB frames with diffusers' ``AutoencoderKLWan``.

The Wan VAE decoder is temporally causal: every ``WanCausalConv3d`` looks at the last two frames of its input,
and diffusers' own ``AutoencoderKLWan._decode`` already decodes one latent frame at a time, carrying those
frames in a per-conv *feature cache* (``feat_cache``) from one latent frame to the next. The first latent frame
is special (``first_chunk=True``; the temporal upsamplers emit 1 frame for it and 4 for every later one).

:class:`LatentDecoder` keeps that feature cache alive **across** :meth:`LatentDecoder.decode_chunk` calls, and
runs the exact loop of ``_decode`` on each chunk. Decoding a video chunk by chunk is therefore the same
computation as decoding it whole, in the same order: the result is bit-identical on CPU in float32
(tests/test_pipeline.py checks it against ``vae.decode`` on the whole latent video). The alternative,
decoding each chunk on its own, would restart the causal convolutions at every chunk boundary (visible seams
and a 1-frame first chunk each time); re-decoding overlapping context would cost extra decoder passes. Memory
stays flat: the cache holds two frames per causal conv whatever the video length.

Not supported on the streaming path: diffusers' spatial tiling (``enable_tiling``); decode large frames on a
GPU with enough memory, or decode the finished latents with ``vae.decode`` yourself.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def video_to_uint8(video: torch.Tensor) -> torch.Tensor:
    """(1, 3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8 on video's device, rounded as diffusers'
    ``VideoProcessor`` does (a view in frame-major order; ``.contiguous()`` or a copy makes it dense)."""
    x = (video[0].float() / 2 + 0.5).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(1, 2, 3, 0)


def latents_to_uint8(video: torch.Tensor) -> np.ndarray:
    """(1, 3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8 host array (:func:`video_to_uint8`, copied to the host)."""
    return video_to_uint8(video).cpu().numpy()


def to_channels_last(module: torch.nn.Module) -> None:
    """Put every 4-D parameter/buffer of ``module`` in channels-last and every 5-D one in channels-last-3d (the
    layouts cuDNN's fastest bf16 convolutions read); values are unchanged. ``Module.to(memory_format=...)``
    takes one format for all, which fails on a mix of 2-D and 3-D convolutions."""
    for t in (*module.parameters(), *module.buffers()):
        if t.dim() == 4:
            t.data = t.data.contiguous(memory_format=torch.channels_last)
        elif t.dim() == 5:
            t.data = t.data.contiguous(memory_format=torch.channels_last_3d)


class LatentDecoder:
    """Wan VAE decoder with a temporal cache kept across chunks.

    Args:
        vae: a ``diffusers.AutoencoderKLWan`` (only its decoder half is used).
        device: where to decode (default: the VAE's device); the VAE is moved there.
        dtype: decoder dtype (default: the VAE's). float32 is the safe choice; bf16 is the fast one.
        channels_last: store the convolution weights and feed the latents channels-last(-3d), the layout of
            cuDNN's fastest bf16 convolutions; the values computed are the same up to the convolution
            algorithms' rounding.
        compile: run the decoder's per-frame step under ``torch.compile`` (compiled on the first frame of a video
            and once more for the next; the feature cache is a list the compiled code updates in place), with
            ``compile_backend`` (``aot_eager`` traces without building kernels, for CPU checks).

    Latents given to :meth:`decode_chunk` are the *normalised* latents the DiT produces; they are mapped back
    with the VAE config's ``latents_mean``/``latents_std`` (``z * std + mean``) as diffusers' ``WanPipeline``
    does before ``vae.decode``.
    """

    def __init__(
        self,
        vae: Any,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        channels_last: bool = False,
        compile: bool = False,
        compile_backend: str = "inductor",
    ) -> None:
        cfg = vae.config
        for name in ("z_dim", "latents_mean", "latents_std"):
            if getattr(cfg, name, None) is None:
                raise ValueError(f"the VAE config has no {name!r}; is it an AutoencoderKLWan?")
        if len(cfg.latents_mean) != cfg.z_dim or len(cfg.latents_std) != cfg.z_dim:
            raise ValueError(f"latents_mean/latents_std must have z_dim={cfg.z_dim} entries")
        param = next(vae.parameters())
        self.device = torch.device(device) if device is not None else param.device
        self.dtype = dtype if dtype is not None else param.dtype
        # Cast only when needed: diffusers warns about any .to(dtype) on this model, even a no-op one.
        vae = vae.to(self.device) if self.dtype == param.dtype else vae.to(device=self.device, dtype=self.dtype)
        self.vae = vae.eval()
        self.channels_last = channels_last
        if channels_last:
            to_channels_last(self.vae)
        self._step: Any = torch.compile(self.vae.decoder, backend=compile_backend) if compile else self.vae.decoder
        self.latent_channels: int = int(cfg.z_dim)
        self.spatial_factor: int = int(getattr(vae, "spatial_compression_ratio", None) or 8)
        self.temporal_factor: int = int(getattr(cfg, "scale_factor_temporal", None) or 4)
        shape = (1, self.latent_channels, 1, 1, 1)
        self._mean = torch.tensor(cfg.latents_mean, dtype=torch.float32, device=self.device).view(shape)
        self._std = torch.tensor(cfg.latents_std, dtype=torch.float32, device=self.device).view(shape)
        self._num_convs = sum(type(m).__name__ == "WanCausalConv3d" for m in vae.decoder.modules())
        self._feat_cache: list[Any] = []
        self.frames_decoded = 0  # latent frames fed since the last reset
        self.reset()

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike[str],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        compile: bool = False,
    ) -> LatentDecoder:
        """Load ``AutoencoderKLWan`` from a local diffusers ``vae/`` folder (never downloads)."""
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
        return cls(vae, device=device, dtype=dtype, channels_last=channels_last, compile=compile)

    def reset(self) -> None:
        """Forget the temporal context: the next chunk starts a new video."""
        self._feat_cache = [None] * self._num_convs
        self.frames_decoded = 0

    def video_frames(self, latent_frames: int) -> int:
        """Video frames decoded from ``latent_frames`` latent frames: ``1 + temporal_factor * (n - 1)``."""
        return 0 if latent_frames < 1 else 1 + self.temporal_factor * (latent_frames - 1)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """(1, C, F, h, w) normalised DiT latents -> VAE latents ``z * std + mean`` in the decoder's dtype."""
        z = latents.to(device=self.device, dtype=torch.float32) * self._std + self._mean
        return z.to(self.dtype)

    def _check(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.dim() == 4:
            latents = latents[None]
        if latents.dim() != 5 or latents.shape[1] != self.latent_channels or latents.shape[2] < 1:
            raise ValueError(f"latents must be (1, {self.latent_channels}, frames, h, w), got {tuple(latents.shape)}")
        if latents.shape[0] != 1:
            # The feature cache belongs to one video; batch videos by running one decoder per video.
            raise ValueError(f"the streaming decoder takes one video at a time, got batch {latents.shape[0]}")
        return latents

    @torch.no_grad()
    def decode_chunk_float(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode the next latent frames of the current video.

        Args:
            latents: (1, C, F, h, w) or (C, F, h, w) normalised latents following those already decoded.

        Returns:
            (1, 3, T, h * spatial_factor, w * spatial_factor) in [-1, 1], float32, where T is 1 + 4 (F - 1) for
            the first chunk of a video and 4 F afterwards.
        """
        z = self.denormalize(self._check(latents))
        if self.channels_last:
            z = z.contiguous(memory_format=torch.channels_last_3d)
        x = self.vae.post_quant_conv(z)  # 1x1x1 conv: no time context
        outs = []
        for i in range(x.shape[2]):
            # The loop body of AutoencoderKLWan._decode, with the cache kept by this object between calls.
            outs.append(
                self._step(
                    x[:, :, i : i + 1],
                    feat_cache=self._feat_cache,
                    feat_idx=[0],
                    first_chunk=self.frames_decoded == 0,
                )
            )
            self.frames_decoded += 1
        out = torch.cat(outs, dim=2)
        if getattr(self.vae.config, "patch_size", None) is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=self.vae.config.patch_size)
        return out.float().clamp(-1.0, 1.0)

    def decode_chunk(self, latents: torch.Tensor) -> np.ndarray:
        """Like :meth:`decode_chunk_float`, as (T, H, W, 3) uint8 RGB frames."""
        return latents_to_uint8(self.decode_chunk_float(latents))

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Decode a whole latent video (1, C, F, h, w) -> (1 + 4 (F - 1), H, W, 3) uint8, from a fresh cache."""
        self.reset()
        try:
            return self.decode_chunk(latents)
        finally:
            self.reset()
