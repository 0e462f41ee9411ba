"""Attach (and the admin's Bind, which is its first half): check the cards, plan the groups, journal,
stop the persistence units, bind every planned function to vfio-pci, grant the group nodes, record the
attachments. All or nothing: a failure at any step gives the nodes back and returns every function this
call moved to its native driver, then settles what the kernel shows.

Runs under the group locks (and the instance lock) the manager holds.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence

from vfiod import phases
from vfiod.core import access, guard, handoff
from vfiod.core.binder import BoundFunction
from vfiod.core.deps import CoreDeps
from vfiod.core.devstate import identity_of, settled_state
from vfiod.core.errors import HandoffUnsupported, InUse, VfiodError
from vfiod.core.journal import Operation
from vfiod.core.ops.settle import keep_hold_for_stuck, settle
from vfiod.core.records import Attachment, vfio_group_path
from vfiod.core.registration import register_companion
from vfiod.core.registry import AttachmentRole, AttachmentRow, DeviceRow, HandoffMode, RegistryError
from vfiod.host.backend import NodeOwner
from vfiod.host.pciaddr import PciAddress
from vfiod.host.pcifunction import read_function
from vfiod.host.vfio_variants import intended_driver
from vfiod.logevents import Action

log = logging.getLogger("vfiod.manager")


def already_attached(
    deps: CoreDeps,
    instance: str,
    owner: int,
    rows: Sequence[DeviceRow],
    clique: int | None = None,
    mode: HandoffMode | None = None,
) -> list[Attachment] | None:
    """Idempotent repeat: every device attached in this boot to the same instance and owner. Asking for
    another gpudirect_clique or hand-over mode than the one handed over is refused (InUse): the VMM may
    already have the device_config or the node, so the attachment is not changed under it."""
    groups: set[int] = set()
    for row in rows:
        att = deps.registry.attachment_of_device(row.id)
        if att is None or att.boot_id != deps.boot_id:
            return None
        if not read_function(deps.host, row.pci_address).is_vfio_bound:
            return None
        if clique is not None and att.gpudirect_clique != clique:
            had = "none" if att.gpudirect_clique is None else str(att.gpudirect_clique)
            raise InUse(
                f"device {row.name!r} is already attached to instance {instance!r} with gpudirect_clique "
                f"{had}, not {clique}: the attachment was handed over as it is; detach and attach again to "
                "change it"
            )
        if mode is not None and att.handoff != mode:
            raise InUse(
                f"device {row.name!r} is already attached to instance {instance!r} with handoff "
                f"{att.handoff}, not {mode}: detach and attach again to change it"
            )
        groups.add(att.iommu_group)
    return attachment_records(
        deps, instance, groups, made_before={a.id for a in deps.registry.attachments_of_instance(instance)}
    )


def attachment_records(
    deps: CoreDeps, instance: str, groups: set[int], made_before: Collection[int] = ()
) -> list[Attachment]:
    """The instance's attachments in `groups`; those in `made_before` existed before this call."""
    out = []
    for att in deps.registry.attachments_of_instance(instance):
        if att.iommu_group not in groups:
            continue
        row = deps.registry.get_device(att.device_id)
        if row is None:
            continue
        fd = att.handoff == "fd"
        out.append(
            Attachment(
                id=row.id,
                pci_address=str(row.pci_address),
                role=att.role,
                iommu_group=att.iommu_group,
                # fd mode: the node stays root's, so there is no path for the VMM to open
                vfio_group_path="" if fd else vfio_group_path(deps.host, att.iommu_group),
                gpudirect_clique=att.gpudirect_clique,
                handoff=att.handoff,
                vfio_cdev_path=handoff.cdev_path(deps.host, row.pci_address) if fd else "",
                changed=att.id not in made_before,
            )
        )
    return sorted(out, key=lambda a: a.pci_address)


def attached_elsewhere(deps: CoreDeps, instance: str | None, owner: int | None) -> dict[PciAddress, str]:
    """Functions attached (in any boot) to someone other than (instance, owner)."""
    out: dict[PciAddress, str] = {}
    for att in deps.registry.all_attachments():
        if att.instance_id == instance and att.owner_uid == owner:
            continue
        row = deps.registry.get_device(att.device_id)
        if row is not None:
            out[row.pci_address] = f"instance {att.instance_id!r} (uid {att.owner_uid})"
    return out


