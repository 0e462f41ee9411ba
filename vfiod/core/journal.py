"""The intent journal as the binder sees it: one `Operation` per Attach/Detach/Bind/... call writes an intent
row before each kernel step and clears it after, so a crash at any point can be finished or rolled back.

Operation-level intents (`attach`, `detach`, ...) name each function with its native driver and module,
so recovery needs nothing else to put a function back. Step-level intents (`override`, `unbind`, `probe`,
`clear-override`, `grant`) say exactly which write may or may not have happened.

For the crash tests, `VFIOD_TEST_CRASH_AT=<operation>:<point>[#n]` (e.g. `attach:probe#2`, the second probe
of an Attach) makes the process SIGKILL itself just before that step or checkpoint, and
`VFIOD_TEST_TRACE_POINTS=<file>` appends the name of every point passed to that file (how the crash loop
finds them all); both are read only when `VFIOD_TEST_HOOKS=1` is also set, so a production daemon never
looks at them.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal

from vfiod.core.binder import Step
from vfiod.core.registry import Registry, RegistryError
from vfiod.host.backend import NodeOwner
from vfiod.logevents import Action

log = logging.getLogger("vfiod.journal")


def _crash_point() -> str | None:
    if os.environ.get("VFIOD_TEST_HOOKS") != "1":
        return None
    return os.environ.get("VFIOD_TEST_CRASH_AT") or None


def _trace_file() -> str | None:
    if os.environ.get("VFIOD_TEST_HOOKS") != "1":
        return None
    return os.environ.get("VFIOD_TEST_TRACE_POINTS") or None


class Operation:
    """The journal of one manager call; also the binder's StepObserver."""

    def __init__(self, registry: Registry, boot_id: str, kind: str) -> None:
        self.registry = registry
        self.boot_id = boot_id
        self.kind = kind
        self.id = f"{kind}-{secrets.token_hex(6)}"
        self._open: dict[Step, int] = {}
        self._crash_at = _crash_point()
        self._trace = _trace_file()
        self._seen: dict[str, int] = {}
        self.devices: list[str] = []  # the registered devices this operation moves, in journal order
        # Set once the registry failed under this operation: from then on its steps only go back toward
        # the native drivers (a rollback, or the rest of a restore), and go on without step intents the
        # registry cannot take. The operation-level intents written before still let start-up finish it.
        self.degraded = False

    def checkpoint(self, point: str) -> None:
        """A named moment of the operation (a test may crash the process here)."""
        if self._crash_at is None and self._trace is None:
            return
        self._seen[point] = self._seen.get(point, 0) + 1
        name = f"{self.kind}:{point}"
        if self._trace is not None:
            with open(self._trace, "a", encoding="utf-8") as f:
                f.write(f"{name}#{self._seen[point]}\n")
        if self._crash_at in (name, f"{name}#{self._seen[point]}"):
            os.kill(os.getpid(), signal.SIGKILL)

    def function(
        self, device_id: str, pci_address: str, group: int, native_driver: str, native_module: str, to: str
    ) -> int:
        """Record that this operation moves one function (call inside the transaction that changes its
        state)."""
        if device_id and device_id not in self.devices:
            self.devices.append(device_id)
        return self.registry.journal_function(
            action=self.kind,
            boot_id=self.boot_id,
            operation=self.id,
            device_id=device_id,
            pci_address=pci_address,
            iommu_group=group,
            from_driver=native_driver,
            native_module=native_module,
            to_driver=to,
        )

    def grant(self, group: int, previous: NodeOwner) -> int:
        """Record that /dev/vfio/<group> is about to be handed over; `previous` is its owner and mode now."""
        return self.registry.journal_grant(
            boot_id=self.boot_id, operation=self.id, iommu_group=group, node_prev=previous
        )

    def attribute(self, pci_address: str, attribute: str, value: str) -> int:
        """Record that this operation is about to write `value` to a device attribute (such as a PF's
        sriov_numvfs); it stays open until the operation finishes."""
        return self.registry.journal_write(
            action=attribute,
            boot_id=self.boot_id,
            operation=self.id,
            pci_address=pci_address,
            from_driver="",
            to_driver="",
            value=value,
        )

    def finish(self) -> None:
        """Clear every intent of this operation and settle every device it moved: any intent an earlier
        operation left open on them is closed too, and their generation moves past it, so start-up recovery
        can never replay it over this result (call inside the transaction that records the result)."""
        for intent in self.registry.open_intents():
            if intent.operation == self.id:
                self.registry.clear_intent(intent.id)
        for device_id in self.devices:
            self.settle(device_id)

    def settle(self, device_id: str) -> None:
        closed = self.registry.settle_intents(device_id)
        earlier = sorted({i.operation for i in closed if i.operation != self.id})
        if earlier:
            log.info(
                "%s superseded the open intents of %s on device %s",
                self.id,
                ", ".join(earlier),
                device_id,
                extra={"ACTION": Action.JOURNAL_SUPERSEDE, "DEVICE_ID": device_id},
            )

    # StepObserver
    def before(self, step: Step) -> None:
        self.checkpoint(step.action)
        try:
            self._open[step] = self.registry.journal_write(
                action=step.action,
                boot_id=self.boot_id,
                operation=self.id,
                pci_address=step.pci_address,
                from_driver=step.from_driver or "",
                to_driver=step.to_driver or "",
            )
        except RegistryError as e:
            if not self.degraded:
                self.degraded = True
                raise  # journal first: this step does not happen; what follows is the way back
            log.warning(
                "%s: %s of %s goes on without a step intent: %s",
                self.id,
                step.action,
                step.pci_address,
                e.message,
                extra={"ACTION": Action.JOURNAL, "PCI_ADDRESS": step.pci_address},
            )

    def after(self, step: Step, ok: bool) -> None:
        intent = self._open.pop(step, None)
        if intent is not None and ok:
            try:
                self.registry.clear_intent(intent)
            except RegistryError:
                if not self.degraded:
                    self.degraded = True
                    raise
        # A failed step keeps its intent until the operation finishes or rolls back: if vfiod dies first,
        # recovery knows that write may have happened.
