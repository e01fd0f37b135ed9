"""Per-component timing of a rollout (attention, ANN selection, cache compression and planning)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class ComponentTimer:
    """Accumulates the time of named spans without synchronising.

    On CUDA each span records a pair of events; :meth:`collect` reads them once per chunk, after the rollout
    engine's end-of-chunk synchronisation, so timing adds no host sync to the hot path. On CPU spans are timed
    with the host clock.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self._events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = defaultdict(list)
        self._host: dict[str, float] = defaultdict(float)

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events[name].append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._host[name] += time.perf_counter() - t0

    def collect(self) -> dict[str, float]:
        """Seconds per component since the last call (waits for the recorded events), then reset."""
        out = dict(self._host)
        for name, pairs in self._events.items():
            if pairs:
                pairs[-1][1].synchronize()
            out[name] = out.get(name, 0.0) + sum(s.elapsed_time(e) for s, e in pairs) / 1e3
        self._events.clear()
        self._host.clear()
        return out
