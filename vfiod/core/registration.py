"""Registration policy: what a new device row holds, which functions anyone allowed to `register` may
register (display controllers, their same-slot functions, the configured allow-list) and which need the
admin authorization, and the companions an Attach with `include_group` registers on its own.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from vfiod.core import discovery, validation
from vfiod.core.deps import CoreDeps
from vfiod.core.devstate import log_fields
from vfiod.core.errors import NameExists
from vfiod.core.registry import DeviceRow
from vfiod.host.pciaddr import PciAddress
from vfiod.host.pcifunction import read_function
from vfiod.logevents import Action

log = logging.getLogger("vfiod.manager")

COMPANION_TAG = "vfiod.companion-of"


def registrable_without_admin(
    deps: CoreDeps, addr: PciAddress, info: discovery.AvailableDevice, allow: Sequence[str]
) -> bool:
    """A display controller, a function in `allow` (by address or vendor:device), or a same-slot function
    of a display controller (its HDMI audio, USB-C, ...)."""
    if discovery.is_candidate(info.class_):
        return True
    ids = f"{info.vendor_id}:{info.device_id}"
    if str(addr) in allow or ids in allow:
        return True
    for member in info.iommu_group_members:
        other = PciAddress.parse(member)
        if (
            other != addr
            and other.same_slot(addr)
            and discovery.is_candidate(read_function(deps.host, other).class_code)
        ):
            return True
    return False


def new_row(
    deps: CoreDeps, addr: PciAddress, name: str, tags: dict[str, str], info: discovery.AvailableDevice
) -> DeviceRow:
    """The row of a device about to be registered: its identity from discovery, its native driver (and
    whether it is on vfio already) from the kernel now."""
    fn = read_function(deps.host, addr)
    return DeviceRow(
        id=validation.new_device_id(),
        name=name,
        pci_address=addr,
        vendor_id=info.vendor_id,
        device_id=info.device_id,
        class_code=info.class_,
        subsystem_vendor_id=info.subsystem_vendor_id,
        subsystem_device_id=info.subsystem_device_id,
        iommu_group=info.iommu_group,
        native_driver=fn.driver or "",
        native_module=fn.module or "",
        state="vfio" if fn.is_vfio_bound else "host",
        tags=tags,
        vendor_name=info.vendor_name,
        device_name=info.device_name,
    )


def companions_of(deps: CoreDeps, anchor: DeviceRow) -> list[DeviceRow]:
    """The functions an Attach registered on its own along with `anchor` (tagged with its id): they are
    unregistered with it. One registered explicitly carries no such tag and stays."""
    return [r for r in deps.registry.list_devices() if r.tags.get(COMPANION_TAG) == anchor.id]


def register_companion(deps: CoreDeps, addr: PciAddress, anchor: DeviceRow | None) -> DeviceRow:
    """Register a same-slot function an Attach takes along, tagged with the device it came with."""
    info = discovery.describe(deps.host, addr, deps.pci_ids)
    tags = {COMPANION_TAG: anchor.id} if anchor else {}
    name = addr.default_device_name()
    row = new_row(deps, addr, name, tags, info)
    try:
        stored = deps.registry.add_device(row)
    except NameExists:
        stored = deps.registry.add_device(DeviceRow(**{**row.__dict__, "name": f"{name}-{row.id[:6]}"}))
    log.info("registered companion %s", addr, extra=log_fields(stored, action=Action.REGISTER_COMPANION))
    return stored