def attach(
    deps: CoreDeps,
    instance: str,
    owner: int,
    rows: Sequence[DeviceRow],
    *,
    include_group: bool,
    clique: int | None,
    force: bool,
    mode: HandoffMode = "node",
) -> list[Attachment]:
    addrs = [r.pci_address for r in rows]
    if mode == "fd" and (why := handoff.fd_mode_refused(deps.host)):
        raise HandoffUnsupported(f"handoff fd cannot work here: {why}; attach with handoff node")
    for row in rows:
        guard.check_identity(deps.host, row.pci_address, identity_of(row))
    plans = guard.plan_groups(
        deps.host,
        addrs,
        include_group=include_group,
        attached_elsewhere=attached_elsewhere(deps, instance, owner),
    )
    for plan in plans:
        _require_one_mode(deps, plan.group, mode)
    before = {a.id for a in deps.registry.attachments_of_instance(instance)}
    op = Operation(deps.registry, deps.boot_id, "attach")
    bound_rows, bound = bind_plans(deps, plans, op, force)
    op.checkpoint("bound")
    granted: list[tuple[int, NodeOwner]] = []
    try:
        if mode == "fd":
            _require_cdevs(deps, bound)
        for plan in plans:
            if mode == "fd" or _group_granted_to(deps, plan.group, instance, owner):
                continue  # fd mode changes no node; a node already granted to this owner stays so
            named = {a.owner_uid for a in deps.registry.attachments_in_group(plan.group)}
            previous = access.previous_owner(deps.host, plan.group, named)
            # Journal first: a crash between here and the attachment's row finds the grant to undo.
            with deps.registry.transaction():
                op.grant(plan.group, previous)
            granted.append((plan.group, previous))
            op.checkpoint("grant")
            access.grant(deps.host, plan.group, owner)
        op.checkpoint("granted")
        _record_attachments(deps, op, instance, owner, bound_rows, bound, dict(granted), clique, mode)
    except VfiodError as e:
        _undo_attach(deps, op, bound_rows, bound, granted, e)
        raise
    except BaseException:
        # Not a kernel refusal (the registry failed, say): at least no node stays with the caller.
        _revoke_quietly(deps, granted)
        raise
    deps.changed(r.id for r in bound_rows.values())
    with phases.timed("records"):
        return attachment_records(deps, instance, {p.group for p in plans}, made_before=before)


def bind(deps: CoreDeps, row: DeviceRow, *, include_group: bool, force: bool) -> list[DeviceRow]:
    """The admin's Bind: the device (and with `include_group` its slot) on vfio-pci, unattached. Returns
    the rows it moved."""
    guard.check_identity(deps.host, row.pci_address, identity_of(row))
    plans = guard.plan_groups(
        deps.host,
        [row.pci_address],
        include_group=include_group,
        attached_elsewhere=attached_elsewhere(deps, None, None),
    )
    op = Operation(deps.registry, deps.boot_id, "bind")
    rows, _bound = bind_plans(deps, plans, op, force)
    with deps.registry.transaction():
        for r in rows.values():
            stored = deps.registry.get_device(r.id)
            if stored is not None:
                deps.registry.update_device(r.id, **settled_state(deps, stored, False))
        op.finish()
    return list(rows.values())


def _revoke_quietly(deps: CoreDeps, granted: Sequence[tuple[int, NodeOwner]]) -> None:
    for group, previous in granted:
        try:
            access.revoke(deps.host, group, previous)
        except VfiodError as e:
            log.warning(
                "giving /dev/vfio/%d back failed: %s", group, e.message, extra={"ACTION": Action.REVOKE}
            )


def _record_attachments(
    deps: CoreDeps,
    op: Operation,
    instance: str,
    owner: int,
    bound_rows: Mapping[PciAddress, DeviceRow],
    bound: Sequence[BoundFunction],
    prev_by_group: Mapping[int, NodeOwner],
    clique: int | None,
    mode: HandoffMode,
) -> None:
    with deps.registry.transaction():
        for fn in bound:
            row = bound_rows[fn.pci_address]
            prev = (
                None
                if mode == "fd"
                else prev_by_group.get(fn.group) or access.previous_grant(deps.registry, fn.group, instance)
            )
            existing = deps.registry.attachment_of_device(row.id)
            if existing is not None and existing.boot_id == deps.boot_id and existing.instance_id == instance:
                continue  # attached to this instance by an earlier call (a group member): kept as it is
            if existing is not None:
                deps.registry.remove_attachment(row.id)  # a reservation from an earlier boot
            deps.registry.add_attachment(
                AttachmentRow(
                    device_id=row.id,
                    instance_id=instance,
                    owner_uid=owner,
                    iommu_group=fn.group,
                    boot_id=deps.boot_id,
                    role=existing.role if existing else _role(fn.role),
                    node_prev=prev,
                    gpudirect_clique=clique if fn.role == "requested" else None,
                    handoff=mode,
                )
            )
            deps.registry.update_device(row.id, state="attached")
        op.finish()


def _require_one_mode(deps: CoreDeps, group: int, mode: HandoffMode) -> None:
    """A group is handed over one way: its node given to the owner (node) or left to root (fd), never both
    (a node granted for one member would let the owner open the group of an fd-mode member)."""
    for att in deps.registry.attachments_in_group(group):
        if att.boot_id == deps.boot_id and att.handoff != mode:
            raise InUse(
                f"IOMMU group {group} is already attached with handoff {att.handoff} (instance "
                f"{att.instance_id!r}); its other functions go the same way, not with handoff {mode}"
            )


