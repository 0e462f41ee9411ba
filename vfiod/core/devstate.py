"""A registered device's state: what the kernel, the attachments and the few stored states that cannot be
derived (`binding`, `releasing`, `stuck`, `missing`) say it is, and the checks every operation makes on
it before it touches the device.

`settled_state` is the one derivation: on vfio with an attachment of this boot → `attached`; on vfio →
`vfio`; otherwise `host` (vfiod no longer owns its binding); gone from the bus → `missing`; a write still
inside the kernel → `stuck`.
"""

from __future__ import annotations

from collections.abc import Iterable

from vfiod.core.binder import NativeDriver
from vfiod.core.deps import CoreDeps
from vfiod.core.errors import Failed, InvalidArgument, NotFound, Timeout
from vfiod.core.registry import DeviceRow
from vfiod.host import vendor_vgpu
from vfiod.host.pciaddr import DriverName, InvalidDriverName, PciAddress
from vfiod.host.pcifunction import Identity, read_function
from vfiod.logevents import Action


def group_of(deps: CoreDeps, row: DeviceRow) -> int:
    """The device's IOMMU group: the live one while it is on the bus, else the registered one."""
    live = read_function(deps.host, row.pci_address).iommu_group
    return live if live is not None else row.iommu_group


def settled_state(deps: CoreDeps, row: DeviceRow, stuck: bool) -> dict[str, object]:
    """The registry fields that make `row` say what the kernel shows now (`stuck`: a write is pending)."""
    if stuck:
        return {"state": "stuck"}
    fn = read_function(deps.host, row.pci_address)
    if not fn.present:
        return {"state": "missing"}
    on_vfio = fn.is_vfio_bound
    att = deps.registry.attachment_of_device(row.id)
    if att is not None and on_vfio and att.boot_id == deps.boot_id:
        return {"state": "attached"}
    if on_vfio:
        return {"state": "vfio"}
    return {"state": "host", "bound_by_vfiod": False}


def identity_of(row: DeviceRow) -> Identity:
    """The card the registry knows at the device's address."""
    return Identity(
        vendor_id=row.vendor_id,
        device_id=row.device_id,
        subsystem_vendor_id=row.subsystem_vendor_id,
        subsystem_device_id=row.subsystem_device_id,
        class_code=row.class_code,
    )


def native_of(row: DeviceRow) -> NativeDriver:
    """The driver (and module) the device goes back to."""

    def name(text: str) -> DriverName | None:
        try:
            return DriverName.parse(text) if text else None
        except InvalidDriverName:
            return None

    return NativeDriver(name(row.native_driver), name(row.native_module))


def fresh(deps: CoreDeps, row: DeviceRow) -> DeviceRow:
    """The row as stored now (under the group lock): NotFound if it was unregistered meanwhile."""
    got = deps.registry.get_device(row.id)
    if got is None:
        raise NotFound(f"device {row.name!r} was unregistered meanwhile")
    return got


def members(deps: CoreDeps, group: int) -> list[PciAddress]:
    return deps.host.group_members(group) if group >= 0 else []


def require_no_pending(deps: CoreDeps, addrs: Iterable[PciAddress]) -> None:
    """Timeout at once, writing nothing, while the kernel still has a write of ours to one of them: any
    new write would hang behind it (and land whenever it is let go, whatever happened since)."""
    for addr in sorted(set(addrs)):
        pending = deps.host.pending(addr)
        if pending:
            raise Timeout(
                f"{addr}: the kernel has not finished {pending[0].describe()}; nothing was written. "
                "Call again once it has (an admin's Recover returns the device then)"
            )


def require_usable(deps: CoreDeps, row: DeviceRow) -> None:
    """Failed for a device that is stuck or not on the bus: no operation may start on it."""
    if row.state == "stuck":
        raise Failed(
            f"device {row.name!r} ({row.pci_address}) is stuck after an earlier failure; an admin must "
            "Recover it first"
        )
    if row.state == "missing" or not deps.host.device_exists(row.pci_address):
        raise Failed(f"device {row.name!r} ({row.pci_address}) is not on the bus")
    if vendor_vgpu.is_vendor_vf(deps.host, row.pci_address):
        # nvidia is the VF's VFIO driver: it looks bound to vfio, but without a vGPU type set a VMM's
        # open fails (ENODEV); the VF is used only through AttachVGPU
        raise InvalidArgument(
            f"device {row.name!r} ({row.pci_address}) is an NVIDIA vendor-VFIO VF: it stays bound to nvidia, "
            "which is its VFIO driver, and is passed to a VM only with a vGPU on it (AttachVGPU)"
        )


def log_fields(row: DeviceRow, *, action: Action, uid: int | None = None) -> dict[str, object]:
    """The journal fields of a log line about one device."""
    out: dict[str, object] = {
        "ACTION": action,
        "DEVICE_ID": row.id,
        "DEVICE": row.name,
        "PCI_ADDRESS": str(row.pci_address),
    }
    if uid is not None:
        out["CALLER_UID"] = uid
    return out
