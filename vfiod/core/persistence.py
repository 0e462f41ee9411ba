"""The daemon-wide, reference-counted hold on the persistence units (nvidia-persistenced by default).

While any bind or unbind of a function from a configured vendor is in progress the units are stopped: the
first holder stops them (recording whether each was running), the last releaser starts again those that
were. The hold is journaled in the registry before the unit is touched, so after a crash or restart
`recover()` starts again every unit a dead vfiod left stopped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

from vfiod.core.errors import Failed
from vfiod.core.registry import HoldRow, Registry
from vfiod.core.system import UnitController

log = logging.getLogger("vfiod.persistence")

DEFAULT_UNITS: dict[str, list[str]] = {"10de": ["nvidia-persistenced.service"]}


class PersistenceHold:
    def __init__(
        self,
        registry: Registry,
        units: UnitController,
        boot_id: str,
        units_by_vendor: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self._registry = registry
        self._units = units
        self._boot_id = boot_id
        self.units_by_vendor = dict(units_by_vendor if units_by_vendor is not None else DEFAULT_UNITS)
        self._lock = threading.Lock()
        self._in_process = 0  # holds taken by this process and not yet released

    def units_for(self, vendors: Iterable[str]) -> list[str]:
        out: set[str] = set()
        for vendor in vendors:
            out.update(self.units_by_vendor.get(vendor.lower(), ()))
        return sorted(out)

    def all_units(self) -> list[str]:
        return sorted({u for units in self.units_by_vendor.values() for u in units})

    @contextmanager
    def held(self, vendors: Iterable[str]) -> Iterator[list[str]]:
        units = self.units_for(vendors)
        self.acquire(units)
        try:
            yield units
        finally:
            self.release(units)

    def acquire(self, units: Sequence[str]) -> None:
        with self._lock:
            self._in_process += len(units)
        taken: list[str] = []
        try:
            for unit in units:
                self._acquire_one(unit)
                taken.append(unit)
        except Failed:
            with self._lock:
                self._in_process -= len(units) - len(taken)
            self.release(taken)
            raise

    def _acquire_one(self, unit: str) -> None:
        with self._lock:
            row = self._registry.get_hold(unit)
            if row is not None:
                self._registry.put_hold(HoldRow(unit, row.was_active, row.holders + 1, row.boot_id))
                return
            was_active = self._units.is_active(unit)
            # Journal first: if vfiod dies between here and the stop, recovery starts the unit again.
            self._registry.put_hold(HoldRow(unit, was_active, 1, self._boot_id))
            if not was_active:
                return
            try:
                self._units.stop(unit)
            except Exception as e:
                self._registry.delete_hold(unit)
                raise Failed(f"could not stop {unit} before touching the GPU driver: {e}") from e
            log.info("stopped %s for a bind/unbind", unit, extra={"ACTION": "hold-units", "UNIT": unit})

    def release(self, units: Sequence[str]) -> None:
        for unit in reversed(units):
            with self._lock:
                self._in_process -= 1
                row = self._registry.get_hold(unit)
                if row is None:
                    continue
                if row.holders > 1:
                    self._registry.put_hold(HoldRow(unit, row.was_active, row.holders - 1, row.boot_id))
                    continue
                self._start_if_was_active(row)

    def release_stale(self) -> list[str]:
        """Start units whose hold no call of this process owns any more (left by a crash)."""
        with self._lock:
            if self._in_process > 0:
                return []
        return self.recover()

    def drop_other_boots(self) -> list[str]:
        """After a reboot a unit's own enablement decides whether it runs: forget older holds."""
        dropped = []
        with self._lock:
            for row in self._registry.all_holds():
                if row.boot_id != self._boot_id:
                    self._registry.delete_hold(row.unit)
                    dropped.append(row.unit)
        return dropped

    def recover(self) -> list[str]:
        """Start again every unit a previous run left held; return their names."""
        started: list[str] = []
        with self._lock:
            for row in self._registry.all_holds():
                if self._start_if_was_active(row):
                    started.append(row.unit)
        return started

    def _start_if_was_active(self, row: HoldRow) -> bool:
        started = False
        if row.was_active:
            try:
                self._units.start(row.unit)
                started = True
                log.info("started %s again", row.unit, extra={"ACTION": "release-units", "UNIT": row.unit})
            except Exception as e:
                # Keep the row: the next release or restart tries again rather than forgetting the unit.
                log.error("could not start %s again: %s", row.unit, e, extra={"UNIT": row.unit})
                return False
        self._registry.delete_hold(row.unit)
        return started
