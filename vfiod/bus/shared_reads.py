"""How inspect calls share work and take turns, so a read flood costs little and holds nobody else up.

Owns two things the service puts between a read and the worker threads:

- `Snapshots`: identical reads (the same method with the same arguments) share one scan, and at most one
  scan of a key runs for unprivileged readers at a time. A result is
  served again, with no worker thread at all, while it is fresh: nothing has been invalidated since the
  scan began (a uevent, a sysfs write by vfiod, a change the manager reports) and it is younger than
  `max_age` (the backstop for what the kernel does not announce, such as a process opening a device node).
  Readers that arrive while a scan runs wait for it instead of starting their own. A scan that overlapped
  an invalidation still answers the callers that waited for it (their calls began before the change), but
  it is never served again.
- `FairLanes`: the reads that remain run on a bounded pool, taken from per-caller queues in turn (round
  robin by unique bus name), so one caller with many calls queued delays another by at most one of its
  calls per round. Work without a caller lane (privileged or mutating calls, vfiod's own housekeeping)
  runs on a pool of its own and never queues behind anyone's reads.

Everything here runs on the event loop thread, except `Snapshots.invalidate`, which worker threads call.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Final, TypeVar

T = TypeVar("T")

SNAPSHOT_MAX_AGE: Final = 1.0  # seconds a result may be served again without a new scan


@dataclass
class _Result:
    generation: int
    taken: float  # monotonic time the scan began
    value: Any


class Snapshots:
    """Results of identical reads, shared while fresh (see the module docstring)."""

    def __init__(
        self, *, max_age: float = SNAPSHOT_MAX_AGE, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_age = max_age
        self._clock = clock
        self._generation = 0
        self._results: dict[Hashable, _Result] = {}
        # key -> (generation, future, whether the scan runs on the priority pool)
        self._running: dict[Hashable, tuple[int, asyncio.Future[Any], bool]] = {}
        self.scans = 0  # reads that ran (for tests and the bench)
        self.served = 0  # reads answered from a result or a scan already running

    def invalidate(self) -> None:
        """Something the results depend on changed: none of them is served again. Thread-safe: a lost
        increment between two threads still moves the generation past every result taken before."""
        self._generation += 1

    def fresh(self, key: Hashable) -> tuple[bool, Any]:
        """(True, value) if a fresh result for `key` exists."""
        hit = self._results.get(key)
        if hit is None:
            return False, None
        if hit.generation != self._generation or self._clock() - hit.taken > self.max_age:
            del self._results[key]
            return False, None
        self.served += 1
        return True, hit.value

    async def get(self, key: Hashable, run: Callable[[], Awaitable[T]], *, priority: bool = False) -> T:
        """The value for `key`: fresh, or from a scan running now, or from `run()`, which is awaited on
        this call's behalf and then shared. A `priority` reader joins only a scan on the priority pool: one
        queued in an unprivileged caller's turn could keep it waiting."""
        while True:
            found, value = self.fresh(key)
            if found:
                return value  # type: ignore[no-any-return]
            running = self._running.get(key)
            if running is None or not (running[2] or not priority):
                break
            if running[0] == self._generation:
                self.served += 1
                return await asyncio.shield(running[1])
            if priority:
                break
            # A scan from before the last change still runs: let it end before starting another, so that
            # a burst of changes under a read flood never has many scans of one key running side by side
            # (they would share one interpreter lock with the call making the changes).
            await asyncio.wait([running[1]])
        generation, taken = self._generation, self._clock()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if running is None or running[0] != generation or priority:
            self._running[key] = (generation, fut, priority)
        self.scans += 1
        try:
            result = await run()
        except BaseException as e:
            if not fut.done():
                fut.set_exception(e)
                fut.exception()  # retrieved: nobody may be waiting for it
            raise
        else:
            if not fut.done():
                fut.set_result(result)
            if generation == self._generation:
                self._results[key] = _Result(generation, taken, result)
            return result
        finally:
            if (mine := self._running.get(key)) is not None and mine[1] is fut:
                del self._running[key]


class FairLanes:
    """Reads run on `executor` at most `slots` at a time, taken from per-caller queues in turn; reads
    without a lane run on `priority` at once.

    While a mutating call runs (`pause`), queued reads do not start: a scan is pure Python and would share
    the interpreter lock with the call, which then waits for it at every one of its many small system
    calls. Reads already running finish; a pause ends with the call, or after `PAUSE_AT_MOST` seconds so
    that a call stuck in the kernel does not stop every reader with it."""

    def __init__(
        self,
        executor: Executor,
        slots: int,
        priority: Executor,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._executor = executor
        self._priority = priority
        self._slots = slots
        self._busy = 0
        self._clock = clock
        self._pauses: dict[int, float] = {}  # token -> when it ends at the latest
        self._next_token = 0
        self._wakeup: asyncio.TimerHandle | None = None
        self._queues: dict[str, deque[tuple[Callable[[], Any], asyncio.Future[Any]]]] = {}
        self._turns: deque[str] = deque()  # lanes with work queued, in the order they get their next turn

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._queues.values())

    async def run(self, lane: str | None, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        if lane is None:
            return await loop.run_in_executor(self._priority, fn)
        fut: asyncio.Future[T] = loop.create_future()
        queue = self._queues.get(lane)
        if queue is None:
            queue = self._queues[lane] = deque()
            self._turns.append(lane)
        queue.append((fn, fut))
        self._pump()
        return await fut

    def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        while self._busy < self._slots and self._turns:
            lane = self._turns.popleft()
            queue = self._queues[lane]
            fn, fut = queue.popleft()
            if queue:
                self._turns.append(lane)  # its next call waits for every other lane's turn
            else:
                del self._queues[lane]
            if fut.done():  # the caller gave up (cancelled) before its turn
                continue
            self._busy += 1
            work = loop.run_in_executor(self._executor, fn)
            work.add_done_callback(functools.partial(self._finished, fut=fut))

    def _finished(self, work: asyncio.Future[Any], *, fut: asyncio.Future[Any]) -> None:
        self._busy -= 1
        if not fut.done():
            if work.cancelled():
                fut.cancel()
            elif (e := work.exception()) is not None:
                fut.set_exception(e)
            else:
                fut.set_result(work.result())
        self._pump()
