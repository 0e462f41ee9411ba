"""AttachVGPU and the release of vGPUs in Detach: creating a vGPU for an instance on a parent that offers
the profile, handing it over (its group node to the owner, or in fd mode nothing: the owner asks
OpenDevices for its cdev), and destroying it again; and finishing either at
start-up when a crash interrupted it. Two frameworks: an mdev (its uuid written to the type's `create`,
`remove` to destroy it) and NVIDIA's vendor-specific VFIO (the type id written to the VF's
`nvidia/current_vgpu_type` and read back, `0` to destroy it; the VF stays bound to `nvidia`, its VFIO
driver, and is never unbound).

Claim first: the parent, the uuid and the type are journaled (a `claim` intent) and the vGPU is stored as
`creating` before anything is written; the grant is journaled before the node changes owner.
Start-up rolls an interrupted AttachVGPU back (the node back, the mdev removed, the vGPU forgotten) and
completes an interrupted release. An mdev whose group node a process holds is never removed: its release
answers DeviceBusy, and start-up leaves it `stuck` for an admin. mdevs vfiod did not create are never
touched (they have no vGPU row).

Hand-over modes (core/handoff.py): a vendor-VFIO vGPU is a PCI function to the VMM and follows the host's
default; an mdev stays in node mode unless the caller asks for fd, because QEMU recognises an mdev only by
its sysfs path (given `fd=` alone it takes one for a physical device and fails; `sysfsdev=` beside `fd=`
works), so a VMM that only knows descriptors would fail.

Placement is `core/placement.py`: the physical GPU with the most free framebuffer that can take the profile,
then a clean parent before one that failed last time, then the one with the most instances left, never a
quarantined one.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid as uuidlib
from collections.abc import Callable, Sequence

from vfiod.core import access, eventlog, guard, handoff, kernel_io, placement, validation
from vfiod.core.context import Report
from vfiod.core.deps import CoreDeps
from vfiod.core.errors import (
    AlreadyExists,
    DeviceBusy,
    Failed,
    HandoffUnsupported,
    InUse,
    InvalidArgument,
    NoCapacity,
    ProfileNotFound,
    VfiodError,
)
from vfiod.core.journal import Operation
from vfiod.core.placement import physical_gpu
from vfiod.core.profiles import QUARANTINE_FAILURES, quarantined
from vfiod.core.records import Attachment, vfio_group_path
from vfiod.core.registry import AttachmentRow, HandoffMode, IntentRow, VgpuRow
from vfiod.host import mdev, vendor_vgpu, vgpus
from vfiod.host.errors import SysfsWriteError
from vfiod.host.mdev import Mdev, MdevParent, MdevType
from vfiod.host.pciaddr import PciAddress
from vfiod.logevents import Action

log = logging.getLogger("vfiod.manager")

ATTACH = "attach-vgpu"
RELEASE = "detach-vgpu"
KEPT_FOR = "vfiod.kept-for-uid"  # tag of a vGPU kept with keep_bound: whose it stays


def cdev_path(deps: CoreDeps, row: VgpuRow) -> str:
    """The vGPU's `/dev/vfio/devices/vfioN` (the VF's for vendor-VFIO, the mdev's own), or ""."""
    return handoff.vgpu_cdev_path(deps.host, row.framework == vgpus.VENDOR, row.parent, row.uuid)


def attachment(deps: CoreDeps, row: VgpuRow, att: AttachmentRow) -> Attachment:
    vendor = row.framework == vgpus.VENDOR
    fd = att.handoff == "fd"
    return Attachment(
        id=row.id,
        pci_address=row.parent if vendor else "",
        role=att.role,
        iommu_group=att.iommu_group,
        # fd mode: the node stays root's, so there is no path for the VMM to open
        vfio_group_path="" if fd else vfio_group_path(deps.host, att.iommu_group),
        handoff=att.handoff,
        vfio_cdev_path=cdev_path(deps, row) if fd else "",
        mdev_uuid="" if vendor else row.uuid,
        vgpu_uuid=row.uuid if vendor else "",
    )


def live(deps: CoreDeps, row: VgpuRow) -> Mdev | None:
    """The row's vGPU as the kernel has it now; None when it is gone."""
    return vgpus.find(deps.host, row.framework, row.uuid, row.parent, row.type_id)


def _matches(row: VgpuRow, profile: str) -> bool:
    return profile in (row.type_id, row.profile)


