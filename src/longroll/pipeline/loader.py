"""Load a text-to-video pipeline (causal DiT + text encoder + VAE) from a local diffusers-format folder.

Expected layout (e.g. a local copy of ``Wan2.1-T2V-1.3B-Diffusers``)::

    folder/
      transformer/config.json          # WanTransformer3DModel config
      transformer/*.safetensors        # one file, or shards (+ *.safetensors.index.json)
      text_encoder/                    # transformers encoder (UMT5EncoderModel for Wan)
      tokenizer/                       # its tokenizer
      vae/                             # AutoencoderKLWan

An autoregressive fine-tune (Self-Forcing, CausVid, Rolling-Forcing, LongLive) ships only the generator's
weights, in the original Wan key format; pass it as ``checkpoint`` and it replaces the transformer weights
(which are then not read at all, and may be absent from the folder).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from longroll.files import CorruptFileError
from longroll.models.wan import CausalWanModel, WanConfig, load_checkpoint, load_into
from longroll.pipeline.decoder import StreamingDecoder, check_decoder_name
from longroll.pipeline.text import WAN_TEXT_LEN, TextEncoder
from longroll.pipeline.tiny_decoder import TinyLatentDecoder
from longroll.pipeline.vae import LatentDecoder

log = logging.getLogger(__name__)
T = TypeVar("T")

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def default_device() -> torch.device:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """A dtype from a name (``bf16``, ``fp16``, ``fp32``); None gives bf16 on CUDA and float32 elsewhere."""
    if isinstance(name, torch.dtype):
        return name
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


@dataclass(frozen=True)
class LoadedPipeline:
    """Everything :func:`longroll.pipeline.generate.generate` needs.

    Attributes:
        model: the causal DiT, in ``dtype`` on ``device`` (time path and norms in float32).
        text_encoder: prompt -> (batch, text_len, wan_config.text_dim) embeddings.
        decoder: streaming latent decoder (float32 by default): the folder's Wan VAE, or the tiny decoder.
        wan_config: the DiT's shape.
        device, dtype: where and in which dtype the DiT runs.
        folder: the model folder; checkpoint: the causal checkpoint file, if any.
        tiny_decoder: the tiny decoder's weights file when ``decoder`` is the tiny decoder.
    """

    model: CausalWanModel
    text_encoder: TextEncoder
    decoder: StreamingDecoder
    wan_config: WanConfig
    device: torch.device
    dtype: torch.dtype
    folder: Path
    checkpoint: Path | None = None
    tiny_decoder: Path | None = None


def _check_layout(folder: Path, need_weights: bool, need_vae: bool = True) -> None:
    """Raise one FileNotFoundError naming every missing part of the diffusers layout."""
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {str(folder)!r} does not exist or is not a directory")
    needed = [folder / "transformer" / "config.json", folder / "text_encoder", folder / "tokenizer"]
    needed += [folder / "vae"] if need_vae else []
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise FileNotFoundError(f"model folder {str(folder)!r} lacks {', '.join(missing)} (diffusers layout expected)")
    if need_weights and not any((folder / "transformer").glob("*.safetensors")):
        raise FileNotFoundError(
            f"no .safetensors weights in {str(folder / 'transformer')!r}; pass a causal checkpoint or add the weights"
        )


def _check_shards(transformer_dir: Path) -> None:
    """Every shard named by a ``*.safetensors.index.json`` must exist (load_checkpoint reads what is there)."""
    for index in transformer_dir.glob("*.safetensors.index.json"):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError) as e:
            raise ValueError(f"cannot read the shard index {str(index)!r}: {e}") from e
        missing = sorted(s for s in shards if not (transformer_dir / s).is_file())
        if missing:
            raise FileNotFoundError(f"shard(s) {missing} listed in {str(index)!r} are missing")


def read_wan_config(transformer_dir: str | os.PathLike[str]) -> WanConfig:
    """The :class:`WanConfig` of a diffusers ``transformer/`` folder (its ``config.json``)."""
    path = Path(transformer_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"transformer config {str(path)!r} does not exist") from None
    except ValueError as e:
        raise ValueError(f"transformer config {str(path)!r} is not valid JSON: {e}") from e
    name = raw.get("_class_name", "WanTransformer3DModel")
    if name != "WanTransformer3DModel":
        raise ValueError(f"{str(path)!r} describes a {name}, expected WanTransformer3DModel")
    return WanConfig.from_diffusers_config(raw)


def load_transformer(
    config: WanConfig,
    weights: str | os.PathLike[str],
    *,
    device: torch.device,
    dtype: torch.dtype,
    use_ema: bool = True,
) -> CausalWanModel:
    """Build a :class:`CausalWanModel` and load ``weights`` (a file or a folder of safetensors shards).

    The model is created on the meta device and materialised uninitialised on ``device``: random init of a
    1.3B model would cost seconds and be overwritten anyway. Safe because :func:`load_into` refuses any
    checkpoint that does not cover every parameter.
    """
    state = load_checkpoint(weights, use_ema=use_ema)
    with torch.device("meta"):
        model = CausalWanModel(config)
    model = model.to_empty(device=device).to_inference_dtype(dtype)
    try:
        load_into(model, state)
    except ValueError as e:
        raise ValueError(f"{str(weights)!r}: {e}") from None
    return model.eval()


def _read_component(folder: Path, what: str, load: Callable[[], T]) -> T:
    """Run a Hugging Face loader; a damaged file in ``folder`` ends in one :class:`CorruptFileError` naming it
    (the loaders raise OSError, safetensors' own errors or RuntimeError, without the file)."""
    try:
        return load()
    except (ValueError, FileNotFoundError, ImportError, MemoryError):
        raise
    except Exception as e:
        if isinstance(e, RuntimeError) and "out of memory" in str(e):
            raise
        raise CorruptFileError(folder, f"{what} weights in", e) from e


def load_pipeline(
    folder: str | os.PathLike[str],
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    use_ema: bool = True,
    text_len: int = WAN_TEXT_LEN,
    vae_dtype: torch.dtype = torch.float32,
    decoder: str = "wan",
    tiny_decoder: str | os.PathLike[str] | None = None,
) -> LoadedPipeline:
    """Load the causal DiT, text encoder, tokenizer and VAE of a local diffusers-format folder.

    Args:
        folder: see the module docstring for the layout.
        checkpoint: optional causal generator checkpoint (``.pt``/``.safetensors``, original or diffusers key
            format, Self-Forcing style nesting); it replaces the folder's transformer weights.
        device: default ``cuda`` if available, else ``cpu``.
        dtype: DiT and text-encoder dtype; default bf16 on CUDA, float32 on CPU.
        use_ema: prefer the checkpoint's EMA generator when it holds one.
        text_len: prompt tokens (512 for Wan).
        vae_dtype: VAE dtype (float32: the decoder is cheap next to the DiT and bf16 costs visible quality); also
            the tiny decoder's.
        decoder: ``"wan"`` (the folder's ``vae/``) or ``"tiny"`` (the TAEHV-architecture tiny decoder of
            :mod:`longroll.pipeline.tiny_decoder`, read from ``tiny_decoder``; ``vae/`` is then not needed).
        tiny_decoder: a taew2_1-style ``.pth``/``.safetensors`` file, with ``decoder="tiny"`` only.

    Raises:
        FileNotFoundError: a missing folder, sub-folder, config, weights or checkpoint (one line naming it).
        ValueError: a config or checkpoint that does not fit (naming the keys), or mismatched components.
    """
    root = Path(folder)
    dev = torch.device(device) if device is not None else default_device()
    dt = resolve_dtype(dtype, dev)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and not ckpt.exists():
        raise FileNotFoundError(f"checkpoint {str(ckpt)!r} does not exist")
    which = check_decoder_name(decoder)
    tiny = Path(tiny_decoder) if tiny_decoder is not None else None
    if (which == "tiny") != (tiny is not None):
        raise ValueError(
            f"tiny_decoder (a file) is needed with decoder='tiny' only, got decoder={decoder!r}, "
            f"tiny_decoder={tiny_decoder!r}"
        )
    if tiny is not None and not tiny.is_file():
        raise FileNotFoundError(f"tiny decoder checkpoint {str(tiny)!r} does not exist")
    _check_layout(root, need_weights=ckpt is None, need_vae=tiny is None)
    config = read_wan_config(root / "transformer")
    # The tiny decoder is small and checked against its architecture: a mismatched file fails before the DiT loads.
    tiny_dec = TinyLatentDecoder.from_file(tiny, device=dev, dtype=vae_dtype) if tiny is not None else None
    if ckpt is None:
        _check_shards(root / "transformer")
    weights = ckpt if ckpt is not None else root / "transformer"
    model = load_transformer(config, weights, device=dev, dtype=dt, use_ema=use_ema)
    text = _read_component(
        root / "text_encoder",
        "text encoder",
        lambda: TextEncoder.from_pretrained(
            root / "text_encoder", root / "tokenizer", device=dev, dtype=dt, max_length=text_len
        ),
    )
    if text.hidden_size != config.text_dim:
        raise ValueError(f"text encoder width {text.hidden_size} != transformer text_dim {config.text_dim}")
    dec: StreamingDecoder
    if tiny_dec is None:
        dec = _read_component(
            root / "vae", "VAE", lambda: LatentDecoder.from_pretrained(root / "vae", device=dev, dtype=vae_dtype)
        )
    else:
        dec = tiny_dec
    if dec.latent_channels != config.out_channels:
        raise ValueError(
            f"{which} decoder latent channels {dec.latent_channels} != transformer out_channels {config.out_channels}"
        )
    log.info("loaded %s (%d layers, dim %d) on %s in %s", root, config.num_layers, config.dim, dev, dt)
    return LoadedPipeline(model, text, dec, config, dev, dt, root, ckpt, tiny)