def _require_cdevs(deps: CoreDeps, bound: Sequence[BoundFunction]) -> None:
    """fd mode: every bound function has its VFIO cdev (the host said it would; a device whose VFIO
    driver registers none is refused here, and the attach is rolled back)."""
    missing = [str(f.pci_address) for f in bound if not handoff.cdev_path(deps.host, f.pci_address)]
    if missing:
        raise HandoffUnsupported(
            f"{', '.join(missing)} got no VFIO device cdev under /dev/vfio/devices on its VFIO driver; "
            "attach with handoff node"
        )


def _group_granted_to(deps: CoreDeps, group: int, instance: str, owner: int) -> bool:
    return any(
        a.boot_id == deps.boot_id and a.instance_id == instance and a.owner_uid == owner
        for a in deps.registry.attachments_in_group(group)
    )


def bind_plans(
    deps: CoreDeps, plans: Sequence[guard.GroupPlan], op: Operation, force: bool
) -> tuple[dict[PciAddress, DeviceRow], list[BoundFunction]]:
    """Bind every plan (all or nothing), registering companions; returns rows by address and what was
    bound, in address order."""
    all_fns = sorted({a for p in plans for a in p.functions})
    to_bind = sorted({a for p in plans for a in p.to_bind})
    guard.check_not_host_critical(deps.host, to_bind, force)
    guard.require_no_dependents(deps.host, to_bind)
    rows = _rows_for(deps, plans)
    vendors = [rows[a].vendor_id for a in to_bind]
    bound: list[BoundFunction] = []
    with deps.registry.transaction():
        for addr in to_bind:
            row = rows[addr]
            fn = read_function(deps.host, addr)
            native, module = fn.driver or "", fn.module or ""
            deps.registry.update_device(
                row.id, state="binding", native_driver=native, native_module=module, bound_by_vfiod=True
            )
            op.function(row.id, str(addr), row.iommu_group, native, module, intended_driver(deps.host, addr))
    op.checkpoint("journaled")
    units = deps.hold.units_for(vendors)
    deps.hold.acquire(units)
    try:
        guard.require_not_in_use(deps.host, to_bind, ignore_units=units)
        binder = deps.binder(op)
        for plan in plans:
            bound.extend(binder.bind_group(plan))
    except VfiodError as e:
        keep_hold_for_stuck(deps, e.stuck, rows)
        _roll_back_binds(deps, op, rows, bound, e)
        raise
    finally:
        deps.hold.release(units)
    assert sorted({f.pci_address for f in bound}) == all_fns
    return rows, sorted(bound, key=lambda f: f.pci_address)


def _rows_for(deps: CoreDeps, plans: Sequence[guard.GroupPlan]) -> dict[PciAddress, DeviceRow]:
    rows: dict[PciAddress, DeviceRow] = {}
    requested = [a for p in plans for a, role in p.roles.items() if role == "requested"]
    anchor = deps.registry.by_pci_address(requested[0]) if requested else None
    for plan in plans:
        for addr in plan.functions:
            row = deps.registry.by_pci_address(addr)
            if row is None:
                row = register_companion(deps, addr, anchor)
            rows[addr] = row
    return rows


def _roll_back_binds(
    deps: CoreDeps,
    op: Operation,
    rows: Mapping[PciAddress, DeviceRow],
    bound: Sequence[BoundFunction],
    cause: VfiodError,
) -> None:
    """The binder rolled back the failing group; put back every earlier group this call bound."""
    if isinstance(cause, RegistryError):
        op.degraded = True  # the way back must not depend on the registry that just failed
    binder = deps.binder(op)
    for fn in reversed(bound):
        if fn.changed and fn.pci_address not in cause.stuck:
            try:
                with deps.hold.held([rows[fn.pci_address].vendor_id]):
                    binder.restore(fn.pci_address, fn.native)
            except VfiodError as e:
                cause.stuck = (*cause.stuck, *e.stuck)
                cause.message += f"; rolling back {fn.pci_address} failed too: {e.message}"
    settle(deps, op, rows.values(), cause)


def _undo_attach(
    deps: CoreDeps,
    op: Operation,
    rows: Mapping[PciAddress, DeviceRow],
    bound: Sequence[BoundFunction],
    granted: Sequence[tuple[int, NodeOwner]],
    cause: VfiodError,
) -> None:
    for group, previous in granted:
        try:
            access.revoke(deps.host, group, previous)
        except VfiodError as e:
            cause.message += f"; giving /dev/vfio/{group} back failed: {e.message}"
    _roll_back_binds(deps, op, rows, bound, cause)


def _role(role: str) -> AttachmentRole:
    return "companion" if role == "companion" else "requested"