def already_attached(
    deps: CoreDeps, instance: str, owner: int, profile: str, uuid: str | None, mode: HandoffMode | None = None
) -> Attachment | None:
    """Idempotent repeat: this instance and owner already have a vGPU of this profile (with this uuid,
    when one is asked for) that the kernel still has. Asking for the other hand-over mode is refused
    (InUse): the VMM may already hold the node or the descriptors."""
    for att in deps.registry.attachments_of_instance(instance):
        row = deps.registry.get_vgpu(att.device_id)
        if row is None or att.owner_uid != owner or not _matches(row, profile):
            continue
        if uuid is not None and row.uuid != uuid:
            continue
        if att.boot_id == deps.boot_id and live(deps, row) is not None:
            if mode is not None and att.handoff != mode:
                raise InUse(
                    f"the vGPU {row.uuid} ({row.profile}) is already attached to instance {instance!r} with "
                    f"handoff {att.handoff}, not {mode}: detach and attach again to change it"
                )
            return dataclasses.replace(attachment(deps, row, att), changed=False)
    return None


def offers(deps: CoreDeps, profile: str, pin: str | None) -> list[tuple[MdevParent, MdevType]]:
    """Every (parent, type) offering the profile (by type id or name), only on `pin` (a parent or a
    physical GPU) when given."""
    found = [(p, t) for p in vgpus.read_parents(deps.host) for t in p.types if profile in (t.id, t.name)]
    if not found:
        raise ProfileNotFound(
            f"no parent on this host offers a vGPU profile {profile!r} (ListProfiles shows what it offers)"
        )
    if pin is not None:
        found = [(p, t) for p, t in found if pin in (p.name, str(p.pci_address or ""), physical_gpu(p))]
        if not found:
            raise InvalidArgument(f"parent {pin!r} does not offer the profile {profile!r}")
    return found


def place(
    deps: CoreDeps, profile: str, found: Sequence[tuple[MdevParent, MdevType]]
) -> tuple[MdevParent, MdevType]:
    """The usable parent on the physical GPU with the most free framebuffer (placement.choose);
    NoCapacity naming what is used and what is quarantined."""
    skip = quarantined(deps)
    suspect = [h.parent for h in deps.registry.all_parent_health() if h.failures]
    chosen = placement.choose(
        found, vgpus.read_parents(deps.host), vgpus.read_vgpus(deps.host), skip, suspect
    )
    if chosen is None:
        gpus = sorted({placement.gpu_of(p) for p, _ in found})
        held = "; ".join(f"{name} quarantined ({why})" for name, why in sorted(skip.items()))
        raise NoCapacity(
            f"no parent can create {profile!r} now (on {', '.join(gpus)}: none left)"
            + (f"; {held}" if held else "")
            + "; Detach a vGPU of this profile (ListVGPUs shows them) or ask an admin to Recover a parent"
        )
    return chosen


def attach_vgpu(
    deps: CoreDeps,
    instance: str,
    owner: int,
    profile: str,
    *,
    pin: str | None,
    uuid: str | None,
    wait: float,
    mode: HandoffMode | None = None,
    default_mode: HandoffMode = "node",
) -> Attachment:
    """Create a vGPU of `profile` for `instance`, verify it, hand it over to `owner` (in `mode`, or the
    framework's default: handoff.vgpu_mode) and record it. All or nothing: a failure leaves nothing
    created. Runs under the instance lock and the manager's placement lock."""
    kept = _kept(deps, owner, profile, uuid)
    if kept is not None:
        kept_mode = handoff.vgpu_mode(kept.framework == vgpus.VENDOR, mode, default_mode)
        return _attach_existing(deps, kept, instance, owner, kept_mode)
    parent, typ = place(deps, profile, offers(deps, profile, pin))
    chosen_mode = handoff.vgpu_mode(parent.framework == vgpus.VENDOR, mode, default_mode)
    if chosen_mode == "fd" and (why := handoff.fd_mode_refused(deps.host)):
        raise HandoffUnsupported(f"handoff fd cannot work here: {why}; attach with handoff node")
    uuid = uuid or str(uuidlib.uuid4())
    if mdev.read_mdev(deps.host, uuid) is not None or any(r.uuid == uuid for r in deps.registry.list_vgpus()):
        raise AlreadyExists(f"a vGPU with uuid {uuid} exists already")
    vendor = parent.framework == vgpus.VENDOR
    row = VgpuRow(
        id=validation.new_device_id(),
        name=f"vgpu-{uuid}",
        uuid=uuid,
        framework="vendor-vfio" if vendor else "mdev",
        type_id=typ.id,
        profile=typ.name,
        parent=parent.name,
        physical_gpu=physical_gpu(parent),
        pci_address=parent.pci_address if vendor else None,
        vendor_id=_parent_id(deps, parent, "vendor"),
        device_id=_parent_id(deps, parent, "device"),
        state="creating",
        managed=True,
    )
    op = claim(deps, ATTACH, row)
    try:
        deps.registry.add_vgpu(row)
        op.checkpoint("create")
        _create(deps, row)
        op.checkpoint("verify")
        group = _verify(deps, row, wait)
        result = _hand_over(deps, op, row, group, instance, owner, chosen_mode)
    except Exception as e:
        _roll_back(deps, op, row, e)
        raise
    log.info(
        "created vGPU %s (%s %s on %s) for %s, uid %d",
        uuid,
        row.framework,
        typ.id,
        parent.name,
        instance,
        owner,
        extra={"ACTION": Action.ATTACH_VGPU, "INSTANCE_ID": instance, "MDEV_UUID": uuid, "OWNER_UID": owner},
    )
    return result


