"""PCI discovery: what is on the bus, what each function is, and whether it can be passed through now.

Owns the `AvailableDevice` record of the contract (ListAvailable) and the rules behind it:
- candidates are display controllers (PCI base class 03: VGA, XGA, 3D and "other display"), whatever the
  vendor; `all_devices` lists every function. A GPU's audio or USB function is not a candidate of its own:
  it shows up in the GPU's `iommu_group_members` and moves with it through `include_group`;
- a function without an IOMMU group is reported with a blocker saying how to turn the IOMMU on, never
  dropped, so a host with the IOMMU off shows its GPUs and the fix instead of an empty list;
- the IOMMU group is judged by driver, as the kernel judges viability: a member with no driver, or on
  vfio-pci / a vfio variant / pci-stub / pcieport, does not block; functions of the same slot do not block
  either (`include_group` takes them along);
- `vendor_name` and `device_name` come from pci.ids; when the database or the entry is missing they fall
  back to the numeric ids ("10de", "27b8") so a name is never empty.

Every attribute is read once per call through `Host` and the host-critical scan runs once per call, so a
listing costs one pass over sysfs. Results are sorted by address.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from vfiod.core.errors import DeviceNotFound
from vfiod.core.hostcritical import host_critical as scan_host_critical
from vfiod.core.kernel_support import IOMMU_FIX
from vfiod.core.pciids import PciIds, default_pci_ids
from vfiod.core.validation import pci_address as parse_pci_address
from vfiod.host.host import Host
from vfiod.host.pciaddr import PciAddress
from vfiod.host.pcifunction import DISPLAY_BASE_CLASS, PciSnapshot, device_type
from vfiod.host.vfio_variants import VfioAlias, kernel_aliases, pick

NO_IOMMU_BLOCKER = f"no IOMMU group: the IOMMU is off ({IOMMU_FIX})"
BRIDGE_BLOCKER = "it is a PCI bridge; bridges are never passed through (pass the devices behind it instead)"


@dataclass(frozen=True)
class AvailableDevice:
    """One PCI function as ListAvailable reports it; the fields are exactly the contract's keys."""

    pci_address: str
    vendor_id: str
    device_id: str
    subsystem_vendor_id: str
    subsystem_device_id: str
    class_: str
    vendor_name: str
    device_name: str
    type: str
    iommu_group: int
    iommu_group_members: tuple[str, ...]
    current_driver: str
    numa_node: int
    boot_vga: bool
    reset_methods: tuple[str, ...]
    registered_as: str
    host_critical: str
    passthrough_ready: bool
    blockers: tuple[str, ...]
    sriov_totalvfs: int  # 0: no SR-IOV capability
    sriov_numvfs: int
    physfn: str  # a VF's physical function, "" for anything else
    virtfns: tuple[str, ...]  # a PF's enabled VFs
    mdev_types: tuple[str, ...]  # the mediated device types it offers as a parent
    variant_driver: str  # the vfio variant driver the kernel's vfio_pci: aliases pick, "" for vfio-pci

    def to_record(self) -> dict[str, object]:
        """The contract's a{sv} keys (`class_` becomes `class`; tuples become lists)."""
        return {
            "pci_address": self.pci_address,
            "vendor_id": self.vendor_id,
            "device_id": self.device_id,
            "subsystem_vendor_id": self.subsystem_vendor_id,
            "subsystem_device_id": self.subsystem_device_id,
            "class": self.class_,
            "vendor_name": self.vendor_name,
            "device_name": self.device_name,
            "type": self.type,
            "iommu_group": self.iommu_group,
            "iommu_group_members": list(self.iommu_group_members),
            "current_driver": self.current_driver,
            "numa_node": self.numa_node,
            "boot_vga": self.boot_vga,
            "reset_methods": list(self.reset_methods),
            "registered_as": self.registered_as,
            "host_critical": self.host_critical,
            "passthrough_ready": self.passthrough_ready,
            "blockers": list(self.blockers),
            "sriov_totalvfs": self.sriov_totalvfs,
            "sriov_numvfs": self.sriov_numvfs,
            "physfn": self.physfn,
            "virtfns": list(self.virtfns),
            "mdev_types": list(self.mdev_types),
            "variant_driver": self.variant_driver,
        }


def is_candidate(class_code: str) -> bool:
    """A default ListAvailable candidate: a display controller (0300 VGA, 0301 XGA, 0302 3D, 0380 other).

    By class only: the vendor does not matter, so an NVIDIA HDMI audio or USB function is not a candidate
    and an AMD or Intel GPU is.
    """
    return class_code[:2] == DISPLAY_BASE_CLASS


def _normalise_registered(registered: Mapping[str, str] | None) -> dict[str, str]:
    return {k.lower(): v for k, v in (registered or {}).items()}


