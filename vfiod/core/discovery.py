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
from pathlib import Path

from vfiod.core.errors import DeviceNotFound, InvalidPCIAddress
from vfiod.core.guard import BRIDGE_CLASSES, DMA_NEUTRAL_DRIVERS
from vfiod.core.hostcritical import host_critical as scan_host_critical
from vfiod.core.pciids import PciIds, default_pci_ids
from vfiod.core.validation import InvalidPciAddressInput
from vfiod.core.validation import pci_address as parse_pci_address
from vfiod.host.host import Host
from vfiod.host.pciaddr import PciAddress

DISPLAY_BASE_CLASS = "03"
_HEADER_TYPE_OFFSET = 0x0E

NO_IOMMU_BLOCKER = (
    "no IOMMU group: the IOMMU is off (add intel_iommu=on or amd_iommu=on to the kernel command line and "
    "reboot)"
)
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
        }


def device_type(class_code: str) -> str:
    """`gpu` for any display controller (base class 03), else `pci`."""
    return "gpu" if class_code[:2] == DISPLAY_BASE_CLASS else "pci"


def is_candidate(class_code: str) -> bool:
    """A default ListAvailable candidate: a display controller (0300 VGA, 0301 XGA, 0302 3D, 0380 other).

    By class only: the vendor does not matter, so an NVIDIA HDMI audio or USB function is not a candidate
    and an AMD or Intel GPU is.
    """
    return class_code[:2] == DISPLAY_BASE_CLASS


def _hex(raw: str | None) -> str:
    if raw is None:
        return ""
    raw = raw.strip().lower()
    return raw[2:] if raw.startswith("0x") else raw


def _int(raw: str | None, default: int) -> int:
    try:
        return int(raw) if raw is not None else default
    except ValueError:
        return default


class _Snapshot:
    """Per-call cache so that each attribute, link and group listing is read once."""

    def __init__(self, host: Host) -> None:
        self.host = host
        # Path joins cost more than the reads on a large host: build each directory once.
        self._devices_dir = host.pci_devices_dir
        self._groups_dir = host.iommu_groups_dir
        self._dirs: dict[PciAddress, Path] = {}
        self._class: dict[PciAddress, str] = {}
        self._driver: dict[PciAddress, str] = {}
        self._vfio_dev: dict[PciAddress, bool] = {}
        self._group: dict[PciAddress, int] = {}
        self._members: dict[int, tuple[PciAddress, ...]] = {}

    def dir(self, addr: PciAddress) -> Path:
        d = self._dirs.get(addr)
        if d is None:
            d = self._dirs[addr] = self._devices_dir / addr
        return d

    def attr(self, addr: PciAddress, name: str) -> str | None:
        return self.host.read_text(self.dir(addr) / name)

    def class_code(self, addr: PciAddress) -> str:
        code = self._class.get(addr)
        if code is None:
            code = _hex(self.attr(addr, "class"))
            code = code.rjust(6, "0") if code else ""
            self._class[addr] = code
        return code

    def driver(self, addr: PciAddress) -> str:
        drv = self._driver.get(addr)
        if drv is None:
            drv = self.host.link_name(self.dir(addr) / "driver") or ""
            self._driver[addr] = drv
        return drv

    def has_vfio_dev(self, addr: PciAddress) -> bool:
        got = self._vfio_dev.get(addr)
        if got is None:
            got = bool(self.host.list_dir(self.dir(addr) / "vfio-dev"))
            self._vfio_dev[addr] = got
        return got

    def group(self, addr: PciAddress) -> int:
        g = self._group.get(addr)
        if g is None:
            name = self.host.link_name(self.dir(addr) / "iommu_group")
            g = int(name) if name is not None and name.isdigit() else -1
            self._group[addr] = g
        return g

    def members(self, group: int) -> tuple[PciAddress, ...]:
        got = self._members.get(group)
        if got is None:
            names = self.host.list_dir(self._groups_dir / f"{group}/devices")
            out = []
            for name in names:
                try:
                    out.append(PciAddress.parse(name))
                except ValueError:
                    continue
            got = tuple(sorted(out))
            self._members[group] = got
        return got

    def is_bridge(self, addr: PciAddress) -> bool:
        """Header type 1 (PCI-to-PCI) or 2 (CardBus), or a bridge class (0600-0609).

        Only base class 06 (or an unreadable class) needs the config header: a type-1/2 header always
        comes with a bridge class, and reading config for every function would double the cost of a
        listing.
        """
        code = self.class_code(addr)
        if code[:4] in BRIDGE_CLASSES:
            return True
        if code and code[:2] != "06":
            return False
        header = _config_header_type(self.dir(addr) / "config")
        return header is not None and (header & 0x7F) in (1, 2)

    def dma_neutral(self, addr: PciAddress) -> bool:
        drv = self.driver(addr)
        return drv == "" or drv in DMA_NEUTRAL_DRIVERS or self.has_vfio_dev(addr)


