"""The project's tolerance rule: a fast path's error may be at most twice the error of the same maths done in
torch at the same dtype, plus an epsilon-derived absolute term."""

from __future__ import annotations

import torch


def dtype_atol(ref: torch.Tensor, dtype: torch.dtype) -> float:
    r = ref.to(dtype)
    return 2.0 * float(((r + 0.3 - 0.3) - r).abs().max()) + float(torch.finfo(dtype).eps)


def assert_within_rule(name: str, out: torch.Tensor, ref64: torch.Tensor, same_dtype_torch: torch.Tensor) -> None:
    err = float((out.double() - ref64.double()).abs().max())
    base = float((same_dtype_torch.double() - ref64.double()).abs().max())
    atol = dtype_atol(ref64, out.dtype)
    assert err <= 2 * base + atol, f"{name}: err={err:.3e} > 2*{base:.3e} + {atol:.3e}"
