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


class StaticInputs:
    """Static input tensors shared by captured calls that never run concurrently (e.g. one per layer, replayed
    in turn): one buffer per (name, shape, dtype, device), instead of one per captured call.

    Each call copies its inputs in right before its replay, so sharing is safe on one stream.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[object, ...], torch.Tensor] = {}

    def get(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The shared buffer ``name`` of ``like``'s shape, dtype and device (allocated on first use)."""
        return self.buffer(name, tuple(like.shape), like.dtype, like.device)

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The shared buffer ``name`` of that shape, dtype and device (allocated on first use)."""
        key = (name, tuple(shape), dtype, device)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = torch.empty(shape, dtype=dtype, device=device)
        return buf

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._buffers.values())


class CapturedCall:
    """``fn(*inputs)`` captured once and replayed.

    Inputs are copied into static tensors before each replay. Outputs are returned as fresh copies, so a caller
    may keep them across replays, unless ``copy_outputs`` is False: then the static outputs themselves are
    returned and the next replay overwrites them (after its inputs were copied in, so passing an output back as
    an input is safe). Memory read or written by ``fn`` outside its inputs (e.g. cache buffers) must stay at
    the same address for the captured call's lifetime.

    Args:
        fn: a function of tensors returning a sequence of tensors, free of host synchronisation.
        example_inputs: tensors of the shapes, dtypes and devices of every later call.
        mode: ``"cuda"`` captures a CUDA graph (capture only: nothing runs until the first call);
            ``"emulate"`` keeps the static-input/static-output discipline but calls ``fn`` on each replay.
        static: optional buffers to use as the static inputs (None entries get a private one), e.g. from a
            :class:`StaticInputs` shared by several calls.
        copy_outputs: return copies of the outputs (default) or the static outputs.
    """

    def __init__(
        self,
        fn: TensorFn,
        example_inputs: Sequence[torch.Tensor],
        mode: Literal["cuda", "emulate"] = "cuda",
        *,
        static: Sequence[torch.Tensor | None] | None = None,
        copy_outputs: bool = True,
    ) -> None:
        if mode not in ("cuda", "emulate"):
            raise ValueError(f"mode must be 'cuda' or 'emulate', got {mode!r}")
        self.fn = fn
        self.mode = mode
        self.copy_outputs = copy_outputs
        given = list(static) if static is not None else [None] * len(example_inputs)
        if len(given) != len(example_inputs):
            raise ValueError(f"static must hold {len(example_inputs)} entries, got {len(given)}")
        self.static_in = []
        for x, buf in zip(example_inputs, given, strict=True):
            if buf is None:
                buf = x.detach().clone()
            elif buf.shape != x.shape or buf.dtype != x.dtype or buf.device != x.device:
                raise ValueError(f"static buffer {tuple(buf.shape)} {buf.dtype} does not match input {tuple(x.shape)}")
            else:
                buf.copy_(x)
            self.static_in.append(buf)
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
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src)
        if self.graph is not None:
            self.graph.replay()
        elif self.static_out and not self.copy_outputs:
            # Emulate the graph writing into the same static outputs.
            for dst, new in zip(self.static_out, self.fn(*self.static_in), strict=True):
                dst.copy_(new)
        else:
            self.static_out = list(self.fn(*self.static_in))
        return [o.clone() for o in self.static_out] if self.copy_outputs else list(self.static_out)


class KeyedCapture:
    """The warm-up / capture / replay life cycle of one function, keyed by what fixes its capture.

    The first call with a new key runs ``fn`` eagerly (it warms up every kernel and library handle, and nothing
    is captured from a path that runs once); the second captures it and replays the capture; later calls with
    that key replay. A call with another key starts over (the previous capture is dropped). If a capture fails,
    every later call runs eagerly (:attr:`failed`). The commit of a TempCache at its cap and AnnSA's per-step
    selection both go through this.

    Args:
        mode: ``"cuda"`` (CUDA graphs) or ``"emulate"`` (the same discipline without a graph, for tests).
    """

    def __init__(self, mode: Literal["cuda", "emulate"]) -> None:
        if mode not in ("cuda", "emulate"):
            raise ValueError(f"mode must be 'cuda' or 'emulate', got {mode!r}")
        self.mode: Literal["cuda", "emulate"] = mode
        self.failed = False
        self._warm: object = None
        self._key: object = None
        self._call: CapturedCall | None = None

    @property
    def captured(self) -> bool:
        """Whether a capture is held (for some key)."""
        return self._call is not None

    def reset(self) -> None:
        """Drop the capture and the warm-up (e.g. after the tensors it reads in place were replaced)."""
        self._warm, self._key, self._call = None, None, None

    def __call__(
        self,
        key: object,
        fn: TensorFn,
        inputs: Sequence[torch.Tensor],
        *,
        static: Sequence[torch.Tensor | None] | None = None,
        copy_outputs: bool = True,
    ) -> list[torch.Tensor]:
        """``fn(*inputs)``, eagerly or through the capture for ``key`` (see the class docstring); ``static`` and
        ``copy_outputs`` as in :class:`CapturedCall`."""
        if self._call is not None and self._key == key:
            return self._call(*inputs)
        if self.failed or self._warm != key:
            self._warm = key
            return list(fn(*inputs))
        call = capture(fn, inputs, self.mode, static=static, copy_outputs=copy_outputs)
        if call is None:
            self.failed = True
            return list(fn(*inputs))
        self._key, self._call = key, call
        return call(*inputs)


def capture(
    fn: TensorFn,
    example_inputs: Sequence[torch.Tensor],
    mode: Literal["cuda", "emulate"],
    *,
    static: Sequence[torch.Tensor | None] | None = None,
    copy_outputs: bool = True,
) -> CapturedCall | None:
    """A :class:`CapturedCall`, or None (logged) when the capture fails, e.g. on an operation that syncs."""
    try:
        return CapturedCall(fn, example_inputs, mode, static=static, copy_outputs=copy_outputs)
    except RuntimeError as err:  # torch.cuda.CudaError included
        log.warning("CUDA graph capture failed, running eagerly: %s", err)
        return None
