"""Giving devices back: Detach, Unbind, Unregister (a device with its companions) and Recover share one
restore path (`restore`): journal each function vfiod bound, give the group nodes back, stop the
persistence units, put every function back on its native driver (highest function first, the reverse of
binding), then drop the attachments. A
function the kernel does not give back is `stuck`, and every attachment stays while any is.

Runs under the group locks (and the instance lock) the manager holds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from vfiod.core import access, guard
from vfiod.core.binder import Binder
from vfiod.core.context import Report
from vfiod.core.deps import CoreDeps
from vfiod.core.devstate import native_of, require_no_pending, settled_state
from vfiod.core.errors import InUse, NativeIsVfio, NotFound, VfiodError
from vfiod.core.hoststatus import native_vfio_reason
from vfiod.core.journal import Operation
from vfiod.core.ops.settle import keep_hold_for_stuck, settle
from vfiod.core.registry import AttachmentRow, DeviceRow, RegistryError
from vfiod.host.pciaddr import is_vfio_driver
from vfiod.host.pcifunction import read_function


def restore(
    deps: CoreDeps,
    rows: Sequence[DeviceRow],
    kind: str,
    *,
    drop_attachments: bool = False,
    before_steps: Callable[[], None] | None = None,
) -> None:
    """Put every function vfiod bound back on its native driver. All attachments stay while any function
    could not be restored; those are `stuck`. `before_steps` runs once the release is journaled and before
    any unbind (the group nodes go back there)."""
    op = Operation(deps.registry, deps.boot_id, kind)
    todo = [
        r
        for r in sorted(rows, key=lambda r: r.pci_address, reverse=True)
        if r.bound_by_vfiod and r.native_driver != "vfio-pci" and deps.host.device_exists(r.pci_address)
    ]
    guard.require_no_dependents(deps.host, [r.pci_address for r in todo])
    with deps.registry.transaction():
        for row in todo:
            deps.registry.update_device(row.id, state="releasing")
            op.function(
                row.id, str(row.pci_address), row.iommu_group, row.native_driver, row.native_module, ""
            )
    op.checkpoint("journaled")
    if before_steps is not None:
        before_steps()
    binder = deps.binder(op)
    failure: VfiodError | None = None
    units = deps.hold.units_for(r.vendor_id for r in todo)
    try:
        deps.hold.acquire(units)
    except VfiodError as e:  # the hold itself failed: nothing was touched
        failure = e
    else:
        try:
            for row in todo:
                try:
                    _restore_one(binder, op, row, let_kernel_probe=kind == "unbind")
                except VfiodError as e:
                    if not e.stuck:
                        e.stuck = (row.pci_address,)
                    if failure is None:
                        failure = e
                    else:
                        failure.stuck = (*failure.stuck, *e.stuck)
                        failure.message += f"; {e.message}"
            if failure is not None:
                keep_hold_for_stuck(deps, failure.stuck, {r.pci_address: r for r in todo})
        finally:
            deps.hold.release(units)
    if failure is not None:
        settle(deps, op, todo, failure)
        raise failure
    op.checkpoint("restored")
    with deps.registry.transaction():
        for row in rows:
            if drop_attachments:
                deps.registry.remove_attachment(row.id)
            fresh = deps.registry.get_device(row.id)
            if fresh is not None:
                deps.registry.update_device(row.id, **settled_state(deps, fresh, False))
        op.finish()


def _restore_one(binder: Binder, op: Operation, row: DeviceRow, *, let_kernel_probe: bool) -> None:
    try:
        binder.restore(row.pci_address, native_of(row), let_kernel_probe=let_kernel_probe)
    except RegistryError:
        # The journal failed before a step: that step did not happen. Going back to the native driver
        # is where this call was heading anyway, so finish it without step intents (the operation's
        # own intent still lets start-up finish it if vfiod dies now).
        op.degraded = True
        binder.restore(row.pci_address, native_of(row), let_kernel_probe=let_kernel_probe)


def detach(
    deps: CoreDeps, instance: str, rows: Sequence[DeviceRow], groups: set[int], keep_bound: bool
) -> None:
    """Release `rows` (the instance's attachments in `groups`): give the nodes back, then restore the
    functions, or with `keep_bound` leave them on vfio, unattached."""
    present = [r.pci_address for r in rows if deps.host.device_exists(r.pci_address)]
    guard.require_not_held(deps.host, present, "detach")
    previous = {g: access.previous_grant(deps.registry, g, instance) for g in sorted(groups)}

    def give_nodes_back() -> None:
        for group, owner in previous.items():
            if owner is not None:
                access.revoke(deps.host, group, owner)

    if keep_bound:
        with deps.registry.transaction():
            for row in rows:
                deps.registry.remove_attachment(row.id)
                deps.registry.update_device(row.id, **settled_state(deps, row, False))
                deps.registry.settle_intents(row.id)
        give_nodes_back()  # a node left with its owner meanwhile is taken back at the next start
    else:
        # The nodes go back once the detach is journaled (a registry that cannot take it leaves the VM
        # its devices), and before any unbind.
        restore(deps, rows, "detach", drop_attachments=True, before_steps=give_nodes_back)


def unbind(deps: CoreDeps, row: DeviceRow) -> DeviceRow:
    """The admin's Unbind of an unattached device on vfio: back to its native driver, or, if it never had
    one, released from its VFIO driver for the kernel to probe. A device found on a vfio variant driver is
    released the same way (a variant binds only through driver_override, so the kernel's probe picks the
    device's own driver). A device whose own driver is vfio-pci (bound to it at boot) has nothing to go back
    to: NativeIsVfio, naming what binds it, before anything is written."""
    if row.native_driver == "vfio-pci":
        raise NativeIsVfio(native_vfio_reason(deps.host, row.name, row.pci_address))
    guard.require_not_held(deps.host, [row.pci_address], "unbind")
    if is_vfio_driver(row.native_driver):
        row = deps.registry.update_device(row.id, bound_by_vfiod=True, native_driver="", native_module="")
    elif not row.bound_by_vfiod or not row.native_driver:
        # There is no native driver to go back to: the admin's explicit Unbind lets the kernel probe.
        row = deps.registry.update_device(row.id, bound_by_vfiod=True)
    restore(deps, [row], "unbind")
    if not row.native_driver:
        # Whatever the kernel's probe picked is the device's own driver from now on.
        fn = read_function(deps.host, row.pci_address)
        if fn.driver is not None:
            row = deps.registry.update_device(row.id, native_driver=fn.driver, native_module=fn.module or "")
    return row


def unregister(deps: CoreDeps, rows: Sequence[DeviceRow]) -> list[DeviceRow]:
    """Forget `rows` (a device and its companions), each put back on its native driver first if vfiod
    bound it. Nothing is forgotten while one of them is attached (InUse) or has a write in the kernel; a
    companion unregistered meanwhile is skipped. Runs under the rows' group locks."""
    current = [got for r in rows if (got := deps.registry.get_device(r.id)) is not None]
    if not current or current[0].id != rows[0].id:
        raise NotFound(f"device {rows[0].name!r} was unregistered meanwhile")
    require_no_pending(deps, [r.pci_address for r in current])
    for r in current:
        att = deps.registry.attachment_of_device(r.id)
        if att is not None:
            raise InUse(
                f"device {r.name!r} is attached to instance {att.instance_id!r} (uid {att.owner_uid}); "
                "detach it first"
            )
    bound = [r for r in current if r.bound_by_vfiod and read_function(deps.host, r.pci_address).is_vfio_bound]
    if bound:
        restore(deps, bound, "unregister")
    for r in current:
        deps.registry.remove_device(r.id)
    return current


def recover_one(deps: CoreDeps, row: DeviceRow, dry_run: bool, report: Report) -> None:
    """Return one stuck or driverless device to its native driver, unless the kernel still has a write of
    it or a process holds it (both reported, nothing touched)."""
    addr = row.pci_address
    if not deps.host.device_exists(addr):
        report.findings.append(f"{row.name} ({addr}) is not on the bus: nothing to recover")
        return
    pending = deps.host.pending_writes(addr)
    if pending:
        report.count("held")
        report.findings.append(
            f"{row.name} ({addr}): the kernel has not finished {', '.join(pending)}; left alone until it "
            "does (the device's lock is held in the kernel)"
        )
        return
    holders = guard.vfio_holders(deps.host, [addr])
    if holders:
        report.count("held")
        report.findings.append(
            f"{row.name} ({addr}) is held: " + "; ".join(h.describe() for h in holders) + " (left alone)"
        )
        return
    target = row.native_driver or "no driver"
    now = deps.host.driver(addr) or "no driver"
    if dry_run:
        report.findings.append(f"would return {row.name} ({addr}) from {now} to {target}")
        return
    att = deps.registry.attachment_of_device(row.id)

    def give_node_back() -> None:
        if att is not None and att.node_prev is not None:
            access.revoke(deps.host, att.iommu_group, att.node_prev)

    fixed = deps.registry.update_device(row.id, bound_by_vfiod=True, state="releasing")
    try:
        restore(deps, [fixed], "recover", drop_attachments=True, before_steps=give_node_back)
    except VfiodError as e:
        report.count("failed")
        report.findings.append(f"{row.name} ({addr}): {e.message}")
        return
    released = drop_released_siblings(deps, att)
    report.count("recovered")
    report.findings.append(f"{row.name} ({addr}) is back on {deps.host.driver(addr) or 'no driver'}")
    deps.changed([row.id, *released])


def drop_released_siblings(deps: CoreDeps, att: AttachmentRow | None) -> list[str]:
    """After Recover ended an attachment: the other functions of that instance in the group that the
    failed call already put back on their drivers lose their attachment too (it names nothing now)."""
    if att is None:
        return []
    released: list[str] = []
    with deps.registry.transaction():
        for other in deps.registry.attachments_in_group(att.iommu_group):
            if other.instance_id != att.instance_id:
                continue
            row = deps.registry.get_device(other.device_id)
            if row is None or row.state == "stuck":
                continue
            if read_function(deps.host, row.pci_address).is_vfio_bound:  # present and on vfio
                continue
            deps.registry.remove_attachment(row.id)
            deps.registry.update_device(row.id, **settled_state(deps, row, False))
            deps.registry.settle_intents(row.id)
            released.append(row.id)
    return released
