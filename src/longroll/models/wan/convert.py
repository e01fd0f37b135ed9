"""Load Wan 2.1 checkpoints (original or diffusers key format) into :class:`CausalWanModel`.

The original format is the one of Wan-AI's repository and of the autoregressive fine-tunes built on it
(Self-Forcing, CausVid, Rolling-Forcing, LongLive); the model uses diffusers' names. Training wrappers add
prefixes (``model.``, ``generator.model.``, ``_orig_mod.``, ``module.``, FSDP segments) and Self-Forcing style
``.pt`` files hold several networks, e.g. ``{"generator": sd, "generator_ema": sd, ...}``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from longroll.files import read_safetensors, read_torch

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

# (original, diffusers) name pairs. A name ending in "." renames a prefix; any other name is a whole key.
_TOP_LEVEL_NAMES: tuple[tuple[str, str], ...] = (
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("head.head.", "proj_out."),
    ("head.modulation", "scale_shift_table"),
)
_ATTENTION_NAMES = (("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("o.", "to_out.0."))
_BLOCK_NAMES: tuple[tuple[str, str], ...] = (
    *(
        (f"{orig_attn}.{orig}", f"{attn}.{new}")
        for orig_attn, attn in (("self_attn", "attn1"), ("cross_attn", "attn2"))
        for orig, new in (*_ATTENTION_NAMES, ("norm_q.", "norm_q."), ("norm_k.", "norm_k."))
    ),
    # The original norm3 is the (affine) cross-attention norm, diffusers' norm2; the original norm2 and
    # diffusers' norm3 (the FFN norm) have no parameters, so no key needs the reverse swap.
    ("norm3.", "norm2."),
    ("ffn.0.", "ffn.net.0.proj."),
    ("ffn.2.", "ffn.net.2."),
    ("modulation", "scale_shift_table"),
)
_BLOCK_KEY = re.compile(r"(blocks\.\d+\.)(.*)")

# Leading prefixes stripped repeatedly, and wrapper segments removed wherever they appear.
_WRAPPER_PREFIXES = ("generator_ema.", "generator.", "module.", "model.diffusion_model.", "model.")
_WRAPPER_SEGMENTS = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
# Sub-networks of a training checkpoint, most preferred first.
_EMA_NAMES = ("generator_ema", "ema")
_PLAIN_NAMES = ("generator", "model", "state_dict", "module")
_SAFETENSORS = ".safetensors"


def _rename(key: str, pairs: tuple[tuple[str, str], ...], reverse: bool) -> str | None:
    """The renamed key, or None when no pair applies."""
    for orig, new in pairs:
        src, dst = (new, orig) if reverse else (orig, new)
        if src.endswith(".") and key.startswith(src):
            return dst + key[len(src) :]
        if key == src:
            return dst
    return None


def _convert_key(key: str, reverse: bool) -> str:
    block = _BLOCK_KEY.fullmatch(key)
    if block is not None:
        renamed = _rename(block.group(2), _BLOCK_NAMES, reverse)
        return key if renamed is None else block.group(1) + renamed
    renamed = _rename(key, _TOP_LEVEL_NAMES, reverse)
    # Unknown keys (patch_embedding.*, action_embedder.*, anything unsupported) pass through unchanged, so
    # that load_into reports the unsupported ones instead of this function hiding them.
    return key if renamed is None else renamed


def _convert(state_dict: Mapping[str, torch.Tensor], reverse: bool) -> StateDict:
    out: StateDict = {}
    for key, value in state_dict.items():
        new_key = _convert_key(key, reverse)
        if new_key in out:
            raise ValueError(f"two checkpoint keys map to {new_key!r}; the second is {key!r}")
        out[new_key] = value
    return out


def convert_original_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Rename original Wan keys to diffusers' names.

    E.g. ``blocks.0.self_attn.q.weight`` -> ``blocks.0.attn1.to_q.weight``. Tensors are shared, not copied.
    Keys already in diffusers' format are left as they are.
    """
    return _convert(state_dict, reverse=False)