def claim(deps: CoreDeps, action: str, row: VgpuRow) -> Operation:
    """A new operation on `row`, its claim (parent, uuid, type) journaled before anything else."""
    op = Operation(deps.registry, deps.boot_id, action)
    deps.registry.journal_claim(
        action=action,
        boot_id=deps.boot_id,
        operation=op.id,
        device_id=row.id,
        parent=row.parent,
        uuid=row.uuid,
        type_id=row.type_id,
    )
    return op


def _parent_id(deps: CoreDeps, parent: MdevParent, what: str) -> str:
    if parent.pci_address is None:
        return ""
    raw = deps.host.attr(parent.pci_address, what) or ""
    return raw.lower().removeprefix("0x")


def _kept(deps: CoreDeps, owner: int, profile: str, uuid: str | None) -> VgpuRow | None:
    """A vGPU this owner kept (Detach with keep_bound) of the profile, unattached and still there."""
    for row in deps.registry.list_vgpus():
        if row.tags.get(KEPT_FOR) != str(owner) or row.state != "vfio" or not _matches(row, profile):
            continue
        if uuid is not None and row.uuid != uuid:
            continue
        if deps.registry.attachment_of_device(row.id) is None and live(deps, row) is not None:
            return row
    return None


def _attach_existing(
    deps: CoreDeps, row: VgpuRow, instance: str, owner: int, mode: HandoffMode
) -> Attachment:
    found = live(deps, row)
    if found is None or found.iommu_group is None:
        raise Failed(f"the kept vGPU {row.uuid} has no IOMMU group any more")
    if mode == "fd" and (why := handoff.fd_mode_refused(deps.host)):
        raise HandoffUnsupported(f"handoff fd cannot work here: {why}; attach with handoff node")
    op = Operation(deps.registry, deps.boot_id, ATTACH)
    try:
        return _hand_over(deps, op, row, found.iommu_group, instance, owner, mode)
    except Exception:
        op.finish()
        raise


def _write(parent: str, act: Callable[[], None], *, what: str) -> None:
    def failed(e: SysfsWriteError) -> VfiodError:
        if what == "create" and e.errname in ("ENOSPC", "EUSERS"):
            return NoCapacity(f"{parent} refused another instance: {e}")
        return Failed(f"{what} on {parent} failed: {e}")

    kernel_io.write(act, still="the kernel is still working on it", failed=failed)


def _create(deps: CoreDeps, row: VgpuRow) -> None:
    """mdev: the uuid to the type's `create`. Vendor-VFIO: the type id to the VF's `current_vgpu_type`,
    read back; a mismatch is written back to 0 and fails."""
    if row.framework != vgpus.VENDOR:
        _write(row.parent, lambda: deps.host.create_mdev(row.parent, row.type_id, row.uuid), what="create")
        return
    vf = PciAddress.parse(row.parent)
    _write(row.parent, lambda: deps.host.set_vgpu_type(vf, int(row.type_id)), what="create")
    got = vendor_vgpu.current_type(deps.host, vf)
    if got != row.type_id:
        if got not in (None, "0"):
            _write(row.parent, lambda: deps.host.set_vgpu_type(vf, 0), what="destroy")
        raise Failed(f"{vf}: current_vgpu_type reads {got} after {row.type_id} was written to it")


