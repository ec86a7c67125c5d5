"""CPU time spent in named phases of work, for the figures `platescope bench detect` prints.

CPU time, not wall time: on a busy node wall time counts the waits for other processes too. A phase
is measured with `time.process_time`, which adds up every thread of the process, so torch's
intra-op threads count where they work for that phase.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager


class PhaseClock:
    """Milliseconds of this process's CPU time per phase, accumulated until `take()`."""

    def __init__(self) -> None:
        self._ms: Counter[str] = Counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.process_time()
        try:
            yield
        finally:
            self._ms[name] += (time.process_time() - started) * 1000.0

    def take(self) -> dict[str, float]:
        """The phases' milliseconds since the last take, and start again from zero."""
        out = dict(self._ms)
        self._ms.clear()
        return out


def process_started() -> float:
    """`time.monotonic()` at the moment this process started (imports and interpreter start-up
    included), so start-up figures count what a user waits for after typing the command."""
    import psutil

    return time.monotonic() - (time.time() - psutil.Process().create_time())
