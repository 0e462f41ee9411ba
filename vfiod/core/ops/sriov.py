"""SetVirtualFunctions: enabling and disabling a physical function's SR-IOV virtual functions, and finishing
it at start-up when a crash interrupted it.

The kernel's rules (drivers/pci/iov.c sriov_numvfs_store; docs/kernel-rules.md, SR-IOV): the PF's driver
does the work (no driver, or one without `sriov_configure`: ENOENT), the count is at most `sriov_totalvfs`
(ERANGE), a new non-zero count needs 0 first (EBUSY), and disabling removes every VF, each unbound from its
driver, which for vfio-pci waits until the VF's user lets go. So nothing is written while a VF that would go
away is attached, held, in use on the host or host-critical. `sriov_drivers_autoprobe` is written first
(default off: new VFs stay driverless until they are passed through).

Journal: before the first write the operation records, on the PF, the autoprobe value and the count it
sets; both stay open until it ends. Start-up reads the PF: the target count means it was done; 0 while the
target is not (the old VFs were removed, the new count never written) means it is finished now; any other
count means nothing had changed yet.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from vfiod.core import guard, kernel_io
from vfiod.core.context import Report
from vfiod.core.deps import CoreDeps
from vfiod.core.devstate import require_no_pending
from vfiod.core.errors import DeviceNotFound, Failed, HostCritical, InUse, InvalidArgument, VfiodError
from vfiod.core.hostcritical import host_critical
from vfiod.core.journal import Operation
from vfiod.core.registry import IntentRow
from vfiod.host.errors import SysfsWriteError
from vfiod.host.pciaddr import DriverName, PciAddress
from vfiod.host.pcifunction import PciFunction, read_function
from vfiod.logevents import Action

log = logging.getLogger("vfiod.manager")

NUMVFS = "sriov_numvfs"
AUTOPROBE = "sriov_drivers_autoprobe"
ATTRIBUTES = frozenset({NUMVFS, AUTOPROBE})
MAX_VFS = 0xFFFF  # sriov_numvfs_store parses a u16


def set_virtual_functions(
    deps: CoreDeps, pf: PciAddress, count: int, *, autoprobe: bool, wait: float
) -> list[PciAddress]:
    """Give `pf` exactly `count` VFs (probed by host drivers only if `autoprobe`) and return them, once each
    is on the bus with its IOMMU group. Runs under the locks of the PF's group and its current VFs' groups."""
    for _ in range(3):
        fn = physical_function(deps, pf, count)
        groups = _groups(deps, fn)
        with deps.locks.hold(groups):
            fn = physical_function(deps, pf, count)
            if _groups(deps, fn) != groups:
                continue  # another tool changed the VFs between the two reads: take the right locks
            return _apply(deps, fn, count, autoprobe, wait)
    raise Failed(f"the virtual functions of {pf} keep changing under vfiod; call again")


def physical_function(deps: CoreDeps, pf: PciAddress, count: int) -> PciFunction:
    """The PF as the kernel shows it now, if `count` VFs can be asked of it at all."""
    fn = read_function(deps.host, pf)
    if not fn.present:
        raise DeviceNotFound(f"no PCI device {pf} on this host")
    if fn.physfn is not None:
        raise InvalidArgument(
            f"{pf} is a virtual function of {fn.physfn}; virtual functions are set on the physical function"
        )
    total = fn.sriov_totalvfs
    if not total:
        raise InvalidArgument(f"{pf} has no SR-IOV capability (the kernel shows no sriov_totalvfs)")
    if count > total:
        raise InvalidArgument(f"{pf} supports at most {total} virtual functions, not {count}")
    if fn.is_vfio_bound:
        raise InUse(f"{pf} is on {fn.driver}: it is passed through, and its VFs belong to its user")
    if fn.driver is None:
        raise Failed(
            f"{pf} has no driver: a physical function's VFs are enabled by its driver; bind its native "
            "driver first"
        )
    return fn


def _groups(deps: CoreDeps, fn: PciFunction) -> set[int]:
    found = [fn.iommu_group, *(deps.host.iommu_group(vf) for vf in fn.virtfns)]
    return {g for g in found if g is not None}


def _apply(deps: CoreDeps, fn: PciFunction, count: int, autoprobe: bool, wait: float) -> list[PciAddress]:
    pf, driver, now = fn.address, fn.driver, fn.sriov_numvfs or 0
    changing = count != now
    leaving = list(fn.virtfns) if changing else []
    require_no_pending(deps, [pf, *leaving])
    if leaving:
        require_free(deps, pf, leaving)
    if not changing and fn.sriov_autoprobe == autoprobe:
        return list(fn.virtfns)
    op = Operation(deps.registry, deps.boot_id, "sriov")
    op.attribute(str(pf), AUTOPROBE, _flag(autoprobe))
    if changing:
        op.attribute(str(pf), NUMVFS, str(count))
    try:
        if fn.sriov_autoprobe != autoprobe:
            _write(op, pf, AUTOPROBE, lambda: deps.host.set_sriov_autoprobe(pf, autoprobe))
        if changing and now:
            _write(op, pf, "disable", lambda: deps.host.set_sriov_numvfs(pf, 0, driver))
        if changing and count:
            _write(op, pf, "enable", lambda: deps.host.set_sriov_numvfs(pf, count, driver))
        vfs = wait_for_vfs(deps, pf, count, wait)
        op.checkpoint("vfs-present")
    finally:
        op.finish()
    log.info(
        "%s has %d virtual function%s%s",
        pf,
        count,
        "" if count == 1 else "s",
        f": {', '.join(vfs)}" if vfs else "",
        extra={"ACTION": Action.SET_VIRTUAL_FUNCTIONS, "PCI_ADDRESS": str(pf), "VF_COUNT": count},
    )
    return vfs


def require_free(deps: CoreDeps, pf: PciAddress, vfs: Sequence[PciAddress]) -> None:
    """Nothing may use a VF that disabling would remove: no attachment, no holder of its VFIO nodes, no
    host process on its native nodes, no host-critical use (a mounted namespace, the default route)."""
    for vf in vfs:
        row = deps.registry.by_pci_address(vf)
        att = deps.registry.attachment_of_device(row.id) if row is not None else None
        if att is not None:
            raise InUse(
                f"{vf}, a virtual function of {pf}, is attached to instance {att.instance_id!r} (uid "
                f"{att.owner_uid}); detach it before changing the number of VFs"
            )
    guard.require_not_held(deps.host, vfs, f"remove the virtual functions of {pf}:")
    guard.require_not_in_use(deps.host, vfs, ())
    critical = host_critical(deps.host)
    for vf in vfs:
        reason = critical.get(vf)
        if reason:
            raise HostCritical(
                f"{vf}, a virtual function of {pf}, {reason}; changing the number of VFs would remove it"
            )


def _flag(on: bool) -> str:
    return "1" if on else "0"


def _write(op: Operation, pf: PciAddress, point: str, act: Callable[[], None]) -> None:
    op.checkpoint(point)
    kernel_io.write(
        act,
        still=f"{pf}'s driver is still working on it, and every write to {pf} is refused until it is done",
        failed=lambda e: Failed(f"{_what(e)}: {e}"),
    )


def _what(e: SysfsWriteError) -> str:
    if e.path.endswith(NUMVFS) and e.errname == "ENOENT":
        return "the physical function's driver does not configure SR-IOV through sysfs"
    if e.path.endswith(NUMVFS) and e.value != "0":
        return "the driver could not enable the virtual functions (the physical function now has none)"
    return "the kernel refused the write"


def wait_for_vfs(deps: CoreDeps, pf: PciAddress, count: int, wait: float) -> list[PciAddress]:
    """The PF's VFs once `count` of them are on the bus, each with its IOMMU group when the PF has one
    (the kernel adds them inside the write; this only covers a kernel or simulator that is slower)."""

    def ready() -> bool:
        fn = read_function(deps.host, pf)
        vfs = fn.virtfns
        grouped = fn.iommu_group is None or all(deps.host.iommu_group(vf) is not None for vf in vfs)
        return len(vfs) == count and grouped and all(deps.host.device_exists(vf) for vf in vfs)

    if not kernel_io.wait_until(ready, wait):
        fn = read_function(deps.host, pf)
        raise Failed(
            f"{pf} reports {fn.sriov_numvfs or 0} virtual functions but {len(fn.virtfns)} of {count} are on "
            f"the bus with their IOMMU group after {wait:g} s"
        )
    return list(read_function(deps.host, pf).virtfns)


# ----- start-up -------------------------------------------------------------------------------------------


def is_sriov(intents: Sequence[IntentRow]) -> bool:
    return bool(intents) and all(i.kind == "write" and i.action in ATTRIBUTES for i in intents)


def finish_interrupted(deps: CoreDeps, intents: Sequence[IntentRow], report: Report, wait: float) -> None:
    """Start-up: finish a SetVirtualFunctions a crash interrupted after it removed the old VFs, or note
    that it had changed nothing; then close its intents."""
    pf = PciAddress.parse(intents[0].pci_address)
    target = next((i for i in intents if i.action == NUMVFS), None)
    autoprobe = next((i for i in intents if i.action == AUTOPROBE), None)
    report.count("operations_recovered")
    group = deps.host.iommu_group(pf)
    with deps.locks.hold({group} if group is not None else set()):
        fn = read_function(deps.host, pf)
        now = fn.sriov_numvfs or 0
        if target is None or not fn.present or now == int(target.value):
            outcome = "was done" if target is not None and fn.present else "had changed nothing"
        elif now != 0:
            outcome = f"had changed nothing (it still has {now} VFs)"
        else:
            outcome = _finish(deps, pf, fn.driver, int(target.value), autoprobe, wait)
        for intent in intents:
            deps.registry.clear_intent(intent.id)
    report.findings.append(f"{pf}: an interrupted change of its virtual functions {outcome}")


def _finish(
    deps: CoreDeps,
    pf: PciAddress,
    driver: DriverName | None,
    count: int,
    autoprobe: IntentRow | None,
    wait: float,
) -> str:
    try:
        if autoprobe is not None:
            _start_up_write(lambda: deps.host.set_sriov_autoprobe(pf, autoprobe.value == "1"))
        _start_up_write(lambda: deps.host.set_sriov_numvfs(pf, count, driver))
        vfs = wait_for_vfs(deps, pf, count, wait)
    except VfiodError as e:
        return f"could not be finished: {e.message} (it has no VFs now)"
    return f"was finished: {', '.join(vfs)}"


def _start_up_write(act: Callable[[], None]) -> None:
    kernel_io.write(
        act, still="the driver is still working on it", failed=kernel_io.refused("the kernel refused")
    )
