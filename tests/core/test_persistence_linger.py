"""The persistence hold's linger: after the last release the units stay stopped for `linger` seconds, a
bind that comes meanwhile shares the stop (one stop/start cycle for both), the row stays journaled while
they linger (a crash then is recovered like any hold), and the daemon's stop ends a linger at once."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vfiod.core.persistence import PersistenceHold
from vfiod.core.registry import Registry

UNIT = "nvidia-persistenced.service"


class Units:
    """systemd's units as a set of running names, with every stop and start recorded."""

    def __init__(self) -> None:
        self.running = {UNIT}
        self.calls: list[tuple[str, str]] = []
        self.started = threading.Event()

    def is_active(self, unit: str) -> bool:
        return unit in self.running

    def stop(self, unit: str) -> None:
        self.calls.append(("stop", unit))
        self.running.discard(unit)

    def start(self, unit: str) -> None:
        self.calls.append(("start", unit))
        self.running.add(unit)
        self.started.set()


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    with Registry.open(tmp_path / "state") as r:
        yield r


def hold(registry: Registry, units: Units, linger: float) -> PersistenceHold:
    return PersistenceHold(registry, units, "boot-1", {"10de": [UNIT]}, linger)


def lingering(registry: Registry, units: Units) -> PersistenceHold:
    """A hold with a 30 s linger whose one bind has just ended: the unit stopped, lingering."""
    h = hold(registry, units, 30.0)
    with h.held(["10de"]):
        pass
    return h


def test_without_a_linger_the_last_release_starts_the_unit_at_once(registry: Registry) -> None:
    units = Units()
    h = hold(registry, units, 0.0)
    with h.held(["10de"]):
        assert not units.is_active(UNIT)
    assert units.calls == [("stop", UNIT), ("start", UNIT)]
    assert registry.get_hold(UNIT) is None


def shared_holds(caplog: pytest.LogCaptureFixture) -> int:
    return sum("held again without a new stop" in r.getMessage() for r in caplog.records)


def test_a_bind_during_the_linger_shares_the_stop(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vfiod.persistence")
    units = Units()
    h = lingering(registry, units)
    # lingering: still stopped, the row still says it was running (a crash now is recovered)
    assert not units.is_active(UNIT) and units.calls == [("stop", UNIT)]
    row = registry.get_hold(UNIT)
    assert row is not None and row.was_active and row.holders == 0
    with h.held(["10de"]):
        assert not units.is_active(UNIT)
    assert units.calls == [("stop", UNIT)] and shared_holds(caplog) == 1
    # the daemon stops: the linger ends now, and the unit runs again
    assert h.end_lingering() == [UNIT]
    assert units.calls == [("stop", UNIT), ("start", UNIT)] and units.is_active(UNIT)
    assert registry.get_hold(UNIT) is None
    assert h.end_lingering() == []


def test_the_linger_ends_by_itself(registry: Registry) -> None:
    units = Units()
    h = hold(registry, units, 0.2)
    began = time.monotonic()
    with h.held(["10de"]):
        pass
    assert units.started.wait(10)
    assert time.monotonic() - began >= 0.2
    assert units.calls == [("stop", UNIT), ("start", UNIT)]
    assert registry.get_hold(UNIT) is None


def test_a_unit_started_by_someone_during_the_linger_is_stopped_again(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vfiod.persistence")
    units = Units()
    h = lingering(registry, units)
    units.running.add(UNIT)  # an admin's systemctl start meanwhile
    with h.held(["10de"]):
        assert not units.is_active(UNIT)
    assert units.calls == [("stop", UNIT), ("stop", UNIT)] and shared_holds(caplog) == 0
    h.end_lingering()
    assert units.is_active(UNIT)


def test_a_unit_that_was_not_running_does_not_linger(registry: Registry) -> None:
    units = Units()
    units.running.clear()
    h = lingering(registry, units)
    assert units.calls == [] and registry.get_hold(UNIT) is None
    assert h.end_lingering() == []


def test_recovery_leaves_a_lingering_unit_to_its_timer(registry: Registry) -> None:
    units = Units()
    h = lingering(registry, units)
    assert h.release_stale() == [] and not units.is_active(UNIT)
    # a crash while it lingers: the next vfiod's recovery starts it from the row
    after_crash = hold(registry, units, 30.0)
    assert after_crash.recover() == [UNIT] and units.is_active(UNIT)
    h.end_lingering()  # the dead process's timer, for the test's sake: nothing left to start
    assert units.calls == [("stop", UNIT), ("start", UNIT)]
