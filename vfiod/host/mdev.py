"""One read model of mediated devices: the parents under /sys/class/mdev_bus/ (a PCI function or a
virtual device such as the kernel's `mtty` sample), the types each offers (`mdev_supported_types/<type>/`
with `name`, `description` when the driver has one, `device_api`, `available_instances`), and the mdevs
on the mdev bus (/sys/bus/mdev/devices/<uuid>, each with its type, parent, driver and IOMMU group).

Reads only, through `Host`; the writes (`create`, `remove`) are `Host.create_mdev` and `Host.remove_mdev`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from vfiod.host.host import Host
from vfiod.host.pciaddr import InvalidPciAddressText, PciAddress

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass(frozen=True)
class MdevType:
    """A type as one parent offers it."""

    id: str  # the directory name: `mtty-2`, `nvidia-1155`
    parent: str
    name: str  # the `name` file, or the id when the driver has none
    description: str
    device_api: str
    available: int


@dataclass(frozen=True)
class MdevParent:
    name: str  # its device name: /sys/class/mdev_bus/<name>
    pci_address: PciAddress | None  # None for a parent that is not a PCI function
    physfn: PciAddress | None  # a VF parent's physical function
    types: tuple[MdevType, ...]
    framework: str = "mdev"  # or "vendor-vfio": an NVIDIA VF with `nvidia/` (host/vendor_vgpu.py)


@dataclass(frozen=True)
class Mdev:
    uuid: str
    parent: str
    type_id: str
    iommu_group: int | None
    driver: str | None
    framework: str = "mdev"  # "vendor-vfio": the vGPU of the VF `parent`; no uuid in the kernel ("")

    @property
    def sysfs_path(self) -> str:
        if self.framework == "vendor-vfio":
            return f"/sys/bus/pci/devices/{self.parent}/"
        return f"/sys/bus/mdev/devices/{self.uuid}/"


def _int(text: str | None) -> int:
    try:
        return max(0, int(text or "0"))
    except ValueError:
        return 0


def parent_names(host: Host) -> list[str]:
    return host.list_dir(host.mdev_bus_dir)


def read_parent(host: Host, name: str) -> MdevParent | None:
    """A parent by its device name; None if it is not registered (its module is not loaded)."""
    base = host.mdev_bus_dir / name
    if not (base / "mdev_supported_types").is_dir():
        return None
    types = []
    for type_id in host.list_dir(base / "mdev_supported_types"):
        d = base / "mdev_supported_types" / type_id
        types.append(
            MdevType(
                id=type_id,
                parent=name,
                name=host.read_text(d / "name") or type_id,
                description=host.read_text(d / "description") or "",
                device_api=host.read_text(d / "device_api") or "",
                available=_int(host.read_text(d / "available_instances")),
            )
        )
    addr = parse_address(name)
    physfn = parse_address(host.link_name(host.device_dir(addr) / "physfn")) if addr is not None else None
    return MdevParent(name=name, pci_address=addr, physfn=physfn, types=tuple(types))


def read_parents(host: Host) -> list[MdevParent]:
    return [p for p in (read_parent(host, n) for n in parent_names(host)) if p is not None]


def read_mdev(host: Host, uuid: str) -> Mdev | None:
    """An mdev on the bus by uuid; None if there is none."""
    d = host.mdev_devices_dir / uuid
    type_link = d / "mdev_type"
    try:
        type_dir = os.path.realpath(type_link, strict=True)
    except OSError:
        return None
    group = host.link_name(d / "iommu_group")
    parent = os.path.basename(os.path.dirname(os.path.dirname(type_dir)))
    return Mdev(
        uuid=uuid,
        parent=parent,
        type_id=os.path.basename(type_dir),
        iommu_group=int(group) if group is not None and group.isdigit() else None,
        driver=host.link_name(d / "driver"),
    )


def read_mdevs(host: Host) -> list[Mdev]:
    names = [n for n in host.list_dir(host.mdev_devices_dir) if UUID_RE.fullmatch(n)]
    return [m for m in (read_mdev(host, n) for n in names) if m is not None]


def parse_address(text: str | None) -> PciAddress | None:
    """A PCI address from a device name or link target; None for anything else (a virtual parent)."""
    if not text:
        return None
    try:
        return PciAddress.parse(text)
    except InvalidPciAddressText:
        return None
