"""Moving functions to vfio-pci and back, the way the kernel wants it.

Binding one function: record its native driver and module, pick the VFIO driver the kernel intends for it
(vfio-pci, or the variant driver its `vfio_pci:` aliases name, whose module is loaded first:
`host/vfio_variants.py`), write that to `driver_override`, unbind the current driver, `drivers_probe`, then
verify that the VFIO driver took it and the group node appeared. A group is only handed over once
VFIO_GROUP_GET_STATUS says it is viable. Any failure rolls back what was done, vfio first. Restoring:
refuse while the group node or cdev is held (the unbind would block in the kernel), load the native module,
steer the probe with `driver_override`, verify the native driver took the device, clear the override.

Each kernel-changing step is announced to a `StepObserver` before and after it happens, so the registry can
journal intent and a crash at any point can be finished or rolled back. A write that misses its deadline
leaves that function `stuck` (reported in the error); the binder never writes to it again in that call,
because the kernel's device lock would make every further write hang too.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from vfiod import phases
from vfiod.core import kernel_io, kernel_support
from vfiod.core.errors import (
    DeviceBusy,
    Failed,
    IOMMUGroupConflict,
    NativeDriverNotRestored,
    VfiodError,
)
from vfiod.core.guard import GroupPlan, require_not_held, vfio_holders
from vfiod.core.system import ModuleLoader
from vfiod.host.backend import VFIO_GROUP_FLAGS_VIABLE
from vfiod.host.host import Host
from vfiod.host.pciaddr import VFIO_PCI, DriverName, PciAddress
from vfiod.host.pcifunction import read_function
from vfiod.host.vfio_variants import intended_driver
from vfiod.logevents import Action

log = logging.getLogger("vfiod.binder")


@dataclass(frozen=True)
class Step:
    """One kernel-changing write, as the journal records it."""

    pci_address: PciAddress
    action: str  # override | unbind | probe | clear-override
    from_driver: str | None
    to_driver: str | None


class StepObserver(Protocol):
    def before(self, step: Step) -> None: ...

    def after(self, step: Step, ok: bool) -> None: ...


class _NoObserver:
    def before(self, step: Step) -> None:
        pass

    def after(self, step: Step, ok: bool) -> None:
        pass


@dataclass(frozen=True)
class NativeDriver:
    """The driver a function had before vfiod touched it (None: no driver) and the module providing it."""

    driver: DriverName | None
    module: DriverName | None


@dataclass(frozen=True)
class BoundFunction:
    pci_address: PciAddress
    group: int
    role: str  # requested | companion
    native: NativeDriver
    changed: bool  # False when it was already on vfio and vfiod left it as it was


class Binder:
    def __init__(
        self,
        host: Host,
        modules: ModuleLoader,
        observer: StepObserver | None = None,
        *,
        verify_timeout: float = 5.0,
        poll_interval: float = 0.02,
    ) -> None:
        self.host = host
        self.modules = modules
        self.observer: StepObserver = observer or _NoObserver()
        self.verify_timeout = verify_timeout
        self.poll_interval = poll_interval

    # ----- binding --------------------------------------------------------------------------------------

    def bind_group(self, plan: GroupPlan) -> list[BoundFunction]:
        """Move every function of `plan` to its VFIO driver and check the group is viable; all or nothing."""
        kernel_support.require_supported(self.host)
        with phases.timed("module load"):
            self.modules.load("vfio_pci")
        done: list[BoundFunction] = []
        in_flight: tuple[PciAddress, NativeDriver] | None = None
        try:
            for addr in plan.to_bind:
                native = self.native_of(addr)
                in_flight = (addr, native)
                self._bind_one(addr, plan.group, self.vfio_driver_for(addr))
                done.append(BoundFunction(addr, plan.group, plan.roles.get(addr, "requested"), native, True))
                in_flight = None
            self._require_viable(plan.group)
        except VfiodError as e:
            undo = [(f.pci_address, f.native) for f in done if f.changed]
            if in_flight is not None:
                undo.append(in_flight)  # may be half-way: override set, native driver unbound
            self._roll_back(undo, e)
            raise
        for addr in sorted(set(plan.already_bound) | set(plan.joined)):
            native = NativeDriver(self.host.driver(addr), self.host.driver_module(addr))
            done.append(BoundFunction(addr, plan.group, plan.roles.get(addr, "companion"), native, False))
        return sorted(done, key=lambda f: f.pci_address)

    def native_of(self, addr: PciAddress) -> NativeDriver:
        return NativeDriver(self.host.driver(addr), self.host.driver_module(addr))

    def vfio_driver_for(self, addr: PciAddress) -> DriverName:
        """vfio-pci, or the variant driver the kernel's aliases pick (its module loaded now: a variant's id
        table is override-only, so nothing loads it on its own)."""
        target = intended_driver(self.host, addr)
        if target != VFIO_PCI and not self.host.driver_loaded(target):
            with phases.timed("module load"):
                self.modules.load(target.replace("-", "_"))
            log.info(
                "%s: the kernel's vfio_pci aliases pick the variant driver %s",
                addr,
                target,
                extra={"PCI_ADDRESS": addr, "ACTION": Action.BIND, "DRIVER": target},
            )
        return target

    def _bind_one(self, addr: PciAddress, group: int, target: DriverName) -> None:
        current = self.host.driver(addr)
        if read_function(self.host, addr).is_vfio_bound:
            return
        self._step(addr, "override", current, target, lambda: self.host.set_driver_override(addr, target))
        if current is not None:
            drv = current
            self._step(addr, "unbind", drv, None, lambda: self.host.unbind(addr, drv))
        self._step(addr, "probe", None, target, lambda: self.host.probe(addr, target))
        node = self.host.vfio_group_node(group)
        # The driver link is made once the VFIO driver's probe (and its VFIO registration) returned;
        # `vfio-dev/` exists only from Linux 6.1, so the group node below is the other proof.
        if not self._wait(lambda: self.host.driver(addr) == target):
            found = self.host.driver(addr)
            raise Failed(
                f"{target} did not claim {addr} (driver now: {found or 'none'}); see the kernel log "
                "(journalctl -k) for the probe error"
            )
        if not self._wait(node.exists):
            raise Failed(f"{addr} is on {target} but {self.host.logical(node)} did not appear")

    @phases.timed_call("viability")
    def _require_viable(self, group: int) -> None:
        try:
            flags = self.host.group_status(group)
        except OSError as e:
            if e.errno == errno.EBUSY:
                holders = vfio_holders(self.host, self.host.group_members(group))
                raise DeviceBusy(
                    f"IOMMU group {group} is already open: "
                    + ("; ".join(h.describe() for h in holders) or "by an unknown process"),
                    [(h.pid, h.exe) for h in holders],
                ) from e
            raise Failed(f"cannot check IOMMU group {group}: {e.strerror or e}") from e
        if not flags & VFIO_GROUP_FLAGS_VIABLE:
            blocking = [
                f"{m} ({self.host.driver(m)})"
                for m in self.host.group_members(group)
                if self.host.driver(m) is not None and not read_function(self.host, m).is_vfio_bound
            ]
            raise IOMMUGroupConflict(
                f"IOMMU group {group} is not viable after binding"
                + (f": still held by the host through {', '.join(blocking)}" if blocking else "")
            )

    def _roll_back(self, undo: list[tuple[PciAddress, NativeDriver]], cause: VfiodError) -> None:
        """Return each function to its native driver, last bound first; the kernel left any `stuck`
        function mid-write and every further write to it would hang, so those are left alone."""
        for addr, native in reversed(undo):
            if addr in cause.stuck:
                continue
            try:
                self.restore(addr, native)
                log.info(
                    "rolled back %s to %s",
                    addr,
                    native.driver or "no driver",
                    extra={"PCI_ADDRESS": addr, "ACTION": Action.ROLLBACK},
                )
            except VfiodError as e:
                log.error(
                    "rollback of %s failed: %s",
                    addr,
                    e.message,
                    extra={"PCI_ADDRESS": addr, "ACTION": Action.ROLLBACK},
                )
                cause.stuck = (*cause.stuck, *e.stuck)
                cause.message += f"; rolling back {addr} failed too: {e.message}"
                cause.args = (cause.message,)

    # ----- restoring ------------------------------------------------------------------------------------

    def restore(self, addr: PciAddress, native: NativeDriver, *, let_kernel_probe: bool = False) -> None:
        """Put a function back on its native driver (or none). Refuses with DeviceBusy, writing nothing,
        while a process holds the group node or cdev. With no native driver, `let_kernel_probe` asks the
        kernel to probe it once released (an admin's Unbind: whatever driver matches takes it)."""
        if native.driver == VFIO_PCI:
            return  # pre-bound to vfio-pci before vfiod touched it: left as it was
        current = self.host.driver(addr)
        if current == native.driver:
            if self.host.driver_override(addr) is not None:
                self._step(addr, "clear-override", current, current, self._clear(addr))
            return
        if current is not None and not read_function(self.host, addr).is_vfio_bound:
            # Someone else moved it to another driver after vfiod: not ours to undo.
            log.warning(
                "%s is on %s, not a VFIO driver: leaving it there",
                addr,
                current,
                extra={"PCI_ADDRESS": addr, "ACTION": Action.RESTORE},
            )
            return
        if current is not None:
            require_not_held(self.host, [addr], "return to the host")
        target = native.driver
        if target is not None and not self.host.driver_loaded(target):
            if native.module is None:
                raise NativeDriverNotRestored(
                    f"cannot put {addr} back on {target}: the driver is not registered and has no module "
                    "to load",
                    stuck=(addr,),
                )
            with phases.timed("module load"):
                self.modules.load(native.module)
        self._step(addr, "override", current, target, lambda: self.host.set_driver_override(addr, target))
        # Each step reads the driver again rather than trusting the first read: an earlier attempt that
        # was cut short (a killed writer, a probe the kernel finished late) may have moved it meanwhile.
        now = self.host.driver(addr)
        if now is not None and now != target:
            self._step(addr, "unbind", now, None, lambda: self.host.unbind(addr, now))
        if target is None:
            # It had no driver: the override is already cleared. Only an Unbind probes (no driver may
            # claim it, which is fine), a Detach leaves it as it was.
            if let_kernel_probe and self.host.driver(addr) is None:
                self._step(addr, "probe", None, None, lambda: self.host.probe(addr, None))
            return
        if self.host.driver(addr) != target:
            self._step(addr, "probe", None, target, lambda: self.host.probe(addr, target))
        deadline = self.host.deadlines.for_driver(target)
        ok = self._wait(lambda: self.host.driver(addr) == target, min(deadline, self.verify_timeout))
        self._step(addr, "clear-override", self.host.driver(addr), None, self._clear(addr))
        if not ok:
            found = self.host.driver(addr)
            raise NativeDriverNotRestored(
                f"{addr} did not come back to {target} (driver now: {found or 'none'}); "
                "Recover can retry once the cause is fixed (see journalctl -k)",
                stuck=(addr,),
            )

    def _clear(self, addr: PciAddress) -> Callable[[], None]:
        return lambda: self.host.set_driver_override(addr, None)

    # ----- plumbing -------------------------------------------------------------------------------------

    def _step(
        self,
        addr: PciAddress,
        action: str,
        from_driver: str | None,
        to_driver: str | None,
        write: Callable[[], None],
    ) -> None:
        step = Step(addr, action, from_driver, to_driver)
        self.observer.before(step)
        ok = False
        try:
            kernel_io.write(
                write,
                still=f"{addr} is stuck until the kernel finishes (Recover can return it once it does)",
                failed=kernel_io.refused(f"{action} of {addr} failed"),
                stuck=(addr,),
            )
            ok = True
        finally:
            self.observer.after(step, ok)

    @phases.timed_call("verify wait")
    def _wait(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        return kernel_io.wait_until(
            predicate, self.verify_timeout if timeout is None else timeout, self.poll_interval
        )
