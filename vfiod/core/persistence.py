"""The daemon-wide, reference-counted hold on the persistence units (nvidia-persistenced by default).

While any bind or unbind of a function from a configured vendor is in progress the units are stopped: the
first holder stops them (recording whether each was running), the last releaser starts again those that
were. Whether to stop is judged from the unit's real state (systemd's ActiveState), not from the journal:
a holder that finds the unit running stops it, whatever a row says. The hold is journaled in the registry
before the unit is touched, so after a crash or restart `recover()` starts again every unit a dead vfiod
left stopped; a row this process cannot update never keeps a unit stopped.

Binds come in bursts (hypeman starting several VMs one after the other), and every stop/start cycle of
nvidia-persistenced costs seconds and tears down the driver state of every GPU. So a stop already in progress
is shared (holders wait on it under the lock), and with a `linger` the last release does not start the units
at once: they stay stopped for `linger` seconds, and a bind that comes meanwhile takes the hold without a
new stop. The lingering hold keeps its row (holders 0), so a crash meanwhile is recovered like any hold;
`end_lingering()` starts them at once (the daemon's stop).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

from vfiod import phases
from vfiod.core.errors import Failed
from vfiod.core.registry import HoldRow, Registry, RegistryError
from vfiod.core.system import UnitController
from vfiod.logevents import Action, MessageId

log = logging.getLogger("vfiod.persistence")

DEFAULT_UNITS: dict[str, list[str]] = {"10de": ["nvidia-persistenced.service"]}


class PersistenceHold:
    def __init__(
        self,
        registry: Registry,
        units: UnitController,
        boot_id: str,
        units_by_vendor: Mapping[str, Sequence[str]] | None = None,
        linger: float = 0.0,
    ) -> None:
        self._registry = registry
        self._units = units
        self._boot_id = boot_id
        self.units_by_vendor = dict(units_by_vendor if units_by_vendor is not None else DEFAULT_UNITS)
        self.linger = linger  # seconds the units stay stopped after the last release (0: start at once)
        self._lock = threading.Lock()
        # The live count is this process's: unit -> holds taken and not yet released, and whether the unit
        # ran before the first of them. The registry row is the journal of it, for a restart; a row this
        # process cannot update (a full disk) never keeps a unit stopped.
        self._held: dict[str, int] = {}
        self._was_active: dict[str, bool] = {}
        self._kept: dict[str, list[str]] = {}  # PCI address -> units held while a write of it is pending
        # unit -> the timer that starts it when its linger ends (held by nobody, still stopped by us)
        self._lingering: dict[str, threading.Timer] = {}

    def units_for(self, vendors: Iterable[str]) -> list[str]:
        out: set[str] = set()
        for vendor in vendors:
            out.update(self.units_by_vendor.get(vendor.lower(), ()))
        return sorted(out)

    def all_units(self) -> list[str]:
        return sorted({u for units in self.units_by_vendor.values() for u in units})

    @property
    def in_process(self) -> int:
        with self._lock:
            return sum(self._held.values())

    @contextmanager
    def held(self, vendors: Iterable[str]) -> Iterator[list[str]]:
        units = self.units_for(vendors)
        self.acquire(units)
        try:
            yield units
        finally:
            self.release(units)

    @phases.timed_call("persistence stop")
    def acquire(self, units: Sequence[str]) -> None:
        taken: list[str] = []
        try:
            for unit in units:
                self._acquire_one(unit)
                taken.append(unit)
        except Failed:
            self.release(taken)
            raise

    def _acquire_one(self, unit: str) -> None:
        with self._lock:
            holders = self._held.get(unit, 0)
            # Judged from the unit's real state, never from a row: a row left by a failure or a crash, or
            # a unit someone started meanwhile, would otherwise leave it running during the unbind.
            active = self._units.is_active(unit)
            lingering = self._lingering.pop(unit, None)
            if lingering is not None:
                lingering.cancel()
                if not active:
                    log.info(
                        "%s is still stopped from the last bind/unbind: held again without a new stop",
                        unit,
                        extra={"ACTION": Action.HOLD_UNITS, "UNIT": unit},
                    )
            if (holders or lingering is not None) and not active:
                self._held[unit] = holders + 1
                self._journal(unit, holders + 1)
                return
            row = self._registry.get_hold(unit)
            was_active = active or self._was_active.get(unit, False) or (row is not None and row.was_active)
            # Journal first: if vfiod dies between here and the stop, recovery starts the unit again. A
            # registry that cannot take it fails the call here, before anything was stopped.
            self._registry.put_hold(HoldRow(unit, was_active, holders + 1, self._boot_id))
            self._held[unit] = holders + 1
            self._was_active[unit] = was_active
            if not active:
                return
            try:
                self._units.stop(unit)
            except Exception as e:
                self._held[unit] = holders
                if not holders:
                    del self._held[unit]
                    self._forget(unit)
                raise Failed(f"could not stop {unit} before touching the GPU driver: {e}") from e
            log.info("stopped %s for a bind/unbind", unit, extra={"ACTION": Action.HOLD_UNITS, "UNIT": unit})

    @phases.timed_call("persistence start")
    def release(self, units: Sequence[str]) -> None:
        for unit in reversed(units):
            with self._lock:
                holders = self._held.get(unit, 0) - 1
                if holders > 0:
                    self._held[unit] = holders
                    self._journal(unit, holders)
                    continue
                self._held.pop(unit, None)
                if not (self.linger > 0 and self._linger(unit)):
                    self._end(unit)

    def _linger(self, unit: str) -> bool:
        """Keep `unit` stopped for `linger` seconds after its last release (under the lock); False when
        there is nothing to linger for (it was not running before the hold)."""
        row = self._read_row(unit)
        if not (self._was_active.get(unit, False) or (row is not None and row.was_active)):
            return False
        self._journal(unit, 0)
        timer = threading.Timer(self.linger, self._linger_ended, args=(unit,))
        timer.daemon = True
        self._lingering[unit] = timer
        timer.start()
        log.info(
            "keeping %s stopped for %g s in case another bind/unbind follows",
            unit,
            self.linger,
            extra={"ACTION": Action.HOLD_UNITS, "UNIT": unit},
        )
        return True

    def _linger_ended(self, unit: str) -> None:
        with self._lock:
            if self._lingering.pop(unit, None) is None or self._held.get(unit):
                return  # a bind took it meanwhile (its release lingers or starts it again)
            self._end(unit)

    def end_lingering(self) -> list[str]:
        """Start now every unit whose linger has not ended (vfiod is stopping); return their names."""
        ended = []
        with self._lock:
            for unit, timer in list(self._lingering.items()):
                timer.cancel()
                del self._lingering[unit]
                if not self._held.get(unit):
                    self._end(unit)
                    ended.append(unit)
        return ended

    def _end(self, unit: str) -> None:
        """Held by nobody any more: start the unit again if it ran before the hold."""
        row = self._read_row(unit)
        was_active = self._was_active.pop(unit, False) or (row is not None and row.was_active)
        self._start_if(unit, was_active)

    def keep_for(self, pci_address: str, units: Sequence[str]) -> None:
        """Hold `units` until `release_kept(pci_address)`: a write to that function is still inside the
        kernel (a bind/unbind in progress), and restarting nvidia-persistenced now would hold the GPU it
        unbinds."""
        self.acquire(units)
        with self._lock:
            self._kept.setdefault(pci_address, []).extend(units)

    def release_kept(self, pci_address: str) -> None:
        with self._lock:
            units = self._kept.pop(pci_address, [])
        self.release(units)

    def release_stale(self) -> list[str]:
        """Start units whose hold no call of this process owns any more (left by a crash or a failure)."""
        if self.in_process > 0:
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
        """Start again every unit a previous run (or a failed call) left held; return their names."""
        started: list[str] = []
        with self._lock:
            for row in self._registry.all_holds():
                if self._held.get(row.unit) or row.unit in self._lingering:
                    continue  # held by a call of this process right now, or lingering after one
                if self._start_if(row.unit, row.was_active):
                    started.append(row.unit)
        return started

    def _start_if(self, unit: str, was_active: bool) -> bool:
        started = False
        if was_active and not self._units.is_active(unit):
            try:
                self._units.start(unit)
                started = True
                log.info("started %s again", unit, extra={"ACTION": Action.RELEASE_UNITS, "UNIT": unit})
            except Exception as e:
                # Keep the row: the next release or restart tries again rather than forgetting the unit.
                log.error(
                    "could not start %s again: %s",
                    unit,
                    e,
                    extra={
                        "UNIT": unit,
                        "ACTION": Action.RELEASE_UNITS,
                        "MESSAGE_ID": MessageId.UNIT_NOT_RESTARTED,
                    },
                )
                return False
        self._forget(unit)
        return started

    def _read_row(self, unit: str) -> HoldRow | None:
        try:
            return self._registry.get_hold(unit)
        except RegistryError as e:
            log.warning("cannot read the hold on %s: %s", unit, e.message, extra={"UNIT": unit})
            return None

    def _journal(self, unit: str, holders: int) -> None:
        """Best effort: the count is this process's; the row only has to say the unit is held."""
        try:
            row = self._registry.get_hold(unit)
            if row is not None:
                self._registry.put_hold(HoldRow(unit, row.was_active, holders, row.boot_id))
        except RegistryError as e:
            log.warning("cannot record the hold on %s: %s", unit, e.message, extra={"UNIT": unit})

    def _forget(self, unit: str) -> None:
        try:
            self._registry.delete_hold(unit)
        except RegistryError as e:
            # The unit runs as it should; the stale row is judged against its real state by the next
            # acquire and dropped at the next start.
            log.warning("cannot drop the hold row of %s: %s", unit, e.message, extra={"UNIT": unit})
