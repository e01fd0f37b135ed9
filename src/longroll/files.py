"""Reading tensor files with one clear error for a file that exists but cannot be read.

safetensors, ``torch.load`` and the Hugging Face loaders fail on a truncated or foreign file with errors of their
own (``SafetensorError``, ``UnpicklingError``, ``EOFError``, ``RuntimeError`` and others) whose messages do not
name the file. Every reader of a checkpoint goes through here, so such a file ends in :class:`CorruptFileError`
(a ``ValueError``: bad input, not a failure of the program), naming the file and what it should have been.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


class CorruptFileError(ValueError):
    """A file that exists but cannot be read as what it should be (truncated, another format, damaged).

    Args:
        path: the file (or folder) that could not be read.
        what: what it should hold, e.g. ``"safetensors checkpoint"``.
        cause: the reader's error (its first line is quoted).
    """

    def __init__(
        self, path: str | os.PathLike[str], what: str, cause: BaseException, reason: str | None = None
    ) -> None:
        if reason is None:
            reason = " ".join(str(cause).split()[:40]) or type(cause).__name__
        super().__init__(f"cannot read {what} {str(path)!r}: {reason}")
        self.path = Path(path)


def read_safetensors(path: str | os.PathLike[str], what: str = "safetensors file") -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` file, on CPU. Raises :class:`CorruptFileError` for a damaged file."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (OSError, MemoryError):
        raise
    except Exception as e:  # safetensors raises its own SafetensorError (and others) for damaged files
        raise CorruptFileError(path, what, e) from e


def safetensors_metadata(path: str | os.PathLike[str], what: str = "safetensors file") -> dict[str, str]:
    """The string metadata of a ``.safetensors`` file's header. Raises :class:`CorruptFileError`."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (OSError, MemoryError):
        raise
    except Exception as e:
        raise CorruptFileError(path, what, e) from e


def read_torch(path: str | os.PathLike[str], what: str = "torch.save file") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``. Raises :class:`CorruptFileError`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, PermissionError, IsADirectoryError, MemoryError):
        raise
    except Exception as e:  # UnpicklingError, EOFError, RuntimeError (bad zip), ... for damaged files
        text = str(e)
        if "WeightsUnpickler error:" in text:
            # torch's advice to retry with weights_only=False does not apply to a damaged file.
            detail = " ".join(text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0].split())
            reason = f"not a file of tensors written by torch.save ({detail})"
        else:
            reason = " ".join(text.split(". ")[0].split()) or type(e).__name__
        raise CorruptFileError(path, what, e, reason) from e


__all__ = ["CorruptFileError", "read_safetensors", "read_torch", "safetensors_metadata"]
