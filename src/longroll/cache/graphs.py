"""Capture-and-replay of a tensor function in a CUDA graph, with static inputs and outputs.

A TempCache commit at its cap issues a few hundred small kernels per layer; issued one by one from Python they
cost far more host time than GPU time (measured on the H100 at Wan2.1-1.3B shapes: ~2 ms per layer and frame).
Replaying them as one CUDA graph removes that overhead. The function must be free of host synchronisation and
its host-side arguments must be fixed for the capture (callers key captures on them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Literal

import torch

log = logging.getLogger(__name__)

TensorFn = Callable[..., Sequence[torch.Tensor]]


class CapturedCall:
    """``fn(*inputs)`` captured once and replayed.

    Inputs are copied into static tensors before each replay; outputs are returned as fresh copies, so a caller
    may keep them across replays. Memory written by ``fn`` outside its inputs (e.g. cache buffers) must stay at
    the same address for the captured call's lifetime.

    Args:
        fn: a function of tensors returning a sequence of tensors, free of host synchronisation.
        example_inputs: tensors of the shapes, dtypes and devices of every later call.
        mode: ``"cuda"`` captures a CUDA graph (capture only: nothing runs until the first call);
            ``"emulate"`` keeps the static-input/static-output discipline but calls ``fn`` on each replay.
    """

    def __init__(
        self, fn: TensorFn, example_inputs: Sequence[torch.Tensor], mode: Literal["cuda", "emulate"] = "cuda"
    ) -> None:
        if mode not in ("cuda", "emulate"):
            raise ValueError(f"mode must be 'cuda' or 'emulate', got {mode!r}")
        self.fn = fn
        self.mode = mode
        self.static_in = [x.detach().clone() for x in example_inputs]
        self.static_out: list[torch.Tensor] = []
        self.graph: torch.cuda.CUDAGraph | None = None
        if mode == "cuda":
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_out = list(fn(*self.static_in))

    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        if len(inputs) != len(self.static_in):
            raise ValueError(f"expected {len(self.static_in)} inputs, got {len(inputs)}")
        for dst, src in zip(self.static_in, inputs, strict=True):
            if src.shape != dst.shape or src.dtype != dst.dtype:
                raise ValueError(
                    f"input of shape {tuple(src.shape)} {src.dtype} does not match the captured "
                    f"{tuple(dst.shape)} {dst.dtype}"
                )
            dst.copy_(src)
        if self.graph is not None:
            self.graph.replay()
        else:
            self.static_out = list(self.fn(*self.static_in))
        return [o.clone() for o in self.static_out]


def capture(
    fn: TensorFn, example_inputs: Sequence[torch.Tensor], mode: Literal["cuda", "emulate"]
) -> CapturedCall | None:
    """A :class:`CapturedCall`, or None (logged) when the capture fails, e.g. on an operation that syncs."""
    try:
        return CapturedCall(fn, example_inputs, mode)
    except RuntimeError as err:  # torch.cuda.CudaError included
        log.warning("CUDA graph capture failed, running eagerly: %s", err)
        return None
