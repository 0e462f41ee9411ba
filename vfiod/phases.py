"""Where a call's time goes: named phases, summed per call, for the call's outcome line in the journal
(one `PHASE_<NAME>_MS` field each, and a short text).

The bus layer makes a `Phases` current for each mutating call (a ContextVar: the call's task on the event
loop, and the worker thread it runs the manager in through a copied context); code anywhere below times
its part with `timed("plan")` or `add("write bind", seconds)`, which cost nothing when no call is being
timed (start-up, the simulator, the tests of the core). Like `logevents`, this module belongs to no layer.
"""

from __future__ import annotations

import contextvars
import functools
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

_CURRENT: ContextVar[Phases | None] = ContextVar("vfiod_phases", default=None)
_FIELD_CHARS = re.compile(r"[^A-Z0-9]+")


class Phases:
    """Seconds per phase name, in the order each phase first ran (a phase may run more than once)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()  # the call's worker thread and the event loop (polkit) both add

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def fields(self) -> dict[str, str]:
        """Journal fields: `PHASE_WRITE_BIND_MS=1.3` for the phase "write bind"."""
        with self._lock:
            items = list(self.seconds.items())
        return {
            f"PHASE_{_FIELD_CHARS.sub('_', name.upper()).strip('_')}_MS": f"{s * 1000:.1f}"
            for name, s in items
        }

    def text(self) -> str:
        """`authorize 1.2 ms, plan 0.3 ms, write bind 12.0 ms`."""
        with self._lock:
            items = list(self.seconds.items())
        return ", ".join(f"{name} {s * 1000:.1f} ms" for name, s in items)


def begin() -> Phases:
    """A new Phases, current from here on in this context (the call's task)."""
    phases = Phases()
    _CURRENT.set(phases)
    return phases


def add(name: str, seconds: float) -> None:
    phases = _CURRENT.get()
    if phases is not None:
        phases.add(name, seconds)


@contextmanager
def timed(name: str) -> Iterator[None]:
    phases = _CURRENT.get()
    if phases is None:
        yield
        return
    started = time.monotonic()
    try:
        yield
    finally:
        phases.add(name, time.monotonic() - started)


def timed_call(name: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """A decorator: every call of the function is the phase `name`."""

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def timed_fn(*args: P.args, **kwargs: P.kwargs) -> R:
            with timed(name):
                return fn(*args, **kwargs)

        return timed_fn

    return wrap


def carried(fn: Callable[[], R]) -> Callable[[], R]:
    """`fn`, to run on a worker thread in this context (the call's phases go with it); the wait until a
    thread takes it is the phase "queue"."""
    context = contextvars.copy_context()
    submitted = time.monotonic()

    def run() -> R:
        context.run(add, "queue", time.monotonic() - submitted)
        return context.run(fn)

    return run