def _verify(deps: CoreDeps, row: VgpuRow, wait: float) -> int:
    """The vGPU exists, has its IOMMU group and /dev/vfio/<n> (a vendor-VFIO VF also its `vfio-dev/`,
    nvidia.ko's VFIO registration); its group."""

    def group() -> int | None:
        found = live(deps, row)
        n = found.iommu_group if found is not None else None
        if n is None or not deps.host.vfio_group_node(n).exists():
            return None
        if row.framework == vgpus.VENDOR and not deps.host.list_dir(
            deps.host.device_dir(PciAddress.parse(row.parent)) / "vfio-dev"
        ):
            return None
        return n

    if not kernel_io.wait_until(lambda: group() is not None, wait):
        state = "is not there" if live(deps, row) is None else "has no VFIO group node or device"
        raise Failed(f"the vGPU {row.uuid} on {row.parent} {state} {wait:g} s after it was created")
    found = group()
    assert found is not None  # it held a moment ago and nothing of vfiod's removes it meanwhile
    return found


def _hand_over(
    deps: CoreDeps, op: Operation, row: VgpuRow, group: int, instance: str, owner: int, mode: HandoffMode
) -> Attachment:
    """Node mode: the group node to the owner (the grant journaled first). fd mode: no node changes
    owner, and the vGPU must have its cdev for OpenDevices to open."""
    prev = None
    if mode == "node":
        prev = access.previous_owner(deps.host, group, set())
        op.grant(group, prev)
        op.checkpoint("grant")
        access.grant(deps.host, group, owner)
    elif not cdev_path(deps, row):
        raise HandoffUnsupported(
            f"the vGPU {row.uuid} on {row.parent} has no VFIO device cdev under /dev/vfio/devices; attach "
            "with handoff node"
        )
    op.checkpoint("record")
    with deps.registry.transaction():
        tags = {k: v for k, v in row.tags.items() if k != KEPT_FOR}
        stored = deps.registry.set_vgpu_state(row.id, "attached", iommu_group=group, tags=tags)
        att = deps.registry.add_attachment(
            AttachmentRow(
                device_id=row.id,
                instance_id=instance,
                owner_uid=owner,
                iommu_group=group,
                boot_id=deps.boot_id,
                node_prev=prev,
                handoff=mode,
            )
        )
        deps.registry.clear_parent_failures(row.parent)
        op.finish()
    deps.changed([""])
    return attachment(deps, stored, att)


def _roll_back(deps: CoreDeps, op: Operation, row: VgpuRow, error: Exception) -> None:
    """Undo a failed AttachVGPU: the node back, the mdev removed, the vGPU forgotten; a failure of the
    parent itself counts toward its quarantine."""
    problems = _destroy(deps, row, None)
    if isinstance(error, Failed) and not isinstance(error, NoCapacity):
        health = deps.registry.record_parent_failure(row.parent, str(error))
        if health.failures == QUARANTINE_FAILURES:
            eventlog.quarantined(row.parent, health.failures, str(error))
    if problems:
        eventlog.vgpu_stuck(op.id, row.uuid, row.parent, "; ".join(problems))
        deps.registry.set_vgpu_state(row.id, "stuck")
        return
    op.finish()


def _destroy(deps: CoreDeps, row: VgpuRow, att: AttachmentRow | None) -> list[str]:
    """Give the node back, remove the mdev (unless held) and forget the vGPU; what could not be done."""
    problems: list[str] = []
    found = live(deps, row)
    group = found.iommu_group if found is not None else None
    if att is not None and att.node_prev is not None:
        try:
            access.revoke(deps.host, att.iommu_group, att.node_prev)
        except VfiodError as e:
            problems.append(e.message)
    if found is not None:
        try:
            if group is not None:
                require_free(deps, row, group, f"destroy the vGPU {row.uuid}")
            _remove(deps, row)
        except VfiodError as e:
            problems.append(e.message)
    if not problems:
        with deps.registry.transaction():
            if deps.registry.attachment_of_device(row.id) is not None:
                deps.registry.remove_attachment(row.id)
            if deps.registry.get_vgpu(row.id) is not None:
                deps.registry.remove_vgpu(row.id)
    return problems


def require_free(deps: CoreDeps, row: VgpuRow, group: int, what: str) -> None:
    """DeviceBusy while a process holds the vGPU's group node, its cdev or a VFIO device file of it."""
    if row.framework == vgpus.VENDOR:
        guard.require_not_held(deps.host, [PciAddress.parse(row.parent)], what + " on")
    else:
        guard.require_group_free(deps.host, group, what, row.uuid)