def convert_diffusers_to_original(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Inverse of :func:`convert_original_to_diffusers`."""
    return _convert(state_dict, reverse=True)


def is_original_format(state_dict: Mapping[str, Any]) -> bool:
    """Whether any key uses original Wan naming (after wrapper prefixes are stripped)."""
    return any(_convert_key(key, reverse=False) != key for key in state_dict)


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Remove training-wrapper prefixes (``generator.model.``, ``module.``, ``_orig_mod.``, FSDP segments).

    Raises ValueError when two keys collide once stripped (e.g. ``generator.*`` next to ``generator_ema.*``;
    :func:`load_checkpoint` picks one network before stripping).
    """
    out: StateDict = {}
    for key, value in state_dict.items():
        new_key = key
        for segment in _WRAPPER_SEGMENTS:
            new_key = new_key.replace(segment, "")
        stripped = True
        while stripped:
            stripped = False
            for prefix in _WRAPPER_PREFIXES:
                if new_key.startswith(prefix):
                    new_key, stripped = new_key[len(prefix) :], True
        if new_key in out:
            raise ValueError(f"key {key!r} and another key both become {new_key!r} without wrapper prefixes")
        out[new_key] = value
    return out


def _select_network(obj: Any, use_ema: bool, where: str = "checkpoint") -> StateDict:
    """The state dict of the generator inside a (possibly nested) training checkpoint."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where} must be a mapping of tensors, got {type(obj).__name__}")
    names = (*_EMA_NAMES, *_PLAIN_NAMES) if use_ema else (*_PLAIN_NAMES, *_EMA_NAMES)
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _select_flat(dict(obj), names, use_ema)
    for name in names:
        if name in obj:
            _log_choice(where, name, use_ema)
            return _select_network(obj[name], use_ema, f"{where}[{name!r}]")
    keys = sorted(map(str, obj))[:20]
    raise ValueError(f"{where} holds no state dict under any of {names}; its keys are {keys}")


def _select_flat(state_dict: StateDict, names: tuple[str, ...], use_ema: bool) -> StateDict:
    """From a flat dict that names its network (``generator_ema.model.*``, maybe next to
    ``generator.model.*``), keep the preferred network; any other flat dict is returned as it is."""
    heads = {key.split(".", 1)[0] for key in state_dict}
    for name in names:
        if name in heads and name in (*_EMA_NAMES, "generator"):
            _log_choice("checkpoint", name, use_ema)
            prefix = name + "."
            return {key[len(prefix) :]: v for key, v in state_dict.items() if key.startswith(prefix)}
    return state_dict


def _log_choice(where: str, name: str, use_ema: bool) -> None:
    if use_ema and name == "generator":
        logger.warning("%s has no EMA weights; using %r", where, name)
    else:
        logger.info("using %s[%r]", where, name)


def _read_file(path: Path) -> Any:
    if path.suffix == _SAFETENSORS:
        return read_safetensors(path, "checkpoint")
    return read_torch(path, "checkpoint")


def load_checkpoint(path: str | os.PathLike[str], *, use_ema: bool = True) -> StateDict:
    """Read a Wan checkpoint and return its generator's state dict in diffusers' key names.

    Args:
        path: a ``.safetensors`` file, a ``torch.save`` file (``.pt``/``.pth``/``.bin``, loaded with
            ``weights_only=True`` on CPU), or a directory of ``.safetensors`` shards (diffusers'
            ``transformer/`` folder).
        use_ema: prefer the EMA network when the checkpoint holds both (``generator_ema`` over ``generator``).

    Returns:
        Tensors on CPU in their stored dtype, keyed like :class:`CausalWanModel`'s ``state_dict``. Pass it to
        :func:`load_into`.
    """
    path = Path(path)
    if path.is_dir():
        shards = sorted(path.glob(f"*{_SAFETENSORS}"))
        if not shards:
            raise ValueError(f"path {str(path)!r} is a directory without {_SAFETENSORS} files")
        raw: Any = {}
        for shard in shards:
            raw.update(_read_file(shard))
    elif path.is_file():
        raw = _read_file(path)
    else:
        raise ValueError(f"path {str(path)!r} does not exist")
    state_dict = strip_wrapper_prefixes(_select_network(raw, use_ema))
    if is_original_format(state_dict):
        logger.info("converting %d tensors of %s from the original Wan key format", len(state_dict), path)
        state_dict = convert_original_to_diffusers(state_dict)
    return state_dict


def _shown(items: list[str], limit: int = 10) -> str:
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def load_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy a diffusers-named state dict into ``model``, casting to the model's dtypes.

    Raises:
        ValueError: one error listing every missing, unexpected and mis-shaped key (the first 10 of each with
            counts) when the checkpoint does not match exactly. The model is left untouched in that case.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} (checkpoint {tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}, "
        f"model {tuple(expected[k].shape)})"
        for k, v in state_dict.items()
        if k in expected and (not isinstance(v, torch.Tensor) or v.shape != expected[k].shape)
    ]
    problems = [
        f"{len(items)} {what} key(s): {_shown(items)}"
        for what, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched))
        if items
    ]
    if problems:
        raise ValueError(f"checkpoint does not match {type(model).__name__}; " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)
