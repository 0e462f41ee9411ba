"""Shared snapshots and fair lanes: identical reads cost one scan, a flood from one caller delays another by
at most one turn, and priority work never queues."""

from __future__ import annotations

import asyncio
import functools
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from vfiod.bus.shared_reads import FairLanes, Snapshots


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_concurrent_identical_reads_share_one_scan() -> None:
    async def go() -> None:
        snaps = Snapshots()
        release = asyncio.Event()
        runs = 0

        async def scan() -> list[int]:
            nonlocal runs
            runs += 1
            await release.wait()
            return [runs]

        readers = [asyncio.ensure_future(snaps.get("k", scan)) for _ in range(50)]
        await asyncio.sleep(0)
        release.set()
        results = await asyncio.gather(*readers)
        assert runs == 1 and snaps.scans == 1 and snaps.served == 49
        assert all(r is results[0] for r in results)
        # fresh: served again without running anything
        assert await snaps.get("k", scan) is results[0]
        assert runs == 1
        # another key is another scan
        await snaps.get("other", scan)
        assert runs == 2

    asyncio.run(go())


def test_invalidation_and_age_end_a_snapshot() -> None:
    async def go() -> None:
        clock = Clock()
        snaps = Snapshots(max_age=1.0, clock=clock)
        n = 0

        async def scan() -> int:
            nonlocal n
            n += 1
            return n

        assert await snaps.get("k", scan) == 1
        assert await snaps.get("k", scan) == 1
        snaps.invalidate()
        assert await snaps.get("k", scan) == 2
        clock.now += 0.9
        assert await snaps.get("k", scan) == 2
        clock.now += 0.2  # older than max_age
        assert await snaps.get("k", scan) == 3

    asyncio.run(go())


def test_a_scan_that_overlapped_a_change_is_not_served_again() -> None:
    async def go() -> None:
        snaps = Snapshots()
        n = 0

        async def scan() -> int:
            nonlocal n
            n += 1
            if n == 1:
                # from another thread, as the manager's change listener and the write listener do
                t = threading.Thread(target=snaps.invalidate)
                t.start()
                t.join()
            return n

        assert await snaps.get("k", scan) == 1  # its caller still gets it
        assert await snaps.get("k", scan) == 2  # but it was not kept

    asyncio.run(go())


def test_a_failed_scan_fails_its_joiners_and_is_not_kept() -> None:
    async def go() -> None:
        snaps = Snapshots()
        release = asyncio.Event()
        n = 0

        async def scan() -> int:
            nonlocal n
            n += 1
            await release.wait()
            if n == 1:
                raise LookupError("gone")
            return n

        readers = [asyncio.ensure_future(snaps.get("k", scan)) for _ in range(3)]
        await asyncio.sleep(0)
        release.set()
        outcomes = await asyncio.gather(*readers, return_exceptions=True)
        assert all(isinstance(o, LookupError) for o in outcomes)
        assert await snaps.get("k", scan) == 2

    asyncio.run(go())


def test_a_priority_reader_does_not_wait_for_a_queued_scan() -> None:
    async def go() -> None:
        snaps = Snapshots()
        slow = asyncio.Event()

        async def queued_scan() -> str:
            await slow.wait()
            return "queued"

        async def own_scan() -> str:
            return "own"

        waiting = asyncio.ensure_future(snaps.get("k", queued_scan))
        await asyncio.sleep(0)
        assert await snaps.get("k", own_scan, priority=True) == "own"
        assert await snaps.get("k", queued_scan) == "own"  # its fresh result now serves everyone
        slow.set()
        assert await waiting == "queued"
        # priority readers share a priority scan with each other
        snaps.invalidate()
        release = asyncio.Event()
        runs = 0

        async def prio_scan() -> str:
            nonlocal runs
            runs += 1
            await release.wait()
            return "prio"

        readers = [asyncio.ensure_future(snaps.get("k", prio_scan, priority=True)) for _ in range(5)]
        await asyncio.sleep(0)
        release.set()
        assert await asyncio.gather(*readers) == ["prio"] * 5 and runs == 1

    asyncio.run(go())


def test_lanes_take_turns() -> None:
    async def go() -> list[str]:
        order: list[str] = []
        gate = threading.Event()
        with ThreadPoolExecutor(1) as pool, ThreadPoolExecutor(1) as prio:
            lanes = FairLanes(pool, 1, prio)

            def job(name: str) -> str:
                gate.wait(10)
                order.append(name)
                return name

            flood = [
                asyncio.ensure_future(lanes.run("flooder", functools.partial(job, f"f{i}")))
                for i in range(20)
            ]
            await asyncio.sleep(0)
            other = asyncio.ensure_future(lanes.run("hypeman", lambda: job("h")))
            await asyncio.sleep(0)
            assert lanes.queued == 20  # one of the flooder's calls runs; 19 wait, and hypeman's
            # priority work runs beside the busy slot, not after the queue
            assert await asyncio.wait_for(lanes.run(None, lambda: "prio"), 5) == "prio"
            gate.set()
            await asyncio.gather(*flood, other)
        return order

    order = asyncio.run(go())
    # f0 was running and f1 had its turn before hypeman queued; then hypeman's, not after the twentieth
    assert order[:3] == ["f0", "f1", "h"], order


def test_a_failing_read_reaches_its_caller_and_frees_its_slot() -> None:
    async def go() -> None:
        with ThreadPoolExecutor(1) as pool, ThreadPoolExecutor(1) as prio:
            lanes = FairLanes(pool, 1, prio)

            def boom() -> int:
                raise ValueError("no")

            with pytest.raises(ValueError, match="no"):
                await lanes.run("a", boom)
            assert await lanes.run("a", lambda: 7) == 7

    asyncio.run(go())


def test_after_a_change_readers_wait_for_the_old_scan_instead_of_starting_beside_it() -> None:
    async def go() -> None:
        snaps = Snapshots()
        gates = [asyncio.Event() for _ in range(3)]
        running = 0
        most = 0
        n = 0

        async def scan() -> int:
            nonlocal running, most, n
            n += 1
            mine = n
            running += 1
            most = max(most, running)
            await gates[mine - 1].wait()
            running -= 1
            return mine

        first = asyncio.ensure_future(snaps.get("k", scan))
        await asyncio.sleep(0)
        snaps.invalidate()
        later = [asyncio.ensure_future(snaps.get("k", scan)) for _ in range(10)]
        await asyncio.sleep(0)
        assert n == 1  # nobody started a second scan beside the first
        gates[0].set()
        assert await first == 1
        await asyncio.sleep(0)
        gates[1].set()
        assert await asyncio.gather(*later) == [2] * 10  # one new scan for all of them, after the change
        assert most == 1

    asyncio.run(go())
