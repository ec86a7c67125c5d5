"""CPU time spent in named phases of work, for the figures `platescope bench detect` prints.

CPU time, not wall time: on a busy node wall time counts the waits for other processes too. A phase
is measured with `time.process_time`, which adds up every thread of the process, so torch's
intra-op threads count where they work for that phase. Work split over threads that each run
single-threaded (a batch cut into slices, one per thread) is measured inside `own_thread()`, with
that thread's CPU only: process time would count the other slices' work too.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager


class PhaseClock:
    """Milliseconds of CPU time per phase, accumulated from any thread until `take()`."""

    def __init__(self) -> None:
        self._ms: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._local = threading.local()

    @contextmanager
    def own_thread(self) -> Iterator[None]:
        """Phases inside count only the calling thread's CPU (it must do its work single-threaded)."""
        self._local.timer = time.thread_time
        try:
            yield
        finally:
            self._local.timer = None

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        timer = getattr(self._local, "timer", None) or time.process_time
        started = timer()
        try:
            yield
        finally:
            elapsed = (timer() - started) * 1000.0
            with self._lock:
                self._ms[name] += elapsed

    def take(self) -> dict[str, float]:
        """The phases' milliseconds since the last take, and start again from zero."""
        with self._lock:
            out = dict(self._ms)
            self._ms.clear()
        return out


def process_started() -> float:
    """`time.monotonic()` at the moment this process started (imports and interpreter start-up
    included), so start-up figures count what a user waits for after typing the command."""
    import psutil

    return time.monotonic() - (time.time() - psutil.Process().create_time())
