"""FP8 linear layers: float8 e4m3 weights and activations multiplied by ``torch._scaled_mm``.

Weights are quantized once (per output row, or one scale for the whole matrix); activations are quantized on
every call with scales computed on the device (per token row, or per tensor), so there is no host sync.
``torch._scaled_mm`` accumulates in float32 and applies both scales in its epilogue; its output is bf16 (the
only output dtype row-wise scaling allows on CUDA) and cast to the input's dtype.

:func:`fp8_linear_reference` is the torch twin: the same quantized operands dequantized and multiplied in
float64. Against the unquantized linear, e4m3's 3 mantissa bits give each operand up to 2^-4 relative
rounding; what that does to a model's output has to be measured on the model (``scripts/eval_memory.py
--fp8``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

#: Weight/activation scaling: ``row`` (per output row of the weight, per token of the input) or ``tensor``.
Fp8Granularity = Literal["row", "tensor"]
FP8_GRANULARITIES: tuple[Fp8Granularity, ...] = ("row", "tensor")
E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
#: Floor of amax, so that an all-zero row gets a finite scale (its values quantize to 0) instead of 0/0.
_AMAX_FLOOR = 1e-12
_SUPPORT: dict[tuple[str, int | None], str | None] = {}


def fp8_unsupported_reason(device: torch.device | str) -> str | None:
    """None when ``torch._scaled_mm`` runs on ``device``, else why not (checked once per device by a 16x16
    product; CUDA needs compute capability 8.9 or newer)."""
    dev = torch.device(device)
    key = (dev.type, dev.index)
    if key in _SUPPORT:
        return _SUPPORT[key]
    reason: str | None = None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            reason = "CUDA is not available"
        else:
            cap = torch.cuda.get_device_capability(dev)
            if cap < (8, 9):
                reason = f"compute capability {cap[0]}.{cap[1]} < 8.9 (FP8 tensor cores need Ada or Hopper)"
    if reason is None:
        try:
            a = torch.ones(16, 16, device=dev).to(E4M3)
            one = torch.ones((), device=dev)
            torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        except (RuntimeError, NotImplementedError, TypeError) as e:
            reason = f"torch._scaled_mm failed: {' '.join(str(e).split()[:20])}"
    _SUPPORT[key] = reason
    return reason


def check_fp8_shape(in_features: int, out_features: int, *, name: str = "linear") -> None:
    """ValueError unless both widths are multiples of 16 (``torch._scaled_mm``'s requirement)."""
    if in_features % 16 or out_features % 16:
        raise ValueError(
            f"{name}: FP8 needs in/out features that are multiples of 16, got {in_features}->{out_features}"
        )


def check_fp8_granularity(granularity: str) -> Fp8Granularity:
    for known in FP8_GRANULARITIES:
        if granularity == known:
            return known
    raise ValueError(f"granularity must be one of {list(FP8_GRANULARITIES)}, got {granularity!r}")


def quantize_fp8(x: torch.Tensor, granularity: Fp8Granularity) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale ``x`` (rows, cols) into e4m3's range and round.

    Returns:
        x_q: (rows, cols) float8_e4m3fn; scale: (rows, 1) float32 for ``row``, () for ``tensor``, so that
        ``x ~ x_q * scale``. NaN stays NaN (its row's scale is NaN); infinities make their row NaN.
    """
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True) if granularity == "row" else xf.abs().amax()
    scale = amax.clamp_min(_AMAX_FLOOR) / E4M3_MAX
    return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def fp8_linear(
    x: torch.Tensor,
    weight_q: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    granularity: Fp8Granularity,
) -> torch.Tensor:
    """``x @ W.T + bias`` with W given quantized.

    Args:
        x: (..., in) any float dtype.
        weight_q: (out, in) float8_e4m3fn; weight_scale: (out,) float32 for ``row``, () for ``tensor``.
        bias: (out,) or None.

    Returns:
        (..., out) in x.dtype (the product itself is rounded to bf16 first).
    """
    lead = x.shape[:-1]
    x_q, x_scale = quantize_fp8(x.reshape(-1, x.shape[-1]), granularity)
    w_scale = weight_scale.reshape(1, -1) if granularity == "row" else weight_scale.reshape(())
    # The bias goes into the matmul's epilogue (added in float32 before the one rounding to bf16), in bf16 as
    # the epilogue requires.
    b = None if bias is None else bias.to(torch.bfloat16)
    y = torch._scaled_mm(x_q, weight_q.t(), scale_a=x_scale, scale_b=w_scale, bias=b, out_dtype=torch.bfloat16)
    return y.to(x.dtype).reshape(*lead, -1)


def fp8_linear_reference(
    x: torch.Tensor,
    weight_q: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    granularity: Fp8Granularity,
) -> torch.Tensor:
    """Torch twin of :func:`fp8_linear`: the same quantized operands (and bf16 bias), dequantized and
    multiplied in float64. Shapes as :func:`fp8_linear`; returns float64."""
    lead = x.shape[:-1]
    x_q, x_scale = quantize_fp8(x.reshape(-1, x.shape[-1]), granularity)
    w_scale = weight_scale.reshape(-1, 1) if granularity == "row" else weight_scale.reshape(())
    y = (x_q.double() * x_scale.double()) @ (weight_q.double() * w_scale.double()).t()
    if bias is not None:
        y = y + bias.to(torch.bfloat16).double()  # the bias as the fast path's epilogue takes it
    return y.reshape(*lead, -1)


class Fp8Linear(nn.Module):
    """A Linear with float8 e4m3 weights, computed by :func:`fp8_linear`.

    The FP8 payload and its float32 scales are stored as uint8 buffers (``weight_bytes``, ``scale_bytes``) and
    viewed back at use: a model-wide ``.to(torch.bfloat16)`` casts every floating tensor, which would silently
    dequantize the weights or round the scales; byte buffers only follow device moves. The bias follows the
    model's dtype like any parameter.

    Args:
        weight_q: (out, in) float8_e4m3fn; weight_scale: (out,) float32 (``row``) or (1,) (``tensor``);
        bias: (out,) or None; granularity: see :data:`Fp8Granularity`.
    """

    weight_bytes: torch.Tensor
    scale_bytes: torch.Tensor

    def __init__(
        self, weight_q: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, granularity: str
    ) -> None:
        super().__init__()
        self.granularity = check_fp8_granularity(granularity)
        if weight_q.dim() != 2 or weight_q.dtype != E4M3:
            raise ValueError(f"weight_q must be (out, in) float8_e4m3fn, got {tuple(weight_q.shape)} {weight_q.dtype}")
        self.out_features, self.in_features = weight_q.shape
        check_fp8_shape(self.in_features, self.out_features, name="Fp8Linear")
        want = (self.out_features,) if self.granularity == "row" else (1,)
        if tuple(weight_scale.shape) != want:
            raise ValueError(
                f"weight_scale must have shape {want} for {granularity!r}, got {tuple(weight_scale.shape)}"
            )
        self.register_buffer("weight_bytes", weight_q.contiguous().view(torch.uint8))
        self.register_buffer("scale_bytes", weight_scale.float().contiguous().view(torch.uint8))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, granularity: str = "row") -> Fp8Linear:
        """Quantize ``linear``'s weight (per output row or per tensor); the bias is kept as it is."""
        gran = check_fp8_granularity(granularity)
        check_fp8_shape(linear.in_features, linear.out_features, name="linear")
        w_q, scale = quantize_fp8(linear.weight.detach(), gran)
        return cls(w_q, scale.reshape(-1), None if linear.bias is None else linear.bias.detach(), gran)

    @property
    def weight_q(self) -> torch.Tensor:
        """(out, in) float8_e4m3fn."""
        return self.weight_bytes.view(E4M3)

    @property
    def weight_scale(self) -> torch.Tensor:
        """(out,) float32 (``row``) or (1,) (``tensor``)."""
        return self.scale_bytes.view(torch.float32)

    def dequantized_weight(self) -> torch.Tensor:
        """(out, in) float32: the weight this layer multiplies by."""
        return self.weight_q.float() * self.weight_scale.reshape(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out) in x.dtype."""
        return fp8_linear(x, self.weight_q, self.weight_scale, self.bias, self.granularity)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, granularity={self.granularity}"


__all__ = [
    "E4M3",
    "FP8_GRANULARITIES",
    "Fp8Granularity",
    "Fp8Linear",
    "check_fp8_granularity",
    "check_fp8_shape",
    "fp8_linear",
    "fp8_linear_reference",
    "fp8_unsupported_reason",
    "quantize_fp8",
]
