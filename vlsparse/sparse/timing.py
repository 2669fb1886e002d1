"""Interleaved timing: several functions called in turn, so that slow phases of a shared machine hit all alike.

Used by the bench (:mod:`vlsparse.bench.timing` re-exports it) and by ``vlsparse export --autotune``
(:mod:`vlsparse.export.autotune`), which times each pruned Linear's formats on the exporting machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["time_interleaved"]


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per call of each function: ``warmup`` untimed calls each, then ``repeats`` rounds that
    call every function once (the order rotates by one each round), so slow phases of a shared
    machine hit every function alike. Returns name -> ``repeats`` times in seconds."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times
