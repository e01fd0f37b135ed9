"""Preprocessing-free approximate nearest-neighbour search: sign LSH and int8 scalar quantisation."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from longroll.ann.config import AnnConfig, Int8Config, LSHConfig
from longroll.ann.int8 import Int8Searcher, int8_scores, quantize_int8
from longroll.ann.lsh import SignLSH, StackedSignLSH

Searcher = SignLSH | StackedSignLSH | Int8Searcher


def make_searcher(
    config: AnnConfig, head_dim: int, *, layer: int, head_ids: Sequence[int], device: torch.device | str = "cpu"
) -> Searcher:
    """Build the searcher of a config for one layer and a set of (global) head ids."""
    if isinstance(config, LSHConfig):
        return SignLSH(config, head_dim, layer=layer, head_ids=head_ids, device=device)
    if isinstance(config, Int8Config):
        return Int8Searcher(config)
    raise TypeError(f"config must be an LSHConfig or Int8Config, got {type(config).__name__}")


__all__ = [
    "AnnConfig",
    "Int8Config",
    "Int8Searcher",
    "LSHConfig",
    "Searcher",
    "SignLSH",
    "StackedSignLSH",
    "int8_scores",
    "make_searcher",
    "quantize_int8",
]
