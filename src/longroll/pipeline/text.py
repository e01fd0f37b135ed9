"""Prompt encoding the way Wan does it: a tokenizer + a text encoder loaded from a local folder.

Wan 2.1 encodes prompts with umT5-XXL (``UMT5EncoderModel``) to 512 tokens of 4096 channels. Like Wan's own
code and diffusers' ``WanPipeline._get_t5_prompt_embeds``, the embeddings past each prompt's real length are
set to zero (not the encoder's outputs at pad positions), so that the DiT's cross-attention sees exact zeros
there. Any ``transformers`` encoder whose ``last_hidden_state`` holds per-token embeddings works too (BERT,
MiniLM, ...), as long as its width equals the DiT's ``text_dim``.
"""

from __future__ import annotations

import html
import logging
import os
import re
from typing import Any

import torch

log = logging.getLogger(__name__)

#: Prompt length of Wan 2.1 (its cross-attention was trained on 512 text tokens).
WAN_TEXT_LEN = 512

# T5-family configs name an encoder-decoder under AutoModel; the DiT needs only the encoder stack.
_ENCODER_ONLY_CLASSES = {"umt5": "UMT5EncoderModel", "t5": "T5EncoderModel", "mt5": "MT5EncoderModel"}


def clean_prompt(text: str) -> str:
    """Unescape HTML entities and collapse whitespace (diffusers' ``prompt_clean`` without ftfy)."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


class TextEncoder:
    """Tokenizer + encoder producing Wan-style prompt embeddings.

    Args:
        tokenizer: a ``transformers`` tokenizer (needs a pad token).
        model: an encoder returning ``last_hidden_state`` (batch, tokens, hidden).
        max_length: tokens per prompt after padding/truncation (512 for Wan).
    """

    def __init__(self, tokenizer: Any, model: Any, *, max_length: int = WAN_TEXT_LEN) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if getattr(tokenizer, "pad_token", None) is None:
            raise ValueError("the tokenizer has no pad token; Wan-style padding to max_length needs one")
        # Wan keeps the first len(prompt) rows: padding must come after the tokens.
        tokenizer.padding_side = "right"
        self.tokenizer = tokenizer
        self.model = model.eval()
        self.max_length = max_length

    @classmethod
    def from_pretrained(
        cls,
        text_encoder_dir: str | os.PathLike[str],
        tokenizer_dir: str | os.PathLike[str],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_length: int = WAN_TEXT_LEN,
    ) -> TextEncoder:
        """Load from local folders only (``local_files_only``: never downloads).

        T5-family configs (umt5/t5/mt5) load their encoder-only class; anything else loads through
        ``AutoModel``.
        """
        import transformers

        config = transformers.AutoConfig.from_pretrained(str(text_encoder_dir), local_files_only=True)
        name = _ENCODER_ONLY_CLASSES.get(config.model_type)
        model_cls = getattr(transformers, name) if name else transformers.AutoModel
        model = model_cls.from_pretrained(str(text_encoder_dir), dtype=dtype, local_files_only=True).to(device)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        log.info("text encoder %s (%s) from %s", type(model).__name__, dtype, text_encoder_dir)
        return cls(tokenizer, model, max_length=max_length)

    @property
    def hidden_size(self) -> int:
        """Channels of an embedding (umT5-XXL: 4096)."""
        cfg = self.model.config
        size = getattr(cfg, "d_model", None) or getattr(cfg, "hidden_size", None)
        if size is None:
            raise ValueError(f"cannot tell the width of {type(self.model).__name__} from its config")
        return int(size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Encode prompts.

        Args:
            prompts: B non-empty strings.

        Returns:
            (B, max_length, hidden_size) in the encoder's dtype and device; rows past each prompt's token count
            (its end-of-sequence token included) are zero.
        """
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a non-empty list of strings")
        tokens = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids, mask = tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
        if ids.shape[1] != self.max_length:
            raise RuntimeError(f"the tokenizer returned {ids.shape[1]} tokens, expected {self.max_length}")
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        # Zero the pad positions, as Wan does (it slices each prompt to its length and pads with zeros);
        # masked_fill rather than a product so that non-finite outputs at pad positions become exact zeros too.
        return hidden.masked_fill(~mask.bool()[:, :, None], 0)