def _config_header_type(path: Path) -> int | None:
    try:
        with open(path, "rb") as f:
            f.seek(_HEADER_TYPE_OFFSET)
            data = f.read(1)
    except OSError:
        return None
    return data[0] if data else None


def _normalise_registered(registered: Mapping[str, str] | None) -> dict[str, str]:
    return {k.lower(): v for k, v in (registered or {}).items()}


def _build(
    snap: _Snapshot,
    addr: PciAddress,
    names: PciIds,
    registered: Mapping[str, str],
    critical: Mapping[PciAddress, str],
) -> AvailableDevice:
    vendor = _hex(snap.attr(addr, "vendor"))
    device = _hex(snap.attr(addr, "device"))
    class_code = snap.class_code(addr)
    group = snap.group(addr)
    members = snap.members(group) if group >= 0 else ()
    reason = critical.get(addr, "")

    blockers: list[str] = []
    if group < 0:
        blockers.append(NO_IOMMU_BLOCKER)
    if reason:
        blockers.append(
            f"the host needs it: it {reason}; stop that use first (an admin can override with force)"
        )
    bridge = snap.is_bridge(addr)
    if bridge:
        blockers.append(BRIDGE_BLOCKER)
    for member in members:
        # A bridge is refused whatever its group holds: listing the group too would only add noise.
        if bridge or member == addr or member.same_slot(addr) or snap.dma_neutral(member):
            continue
        blockers.append(
            f"IOMMU group {group} also holds {member} ({snap.driver(member)}), which the host is using; "
            "it must be passed through with it or unbound"
        )

    return AvailableDevice(
        pci_address=str(addr),
        vendor_id=vendor,
        device_id=device,
        subsystem_vendor_id=_hex(snap.attr(addr, "subsystem_vendor")),
        subsystem_device_id=_hex(snap.attr(addr, "subsystem_device")),
        class_=class_code,
        vendor_name=(names.vendor_name(vendor) if vendor else None) or vendor,
        device_name=(names.device_name(vendor, device) if vendor and device else None) or device,
        type=device_type(class_code),
        iommu_group=group,
        iommu_group_members=tuple(str(m) for m in members),
        current_driver=snap.driver(addr),
        numa_node=_int(snap.attr(addr, "numa_node"), -1),
        boot_vga=snap.attr(addr, "boot_vga") == "1",
        reset_methods=tuple((snap.attr(addr, "reset_method") or "").split()),
        registered_as=registered.get(str(addr), ""),
        host_critical=reason,
        passthrough_ready=not blockers,
        blockers=tuple(blockers),
    )


def discover(
    host: Host,
    pci_ids: PciIds | None = None,
    *,
    all_devices: bool = False,
    registered: Mapping[str, str] | None = None,
    critical: Mapping[PciAddress, str] | None = None,
) -> list[AvailableDevice]:
    """Every candidate (display controllers; every function with `all_devices`), sorted by address.

    `registered` maps PCI address -> registered device id (`registered_as`). `critical` is a
    `host_critical()` result the caller already has; by default it is computed once here.
    """
    names = pci_ids if pci_ids is not None else default_pci_ids()
    snap = _Snapshot(host)
    reg = _normalise_registered(registered)
    crit = critical if critical is not None else scan_host_critical(host)
    out = []
    for addr in host.pci_addresses():
        if all_devices or is_candidate(snap.class_code(addr)):
            out.append(_build(snap, addr, names, reg, crit))
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
    try:
        canonical = parse_pci_address(addr)
    except InvalidPciAddressInput as e:
        raise InvalidPCIAddress(str(e)) from e
    if not host.device_exists(canonical):
        raise DeviceNotFound(f"no PCI device {canonical} on this host")
    names = pci_ids if pci_ids is not None else default_pci_ids()
    crit = critical if critical is not None else scan_host_critical(host)
    return _build(_Snapshot(host), canonical, names, _normalise_registered(registered), crit)