def _remove(deps: CoreDeps, row: VgpuRow, wait: float = 5.0) -> None:
    """mdev: `remove`, then wait until it is off the bus. Vendor-VFIO: 0 to `current_vgpu_type`, read back."""
    if row.framework == vgpus.VENDOR:
        vf = PciAddress.parse(row.parent)
        _write(row.parent, lambda: deps.host.set_vgpu_type(vf, 0), what="destroy")
        got = vendor_vgpu.current_type(deps.host, vf)
        if got not in (None, "0"):
            raise Failed(f"{vf}: current_vgpu_type reads {got} after 0 was written to it")
        return
    _write(row.parent, lambda: deps.host.remove_mdev(row.uuid), what="remove")
    if not kernel_io.wait_until(lambda: mdev.read_mdev(deps.host, row.uuid) is None, wait):
        raise Failed(f"the mdev {row.uuid} is still there {wait:g} s after its remove")


def release(deps: CoreDeps, instance: str, rows: Sequence[VgpuRow], keep_bound: bool) -> None:
    """Detach's part for vGPUs: refuse while a node is held (nothing changed), then for each the node
    back and the mdev removed and forgotten, or with `keep_bound` kept unattached for the same owner."""
    atts = {r.id: deps.registry.attachment_of_device(r.id) for r in rows}
    for row in rows:
        att = atts[row.id]
        if att is not None and live(deps, row) is not None:
            require_free(deps, row, att.iommu_group, f"detach the vGPU {row.uuid}")
    for row in rows:
        att = atts[row.id]
        op = claim(deps, RELEASE, row)
        op.checkpoint("release")
        if keep_bound and att is not None:
            if att.handoff == "node":
                access.revoke(deps.host, att.iommu_group, att.node_prev or access.KERNEL_DEFAULT)
            with deps.registry.transaction():
                deps.registry.remove_attachment(row.id)
                tags = {**row.tags, KEPT_FOR: str(att.owner_uid)}
                deps.registry.set_vgpu_state(row.id, "vfio", tags=tags)
                op.finish()
            continue
        problems = _destroy(deps, row, att)
        if problems:
            raise DeviceBusy(f"the vGPU {row.uuid} of {instance!r} was not released: {'; '.join(problems)}")
        op.finish()
        log.info(
            "removed vGPU %s of %s",
            row.uuid,
            instance,
            extra={"ACTION": Action.DETACH_VGPU, "INSTANCE_ID": instance, "MDEV_UUID": row.uuid},
        )


# ----- start-up ---------------------------------------------------------------------------------------------


def is_vgpu(intents: Sequence[IntentRow]) -> bool:
    return any(i.kind == "claim" for i in intents)


def finish_interrupted(deps: CoreDeps, intents: Sequence[IntentRow], report: Report) -> None:
    """Start-up: an interrupted AttachVGPU is rolled back, an interrupted release completed; either way
    the node goes back, the mdev is removed (unless held: then the vGPU is left `stuck`) and forgotten."""
    claim = next(i for i in intents if i.kind == "claim")
    report.count("operations_recovered")
    for grant in (i for i in intents if i.kind == "grant"):
        assert grant.node_prev is not None  # the schema: a grant intent always records it
        try:
            access.revoke(deps.host, grant.iommu_group, grant.node_prev)
        except VfiodError as e:
            report.findings.append(f"could not give /dev/vfio/{grant.iommu_group} back: {e.message}")
    row = deps.registry.get_vgpu(claim.device_id)
    done = "rolled back" if claim.action == ATTACH else "completed"
    if row is None:  # killed before the vGPU was stored: nothing was created
        framework = vgpus.framework_of(deps.host, claim.vgpu_parent)
        exists = (
            vgpus.find(deps.host, framework, claim.vgpu_uuid, claim.vgpu_parent, claim.vgpu_type) is not None
        )
        report.findings.append(
            f"vGPU {claim.vgpu_uuid}: an interrupted {claim.action} had "
            + ("created a vGPU that vfiod did not record; it is left alone" if exists else "created nothing")
        )
    else:
        problems = _destroy(deps, row, deps.registry.attachment_of_device(row.id))
        if problems:
            eventlog.vgpu_stuck(claim.operation, row.uuid, row.parent, "; ".join(problems))
            deps.registry.set_vgpu_state(row.id, "stuck")
            report.count("stuck")
            report.findings.append(
                f"vGPU {row.uuid}: an interrupted {claim.action} could not be {done}: " + "; ".join(problems)
            )
        else:
            report.findings.append(f"vGPU {row.uuid}: an interrupted {claim.action} was {done}")
    for intent in intents:
        deps.registry.clear_intent(intent.id)
