"""The run record stored with every result file: date, command line, versions and device."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

_VERSIONED = ("torch", "triton", "diffusers", "transformers", "imageio-ffmpeg", "longroll")


def device_name(device: torch.device | str) -> str:
    """A human-readable device: the GPU's name, or the CPU model from /proc/cpuinfo with the core count."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def environment_info(device: torch.device | str) -> dict[str, Any]:
    """Versions and device facts recorded next to every measurement."""
    dev = torch.device(device)
    versions: dict[str, str | None] = {}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "device": str(dev),
        "device_name": device_name(dev),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "torch_threads": torch.get_num_threads(),
    }
    if dev.type == "cuda":
        info["device_memory_bytes"] = torch.cuda.get_device_properties(dev).total_memory
    return info


def current_command() -> str:
    """The command line of this process, shell-quoted."""
    return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else ""


def run_record(device: torch.device | str, command: str | None = None) -> dict[str, Any]:
    """Date (UTC), command (default: this process's) and environment, recorded with every result.

    Returns:
        ``{"date": ISO 8601, "command": str, "environment": environment_info(device)}``.
    """
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": current_command() if command is None else command,
        "environment": environment_info(device),
    }


__all__ = ["current_command", "device_name", "environment_info", "run_record"]