def _build(
    snap: PciSnapshot,
    addr: PciAddress,
    names: PciIds,
    registered: Mapping[str, str],
    critical: Mapping[PciAddress, str],
    aliases: tuple[VfioAlias, ...],
) -> AvailableDevice:
    fn = snap.function(addr)
    vendor, device, class_code = fn.vendor, fn.device, fn.class_code
    group = fn.iommu_group
    members = snap.members(group) if group is not None else ()
    reason = critical.get(addr, "")

    blockers: list[str] = []
    if group is None:
        blockers.append(NO_IOMMU_BLOCKER)
    if reason:
        blockers.append(
            f"the host needs it: it {reason}; stop that use first (an admin can override with force)"
        )
    bridge = fn.never_passed_through
    if bridge:
        blockers.append(BRIDGE_BLOCKER)
    if fn.sriov_numvfs:
        blockers.append(
            f"it is an SR-IOV physical function with {fn.sriov_numvfs} virtual functions enabled "
            f"({', '.join(str(v) for v in fn.virtfns)}); pass the VFs through, or disable them to pass the PF"
        )
    if fn.physfn is not None and fn.mdev_types:
        blockers.append(
            "it is a vGPU parent (a virtual function offering mediated-device types): AttachVGPU shares it; "
            "it is not passed through whole"
        )
    if fn.vendor_vgpu_host:
        blockers.append(
            "it is an NVIDIA vendor-VFIO vGPU host (nvidia is its VFIO driver, and unbinding it from nvidia "
            "breaks the VF until its GPU's VFs are enabled afresh): AttachVGPU shares it"
        )
    if fn.mdev_children:
        blockers.append(
            f"it is the parent of mediated devices ({', '.join(fn.mdev_children)}); remove them to pass it"
        )
    for member in members:
        # A bridge is refused whatever its group holds: listing the group too would only add noise.
        other = snap.function(member)
        # Judged by driver, as the kernel judges viability and as Attach plans the group (a same-slot
        # function goes along with include_group; a VF never does).
        if bridge or member == addr or (member.same_slot(addr) and not other.physfn) or other.dma_neutral:
            continue
        blockers.append(
            f"IOMMU group {group} also holds {member} ({other.driver or ''}), which the host is using; "
            "it must be passed through with it or unbound"
        )

    return AvailableDevice(
        pci_address=str(addr),
        vendor_id=vendor,
        device_id=device,
        subsystem_vendor_id=fn.subsystem_vendor,
        subsystem_device_id=fn.subsystem_device,
        class_=class_code,
        vendor_name=(names.vendor_name(vendor) if vendor else None) or vendor,
        device_name=(names.device_name(vendor, device) if vendor and device else None) or device,
        type=device_type(class_code),
        iommu_group=group if group is not None else -1,
        iommu_group_members=tuple(str(m) for m in members),
        current_driver=fn.driver or "",
        numa_node=fn.numa_node,
        boot_vga=fn.boot_vga,
        reset_methods=fn.reset_methods,
        registered_as=registered.get(str(addr), ""),
        host_critical=reason,
        passthrough_ready=not blockers,
        blockers=tuple(blockers),
        sriov_totalvfs=fn.sriov_totalvfs or 0,
        sriov_numvfs=fn.sriov_numvfs or 0,
        physfn=str(fn.physfn) if fn.physfn else "",
        virtfns=tuple(str(v) for v in fn.virtfns),
        mdev_types=fn.mdev_types,
        variant_driver=(pick(fn.modalias, aliases) or "") if aliases else "",
    )


def discover(
    host: Host,
    pci_ids: PciIds | None = None,
    *,
    all_devices: bool = False,
    registered: Mapping[str, str] | None = None,
    critical: Mapping[PciAddress, str] | None = None,
    snap: PciSnapshot | None = None,
) -> list[AvailableDevice]:
    """Every candidate (display controllers; every function with `all_devices`), sorted by address.

    `registered` maps PCI address -> registered device id (`registered_as`). `critical` is a
    `host_critical()` result the caller already has; by default it is computed once here. `snap` is the
    caller's read of the bus when it goes on reading the same functions (a new one by default).
    """
    names = pci_ids if pci_ids is not None else default_pci_ids()
    snap = snap if snap is not None else PciSnapshot(host)
    reg = _normalise_registered(registered)
    crit = critical if critical is not None else scan_host_critical(host)
    aliases = kernel_aliases(host)
    if all_devices:
        snap.load_all()  # each function in one pass over its directory, group members included
    out = []
    for addr in snap.addresses():
        if all_devices or is_candidate(snap.function(addr).class_code):
            out.append(_build(snap, addr, names, reg, crit, aliases))
    return out


def describe(
    host: Host,
    addr: str,
    pci_ids: PciIds | None = None,
    *,
    registered: Mapping[str, str] | None = None,
    critical: Mapping[PciAddress, str] | None = None,
) -> AvailableDevice:
    """One function, candidate or not. `addr` may be in any case (`0000:A2:00.0`); it is normalised.

    Raises InvalidPCIAddress for malformed text and DeviceNotFound when no such function is on the bus.
    """
    canonical = parse_pci_address(addr)
    if not host.device_exists(canonical):
        raise DeviceNotFound(f"no PCI device {canonical} on this host")
    names = pci_ids if pci_ids is not None else default_pci_ids()
    crit = critical if critical is not None else scan_host_critical(host)
    aliases = kernel_aliases(host)
    return _build(PciSnapshot(host), canonical, names, _normalise_registered(registered), crit, aliases)
