"""The process group that head-parallel inference shards over, and how it splits heads and FFN columns."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from longroll.policies.timing import ComponentTimer

#: Name of the :class:`~longroll.policies.timing.ComponentTimer` span of every all-reduce.
ALL_REDUCE_SPAN = "all_reduce"


def split_range(total: int, parts: int, index: int) -> tuple[int, int]:
    """(start, length) of part ``index`` of ``total`` items cut into ``parts`` contiguous, balanced pieces: the
    first ``total % parts`` pieces hold one item more than the others."""
    base, extra = divmod(total, parts)
    return index * base + min(index, extra), base + (index < extra)


@dataclass(frozen=True)
class HeadParallelGroup:
    """The ranks that share one model by attention heads (tensor parallel), and this process's place in them.

    Every rank holds the same residual stream; each holds a contiguous range of heads of every attention layer
    (their q/k/v columns and output-projection rows) and a range of FFN hidden columns, and the partial outputs
    are summed with :meth:`all_reduce`.

    Args:
        group: the torch.distributed process group (None: the default group once initialised, or a single
            process when torch.distributed is not initialised).
        uneven_heads: allow a head count that the group size does not divide (ranks then hold ``ceil`` or
            ``floor`` of heads / size, and the rank with more sets the pace); by default that is an error.
        timer: receives the time of every all-reduce (span :data:`ALL_REDUCE_SPAN`), e.g. the processor's timer.
    """

    group: dist.ProcessGroup | None = None
    uneven_heads: bool = False
    timer: ComponentTimer | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.uneven_heads, bool):
            raise ValueError(f"uneven_heads must be a bool, got {self.uneven_heads!r}")
        if self.group is not None and not dist.is_initialized():
            raise ValueError("group given but torch.distributed is not initialised (init_process_group first)")

    @property
    def size(self) -> int:
        """Ranks in the group (1 without torch.distributed)."""
        if self.group is None and not dist.is_initialized():
            return 1
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        """This process's rank in the group."""
        if self.group is None and not dist.is_initialized():
            return 0
        return dist.get_rank(self.group)

    def head_range(self, num_heads: int) -> tuple[int, int]:
        """(first global head id, heads held) of this rank for a layer of ``num_heads`` heads.

        Raises:
            ValueError: ``num_heads`` is not divisible by the group size (unless ``uneven_heads``), or is smaller
                than the group.
        """
        size = self.size
        if not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        if num_heads < size:
            raise ValueError(f"num_heads={num_heads} cannot be sharded over {size} ranks: every rank needs a head")
        if num_heads % size and not self.uneven_heads:
            raise ValueError(
                f"num_heads={num_heads} is not divisible by the group size {size}; use a size that divides it, "
                f"or uneven_heads=True (ranks then hold {num_heads // size + 1} or {num_heads // size} heads)"
            )
        return split_range(num_heads, size, self.rank)

    def head_ids(self, num_heads: int) -> tuple[int, ...]:
        """Global ids of the heads this rank holds."""
        start, n = self.head_range(num_heads)
        return tuple(range(start, start + n))

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` (any shape) over the group, in place; returns it. Every rank receives the same values."""
        if self.size == 1:
            return x
        with self._span():
            dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
        return x

    def all_reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise maximum of ``x`` over the group, in place (not timed: for small agreements)."""
        if self.size > 1:
            dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.group)
        return x

    def _span(self) -> AbstractContextManager[None]:
        return nullcontext() if self.timer is None else self.timer.span(ALL_REDUCE_SPAN)
