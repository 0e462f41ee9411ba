"""The manager's locks.

Per-IOMMU-group locks, always taken in sorted order so two calls spanning the same groups cannot deadlock,
while calls on different groups proceed in parallel. `try_hold` takes them only if none is busy: a refresh
after a uevent must never wait behind a call that is itself waiting on the kernel. Whoever releases a group
runs `after_release(groups)` (the manager's deferred refreshes) once the locks are free.

Per-instance locks serialize the calls about one instance (an Attach and a Detach of the same VM), and are
always taken before any group lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager


class GroupLocks:
    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[int, threading.Lock] = {}
        self.after_release: Callable[[set[int]], None] | None = None

    def _lock(self, group: int) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(group, threading.Lock())

    @contextmanager
    def hold(self, groups: Iterable[int]) -> Iterator[None]:
        wanted = set(groups)
        with ExitStack() as stack:
            stack.callback(self._released, wanted)
            for group in sorted(wanted):
                lock = self._lock(group)
                lock.acquire()
                stack.callback(lock.release)
            yield

    @contextmanager
    def try_hold(self, groups: Iterable[int]) -> Iterator[bool]:
        """Yields True holding every group, or False holding none (one of them was busy)."""
        wanted = set(groups)
        taken: list[threading.Lock] = []
        for group in sorted(wanted):
            lock = self._lock(group)
            if not lock.acquire(blocking=False):
                for held in reversed(taken):
                    held.release()
                yield False
                return
            taken.append(lock)
        try:
            yield True
        finally:
            for held in reversed(taken):
                held.release()
            self._released(wanted)

    def _released(self, groups: set[int]) -> None:
        hook = self.after_release
        if hook is not None:
            hook(groups)


class InstanceLocks:
    """One lock per instance id, kept only while someone holds or waits for it."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextmanager
    def hold(self, instance: str) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.get(instance, (threading.Lock(), 0))
            self._locks[instance] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._guard:
                lock, users = self._locks[instance]
                if users <= 1:
                    del self._locks[instance]
                else:
                    self._locks[instance] = (lock, users - 1)
