"""One read model of a PCI function: what sysfs says about it (ids, class, header type, driver and its
module, IOMMU group, `vfio-dev`, override, reset methods, NUMA node, SR-IOV links, mdev types), and the
few rules that are judged on it everywhere in vfiod (a bridge, a DMA-neutral group member, bound to VFIO).

A `PciSnapshot` is one call's view of the bus: each function's attributes are read on first use and then
kept, so a listing reads every attribute at most once and never sees a value change under it. Snapshots
are cheap; take a new one for every decision (vfiod never decides on a stale read). Reads go through
`Host` (its driver, override, group and vfio-dev readers are the ones parsing those attributes), so a
simulated tree, a copied tree or the real /sys all read the same way.

Also the one parser of sysfs hex ids (`parse_hex`) and the one normaliser of module names
(`module_name`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vfiod.host import vendor_vgpu
from vfiod.host.dirread import DirectoryRead, read_directory
from vfiod.host.host import Host
from vfiod.host.kept import kept
from vfiod.host.mdev import UUID_RE
from vfiod.host.pciaddr import DriverName, PciAddress, driver_from_link, group_from_link, is_vfio_driver

# Drivers that leave DMA ownership to the user (driver_managed_dma in Linux): a group member on one of
# these does not make the group unviable. vfio variant drivers are recognised by name (vfio_variants) and
# by their vfio-dev/ directory.
DMA_NEUTRAL_DRIVERS = frozenset({"vfio-pci", "pci-stub", "pcieport"})
# Bridge classes 0600 (host) .. 0609 (semi-transparent PCI-to-PCI): never passed through. 0680 ("other
# bridge", e.g. NVSwitch) is an endpoint.
BRIDGE_CLASSES = frozenset(f"060{i}" for i in range(10))
# Classes of a PCI-to-PCI (0604, 0609) or CardBus (0607) bridge: header type 1 or 2.
_BRIDGE_HEADER_CLASSES = frozenset({"0604", "0607", "0609"})
_HEADER_TYPE_OFFSET = 0x0E
# Display controllers (0300 VGA, 0301 XGA, 0302 3D, 0380 other): what vfiod calls a GPU.
DISPLAY_BASE_CLASS = "03"
# What a listing reads of every function (`PciFunction.load`): attributes, links, sub-directories.
_LISTED_FILES = (
    "vendor",
    "device",
    "subsystem_vendor",
    "subsystem_device",
    "class",
    "numa_node",
    "boot_vga",
    "reset_method",
    "sriov_totalvfs",
)
_LISTED_LINKS = ("driver", "iommu_group", "physfn")
_LISTED_DIRS = ("mdev_supported_types",)


def parse_hex(raw: str | None) -> str:
    """A sysfs id (`0x10de\\n`, `0x030000`) as bare lower-case hex (`10de`, `030000`); "" if unreadable."""
    text = (raw or "").strip().lower()
    return text[2:] if text.startswith("0x") else text


def module_name(name: str) -> str:
    """A module name as /sys/module and modprobe.d compare it: `-` and `_` are the same character."""
    return name.strip().replace("-", "_")


@dataclass(frozen=True)
class Identity:
    """What makes a card that card: compared before any unbind so a swapped card is never touched."""

    vendor_id: str
    device_id: str
    subsystem_vendor_id: str
    subsystem_device_id: str
    class_code: str

    def describe(self) -> str:
        return (
            f"{self.vendor_id}:{self.device_id} (subsystem {self.subsystem_vendor_id}:"
            f"{self.subsystem_device_id}, class {self.class_code})"
        )


class PciFunction:
    """One function as this snapshot sees it. Every property reads its sysfs file once, on first use."""

    def __init__(self, host: Host, address: PciAddress, directory: Path | str) -> None:
        self._host = host
        self.address = address
        # Reads join names to this string: a listing of thousands of functions makes no Path per read.
        self._prefix = os.fspath(directory).rstrip("/") + "/"
        self._loaded: DirectoryRead | None = None

    def load(self) -> None:
        """Read everything a listing asks of a function in one pass over its directory (one directory
        descriptor, one read per attribute). The properties then answer from it; what it does not cover
        is still read on first use."""
        self._loaded = read_directory(self._prefix, _LISTED_FILES, _LISTED_LINKS, _LISTED_DIRS)

    def _file(self, name: str) -> str | None:
        loaded = self._loaded
        if loaded is not None and name in loaded.files:
            return loaded.files[name]
        return self.attr(name)

    def _link(self, name: str) -> str | None:
        loaded = self._loaded
        if loaded is not None and name in loaded.links:
            return loaded.links[name]
        return self._host.link_name(self._prefix + name)

    @property
    def dir(self) -> Path:
        return Path(self._prefix)

    def attr(self, name: str) -> str | None:
        """A raw attribute, read now (not kept): for what the model does not name."""
        return self._host.read_text(self._prefix + name)

    @kept
    def present(self) -> bool:
        return self.dir.is_dir()

    @kept
    def vendor(self) -> str:
        return parse_hex(self._file("vendor"))

    @kept
    def device(self) -> str:
        return parse_hex(self._file("device"))

    @kept
    def subsystem_vendor(self) -> str:
        return parse_hex(self._file("subsystem_vendor"))

    @kept
    def subsystem_device(self) -> str:
        return parse_hex(self._file("subsystem_device"))

    @kept
    def class_code(self) -> str:
        """Six hex digits (base class, sub-class, prog-if), "" if unreadable."""
        code = parse_hex(self._file("class"))
        return code.rjust(6, "0") if code else ""

    @property
    def modalias(self) -> str:
        """The `modalias` text, composed from the ids already read exactly as the kernel prints it
        (drivers/pci/pci-sysfs.c `modalias_show`); "" if the ids cannot be read."""
        try:
            vendor, device = int(self.vendor, 16), int(self.device, 16)
            sv, sd = int(self.subsystem_vendor, 16), int(self.subsystem_device, 16)
            cls = int(self.class_code, 16)
        except ValueError:
            return ""
        return (
            f"pci:v{vendor:08X}d{device:08X}sv{sv:08X}sd{sd:08X}"
            f"bc{cls >> 16:02X}sc{(cls >> 8) & 0xFF:02X}i{cls & 0xFF:02X}"
        )

    @kept
    def header_type(self) -> int | None:
        """The config header's type (0 endpoint, 1 PCI-to-PCI bridge, 2 CardBus), None if unreadable."""
        try:
            with open(self.dir / "config", "rb") as f:
                f.seek(_HEADER_TYPE_OFFSET)
                data = f.read(1)
        except OSError:
            return None
        return data[0] & 0x7F if data else None

    @kept
    def driver(self) -> DriverName | None:
        return driver_from_link(self._link("driver"))

    @kept
    def module(self) -> DriverName | None:
        """The module providing the bound driver (`driver/module`), None if built in or unbound."""
        return self._host.driver_module(self.address)

    @kept
    def driver_override(self) -> str | None:
        return self._host.driver_override(self.address)

    @kept
    def iommu_group(self) -> int | None:
        return group_from_link(self._link("iommu_group"))

    @kept
    def has_vfio_dev(self) -> bool:
        """A `vfio-dev/` directory: the function is registered with VFIO (vfio-pci or a variant driver)."""
        return self._host.has_vfio_dev(self.address)

    @kept
    def numa_node(self) -> int:
        try:
            return int(self._file("numa_node") or "-1")
        except ValueError:
            return -1

    @kept
    def boot_vga(self) -> bool:
        return self._file("boot_vga") == "1"

    @kept
    def reset_methods(self) -> tuple[str, ...]:
        """The resets the kernel will try, in order (`reset_method`, 5.15+; hidden when there is none)."""
        return tuple((self._file("reset_method") or "").split())

    @kept
    def has_reset(self) -> bool:
        """The `reset` attribute: present only when the function has some reset (every kernel)."""
        return (self.dir / "reset").exists()

    @kept
    def sriov_totalvfs(self) -> int | None:
        """VFs the device supports (an SR-IOV physical function), None if it has no SR-IOV capability."""
        return _optional_int(self._file("sriov_totalvfs"))

    @kept
    def sriov_numvfs(self) -> int | None:
        if self.sriov_totalvfs is None:
            return None  # no SR-IOV capability: spare the read on every function of a listing
        return _optional_int(self.attr("sriov_numvfs"))

    @kept
    def sriov_autoprobe(self) -> bool | None:
        """Whether VFs are probed by a host driver when they are enabled (`sriov_drivers_autoprobe`)."""
        if self.sriov_totalvfs is None:
            return None
        return self.attr("sriov_drivers_autoprobe") == "1"

    @kept
    def physfn(self) -> PciAddress | None:
        """The physical function of a virtual function (its `physfn` link), None for anything else."""
        return _address(self._link("physfn"))

    @kept
    def virtfns(self) -> tuple[PciAddress, ...]:
        """The enabled VFs of a physical function (`virtfnN` links), in VF order."""
        if not self.sriov_numvfs:
            return ()  # not a PF, or none enabled: no directory listing for every function of a listing
        names = [n for n in self._host.list_dir(self._prefix) if n.startswith("virtfn") and n[6:].isdigit()]
        out = []
        for n in sorted(names, key=lambda n: int(n[6:])):
            addr = _address(self._host.link_name(self._prefix + n))
            if addr is not None:
                out.append(addr)
        return tuple(out)

    @kept
    def vendor_vgpu_host(self) -> bool:
        """An NVIDIA vendor-VFIO VF: `nvidia` is its VFIO driver and it has `nvidia/` (vGPU 17+)."""
        return self.physfn is not None and vendor_vgpu.is_vendor_vf(self._host, self.address)

    @kept
    def mdev_types(self) -> tuple[str, ...]:
        """The mediated device types this function offers as a parent (`mdev_supported_types/`)."""
        loaded = self._loaded
        if loaded is not None:
            return loaded.dirs["mdev_supported_types"]
        return tuple(self._host.list_dir(self._prefix + "mdev_supported_types"))

    @kept
    def mdev_children(self) -> tuple[str, ...]:
        """The uuids of the mediated devices created on this parent: the kernel puts each under its
        parent's directory (`<dev>/<uuid>/`, with an `mdev_type` link; drivers/vfio/mdev/mdev_core.c)."""
        names = self._host.list_dir(self._prefix) if self.mdev_types else []
        return tuple(
            n
            for n in sorted(names)
            if UUID_RE.fullmatch(n) and self._host.link_name(f"{self._prefix}{n}/mdev_type") is not None
        )

    # ----- the rules judged on a function ------------------------------------------------------------

    @property
    def identity(self) -> Identity | None:
        """The ids that make the card that card; None when the function is gone (no vendor or device)."""
        if not self.vendor or not self.device:
            return None
        return Identity(
            vendor_id=self.vendor,
            device_id=self.device,
            subsystem_vendor_id=self.subsystem_vendor,
            subsystem_device_id=self.subsystem_device,
            class_code=self.class_code,
        )

    @property
    def is_bridge(self) -> bool:
        """A PCI-to-PCI or CardBus bridge: header type 1 or 2 (by class when config is unreadable). Only a
        base class 06 or unreadable class needs config: a type-1/2 header always comes with a bridge class,
        and reading config for every function would double the cost of a listing. Class 0680 endpoints such
        as NVSwitch are not bridges."""
        code = self.class_code
        if code and code[:2] != "06":
            return False
        header = self.header_type
        if header is None:
            return code[:4] in _BRIDGE_HEADER_CLASSES
        return header in (1, 2)

    @property
    def never_passed_through(self) -> bool:
        """A bridge by header type or by class: a host or ISA bridge is a header-type-0 function, but no VM
        gets the chipset."""
        return self.class_code[:4] in BRIDGE_CLASSES or self.is_bridge

    @property
    def is_vfio_bound(self) -> bool:
        """Bound to vfio-pci or a vfio variant driver (which shows as a vfio-dev/ directory)."""
        drv = self.driver
        return is_vfio_driver(drv) or (drv is not None and self.has_vfio_dev)

    @property
    def dma_neutral(self) -> bool:
        """The member does not stop its group from being viable: no driver, or a driver that lets the user
        own DMA (vfio-pci and its variants, pci-stub, pcieport)."""
        drv = self.driver
        return drv is None or drv in DMA_NEUTRAL_DRIVERS or is_vfio_driver(drv) or self.has_vfio_dev


