"""Start-up in two halves, and the devices still being recovered between them: `begin` (quick, before the
daemon takes its bus name) finds the operations a restart interrupted; until `finish` has dealt with each,
its devices answer `Recovering` to any call (`require_settled`). What recovery does is in `recovery`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence

from vfiod.core import recovery
from vfiod.core.context import Report
from vfiod.core.deps import CoreDeps
from vfiod.core.errors import Recovering
from vfiod.core.registry import DeviceRow
from vfiod.logevents import Action, MessageId

log = logging.getLogger("vfiod.manager")


class Startup:
    def __init__(self, deps: CoreDeps) -> None:
        self._deps = deps
        self._lock = threading.Lock()
        self.devices: dict[str, str] = {}  # device id -> address: an interrupted operation is being finished

    def is_recovering(self, device_id: str) -> bool:
        with self._lock:
            return device_id in self.devices

    def begin(self) -> tuple[Report, list[recovery.Operation]]:
        report = Report()
        operations = recovery.plan(self._deps, report)
        for finding in report.findings:
            log.warning(
                "startup: %s",
                finding,
                extra={"ACTION": Action.STARTUP, "MESSAGE_ID": MessageId.STARTUP_REPAIRED},
            )
        with self._lock:
            self.devices = recovery.devices_of(self._deps, operations)
        return report, operations

    def finish(
        self,
        report: Report,
        operations: Sequence[recovery.Operation],
        progress: Callable[[int, int], None] | None = None,
    ) -> Report:
        total = len(self.devices)

        def done(operation: recovery.Operation) -> None:
            finished = recovery.devices_of(self._deps, [operation])
            with self._lock:
                for device_id in finished:
                    self.devices.pop(device_id, None)
                left = len(self.devices)
            self._deps.changed(finished)
            if progress is not None:
                progress(total - left, total)

        try:
            recovery.finish(self._deps, report, operations, done)  # it logs each finding as it comes
        finally:
            with self._lock:
                self.devices = {}
        return report

    def require_settled(self, rows: Iterable[DeviceRow]) -> None:
        """`Recovering` for a device whose interrupted operation (from before a restart) is being finished."""
        with self._lock:
            busy = [r for r in rows if r.id in self.devices]
            left = len(self.devices)
        if busy:
            names = ", ".join(f"{r.name} ({r.pci_address})" for r in busy)
            raise Recovering(
                f"vfiod is still finishing the operation on {names} that its restart interrupted "
                f"({left} device{'s' if left != 1 else ''} left to recover); call again in a few seconds"
            )
