"""The typed rows the registry stores and returns, and the closed sets of values their fields take.

Only what the kernel cannot tell is stored: a device's type (`gpu`, `pci`) is derived from its class code,
and where a device goes back to when it reappears is derived from the kernel when it does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final, Literal, get_args

from vfiod.host.backend import NodeOwner
from vfiod.host.pciaddr import PciAddress
from vfiod.host.pcifunction import device_type

# `creating` and `destroying` are a vGPU's: the claim is journaled and the create or remove write is in
# flight.
DeviceState = Literal[
    "host", "binding", "vfio", "attached", "releasing", "stuck", "missing", "creating", "destroying"
]
DEVICE_STATES: Final[tuple[DeviceState, ...]] = get_args(DeviceState)
AttachmentRole = Literal["requested", "companion"]
ATTACHMENT_ROLES: Final[tuple[AttachmentRole, ...]] = get_args(AttachmentRole)
# How an attachment reaches its VMM (vfiod/core/handoff.py): the group node, or descriptors.
HandoffMode = Literal["node", "fd"]
HANDOFF_MODES: Final[tuple[HandoffMode, ...]] = get_args(HandoffMode)
# What an intent journals: `function`, that an operation (its `action`: attach, detach, bind, ...) moves
# one function; `write`, one sysfs write about to happen (override, unbind, probe, clear-override);
# `grant`, that a group node is about to be handed over; `claim`, that a vGPU is about to be created.
IntentKind = Literal["function", "write", "grant", "claim"]
INTENT_KINDS: Final[tuple[IntentKind, ...]] = get_args(IntentKind)
# mdev: a mediated device under /sys/bus/mdev; vendor-vfio: an SR-IOV VF whose own driver is its VFIO
# driver (NVIDIA vGPU 17 and later).
VgpuFramework = Literal["mdev", "vendor-vfio"]
VGPU_FRAMEWORKS: Final[tuple[VgpuFramework, ...]] = get_args(VgpuFramework)


def utc_now() -> datetime:
    """Now in UTC, to the second: the precision the registry stores."""
    return datetime.now(UTC).replace(microsecond=0)


@dataclass(frozen=True)
class DeviceRow:
    """A registered PCI function. The identity fields (vendor, device, subsystem ids, class) are what the
    live device is compared with before any unbind."""

    id: str
    name: str
    pci_address: PciAddress
    vendor_id: str
    device_id: str
    class_code: str
    subsystem_vendor_id: str = ""
    subsystem_device_id: str = ""
    iommu_group: int = -1
    native_driver: str = ""
    native_module: str = ""
    state: DeviceState = "host"
    # vfiod moved the device to vfio-pci and must put it back; false for devices pre-bound at boot.
    bound_by_vfiod: bool = False
    created_at: datetime = field(default_factory=utc_now)
    tags: dict[str, str] = field(default_factory=dict)
    vendor_name: str = ""
    device_name: str = ""
    # The device's generation in the intent journal: every intent with an id up to this one is resolved
    # (the device was settled after it was written), so start-up recovery never replays it.
    settled_through: int = 0

    @property
    def type(self) -> str:
        return device_type(self.class_code)


@dataclass(frozen=True)
class VgpuRow:
    """A vGPU: a registered device of type `vgpu` (it shares the devices' ids and names) with what its
    parent made of it. `pci_address` is the VF's for vendor-vfio and None for an mdev, which lives at
    /sys/bus/mdev/devices/<uuid>; vendor and device ids are the parent's."""

    id: str
    name: str
    uuid: str
    framework: VgpuFramework
    type_id: str  # nvidia-1155, mtty-2, or a vendor-vfio type id such as 1155
    profile: str  # the type's name (NVIDIA L40S-4Q), or its id when it has none
    parent: str  # the mdev parent's device name or the VF's PCI address
    physical_gpu: str = ""  # the PF's PCI address, "" when the parent is not on an SR-IOV GPU
    pci_address: PciAddress | None = None
    vendor_id: str = ""
    device_id: str = ""
    iommu_group: int = -1
    state: DeviceState = "creating"
    managed: bool = True  # vfiod created it (and may destroy it)
    created_at: datetime = field(default_factory=utc_now)
    tags: dict[str, str] = field(default_factory=dict)
    settled_through: int = 0

    @property
    def type(self) -> str:
        return "vgpu"


@dataclass(frozen=True)
class AttachmentRow:
    """A device given to an instance. One from an earlier boot is a reservation, not a live binding."""

    device_id: str
    instance_id: str
    owner_uid: int
    iommu_group: int
    boot_id: str
    role: AttachmentRole = "requested"
    attached_at: datetime = field(default_factory=utc_now)
    # The group node's owner and mode before vfiod granted it; None when vfiod did not change it.
    node_prev: NodeOwner | None = None
    # cloud-hypervisor's x_nv_gpudirect_clique for this function (GPUDirect P2P), None when not asked.
    gpudirect_clique: int | None = None
    # How the VMM gets the device: the group node given to the owner, or descriptors (OpenDevices).
    handoff: HandoffMode = "node"
    id: int = 0  # assigned by add_attachment; never reused


@dataclass(frozen=True)
class IntentRow:
    """A journaled act that had not been cleared: it may or may not have happened. Which fields mean
    something depends on `kind` (see IntentKind); the others are empty."""

    id: int
    kind: IntentKind
    action: str
    boot_id: str
    operation: str
    created_at: datetime
    device_id: str = ""
    pci_address: str = ""
    iommu_group: int = -1
    from_driver: str = ""
    to_driver: str = ""
    value: str = ""  # write: what is written when it is not a driver (a VF count, say)
    native_module: str = ""  # function: the module that provides from_driver
    node_prev: NodeOwner | None = None  # grant: the node's owner and mode before vfiod changed it
    vgpu_parent: str = ""  # claim: where the vGPU is being created
    vgpu_uuid: str = ""
    vgpu_type: str = ""


@dataclass(frozen=True)
class HoldRow:
    """The daemon-wide hold on a persistence unit: stopped while `holders` > 0, started again at 0 if it
    `was_active`."""

    unit: str
    was_active: bool
    holders: int
    boot_id: str


@dataclass(frozen=True)
class ParentHealthRow:
    """The failures in a row of one vGPU parent (creates or verifies that failed, VMMs that died while the
    guest driver started): placement policy quarantines a parent from some count on; a success or an
    admin's Recover clears it."""

    parent: str
    failures: int
    last_failure: str
    since: datetime
