"""How an operation ends after a failure: every device it touched is recorded as what the kernel shows
(`stuck` where a write is still inside the kernel, whose persistence hold is kept until it returns), and
its intents are closed, so nothing is left `binding` or `releasing`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from vfiod.core import eventlog
from vfiod.core.deps import CoreDeps
from vfiod.core.devstate import settled_state
from vfiod.core.errors import VfiodError
from vfiod.core.journal import Operation
from vfiod.core.registry import DeviceRow, RegistryError
from vfiod.host.pciaddr import PciAddress
from vfiod.logevents import Action

log = logging.getLogger("vfiod.manager")


def settle(deps: CoreDeps, op: Operation, rows: Iterable[DeviceRow], failure: VfiodError) -> None:
    """After `failure`: every touched device's state is what the kernel shows, `stuck` (logged as an
    error) where the kernel left it mid-write; the operation's intents are cleared. If the registry cannot
    take that (it is what failed), the intents stay and start-up settles the devices."""
    rows = list(rows)
    stuck = set(failure.stuck)
    for row in rows:
        if str(row.pci_address) in stuck:
            att = deps.registry.attachment_of_device(row.id)
            instance = att.instance_id if att is not None else ""
            eventlog.stuck(op.id, str(row.pci_address), row.name, failure.message, instance)
    try:
        _record_settled(deps, op, rows, stuck)
    except RegistryError as e:
        log.warning(
            "%s: the registry could not record what the kernel now shows (%s); the next start finishes "
            "the bookkeeping",
            op.id,
            e.message,
            extra={"ACTION": Action.SETTLE},
        )
    finally:
        deps.changed(r.id for r in rows)
    deps.hold.release_stale()


def _record_settled(deps: CoreDeps, op: Operation, rows: list[DeviceRow], stuck_set: set[str]) -> None:
    with deps.registry.transaction():
        for row in rows:
            fresh = deps.registry.get_device(row.id)
            if fresh is None:
                continue
            deps.registry.update_device(row.id, **settled_state(deps, fresh, row.pci_address in stuck_set))
        if not stuck_set:
            op.finish()
        else:
            # Keep the intents of stuck functions: recovery must know a write may still land.
            for intent in deps.registry.open_intents():
                if intent.operation == op.id and intent.pci_address not in stuck_set:
                    deps.registry.clear_intent(intent.id)
        for row in rows:
            if str(row.pci_address) not in stuck_set:
                op.settle(row.id)  # what the kernel shows is final for it: no older intent stays open


def keep_hold_for_stuck(deps: CoreDeps, stuck: Iterable[str], rows: Mapping[PciAddress, DeviceRow]) -> None:
    """A write still pending in the kernel is a bind/unbind in progress: the persistence units stay
    stopped until it returns (restarting nvidia-persistenced now would hold the GPU it unbinds)."""
    for addr in stuck:
        row = rows.get(PciAddress.parse(addr))
        if row is None or not deps.host.pending_writes(row.pci_address):
            continue
        deps.hold.keep_for(str(row.pci_address), deps.hold.units_for([row.vendor_id]))
