"""Re-reading registered devices the kernel changed without a vfiod call: another tool bound or unbound one
(a uevent), or a write of ours that missed its deadline came back after all; and re-checking the group
nodes vfiod granted after udev may have re-applied its rules to them (a `vfio` uevent). A device in the
middle of a vfiod operation is left to that operation: a refresh never waits behind a call working on the
group (it runs when that call lets go, and repeated uevents merge into one).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from vfiod.core import grants, recovery
from vfiod.core.deps import CoreDeps
from vfiod.core.devstate import group_of
from vfiod.host.pciaddr import PciAddress
from vfiod.host.writes import WriteRecord

log = logging.getLogger("vfiod.manager")


class Refreshes:
    def __init__(self, deps: CoreDeps, recovering: Callable[[str], bool]) -> None:
        self._deps = deps
        self._recovering = recovering  # device id -> being finished after a restart (re-read when done)
        self._lock = threading.Lock()
        self._deferred: dict[int, set[str]] = {}  # group -> addresses a uevent asked to re-read
        self._deferred_grants: set[int] = set()  # groups whose node a uevent asked to re-check

    def device(self, pci_address: str) -> None:
        """Re-read one registered device's state from the kernel."""
        deps = self._deps
        try:
            addr = PciAddress.parse(pci_address)
        except ValueError:
            return
        row = deps.registry.by_pci_address(addr)
        if row is None or self._recovering(row.id):
            return
        group = group_of(deps, row)
        with deps.locks.try_hold([group]) as held:
            if not held:
                with self._lock:
                    self._deferred.setdefault(group, set()).add(str(addr))
                return
            stored = deps.registry.get_device(row.id)
            if stored is None or stored.state in ("binding", "releasing"):
                return
            before = stored.state
            recovery.refresh_one(deps, stored)
            after = deps.registry.get_device(row.id)
        if after is not None and after.state != before:
            deps.changed([row.id])

    def grants(self, groups: Iterable[int] | None = None) -> list[str]:
        """A `vfio` uevent (udev may have re-applied its rules to a group node): re-check and re-apply the
        grants of `groups`, every attached group by default (core/grants.py); a group a call holds is
        re-checked when the call lets go of it."""
        findings, busy = grants.recheck(self._deps, groups)
        with self._lock:
            self._deferred_grants |= busy
        return findings

    def run_deferred(self, groups: set[int]) -> None:
        """The groups' locks were let go: the refreshes that waited for them run now."""
        with self._lock:
            due = [a for g in groups for a in sorted(self._deferred.pop(g, ()))]
            nodes = self._deferred_grants & groups
            self._deferred_grants -= nodes
        if nodes:
            try:
                self.grants(nodes)
            except Exception:
                log.exception("deferred grant check of groups %s failed", sorted(nodes))
        for addr in due:
            try:
                self.device(addr)
            except Exception:
                log.exception("deferred refresh of %s failed", addr)

    def late_write(self, record: WriteRecord) -> None:
        """A write that missed its deadline finished after all: move the device to its real state."""
        deps = self._deps
        if not record.late or record.pci_address is None:
            return
        if not deps.host.pending_writes(PciAddress.parse(record.pci_address)):
            deps.hold.release_kept(record.pci_address)
        row = deps.registry.by_pci_address(record.pci_address)
        if row is None:
            return
        # This runs on the thread of the write that came back late; the call that issued it has long
        # answered Timeout and let go of the group, so waiting for the group here waits for no one of ours.
        with deps.locks.hold([group_of(deps, row)]):
            stored = deps.registry.get_device(row.id)
            if stored is None:
                return
            recovery.refresh_one(deps, stored)
        deps.changed([row.id])
