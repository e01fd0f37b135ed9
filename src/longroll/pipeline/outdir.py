"""Output folders checked before any work: a run that cannot write its results fails in its first second,
not after minutes of rollout."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def prepare_out_dir(path: str | os.PathLike[str], *, name: str = "out_dir") -> Path:
    """Create ``path`` if needed and prove it writable by creating (and removing) a file in it.

    Args:
        path: the output folder.
        name: how the caller's user knows the argument (e.g. ``"--out"``), for the error.

    Raises:
        ValueError naming ``name`` and ``path``: it is a file, it cannot be created, or it is not writable.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{name} {str(out)!r} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".longroll-write-check-"):
            pass
    except OSError as e:
        raise ValueError(f"{name} {str(out)!r} is not writable: {e.strerror or e}") from None
    return out


__all__ = ["prepare_out_dir"]
