"""flash-attn-4's CuTe DSL kernels as an optional dense route, the per-key bias folded into the head dim.

flash-attn-4 (``pip install flash-attn-4``, import ``flash_attn.cute``) is an FA3/FA4-class kernel for Hopper
and Blackwell. It takes no per-key bias, so the bias goes in as in ``sdpa_augmented``
(:func:`longroll.ops.attention.augment_qk`): q gets two columns of ``1/scale``, k the bias split into a high
and a low half, and the qk width is rounded up to :data:`AUG_MULTIPLE` (on SM90 it accepts any multiple of 8
up to 256, where cuDNN runs only 192 at speed). Unlike the SDPA routes it returns the log-sum-exp.

It is an optional dependency: nothing imports it unless this route is asked for, CPU machines never need it,
and :func:`fa4_available` says whether it can run here. The Triton kernel stays the portable path.
"""

from __future__ import annotations

import functools
import importlib
import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

#: qk width multiple of the augmented route (head_dim + 2 rounded up): 16 keeps the tensor-core k-step whole.
AUG_MULTIPLE = 16

#: Compute capabilities (major) flash-attn-4's forward supports.
FA4_ARCHES = (9, 10)


@functools.lru_cache(maxsize=1)
def _module() -> Any | None:
    try:
        return importlib.import_module("flash_attn.cute")
    except Exception as err:  # ImportError, or a broken CUDA / CuTe DSL install
        log.debug("flash-attn-4 is not usable: %r", err)
        return None


def fa4_available(device: torch.device | str | None = None) -> bool:
    """Whether flash-attn-4 imports and ``device`` (default: the current CUDA device) is a GPU it supports."""
    if not torch.cuda.is_available():
        return False
    dev = torch.device("cuda") if device is None else torch.device(device)
    if dev.type != "cuda":
        return False
    return torch.cuda.get_device_capability(dev)[0] in FA4_ARCHES and _module() is not None


def fa4_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, return_lse: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dense attention through flash-attn-4, no bias (the ``fa4`` route of
    :func:`longroll.ops.attention.attention` folds one into q and k first).

    The shared inputs are validated by :func:`~longroll.ops.attention.attention` (the only caller); this checks
    what is particular to the library.

    Args:
        q: (B, H, Lq, D) fp16/bf16 on a supported GPU; k: (B, Hk, Lk, D); v: (B, Hk, Lk, Dv); Hk divides H.
        scale: logit scale.
        return_lse: also return the log-sum-exp.

    Returns:
        out (B, H, Lq, Dv) in q.dtype and, when asked, the float32 log-sum-exp (B, H, Lq) of the scaled logits.
    """
    mod = _module()
    if mod is None or not q.is_cuda:
        raise ValueError("backend='fa4' needs flash-attn-4 (pip install flash-attn-4) and a CUDA device")
    cap = torch.cuda.get_device_capability(q.device)
    if cap[0] not in FA4_ARCHES:
        raise ValueError(f"backend='fa4' runs on compute capability 9.x/10.x, this device is {cap}")
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"backend='fa4' takes float16 or bfloat16, got q of dtype {q.dtype}")
    d, dv = q.shape[-1], v.shape[-1]
    if d % 8 or dv % 8 or d > 256 or dv > 256:
        raise ValueError(
            f"backend='fa4' needs qk and v head dims that are multiples of 8 and at most 256, got {d} and {dv}"
        )
    # flash-attn-4 lays tensors out (B, L, H, D); the transposes are views.
    out, lse = mod.flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, return_lse=return_lse
    )
    return out.transpose(1, 2), (lse if return_lse else None)
