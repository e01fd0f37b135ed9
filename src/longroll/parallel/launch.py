"""Starting a head-parallel run: torch.distributed from torchrun's environment, one device per process."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from longroll.parallel.group import HeadParallelGroup

log = logging.getLogger(__name__)

#: Environment variables torchrun sets for every process it starts.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_world_size() -> int | None:
    """WORLD_SIZE when this process was started by torchrun (all of :data:`TORCHRUN_ENV` set), else None."""
    if not all(name in os.environ for name in TORCHRUN_ENV):
        return None
    return int(os.environ["WORLD_SIZE"])


def free_port() -> int:
    """A TCP port on localhost that is free now (for a rendezvous started right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Launched:
    """This process's part of a launched run: its group, its device, and its rank in the whole run."""

    group: HeadParallelGroup
    device: torch.device
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes results."""
        return self.rank == 0


def init_from_env(device_type: str, *, uneven_heads: bool = False) -> Launched:
    """Initialise torch.distributed from torchrun's environment: NCCL with one GPU per process
    (``cuda:LOCAL_RANK``) for ``device_type`` "cuda", gloo on CPU.

    Raises:
        ValueError: not started by torchrun, an unknown device type, or fewer GPUs than local processes.
    """
    world = launched_world_size()
    if world is None:
        raise ValueError(f"not started by torchrun: the environment lacks one of {', '.join(TORCHRUN_ENV)}")
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"device_type must be 'cuda' or 'cpu', got {device_type!r}")
    local = int(os.environ["LOCAL_RANK"])
    if device_type == "cuda":
        if not torch.cuda.is_available() or local >= torch.cuda.device_count():
            raise ValueError(
                f"local rank {local} needs a CUDA device of its own; {torch.cuda.device_count()} are visible"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        if backend == "nccl":
            dist.init_process_group(backend, device_id=device)
        else:
            dist.init_process_group(backend)
    rank = dist.get_rank()
    log.info("rank %d of %d on %s (%s)", rank, world, device, backend)
    return Launched(HeadParallelGroup(None, uneven_heads=uneven_heads), device, rank, world)
