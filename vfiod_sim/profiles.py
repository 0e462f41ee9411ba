"""Simulated hosts as data: the PCI topology, IOMMU groups, drivers and their id tables, modules, mounts,
routes and boot-time processes of one machine.

A `Profile` is a plain frozen dataclass that round-trips through JSON (`to_json` / `from_json`), so the
simulator, its tests and the real-kernel suite can share a scenario as a file. `get_profile(name)` returns
the built-in ones: `workstation-l4`, `dgx-h100`, `no-iommu`, `qemu-q35` and `synthetic:N`.

The device list is in bus-add order (what `pci_bus_add_devices` walks: a bus's devices, then the buses
behind its bridges), which is the order drivers meet devices at boot and so decides minor numbers
(card0, nvidia0, ...). Modules load at boot in list order, so a profile decides, as modprobe and udev do
on a real host, which driver claims a device first.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

PCI_ANY_ID = 0xFFFFFFFF

DRIVER_KINDS = ("drm", "net", "nvme", "audio", "vfio", "gpu-nvidia", "virtio", "pcieport", "other")

_ADDR_RE = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")

# The vtconsole drivers (/sys/class/vtconsole/vtconN/name, "(M)" for one registered later as a module,
# "(S)" for the system driver con_init found at boot: drivers/tty/vt/vt.c show_name). Which is vtcon0
# depends on how the machine booted:
FBCON = "frame buffer device"
DUMMYCON = "dummy device"
_VTCON_NAME_RE = re.compile(r"\((M|S)\) (dummy device|frame buffer device)")
# UEFI boot: no VGA text mode, so con_init's console is dummycon (the system driver, vtcon0); fbcon
# registers as vtcon1 when the first frame buffer appears.
VTCONSOLES_DUMMY_AT_BOOT = (f"(S) {DUMMYCON}", f"(M) {FBCON}")
# Legacy BIOS boot of a VGA (the boot console is vgacon, "(S) VGA+"): the DRM driver's probe calls
# vga_remove_vgacon (drivers/pci/vgaarb.c), which has dummycon take over (do_take_over_console: registered
# as a module, vtcon1) and unregisters vgacon; fbcon then registers in vgacon's freed slot, vtcon0.
VTCONSOLES_VGACON_REPLACED = (f"(M) {FBCON}", f"(M) {DUMMYCON}")


def _hex_id(value: int) -> str:
    return "*" if value == PCI_ANY_ID else f"{value:04x}"


def _parse_id(text: object) -> int:
    if isinstance(text, int):
        return text
    if not isinstance(text, str):
        raise ValueError(f"PCI id must be a hex string or '*', not {text!r}")
    return PCI_ANY_ID if text in ("*", "") else int(text, 16)


def _str(d: dict[str, Any], key: str, default: str | None = None) -> str:
    value = d.get(key, default)
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string, not {value!r}")
    return value


def _opt_str(d: dict[str, Any], key: str) -> str | None:
    value = d.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string or null, not {value!r}")
    return value


@dataclass(frozen=True)
class CardIdentity:
    """The ids a card reports in config space: what `pci_match_one_device` compares."""

    vendor: int
    device: int
    subsystem_vendor: int
    subsystem_device: int
    class_code: int  # 24 bits: base, sub-class, prog-if
    revision: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "vendor": f"{self.vendor:04x}",
            "device": f"{self.device:04x}",
            "subsystem_vendor": f"{self.subsystem_vendor:04x}",
            "subsystem_device": f"{self.subsystem_device:04x}",
            "class": f"{self.class_code:06x}",
            "revision": f"{self.revision:02x}",
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CardIdentity:
        return cls(
            vendor=int(_str(d, "vendor"), 16),
            device=int(_str(d, "device"), 16),
            subsystem_vendor=int(_str(d, "subsystem_vendor"), 16),
            subsystem_device=int(_str(d, "subsystem_device"), 16),
            class_code=int(_str(d, "class"), 16),
            revision=int(_str(d, "revision", "00"), 16),
        )


@dataclass(frozen=True)
class MatchEntry:
    """One `struct pci_device_id`: PCI_ANY_ID wildcards, and a class compared under `class_mask`.

    `override_only` is 6.1's PCI_ID_F_VFIO_DRIVER_OVERRIDE: the entry matches only while the device's
    `driver_override` names the driver (vfio-pci's whole table is one such entry).
    """

    vendor: int = PCI_ANY_ID
    device: int = PCI_ANY_ID
    subvendor: int = PCI_ANY_ID
    subdevice: int = PCI_ANY_ID
    class_code: int = 0
    class_mask: int = 0
    override_only: bool = False

    def matches(self, card: CardIdentity) -> bool:
        # drivers/pci/pci.h pci_match_one_device
        return (
            self.vendor in (PCI_ANY_ID, card.vendor)
            and self.device in (PCI_ANY_ID, card.device)
            and self.subvendor in (PCI_ANY_ID, card.subsystem_vendor)
            and self.subdevice in (PCI_ANY_ID, card.subsystem_device)
            and not ((self.class_code ^ card.class_code) & self.class_mask)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "vendor": _hex_id(self.vendor),
            "device": _hex_id(self.device),
            "subvendor": _hex_id(self.subvendor),
            "subdevice": _hex_id(self.subdevice),
            "class": f"{self.class_code:06x}",
            "class_mask": f"{self.class_mask:06x}",
            "override_only": self.override_only,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MatchEntry:
        return cls(
            vendor=_parse_id(d.get("vendor", "*")),
            device=_parse_id(d.get("device", "*")),
            subvendor=_parse_id(d.get("subvendor", "*")),
            subdevice=_parse_id(d.get("subdevice", "*")),
            class_code=int(_str(d, "class", "000000"), 16),
            class_mask=int(_str(d, "class_mask", "000000"), 16),
            override_only=bool(d.get("override_only", False)),
        )


@dataclass(frozen=True)
class DriverSpec:
    """A PCI driver: its name in /sys/bus/pci/drivers, the module providing it (None = built in), its
    static id table, whether it leaves DMA ownership to the user (`driver_managed_dma`), and the kind of
    side effects binding it has (DRM nodes, a netdev, a block device, a vfio device...)."""

    name: str
    module: str | None
    id_table: tuple[MatchEntry, ...] = ()
    kind: str = "other"
    driver_managed_dma: bool = False
    fbdev: bool = False  # DRM drivers whose fbdev emulation registers /dev/fbN for each device

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "module": self.module,
            "kind": self.kind,
            "driver_managed_dma": self.driver_managed_dma,
            "fbdev": self.fbdev,
            "id_table": [e.to_dict() for e in self.id_table],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DriverSpec:
        return cls(
            name=_str(d, "name"),
            module=_opt_str(d, "module"),
            id_table=tuple(MatchEntry.from_dict(e) for e in d.get("id_table", [])),
            kind=_str(d, "kind", "other"),
            driver_managed_dma=bool(d.get("driver_managed_dma", False)),
            fbdev=bool(d.get("fbdev", False)),
        )


@dataclass(frozen=True)
class ModuleSpec:
    """A loadable module: loaded at boot or not, and the modules it needs (loaded first by modprobe)."""

    name: str
    loaded: bool = True
    depends: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "loaded": self.loaded, "depends": list(self.depends)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModuleSpec:
        return cls(
            name=_str(d, "name"),
            loaded=bool(d.get("loaded", True)),
            depends=tuple(str(x) for x in d.get("depends", [])),
        )


@dataclass(frozen=True)
class DeviceSpec:
    """One PCI function as the profile installs it. `driver` is the driver it is expected to have after
    boot (the tests check that the boot probe agrees); `parent` is the bridge it sits behind."""

    address: str
    vendor: int
    device: int
    subsystem_vendor: int
    subsystem_device: int
    class_code: int
    revision: int = 0
    driver: str | None = None
    parent: str | None = None
    iommu_group: int | None = None
    header_type: int = 0  # 0 endpoint, 1 PCI-to-PCI bridge
    pcie_port: bool = False  # a root/switch port: pcieport's probe accepts it, a PCIe-to-PCI bridge not
    reset_method: str | None = None
    numa_node: int = -1
    boot_vga: bool = False
    ifname: str | None = None
    partitions: int = 0  # NVMe: partitions on namespace 1
    mount_tag: str | None = None  # virtio-9p / virtiofs tag
    irq: int = 0
    label: str = ""

    @property
    def identity(self) -> CardIdentity:
        return CardIdentity(
            self.vendor,
            self.device,
            self.subsystem_vendor,
            self.subsystem_device,
            self.class_code,
            self.revision,
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"address": self.address}
        out.update(self.identity.to_dict())
        out.update(
            {
                "driver": self.driver,
                "parent": self.parent,
                "iommu_group": self.iommu_group,
                "header_type": self.header_type,
                "pcie_port": self.pcie_port,
                "reset_method": self.reset_method,
                "numa_node": self.numa_node,
                "boot_vga": self.boot_vga,
                "ifname": self.ifname,
                "partitions": self.partitions,
                "mount_tag": self.mount_tag,
                "irq": self.irq,
                "label": self.label,
            }
        )
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeviceSpec:
        ident = CardIdentity.from_dict(d)
        group = d.get("iommu_group")
        return cls(
            address=_str(d, "address"),
            vendor=ident.vendor,
            device=ident.device,
            subsystem_vendor=ident.subsystem_vendor,
            subsystem_device=ident.subsystem_device,
            class_code=ident.class_code,
            revision=ident.revision,
            driver=_opt_str(d, "driver"),
            parent=_opt_str(d, "parent"),
            iommu_group=None if group is None else int(group),
            header_type=int(d.get("header_type", 0)),
            pcie_port=bool(d.get("pcie_port", False)),
            reset_method=_opt_str(d, "reset_method"),
            numa_node=int(d.get("numa_node", -1)),
            boot_vga=bool(d.get("boot_vga", False)),
            ifname=_opt_str(d, "ifname"),
            partitions=int(d.get("partitions", 0)),
            mount_tag=_opt_str(d, "mount_tag"),
            irq=int(d.get("irq", 0)),
            label=_str(d, "label", ""),
        )


@dataclass(frozen=True)
class Mount:
    """A line of /proc/self/mountinfo (or of /proc/swaps when `fstype` is "swap"). A `/dev/<block>`
    source gets the block device's major:minor from the simulated tree; anything else is anonymous."""

    source: str
    mountpoint: str
    fstype: str
    options: str = "rw,relatime"

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "mountpoint": self.mountpoint,
            "fstype": self.fstype,
            "options": self.options,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Mount:
        return cls(
            source=_str(d, "source"),
            mountpoint=_str(d, "mountpoint"),
            fstype=_str(d, "fstype"),
            options=_str(d, "options", "rw,relatime"),
        )


@dataclass(frozen=True)
class ProcessSpec:
    """A process running after boot. `hold_nvidia_gpus` opens every /dev/nvidiaN present when it starts
    (what nvidia-persistenced does)."""

    pid: int
    exe: str
    args: tuple[str, ...] = ()
    uid: int = 0
    fds: tuple[str, ...] = ()
    cgroup_unit: str | None = None
    hold_nvidia_gpus: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "exe": self.exe,
            "args": list(self.args),
            "uid": self.uid,
            "fds": list(self.fds),
            "cgroup_unit": self.cgroup_unit,
            "hold_nvidia_gpus": self.hold_nvidia_gpus,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProcessSpec:
        return cls(
            pid=int(d["pid"]),
            exe=_str(d, "exe"),
            args=tuple(str(a) for a in d.get("args", [])),
            uid=int(d.get("uid", 0)),
            fds=tuple(str(f) for f in d.get("fds", [])),
            cgroup_unit=_opt_str(d, "cgroup_unit"),
            hold_nvidia_gpus=bool(d.get("hold_nvidia_gpus", False)),
        )


@dataclass(frozen=True)
class Profile:
    """One simulated machine."""

    name: str
    description: str
    devices: tuple[DeviceSpec, ...]
    drivers: tuple[DriverSpec, ...]
    modules: tuple[ModuleSpec, ...]
    cmdline: str
    iommu: bool = True
    interrupt_remapping: bool = True
    numa_nodes: int = 1
    cpus_per_node: int = 16
    console_on_boot_vga: bool = True
    default_route_ifname: str | None = None
    mounts: tuple[Mount, ...] = ()
    processes: tuple[ProcessSpec, ...] = ()
    etc_files: tuple[tuple[str, str], ...] = ()  # (path under /etc, content)
    hugepages_2m: int = 0
    hugepages_1g: int = 0
    vfio_cdev: bool = False  # CONFIG_VFIO_DEVICE_CDEV (6.6+): /dev/vfio/devices/vfioN
    iommufd: bool = False  # CONFIG_IOMMUFD: /dev/iommu
    # The real nvidia driver's nv_pci_remove waits (an os_delay loop) while any process has /dev/nvidiaN
    # open, so unbinding a GPU that nvidia-persistenced still holds hangs until the daemon stops. On by
    # default, as on a real host: callers (vfiod's persistence hold, tests) must stop the unit first.
    nvidia_remove_waits_for_users: bool = True
    # /sys/class/vtconsole/vtconN/name in N order: one fbcon and one dummycon entry (see FBCON)
    vtconsoles: tuple[str, ...] = VTCONSOLES_DUMMY_AT_BOOT
    extra: dict[str, str] = field(default_factory=dict)  # free-form notes carried with the scenario

    @property
    def iommu_domain_type(self) -> str:
        """What sys/kernel/iommu_groups/N/type shows: iommu=pt makes the default domain identity."""
        return "identity" if "iommu=pt" in self.cmdline.split() else "DMA"

    def device(self, address: str) -> DeviceSpec:
        for d in self.devices:
            if d.address == address:
                return d
        raise KeyError(f"profile {self.name} has no device {address}")

    def driver_spec(self, name: str) -> DriverSpec:
        for d in self.drivers:
            if d.name == name:
                return d
        raise KeyError(f"profile {self.name} has no driver {name}")

    def vtconsole(self, index: int) -> tuple[str, bool]:
        """vtcon<index>'s driver (FBCON or DUMMYCON) and whether it was registered as a module ("(M)")."""
        m = _VTCON_NAME_RE.fullmatch(self.vtconsoles[index])
        if m is None:
            raise ValueError(f"{self.vtconsoles[index]!r} is not a vtconsole the simulator knows")
        return m[2], m[1] == "M"

    def groups(self) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        if not self.iommu:
            return out
        for d in self.devices:
            if d.iommu_group is not None:
                out.setdefault(d.iommu_group, []).append(d.address)
        return {g: sorted(m) for g, m in sorted(out.items())}

    def validate(self) -> None:
        """Raise ValueError for a profile the simulator cannot lay out consistently."""
        seen: set[str] = set()
        for d in self.devices:
            if _ADDR_RE.fullmatch(d.address) is None:
                raise ValueError(f"{d.address!r} is not a canonical PCI address")
            if d.address in seen:
                raise ValueError(f"device {d.address} is listed twice")
            if d.parent is not None and d.parent not in seen:
                raise ValueError(f"{d.address}: its parent {d.parent} must be listed before it")
            if d.parent is not None and self.device(d.parent).header_type != 1:
                raise ValueError(f"{d.address}: its parent {d.parent} is not a bridge")
            seen.add(d.address)
        modules = {m.name for m in self.modules}
        for m in self.modules:
            for dep in m.depends:
                if dep not in modules:
                    raise ValueError(f"module {m.name} depends on {dep}, which the profile does not have")
        names = set()
        for drv in self.drivers:
            if _NAME_RE.fullmatch(drv.name) is None:
                raise ValueError(f"{drv.name!r} is not a driver name")
            if drv.kind not in DRIVER_KINDS:
                raise ValueError(f"driver {drv.name}: unknown kind {drv.kind!r}")
            if drv.module is not None and drv.module not in modules:
                raise ValueError(f"driver {drv.name} comes from module {drv.module}, which is not listed")
            names.add(drv.name)
        for d in self.devices:
            if d.driver is not None and d.driver not in names:
                raise ValueError(f"{d.address} expects driver {d.driver}, which the profile does not have")
        kinds = sorted(self.vtconsole(i) for i in range(len(self.vtconsoles)))
        if [k for k, _ in kinds] != [DUMMYCON, FBCON]:
            raise ValueError(
                f"vtconsoles must be one dummy device and one frame buffer device: {self.vtconsoles}"
            )
        if not dict(kinds)[FBCON]:
            raise ValueError("fbcon registers through do_take_over_console: its vtconsole is '(M)'")

    # ----- JSON ---------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "cmdline": self.cmdline,
            "iommu": self.iommu,
            "interrupt_remapping": self.interrupt_remapping,
            "numa_nodes": self.numa_nodes,
            "cpus_per_node": self.cpus_per_node,
            "console_on_boot_vga": self.console_on_boot_vga,
            "default_route_ifname": self.default_route_ifname,
            "hugepages_2m": self.hugepages_2m,
            "hugepages_1g": self.hugepages_1g,
            "vfio_cdev": self.vfio_cdev,
            "iommufd": self.iommufd,
            "nvidia_remove_waits_for_users": self.nvidia_remove_waits_for_users,
            "vtconsoles": list(self.vtconsoles),
            "modules": [m.to_dict() for m in self.modules],
            "drivers": [d.to_dict() for d in self.drivers],
            "devices": [d.to_dict() for d in self.devices],
            "mounts": [m.to_dict() for m in self.mounts],
            "processes": [p.to_dict() for p in self.processes],
            "etc_files": {path: text for path, text in self.etc_files},
            "extra": dict(self.extra),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Profile:
        etc = d.get("etc_files", {})
        if not isinstance(etc, dict):
            raise ValueError("etc_files must be an object of path -> content")
        return cls(
            name=_str(d, "name"),
            description=_str(d, "description", ""),
            cmdline=_str(d, "cmdline", ""),
            iommu=bool(d.get("iommu", True)),
            interrupt_remapping=bool(d.get("interrupt_remapping", True)),
            numa_nodes=int(d.get("numa_nodes", 1)),
            cpus_per_node=int(d.get("cpus_per_node", 16)),
            console_on_boot_vga=bool(d.get("console_on_boot_vga", True)),
            default_route_ifname=_opt_str(d, "default_route_ifname"),
            hugepages_2m=int(d.get("hugepages_2m", 0)),
            hugepages_1g=int(d.get("hugepages_1g", 0)),
            vfio_cdev=bool(d.get("vfio_cdev", False)),
            iommufd=bool(d.get("iommufd", False)),
            nvidia_remove_waits_for_users=bool(d.get("nvidia_remove_waits_for_users", True)),
            vtconsoles=tuple(str(v) for v in d.get("vtconsoles", VTCONSOLES_DUMMY_AT_BOOT)),
            modules=tuple(ModuleSpec.from_dict(m) for m in d.get("modules", [])),
            drivers=tuple(DriverSpec.from_dict(x) for x in d.get("drivers", [])),
            devices=tuple(DeviceSpec.from_dict(x) for x in d.get("devices", [])),
            mounts=tuple(Mount.from_dict(m) for m in d.get("mounts", [])),
            processes=tuple(ProcessSpec.from_dict(p) for p in d.get("processes", [])),
            etc_files=tuple((str(k), str(v)) for k, v in etc.items()),
            extra={str(k): str(v) for k, v in dict(d.get("extra", {})).items()},
        )

    @classmethod
    def from_json(cls, text: str) -> Profile:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a profile is a JSON object")
        return cls.from_dict(data)


# ----- the driver and module catalogue ---------------------------------------------------------------


def ids(vendor: int, device: int = PCI_ANY_ID) -> MatchEntry:
    return MatchEntry(vendor=vendor, device=device)


def klass(class_code: int, mask: int, vendor: int = PCI_ANY_ID) -> MatchEntry:
    return MatchEntry(vendor=vendor, class_code=class_code, class_mask=mask)


# The id tables are trimmed to what the profiles need, but each is the shape of the real one: vendor and
# class for the GPU drivers, exact ids for NICs, class alone for NVMe/AHCI/xHCI/HDA.
DRIVERS: dict[str, DriverSpec] = {
    d.name: d
    for d in (
        # built in; pcie_portdriver sets driver_managed_dma (drivers/pci/pcie/portdrv.c)
        DriverSpec(
            "pcieport",
            None,
            (klass(0x060400, 0xFFFFFF), klass(0x060401, 0xFFFFFF)),
            kind="pcieport",
            driver_managed_dma=True,
        ),
        DriverSpec("pci-stub", "pci_stub", (), driver_managed_dma=True),
        # drivers/vfio/pci/vfio_pci.c: PCI_DRIVER_OVERRIDE_DEVICE_VFIO(PCI_ANY_ID, PCI_ANY_ID)
        DriverSpec(
            "vfio-pci",
            "vfio_pci",
            (MatchEntry(override_only=True),),
            kind="vfio",
            driver_managed_dma=True,
        ),
        DriverSpec(
            "nvidia",
            "nvidia",
            (klass(0x030000, 0xFF0000, 0x10DE), klass(0x068000, 0xFFFF00, 0x10DE)),
            kind="gpu-nvidia",
        ),
        DriverSpec("nouveau", "nouveau", (klass(0x030000, 0xFF0000, 0x10DE),), kind="drm", fbdev=True),
        DriverSpec("i915", "i915", (klass(0x030000, 0xFF0000, 0x8086),), kind="drm", fbdev=True),
        DriverSpec(
            "amdgpu",
            "amdgpu",
            (klass(0x030000, 0xFF0000, 0x1002), klass(0x038000, 0xFFFF00, 0x1002)),
            kind="drm",
            fbdev=True,
        ),
        DriverSpec("bochs-drm", "bochs", (ids(0x1234, 0x1111),), kind="drm", fbdev=True),
        DriverSpec("ast", "ast", (ids(0x1A03, 0x2000),), kind="drm", fbdev=True),
        DriverSpec("snd_hda_intel", "snd_hda_intel", (klass(0x040300, 0xFFFF00),), kind="audio"),
        DriverSpec("e1000e", "e1000e", (ids(0x8086, 0x1A1C), ids(0x8086, 0x15B8)), kind="net"),
        DriverSpec("e1000", "e1000", (ids(0x8086, 0x100E),), kind="net"),
        DriverSpec("igb", "igb", (ids(0x8086, 0x1533),), kind="net"),
        DriverSpec("mlx5_core", "mlx5_core", (ids(0x15B3, 0x1021), ids(0x15B3, 0x101B)), kind="net"),
        DriverSpec("virtio-pci", "virtio_pci", (ids(0x1AF4),), kind="virtio"),
        DriverSpec("nvme", "nvme", (klass(0x010802, 0xFFFFFF),), kind="nvme"),
        DriverSpec("ahci", "ahci", (klass(0x010601, 0xFFFFFF),)),
        DriverSpec("xhci_hcd", "xhci_pci", (klass(0x0C0330, 0xFFFFFF),)),
        DriverSpec("i801_smbus", "i2c_i801", (klass(0x0C0500, 0xFFFF00, 0x8086),)),
        DriverSpec("lpc_ich", "lpc_ich", (ids(0x8086, 0x2918),)),
    )
}

MODULES: dict[str, ModuleSpec] = {
    m.name: m
    for m in (
        ModuleSpec("drm"),
        ModuleSpec("drm_kms_helper", depends=("drm",)),
        ModuleSpec("i915", depends=("drm_kms_helper", "drm")),
        ModuleSpec("nouveau", depends=("drm_kms_helper", "drm")),
        ModuleSpec("amdgpu", depends=("drm_kms_helper", "drm")),
        ModuleSpec("bochs", depends=("drm_kms_helper", "drm")),
        ModuleSpec("ast", depends=("drm_kms_helper", "drm")),
        ModuleSpec("nvidia"),
        ModuleSpec("nvidia_modeset", depends=("nvidia",)),
        ModuleSpec("nvidia_drm", depends=("nvidia_modeset", "drm_kms_helper", "drm")),
        ModuleSpec("nvidia_uvm", depends=("nvidia",)),
        ModuleSpec("snd_hda_intel"),
        ModuleSpec("e1000e"),
        ModuleSpec("e1000"),
        ModuleSpec("igb"),
        ModuleSpec("mlx5_core"),
        ModuleSpec("virtio_pci"),
        ModuleSpec("nvme_core"),
        ModuleSpec("nvme", depends=("nvme_core",)),
        ModuleSpec("ahci"),
        ModuleSpec("xhci_pci"),
        ModuleSpec("i2c_i801"),
        ModuleSpec("lpc_ich"),
        ModuleSpec("pci_stub"),
        ModuleSpec("iommufd"),
        ModuleSpec("vfio"),
        ModuleSpec("vfio_iommu_type1", depends=("vfio",)),
        ModuleSpec("vfio_pci_core", depends=("vfio",)),
        ModuleSpec("vfio_pci", depends=("vfio_pci_core", "vfio")),
    )
}

_VFIO_MODULES = ("vfio", "vfio_iommu_type1", "vfio_pci_core", "vfio_pci")


def _catalogue(
    loaded: Sequence[str], available: Sequence[str] = ()
) -> tuple[tuple[ModuleSpec, ...], tuple[DriverSpec, ...]]:
    """Modules in load order (deps first) and every driver they provide, plus the built-ins."""
    mods: list[ModuleSpec] = []
    names: list[str] = []

    def add(name: str, is_loaded: bool) -> None:
        if name in names:
            return
        spec = MODULES[name]
        for dep in spec.depends:
            add(dep, is_loaded)
        names.append(name)
        mods.append(ModuleSpec(name, loaded=is_loaded, depends=spec.depends))

    for name in loaded:
        add(name, True)
    for name in available:
        add(name, False)
    drivers = [d for d in DRIVERS.values() if d.module is None] + [
        d for m in names for d in DRIVERS.values() if d.module == m
    ]
    return tuple(mods), tuple(drivers)


def _dev(
    address: str,
    ids_: str,
    subsystem: str,
    class_code: int,
    **kw: Any,
) -> DeviceSpec:
    vendor, device = (int(x, 16) for x in ids_.split(":"))
    sv, sd = (int(x, 16) for x in subsystem.split(":"))
    return DeviceSpec(address, vendor, device, sv, sd, class_code, **kw)


def _nvidia_persistenced() -> ProcessSpec:
    return ProcessSpec(
        pid=900,
        exe="/usr/bin/nvidia-persistenced",
        args=("/usr/bin/nvidia-persistenced", "--user", "nvidia-persistenced"),
        fds=("/dev/nvidiactl",),
        cgroup_unit="nvidia-persistenced.service",
        hold_nvidia_gpus=True,
    )


_DISK_MOUNTS = (
    Mount("/dev/nvme0n1p2", "/", "ext4", "rw,relatime"),
    Mount("/dev/nvme0n1p1", "/boot/efi", "vfat", "rw,relatime"),
)


# ----- built-in profiles ----------------------------------------------------------------------------


def workstation_l4(*, iommu: bool = True) -> Profile:
    """A desktop with an Intel iGPU driving the console and an NVIDIA L4 (+ its HDMI audio) behind a
    root port, both functions in one IOMMU group."""
    g = (lambda n: n) if iommu else (lambda n: None)
    devices = (
        _dev("0000:00:00.0", "8086:a700", "1043:8882", 0x060000, iommu_group=g(0), label="Host bridge"),
        _dev(
            "0000:00:01.0",
            "8086:a70d",
            "1043:8882",
            0x060400,
            driver="pcieport",
            header_type=1,
            pcie_port=True,
            iommu_group=g(1),
            irq=120,
            label="PCIe root port (x16)",
        ),
        _dev(
            "0000:00:02.0",
            "8086:a780",
            "1043:8882",
            0x030000,
            revision=0x04,
            driver="i915",
            boot_vga=True,
            iommu_group=g(2),
            reset_method="flr",
            irq=158,
            label="Intel UHD Graphics 770",
        ),
        _dev(
            "0000:00:06.0",
            "8086:a74d",
            "1043:8882",
            0x060400,
            driver="pcieport",
            header_type=1,
            pcie_port=True,
            iommu_group=g(3),
            irq=121,
            label="PCIe root port (M.2)",
        ),
        _dev(
            "0000:00:14.0",
            "8086:7ae0",
            "1043:8882",
            0x0C0330,
            driver="xhci_hcd",
            iommu_group=g(4),
            irq=130,
            label="USB 3.2 xHCI",
        ),
        _dev(
            "0000:00:1f.0",
            "8086:7a84",
            "1043:8882",
            0x060100,
            iommu_group=g(5),
            label="ISA bridge (LPC)",
        ),
        _dev(
            "0000:00:1f.4",
            "8086:7aa3",
            "1043:8882",
            0x0C0500,
            driver="i801_smbus",
            iommu_group=g(5),
            irq=18,
            label="SMBus",
        ),
        _dev(
            "0000:00:1f.6",
            "8086:1a1c",
            "1043:8882",
            0x020000,
            revision=0x11,
            driver="e1000e",
            iommu_group=g(6),
            ifname="eno1",
            reset_method="flr pm",
            irq=140,
            label="Ethernet I219-LM",
        ),
        _dev(
            "0000:a2:00.0",
            "10de:27b8",
            "10de:16ca",
            0x030200,
            revision=0xA1,
            driver="nvidia",
            parent="0000:00:01.0",
            iommu_group=g(7),
            reset_method="flr bus",
            numa_node=0,
            irq=186,
            label="NVIDIA L4",
        ),
        _dev(
            "0000:a2:00.1",
            "10de:22bc",
            "10de:16ca",
            0x040300,
            revision=0xA1,
            driver="snd_hda_intel",
            parent="0000:00:01.0",
            iommu_group=g(7),
            reset_method="flr bus",
            numa_node=0,
            irq=17,
            label="NVIDIA HDMI audio",
        ),
        _dev(
            "0000:01:00.0",
            "144d:a80a",
            "144d:a801",
            0x010802,
            driver="nvme",
            parent="0000:00:06.0",
            iommu_group=g(8),
            partitions=2,
            reset_method="flr",
            numa_node=0,
            irq=150,
            label="Samsung 980 PRO",
        ),
    )
    modules, drivers = _catalogue(
        [
            "i915",
            "nvidia",
            "nvidia_modeset",
            "nvidia_drm",
            "nvidia_uvm",
            "snd_hda_intel",
            "e1000e",
            "nvme",
            "xhci_pci",
            "i2c_i801",
            *_VFIO_MODULES,
        ],
        ["pci_stub", "nouveau"],
    )
    cmdline = "BOOT_IMAGE=/vmlinuz root=/dev/nvme0n1p2 ro" + (" intel_iommu=on iommu=pt" if iommu else "")
    return Profile(
        name="workstation-l4" if iommu else "no-iommu",
        description=(
            "Desktop: Intel iGPU with the console, NVIDIA L4 + HDMI audio in one IOMMU group, e1000e with "
            "the default route, NVMe root disk"
            + ("" if iommu else "; the IOMMU is off (no intel_iommu=on), so there are no IOMMU groups")
        ),
        devices=_bus_add_order(list(devices)),
        drivers=drivers,
        modules=modules,
        cmdline=cmdline,
        iommu=iommu,
        interrupt_remapping=True,
        numa_nodes=1,
        cpus_per_node=24,
        console_on_boot_vga=True,
        default_route_ifname="eno1",
        mounts=_DISK_MOUNTS,
        processes=(
            _nvidia_persistenced(),
            ProcessSpec(
                pid=1500,
                exe="/usr/lib/xorg/Xorg",
                args=("/usr/lib/xorg/Xorg", "vt2", "-displayfd", "3", "-nolisten", "tcp"),
                uid=1000,
                fds=("/dev/dri/card0",),
                cgroup_unit="session-2.scope",
            ),
        ),
    )


def no_iommu() -> Profile:
    return workstation_l4(iommu=False)


def dgx_h100() -> Profile:
    """8 x H100 SXM each behind its own PCIe switch port, 4 NVSwitches, 8 ConnectX-7, an ASPEED BMC VGA
    behind its own PCIe-to-PCI bridge (sharing that bridge's group), an NVMe root disk, two NUMA nodes."""
    devices: list[DeviceSpec] = [
        _dev("0000:00:00.0", "8086:09a2", "8086:0000", 0x060000, iommu_group=0, label="Host bridge"),
    ]
    group = 1

    def port(addr: str, parent: str | None, irq: int, numa: int) -> None:
        nonlocal group
        devices.append(
            _dev(
                addr,
                "8086:352a" if parent is None else "1000:c030",
                "8086:0000" if parent is None else "1000:a064",
                0x060400,
                driver="pcieport",
                parent=parent,
                header_type=1,
                pcie_port=True,
                iommu_group=group,
                numa_node=numa,
                irq=irq,
                label="PCIe root port" if parent is None else "PCIe switch port",
            )
        )
        group += 1

    # BMC VGA: ASPEED AST2600 behind the ASPEED PCIe-to-PCI bridge (no ACS below a conventional bridge:
    # bridge and VGA share a group).
    port("0000:00:1c.0", None, 122, 0)
    devices.append(
        _dev(
            "0000:02:00.0",
            "1a03:1150",
            "1a03:1150",
            0x060400,
            parent="0000:00:1c.0",
            header_type=1,
            iommu_group=group,
            numa_node=0,
            label="ASPEED PCIe-to-PCI bridge",
        )
    )
    devices.append(
        _dev(
            "0000:03:00.0",
            "1a03:2000",
            "1a03:2000",
            0x030000,
            revision=0x52,
            driver="ast",
            parent="0000:02:00.0",
            iommu_group=group,
            boot_vga=True,
            numa_node=0,
            irq=16,
            label="ASPEED Graphics",
        )
    )
    group += 1
    port("0000:00:1d.0", None, 123, 0)
    devices.append(
        _dev(
            "0000:04:00.0",
            "144d:a824",
            "144d:a809",
            0x010802,
            driver="nvme",
            parent="0000:00:1d.0",
            iommu_group=group,
            partitions=2,
            reset_method="flr",
            numa_node=0,
            irq=151,
            label="Samsung PM1733",
        )
    )
    group += 1
    for i, bus in enumerate((0x05, 0x06, 0x07, 0x08)):
        rp = f"0000:00:{0x0A + i:02x}.0"
        port(rp, None, 124 + i, 0 if i < 2 else 1)
        devices.append(
            _dev(
                f"0000:{bus:02x}:00.0",
                "10de:22a3",
                "10de:1796",
                0x068000,
                revision=0xA1,
                driver="nvidia",
                parent=rp,
                iommu_group=group,
                numa_node=0 if i < 2 else 1,
                irq=200 + i,
                label="NVSwitch",
            )
        )
        group += 1
    gpu_buses = (0x1B, 0x43, 0x52, 0x61, 0x9D, 0xC3, 0xD1, 0xDF)
    # InfiniBand ports are named after their bus (ibp<bus>s0); the last two run Ethernet (one carries the
    # default route).
    nic_names = [f"ibp{bus + 1}s0" for bus in gpu_buses[:6]] + ["ens6f0np0", "ens7f0np0"]
    for i, bus in enumerate(gpu_buses):
        numa = 0 if i < 4 else 1
        rp = f"0000:00:{0x01 + i:02x}.0"
        up = f"0000:{bus - 2:02x}:00.0"
        down_gpu = f"0000:{bus - 1:02x}:00.0"
        down_nic = f"0000:{bus - 1:02x}:01.0"
        port(rp, None, 100 + i, numa)
        port(up, rp, 110 + i, numa)
        port(down_gpu, up, 130 + i, numa)
        devices.append(
            _dev(
                f"0000:{bus:02x}:00.0",
                "10de:2330",
                "10de:16c1",
                0x030200,
                revision=0xA1,
                driver="nvidia",
                parent=down_gpu,
                iommu_group=group,
                reset_method="flr bus",
                numa_node=numa,
                irq=300 + i,
                label="NVIDIA H100 80GB HBM3",
            )
        )
        group += 1
        port(down_nic, up, 140 + i, numa)
        devices.append(
            _dev(
                f"0000:{bus + 1:02x}:00.0",
                "15b3:1021",
                "15b3:0041",
                0x020000,
                driver="mlx5_core",
                parent=down_nic,
                iommu_group=group,
                reset_method="flr",
                numa_node=numa,
                ifname=nic_names[i],
                irq=400 + i,
                label="ConnectX-7",
            )
        )
        group += 1
    modules, drivers = _catalogue(
        [
            "ast",
            "nvidia",
            "nvidia_modeset",
            "nvidia_drm",
            "nvidia_uvm",
            "mlx5_core",
            "nvme",
            *_VFIO_MODULES,
        ],
        ["pci_stub", "nouveau"],
    )
    nvswitch_fds = ("/dev/nvidiactl", *(f"/dev/nvidia-nvswitch{i}" for i in range(4)))
    return Profile(
        name="dgx-h100",
        description=(
            "DGX H100: 8 GPUs, 4 NVSwitches, 8 ConnectX-7, ASPEED BMC console, NVMe root, 2 NUMA nodes"
        ),
        devices=_bus_add_order(devices),
        drivers=drivers,
        modules=modules,
        cmdline="BOOT_IMAGE=/vmlinuz root=/dev/nvme0n1p2 ro intel_iommu=on iommu=pt",
        iommu=True,
        interrupt_remapping=True,
        numa_nodes=2,
        cpus_per_node=56,
        console_on_boot_vga=True,
        default_route_ifname="ens6f0np0",
        mounts=_DISK_MOUNTS,
        processes=(
            _nvidia_persistenced(),
            ProcessSpec(
                pid=950,
                exe="/usr/bin/nv-fabricmanager",
                args=("/usr/bin/nv-fabricmanager", "-c", "/usr/share/nvidia/nvswitch/fabricmanager.cfg"),
                fds=nvswitch_fds,
                cgroup_unit="nvidia-fabricmanager.service",
            ),
        ),
        hugepages_2m=0,
        hugepages_1g=0,
    )


def _bus_add_order(devices: list[DeviceSpec]) -> tuple[DeviceSpec, ...]:
    """pci_bus_add_devices order: every device of a bus (by devfn), then the buses behind its bridges."""
    children: dict[str | None, list[DeviceSpec]] = {}
    for d in devices:
        children.setdefault(d.parent, []).append(d)
    out: list[DeviceSpec] = []

    def walk(parent: str | None) -> None:
        level = sorted(children.get(parent, []), key=lambda d: d.address)
        out.extend(level)
        for d in level:
            walk(d.address)

    walk(None)
    return tuple(out)


def qemu_q35() -> Profile:
    """The QEMU q35 guest of the real-kernel suite (tests/e2e/guest.py, Debian's 6.1 kernel): its devices,
    IOMMU groups, drivers, mounts and vtconsoles as that guest shows them (the `inventory` scenario).

    The IOMMU groups are numbered in the order intel-iommu meets the functions (bus 0 by devfn, then the
    buses behind the root port): VGA + intel-hda share 1 (one slot, no ACS), the pcie-pci-bridge and
    everything behind it share 11 (no ACS below a conventional bridge)."""
    devices = [
        _dev("0000:00:00.0", "8086:29c0", "1af4:1100", 0x060000, iommu_group=0, label="Q35 host bridge"),
        _dev(
            "0000:00:02.0",
            "1234:1111",
            "1af4:1100",
            0x030000,
            revision=0x02,
            driver="bochs-drm",
            boot_vga=True,
            iommu_group=1,
            label="QEMU VGA",
        ),
        _dev(
            "0000:00:02.1",
            "8086:2668",
            "1af4:1100",
            0x040300,
            revision=0x01,
            driver="snd_hda_intel",
            iommu_group=1,
            irq=16,
            label="intel-hda",
        ),
        _dev(
            "0000:00:03.0",
            "1234:1111",
            "1af4:1100",
            0x038000,
            revision=0x02,
            driver="bochs-drm",
            iommu_group=2,
            label="bochs-display",
        ),
        _dev(
            "0000:00:04.0",
            "8086:100e",
            "1af4:1100",
            0x020000,
            revision=0x03,
            driver="e1000",
            iommu_group=3,
            ifname="eth0",
            irq=22,
            label="e1000",
        ),
        _dev(
            "0000:00:05.0",
            "1af4:1000",
            "1af4:0001",
            0x020000,
            driver="virtio-pci",
            iommu_group=4,
            ifname="eth1",
            irq=23,
            label="virtio-net",
        ),
        _dev(
            "0000:00:06.0",
            "1b36:000c",
            "1b36:0000",
            0x060400,
            driver="pcieport",
            header_type=1,
            pcie_port=True,
            iommu_group=5,
            irq=24,
            label="pcie-root-port",
        ),
        _dev("0000:00:07.0", "1234:11e8", "1af4:1100", 0x00FF00, revision=0x10, iommu_group=6, label="edu"),
        # -device nvme,drive=nvm0,addr=0x8.0: an ext4 file system on the whole namespace, no partition
        _dev(
            "0000:00:08.0",
            "1b36:0010",
            "1af4:1100",
            0x010802,
            revision=0x02,
            driver="nvme",
            iommu_group=7,
            partitions=0,
            label="QEMU NVMe (nvme0n1 on /mnt/data)",
        ),
        _dev(
            "0000:00:10.0",
            "1af4:1009",
            "1af4:0009",
            0x000200,
            driver="virtio-pci",
            iommu_group=8,
            mount_tag="hostroot",
            irq=21,
            label="virtio-9p (hostroot)",
        ),
        _dev(
            "0000:00:11.0",
            "1af4:1009",
            "1af4:0009",
            0x000200,
            driver="virtio-pci",
            iommu_group=9,
            mount_tag="out",
            irq=20,
            label="virtio-9p (out)",
        ),
        _dev(
            "0000:00:1f.0",
            "8086:2918",
            "1af4:1100",
            0x060100,
            revision=0x02,
            driver="lpc_ich",
            iommu_group=10,
            label="ICH9 LPC",
        ),
        _dev(
            "0000:00:1f.2",
            "8086:2922",
            "1af4:1100",
            0x010601,
            revision=0x02,
            driver="ahci",
            iommu_group=10,
            irq=19,
            label="ICH9 AHCI",
        ),
        _dev(
            "0000:00:1f.3",
            "8086:2930",
            "1af4:1100",
            0x0C0500,
            revision=0x02,
            driver="i801_smbus",
            iommu_group=10,
            irq=18,
            label="ICH9 SMBus",
        ),
        # pcie-pci-bridge: class 0604 but a PCIe-to-PCI bridge, which pcieport's probe refuses
        _dev(
            "0000:01:00.0",
            "1b36:000e",
            "0000:0000",
            0x060400,
            parent="0000:00:06.0",
            header_type=1,
            iommu_group=11,
            label="pcie-pci-bridge",
        ),
        _dev(
            "0000:02:01.0",
            "8086:100e",
            "1af4:1100",
            0x020000,
            revision=0x03,
            driver="e1000",
            parent="0000:01:00.0",
            iommu_group=11,
            ifname="eth2",
            irq=22,
            label="e1000 behind the bridge",
        ),
        _dev(
            "0000:02:02.0",
            "1234:11e8",
            "1af4:1100",
            0x00FF00,
            revision=0x10,
            parent="0000:01:00.0",
            iommu_group=11,
            label="edu behind the bridge",
        ),
    ]
    # The guest has no udev: its init loads the drivers the devices' modaliases name, which leaves out
    # vfio-pci (its table matches nothing by id), so /dev/vfio/vfio appears only after `modprobe vfio-pci`.
    modules, drivers = _catalogue(
        [
            "bochs",
            "snd_hda_intel",
            "e1000",
            "virtio_pci",
            "nvme",
            "lpc_ich",
            "ahci",
            "i2c_i801",
        ],
        [*_VFIO_MODULES, "pci_stub"],
    )
    return Profile(
        name="qemu-q35",
        description="QEMU q35 guest with an emulated Intel IOMMU (the real-kernel suite's guest)",
        devices=_bus_add_order(devices),
        drivers=drivers,
        modules=modules,
        cmdline="console=ttyS0 intel_iommu=on iommu=pt panic=-1 loglevel=4",
        iommu=True,
        interrupt_remapping=True,
        numa_nodes=1,
        cpus_per_node=2,
        console_on_boot_vga=True,
        default_route_ifname=None,
        mounts=(
            # an overlay over a tmpfs and the hostroot share's bookworm tree (tests/e2e/guest/init.sh)
            Mount("overlay", "/", "overlay", "rw,relatime"),
            Mount("hostroot", "/mnt/hostroot", "9p", "ro,relatime"),
            Mount("out", "/out", "9p", "rw,relatime"),
            Mount("/dev/nvme0n1", "/mnt/data", "ext4", "rw,relatime"),
        ),
        # booted by SeaBIOS with VGA text mode: bochs-drm replaces vgacon with dummycon, then fbcon comes
        vtconsoles=VTCONSOLES_VGACON_REPLACED,
    )


def synthetic(n: int) -> Profile:
    """`n` functions for benchmarks: n//2 GPU + HDMI audio pairs, one group per pair; odd n adds a NIC."""
    if n < 1:
        raise ValueError("synthetic:N needs N >= 1")
    devices: list[DeviceSpec] = []
    for i in range(n // 2):
        dom, bus = divmod(i, 255)
        bus += 1
        for fn, (ident, sub, cls, drv) in enumerate(
            (
                ("10de:2230", "10de:1459", 0x030000, "nvidia"),
                ("10de:1aef", "10de:1459", 0x040300, "snd_hda_intel"),
            )
        ):
            devices.append(
                _dev(
                    f"{dom:04x}:{bus:02x}:00.{fn}",
                    ident,
                    sub,
                    cls,
                    revision=0xA1,
                    driver=drv,
                    iommu_group=i,
                    reset_method="flr bus",
                    numa_node=0,
                    irq=32 + i % 200,
                    label="NVIDIA RTX A6000" if fn == 0 else "NVIDIA HDMI audio",
                )
            )
    if n % 2:
        devices.append(
            _dev(
                "0000:00:1f.6",
                "8086:1a1c",
                "8086:0000",
                0x020000,
                driver="e1000e",
                iommu_group=n // 2,
                ifname="eno1",
                irq=16,
                label="Ethernet I219-LM",
            )
        )
    loaded = ["nvidia", "snd_hda_intel", *_VFIO_MODULES] if n > 1 else [*_VFIO_MODULES]
    if n % 2:
        loaded.insert(0, "e1000e")
    modules, drivers = _catalogue(loaded, ["pci_stub"])
    return Profile(
        name=f"synthetic:{n}",
        description=f"{n} synthetic functions for benchmarks",
        devices=_bus_add_order(devices),
        drivers=drivers,
        modules=modules,
        cmdline="BOOT_IMAGE=/vmlinuz root=/dev/ram0 ro intel_iommu=on iommu=pt",
        console_on_boot_vga=False,
        default_route_ifname="eno1" if n % 2 else None,
        mounts=(Mount("rootfs", "/", "tmpfs", "rw,relatime"),),
    )


PROFILES = {
    "workstation-l4": workstation_l4,
    "dgx-h100": dgx_h100,
    "no-iommu": no_iommu,
    "qemu-q35": qemu_q35,
}


def profile_names() -> list[str]:
    return [*PROFILES, "synthetic:N"]


def get_profile(name: str) -> Profile:
    """A built-in profile by name; KeyError (a LookupError) with the reason if there is none."""
    if name.startswith("synthetic:"):
        count = name.partition(":")[2]
        if not count.isdigit() or int(count) < 1:
            raise KeyError(f"synthetic:N needs a positive count, not {count!r}")
        return synthetic(int(count))
    factory = PROFILES.get(name)
    if factory is None:
        raise KeyError(f"no simulator profile named {name!r} (known: {', '.join(profile_names())})")
    return factory()
