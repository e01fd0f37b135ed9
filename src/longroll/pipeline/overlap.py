"""Decode one chunk behind the DiT: chunk i's decode runs on a side CUDA stream while chunk i+1's DiT runs.

The rollout hands each finished chunk to :meth:`DecodeQueue.submit`. On CUDA (``mode="auto"``) that enqueues
the chunk's decode, its conversion to uint8 and a copy into pinned host memory on a side stream, records an
event, and returns at once; the host goes on to enqueue the next chunk's DiT on the main stream, and the GPU
runs both. Frames reach ``consume`` in chunk order: chunk i's when chunk i+1 is submitted (its event has
fired by then in a rollout, which synchronises the device after each chunk), the last ones at
:meth:`DecodeQueue.finish`.

Stream rules kept here: the side stream waits for the main stream before it reads the chunk (the DiT wrote
it there), and the chunk's memory is marked in use by the side stream (``record_stream``) so the allocator
cannot hand it to the main stream before the decode has read it. Everything the decoder allocates, its
carried state included, belongs to the side stream; :meth:`finish` makes the main stream wait for it before
anything else may touch the decoder.

``mode="emulate"`` (and ``"auto"`` off CUDA) runs the same one-behind schedule in line, without streams, so
the order of decodes, state updates and ``consume`` calls can be tested on the CPU; ``"off"`` decodes and
consumes each chunk inside ``submit``. All three hand ``consume`` the same frames.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from longroll.pipeline.decoder import StreamingDecoder
from longroll.pipeline.vae import video_to_uint8

OverlapMode = Literal["auto", "off", "emulate"]
OVERLAP_MODES: tuple[OverlapMode, ...] = ("auto", "off", "emulate")


def check_overlap_mode(mode: str) -> OverlapMode:
    """``mode`` if it is one of :data:`OVERLAP_MODES`, else a ValueError naming it."""
    for known in OVERLAP_MODES:
        if mode == known:
            return known
    raise ValueError(f"overlap mode must be one of {list(OVERLAP_MODES)}, got {mode!r}")


@dataclass
class _Pending:
    chunk: int
    frames: torch.Tensor  # (T, H, W, 3) uint8; pinned host memory being filled when ``done`` is set
    done: torch.cuda.Event | None


class DecodeQueue:
    """Streaming decode of a rollout's chunks, overlapped with the next chunk's DiT where a GPU allows.

    Args:
        decoder: the streaming decoder (its temporal state carries from chunk to chunk, in submission order).
        consume: called as ``consume(chunk, frames)`` with (T, H, W, 3) uint8 RGB frames, in chunk order.
        mode: ``auto`` (side stream on CUDA, in-line one-behind schedule elsewhere), ``emulate`` (the in-line
            schedule everywhere) or ``off`` (decode and consume inside :meth:`submit`).
    """

    def __init__(
        self, decoder: StreamingDecoder, consume: Callable[[int, np.ndarray], None], mode: str = "auto"
    ) -> None:
        self.mode = check_overlap_mode(mode)
        self.decoder, self.consume = decoder, consume
        dev = decoder.device
        self.stream = torch.cuda.Stream(dev) if self.mode == "auto" and dev.type == "cuda" else None
        self._pending: deque[_Pending] = deque()

    @property
    def overlapped(self) -> bool:
        """Whether decodes run on a side stream."""
        return self.stream is not None

    def submit(self, chunk: int, latents: torch.Tensor) -> None:
        """Start decoding ``latents`` (1, C, F, h, w), the chunk after the last one submitted; hand every earlier
        chunk's frames to ``consume``."""
        if self.mode == "off":
            self.consume(chunk, self.decoder.decode_chunk(latents))
            return
        if self.stream is None:
            frames = torch.from_numpy(self.decoder.decode_chunk(latents))
            self._pending.append(_Pending(chunk, frames, None))
        else:
            self._pending.append(self._submit_on_stream(chunk, latents, self.stream))
        while len(self._pending) > 1:
            self._hand_over(self._pending.popleft())

    def _submit_on_stream(self, chunk: int, latents: torch.Tensor, stream: torch.cuda.Stream) -> _Pending:
        main = torch.cuda.current_stream(latents.device)
        stream.wait_stream(main)  # the DiT wrote the chunk on the main stream
        latents.record_stream(stream)  # not reusable by the main stream before the decode has read it
        with torch.cuda.stream(stream):
            frames = video_to_uint8(self.decoder.decode_chunk_float(latents))
            host = torch.empty(frames.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(frames, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        return _Pending(chunk, host, done)

    def _hand_over(self, item: _Pending) -> None:
        if item.done is not None:
            item.done.synchronize()
        self.consume(item.chunk, item.frames.numpy())

    def finish(self) -> None:
        """Hand the frames of every submitted chunk to ``consume`` (waiting for their decode), and order the
        main stream after the side stream's work."""
        while self._pending:
            self._hand_over(self._pending.popleft())
        if self.stream is not None:
            torch.cuda.current_stream(self.decoder.device).wait_stream(self.stream)

    def discard(self) -> None:
        """Drop the chunks not yet consumed (after a failure), still ordering the main stream after them."""
        self._pending.clear()
        if self.stream is not None:
            torch.cuda.current_stream(self.decoder.device).wait_stream(self.stream)


__all__ = ["OVERLAP_MODES", "DecodeQueue", "OverlapMode", "check_overlap_mode"]
