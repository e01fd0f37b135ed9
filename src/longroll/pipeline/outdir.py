"""Output folders checked before any work: a run that cannot write its results fails in its first second,
not after minutes of rollout."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def prepare_out_dir(path: str | os.PathLike[str], *, name: str = "out_dir", create: bool = True) -> Path:
    """Check that results can be written under ``path``, by creating (and removing) a file there.

    Args:
        path: the output folder.
        name: how the caller's user knows the argument (e.g. ``"--out"``), for the error.
        create: create the folder (and its parents); otherwise only check, in the nearest folder that exists,
            that it could be created (so that a command refused later for another reason leaves nothing).

    Raises:
        ValueError naming ``name`` and ``path``: it is a file, it cannot be created, or it is not writable.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{name} {str(out)!r} is a file, not a folder")
    probe = out
    if not create:
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir():
            raise ValueError(f"{name} {str(out)!r} is not writable: {str(probe)!r} is a file, not a folder")
    try:
        if create:
            out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".longroll-write-check-"):
            pass
    except OSError as e:
        raise ValueError(f"{name} {str(out)!r} is not writable: {e.strerror or e}") from None
    return out


__all__ = ["prepare_out_dir"]
