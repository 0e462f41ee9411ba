"""The Device and Attachment records of the contract, built from registry rows plus the live kernel.

`bound_to_vfio`, `driver` and `vfio_group_path` are read from the host every time, never from the registry,
so a record always says what the kernel says now.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from vfiod.core.registry import AttachmentRow, DeviceRow, HandoffMode, VgpuRow, format_timestamp
from vfiod.host import vendor_vgpu
from vfiod.host.host import Host
from vfiod.host.pciaddr import PciAddress
from vfiod.host.pcifunction import read_function

NO_OWNER: Final = 0xFFFFFFFF  # owner_uid of a device nobody has attached: (uint32) -1


def sysfs_path(addr: str) -> str:
    """What cloud-hypervisor's `--device path=` takes (hypeman passes it with the trailing slash)."""
    return f"/sys/bus/pci/devices/{addr}/"


@dataclass(frozen=True)
class Device:
    id: str
    name: str
    type: str
    pci_address: str
    vendor_id: str
    device_id: str
    subsystem_vendor_id: str
    subsystem_device_id: str
    vendor_name: str
    device_name: str
    iommu_group: int
    bound_to_vfio: bool
    driver: str
    native_driver: str
    state: str
    attached_to: str
    owner_uid: int | None
    created_at: str
    sysfs_path: str
    vfio_group_path: str
    tags: dict[str, str] = field(default_factory=dict)

    def to_record(self) -> dict[str, object]:
        rec: dict[str, object] = {
            "id": self.id,
            "name": self.name,
            "type": self.type,
            "pci_address": self.pci_address,
            "vendor_id": self.vendor_id,
            "device_id": self.device_id,
            "subsystem_vendor_id": self.subsystem_vendor_id,
            "subsystem_device_id": self.subsystem_device_id,
            "vendor_name": self.vendor_name,
            "device_name": self.device_name,
            "iommu_group": self.iommu_group,
            "bound_to_vfio": self.bound_to_vfio,
            "driver": self.driver,
            "native_driver": self.native_driver,
            "state": self.state,
            "attached_to": self.attached_to,
            "created_at": self.created_at,
            "sysfs_path": self.sysfs_path,
            "vfio_group_path": self.vfio_group_path,
            "tags": dict(self.tags),
        }
        # Always present: a decoder that reads a missing key as 0 would see root.
        rec["owner_uid"] = NO_OWNER if self.owner_uid is None else self.owner_uid
        return rec


def vfio_group_path(host: Host, group: int) -> str:
    if group < 0:
        return ""
    return f"/dev/vfio/{group}" if host.vfio_group_node(group).exists() else ""


def device_from_row(host: Host, row: DeviceRow, attachment: AttachmentRow | None) -> Device:
    addr = PciAddress.parse(row.pci_address)
    fn = read_function(host, addr)
    present = fn.present
    live_group = fn.iommu_group if present else None
    group = live_group if live_group is not None else row.iommu_group
    return Device(
        id=row.id,
        name=row.name,
        type=row.type,
        pci_address=row.pci_address,
        vendor_id=row.vendor_id,
        device_id=row.device_id,
        subsystem_vendor_id=row.subsystem_vendor_id,
        subsystem_device_id=row.subsystem_device_id,
        vendor_name=row.vendor_name,
        device_name=row.device_name,
        iommu_group=group,
        bound_to_vfio=present and fn.is_vfio_bound,
        driver=(fn.driver or "") if present else "",
        native_driver=row.native_driver,
        state=row.state,
        attached_to=attachment.instance_id if attachment else "",
        owner_uid=attachment.owner_uid if attachment else None,
        created_at=format_timestamp(row.created_at),
        sysfs_path=sysfs_path(row.pci_address),
        vfio_group_path=vfio_group_path(host, group) if present else "",
        tags=dict(row.tags),
    )


def mdev_sysfs_path(uuid: str) -> str:
    """A mediated device's directory: cloud-hypervisor's `--device path=`, and without the trailing slash
    QEMU's `-device vfio-pci,sysfsdev=`."""
    return f"/sys/bus/mdev/devices/{uuid}/"


def device_from_vgpu(host: Host, row: VgpuRow, attachment: AttachmentRow | None) -> Device:
    """A vGPU as the Device record the contract gives it: type `vgpu`; an mdev has no PCI address and its
    own directory, a vendor-VFIO vGPU is its VF's; group and driver read live (a vGPU the kernel no longer
    has shows none)."""
    vendor = row.framework == "vendor-vfio"
    where = (
        host.device_dir(row.pci_address) if vendor and row.pci_address else host.mdev_devices_dir / row.uuid
    )
    live = host.link_name(where / "iommu_group")
    if vendor and row.pci_address and vendor_vgpu.current_type(host, row.pci_address) != row.type_id:
        live = None  # the VF is there, its vGPU is not
    group = int(live) if live is not None and live.isdigit() else row.iommu_group
    present = live is not None
    return Device(
        id=row.id,
        name=row.name,
        type=row.type,
        pci_address=str(row.pci_address or "") if vendor else "",
        vendor_id=row.vendor_id,
        device_id=row.device_id,
        subsystem_vendor_id="",
        subsystem_device_id="",
        vendor_name="",
        device_name=row.profile,
        iommu_group=group,
        bound_to_vfio=present,
        driver=(host.link_name(where / "driver") or "") if present else "",
        native_driver="",
        state=row.state,
        attached_to=attachment.instance_id if attachment else "",
        owner_uid=attachment.owner_uid if attachment else None,
        created_at=format_timestamp(row.created_at),
        sysfs_path=sysfs_path(str(row.pci_address)) if vendor else mdev_sysfs_path(row.uuid),
        vfio_group_path=vfio_group_path(host, group) if present else "",
        tags=dict(row.tags),
    )


@dataclass(frozen=True)
class Attachment:
    id: str
    pci_address: str  # "" for a vGPU (an mdev)
    role: str
    iommu_group: int
    vfio_group_path: str
    gpudirect_clique: int | None = None
    handoff: HandoffMode = (
        "node"  # node: vfio_group_path is the owner's; fd: OpenDevices hands descriptors over
    )
    vfio_cdev_path: str = ""  # the function's /dev/vfio/devices/vfioN (fd mode), "" otherwise
    mdev_uuid: str = ""  # an mdev vGPU's uuid
    vgpu_uuid: str = ""  # a vendor-VFIO vGPU's uuid (vfiod's, or the VM's when the VMM chose it)
    changed: bool = True  # this call made it (False: the idempotent repeat of an earlier one)

    @property
    def sysfs_path(self) -> str:
        return mdev_sysfs_path(self.mdev_uuid) if self.mdev_uuid else sysfs_path(self.pci_address)

    def to_record(self) -> dict[str, object]:
        config: dict[str, object] = {"path": self.sysfs_path}
        uuid = self.mdev_uuid or self.vgpu_uuid
        if uuid:  # a vGPU: QEMU's sysfsdev= and the uuid its VM must carry (-uuid)
            config["sysfsdev"] = self.sysfs_path.rstrip("/")
            config["uuid"] = uuid
        if self.gpudirect_clique is not None:
            config["x_nv_gpudirect_clique"] = self.gpudirect_clique
        return {
            "id": self.id,
            "pci_address": self.pci_address,
            "role": self.role,
            "sysfs_path": self.sysfs_path,
            "vfio_group_path": self.vfio_group_path,
            "vfio_cdev_path": self.vfio_cdev_path,
            "handoff": self.handoff,
            "iommu_group": self.iommu_group,
            "device_config": config,
            "changed": self.changed,
        }
