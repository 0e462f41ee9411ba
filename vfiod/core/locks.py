"""Per-IOMMU-group locks, always taken in sorted order so two calls spanning the same groups cannot
deadlock, while calls on different groups proceed in parallel."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager


class GroupLocks:
    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[int, threading.Lock] = {}

    def _lock(self, group: int) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(group, threading.Lock())

    @contextmanager
    def hold(self, groups: Iterable[int]) -> Iterator[None]:
        with ExitStack() as stack:
            for group in sorted(set(groups)):
                lock = self._lock(group)
                lock.acquire()
                stack.callback(lock.release)
            yield
