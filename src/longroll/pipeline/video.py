"""MP4 writing (H.264 through imageio-ffmpeg) and side-by-side comparison clips.

Frames are uint8 arrays (frames, height, width, 3) in RGB order throughout. ffmpeg is imported lazily so that
``import longroll.pipeline.video`` stays cheap.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Generator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def _check_frames(frames: np.ndarray, name: str = "frames") -> np.ndarray:
    """Validate a (T, H, W, 3) uint8 array (a single (H, W, 3) frame is promoted to T = 1)."""
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or min(frames.shape[:3]) < 1:
        raise ValueError(f"{name} must be (frames, height, width, 3), got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8, got {frames.dtype}")
    return frames


def pad_to_even(frames: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) -> (T, H + H % 2, W + W % 2, 3), replicating the last row/column.

    yuv420p stores chroma at half resolution, so libx264 refuses odd sizes; padding (not resizing) keeps every
    source pixel unchanged.
    """
    frames = _check_frames(frames)
    ph, pw = frames.shape[1] % 2, frames.shape[2] % 2
    if ph or pw:
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    return frames


class Mp4Writer:
    """Streaming H.264 writer: append chunks of frames as they are decoded, so that a long rollout never holds
    the whole video in memory.

    Args:
        path: output ``.mp4`` file (parent folders are created).
        fps: frames per second of the video (Wan 2.1: 16).
        crf: x264 constant rate factor (lower = better quality; 18 is visually near lossless).

    Use as a context manager, or call :meth:`close`. The frame size is fixed by the first appended chunk.
    """

    def __init__(self, path: str | os.PathLike[str], fps: float, *, crf: int = 18) -> None:
        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if not 0 <= crf <= 51:
            raise ValueError(f"crf must be in [0, 51], got {crf}")
        self.path = Path(path)
        self.fps = float(fps)
        self.crf = crf
        self.frames_written = 0
        self._size: tuple[int, int] | None = None  # (height, width) after padding
        self._gen: Generator[Any, Any, None] | None = None

    def _open(self, height: int, width: int) -> None:
        import imageio_ffmpeg

        self.path.parent.mkdir(parents=True, exist_ok=True)
        # macro_block_size=1: imageio-ffmpeg would otherwise *resize* to multiples of 16; we pad to even sizes.
        self._gen = imageio_ffmpeg.write_frames(
            str(self.path),
            (width, height),
            fps=self.fps,
            codec="libx264",
            pix_fmt_in="rgb24",
            pix_fmt_out="yuv420p",
            macro_block_size=1,
            output_params=["-crf", str(self.crf)],
            ffmpeg_log_level="error",
        )
        self._gen.send(None)
        self._size = (height, width)

    def append(self, frames: np.ndarray) -> None:
        """Append frames: (T, H, W, 3) uint8, or one (H, W, 3) frame."""
        frames = pad_to_even(frames)
        if self._gen is None:
            self._open(frames.shape[1], frames.shape[2])
        if frames.shape[1:3] != self._size:
            raise ValueError(f"frames are {frames.shape[1:3]} (after padding), the video is {self._size}")
        assert self._gen is not None
        for frame in frames:
            self._gen.send(np.ascontiguousarray(frame))
        self.frames_written += frames.shape[0]

    def close(self) -> None:
        """Flush and finish the file. A writer that received no frame writes nothing."""
        if self._gen is not None:
            self._gen.close()
            self._gen = None
            log.info("wrote %s (%d frames at %g fps)", self.path, self.frames_written, self.fps)

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def write_mp4(path: str | os.PathLike[str], frames: np.ndarray, fps: float, *, crf: int = 18) -> Path:
    """Write (T, H, W, 3) uint8 RGB frames to an H.264 (libx264, yuv420p) MP4; odd sizes are edge-padded to even.

    Returns the path written.
    """
    frames = _check_frames(frames)
    with Mp4Writer(path, fps, crf=crf) as writer:
        writer.append(frames)
    return Path(path)


def _label_strip(text: str, width: int, height: int) -> np.ndarray:
    """(height, width, 3) uint8 black strip with ``text`` in white (Pillow ships with matplotlib)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height))
    ImageDraw.Draw(img).text((2, max(0, (height - 11) // 2)), text, fill=(255, 255, 255))
    return np.asarray(img, dtype=np.uint8)


def side_by_side(
    a: np.ndarray,
    b: np.ndarray,
    labels: Sequence[str] | None = None,
    *,
    gap: int = 4,
    label_height: int = 14,
) -> np.ndarray:
    """Two clips next to each other, e.g. dense attention vs a bounded policy (:func:`tile_clips` of two).

    Args:
        a, b: (T_a, H_a, W_a, 3) and (T_b, H_b, W_b, 3) uint8; the result keeps the first min(T_a, T_b) frames
            and pads the shorter clip at the bottom to the taller height.
        labels: two captions drawn in a strip above each clip, or None for no strip.
        gap: black columns between the clips.
        label_height: height of the caption strip in pixels.

    Returns:
        (min(T_a, T_b), max(H_a, H_b) [+ label_height], W_a + gap + W_b, 3) uint8.
    """
    if labels is not None and len(labels) != 2:
        raise ValueError(f"labels must hold two captions, got {len(labels)}")
    return tile_clips((a, b), labels, gap=gap, label_height=label_height)


def tile_clips(
    clips: Sequence[np.ndarray],
    labels: Sequence[str] | None = None,
    *,
    gap: int = 4,
    label_height: int = 14,
    scale: int = 1,
) -> np.ndarray:
    """Clips next to each other in one row, each under an optional caption.

    Args:
        clips: n >= 1 arrays (T_i, H_i, W_i, 3) uint8; the result keeps the first min(T_i) frames and pads
            shorter clips at the bottom to the tallest height.
        labels: n captions drawn in a strip above each clip, or None for no strip.
        gap: black columns between clips.
        label_height: height of the caption strip in pixels.
        scale: integer upscaling of every clip (nearest neighbour: pixels stay exact blocks), before captions.

    Returns:
        (min T_i, scale * max H_i [+ label_height], scale * sum W_i + gap * (n - 1), 3) uint8.
    """
    arrays = [_check_frames(c, f"clips[{i}]") for i, c in enumerate(clips)]
    if not arrays:
        raise ValueError("clips must hold at least one clip")
    if labels is not None and len(labels) != len(arrays):
        raise ValueError(f"labels must hold {len(arrays)} captions, got {len(labels)}")
    if gap < 0 or label_height < 1:
        raise ValueError(f"gap must be >= 0 and label_height >= 1, got {gap}, {label_height}")
    if not isinstance(scale, int) or isinstance(scale, bool) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    if scale > 1:
        arrays = [x.repeat(scale, axis=1).repeat(scale, axis=2) for x in arrays]
    t = min(x.shape[0] for x in arrays)
    h = max(x.shape[1] for x in arrays)
    panels = [np.pad(x[:t], ((0, 0), (0, h - x.shape[1]), (0, 0), (0, 0))) for x in arrays]
    if labels is not None:
        strips = [_label_strip(text, p.shape[2], label_height) for text, p in zip(labels, panels, strict=True)]
        panels = [
            np.concatenate([np.broadcast_to(s, (t, *s.shape)), p], axis=1) for s, p in zip(strips, panels, strict=True)
        ]
    spacer = np.zeros((t, panels[0].shape[1], gap, 3), dtype=np.uint8)
    row: list[np.ndarray] = []
    for i, p in enumerate(panels):
        row += [spacer, p] if i else [p]
    return np.concatenate(row, axis=2)