def device_type(class_code: str) -> str:
    """`gpu` for any display controller (base class 03), else `pci`: the type a PCI function is listed
    and registered with."""
    return "gpu" if class_code[:2] == DISPLAY_BASE_CLASS else "pci"


class PciSnapshot:
    """One call's view of the PCI bus: functions and IOMMU groups, each read once on first use."""

    def __init__(self, host: Host) -> None:
        self.host = host
        # Path joins cost more than the reads on a large host: build each directory once.
        self._devices_dir = os.fspath(host.pci_devices_dir)
        self._functions: dict[PciAddress, PciFunction] = {}
        self._members: dict[int, tuple[PciAddress, ...]] = {}
        self._addresses: list[PciAddress] | None = None

    def addresses(self) -> list[PciAddress]:
        """Every function on the bus, sorted."""
        if self._addresses is None:
            self._addresses = self.host.pci_addresses()
        return self._addresses

    def function(self, addr: PciAddress) -> PciFunction:
        fn = self._functions.get(addr)
        if fn is None:
            fn = self._functions[addr] = PciFunction(self.host, addr, f"{self._devices_dir}/{addr}")
        return fn

    def functions(self) -> list[PciFunction]:
        return [self.function(a) for a in self.addresses()]

    def load_all(self) -> list[PciFunction]:
        """Every function, each read in one pass (`PciFunction.load`): for a listing of the whole bus."""
        functions = self.functions()
        for fn in functions:
            fn.load()
        return functions

    def members(self, group: int) -> tuple[PciAddress, ...]:
        """The functions of IOMMU group `group`, sorted."""
        got = self._members.get(group)
        if got is None:
            got = self._members[group] = tuple(self.host.group_members(group))
        return got


def read_function(host: Host, addr: PciAddress) -> PciFunction:
    """A fresh view of one function (a snapshot of its own)."""
    return PciSnapshot(host).function(addr)


def _optional_int(raw: str | None) -> int | None:
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def _address(name: str | None) -> PciAddress | None:
    if name is None:
        return None
    try:
        return PciAddress.parse(name)
    except ValueError:
        return None
