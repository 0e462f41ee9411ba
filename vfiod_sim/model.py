"""Simulated hosts as data: the models of one machine's PCI topology, IOMMU groups, drivers and their id
tables, modules, mounts, routes and boot-time processes.

The models are pydantic dataclasses: a profile round-trips through JSON (`Profile.to_json` /
`Profile.from_json`) in the layout below, so the simulator, its tests and the real-kernel suite can share a
scenario as a file, and a file with a wrong type or an unknown key is refused with the field's name. PCI
ids are hex strings in JSON ("10de", a class "030000", "*" for PCI_ANY_ID in an id table) and ints in
Python. The built-in machines are in `vfiod_sim.machines`.

The device list is in bus-add order (what `pci_bus_add_devices` walks: a bus's devices, then the buses
behind its bridges), which is the order drivers meet devices at boot and so decides minor numbers
(card0, nvidia0, ...). Modules load at boot in list order, so a profile decides, as modprobe and udev do
on a real host, which driver claims a device first.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import field
from functools import cached_property
from typing import Annotated, Any, ClassVar, Self

from pydantic import AliasChoices, BeforeValidator, ConfigDict, Field, PlainSerializer, TypeAdapter
from pydantic.dataclasses import dataclass

PCI_ANY_ID = 0xFFFFFFFF

DRIVER_KINDS = ("drm", "net", "nvme", "audio", "vfio", "gpu-nvidia", "virtio", "pcieport", "other")

# The domain as the kernel prints it (%04x): four hex digits, more above ffff (Intel VMD's 10000 on).
ADDR_RE = re.compile(r"(?:[0-9a-f]{4}|[1-9a-f][0-9a-f]{4,7}):[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")
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


def _parse_hex(value: object) -> object:
    """A hex string ("10de", "0x10de") or "*" (PCI_ANY_ID) from JSON; ints pass through."""
    if isinstance(value, str):
        return PCI_ANY_ID if value in ("*", "") else int(value, 16)
    return value


def _dump_hex(width: int, *, wildcard: bool = False) -> Callable[[int], str]:
    def dump(value: int) -> str:
        return "*" if wildcard and value == PCI_ANY_ID else f"{value:0{width}x}"

    return dump


Hex2 = Annotated[int, BeforeValidator(_parse_hex), PlainSerializer(_dump_hex(2), return_type=str)]
Hex4 = Annotated[int, BeforeValidator(_parse_hex), PlainSerializer(_dump_hex(4), return_type=str)]
Hex6 = Annotated[int, BeforeValidator(_parse_hex), PlainSerializer(_dump_hex(6), return_type=str)]
# an id-table field: "*" is PCI_ANY_ID
PciId = Annotated[
    int, BeforeValidator(_parse_hex), PlainSerializer(_dump_hex(4, wildcard=True), return_type=str)
]


def _etc_files(value: object) -> object:
    return tuple(value.items()) if isinstance(value, dict) else value


EtcFiles = Annotated[
    tuple[tuple[str, str], ...],
    BeforeValidator(_etc_files),
    PlainSerializer(dict, return_type=dict[str, str]),
]


def _class(default: int | None = None) -> Any:
    """The `class` key of the JSON layout (a Python keyword, so `class_code` in Python)."""
    names = AliasChoices("class", "class_code")
    if default is None:
        return Field(validation_alias=names, serialization_alias="class")
    return Field(default=default, validation_alias=names, serialization_alias="class")


CONFIG = ConfigDict(extra="forbid", populate_by_name=True, strict=False)


class Codec:
    """`to_dict` / `from_dict` in the JSON layout, derived from the model (one adapter per class)."""

    _adapters: ClassVar[dict[type, TypeAdapter[Any]]] = {}

    @classmethod
    def _adapter(cls) -> TypeAdapter[Any]:
        adapter = Codec._adapters.get(cls)
        if adapter is None:
            adapter = Codec._adapters[cls] = TypeAdapter(cls)
        return adapter

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = self._adapter().dump_python(self, mode="json", by_alias=True)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        """The model from its JSON layout: pydantic's ValidationError (a ValueError) names a bad field."""
        out: Self = cls._adapter().validate_python(d)
        return out


@dataclass(frozen=True, config=CONFIG)
class CardIdentity(Codec):
    """The ids a card reports in config space: what `pci_match_one_device` compares."""

    vendor: Hex4
    device: Hex4
    subsystem_vendor: Hex4
    subsystem_device: Hex4
    class_code: Hex6 = _class()  # 24 bits: base, sub-class, prog-if
    revision: Hex2 = 0


@dataclass(frozen=True, config=CONFIG)
class MatchEntry(Codec):
    """One `struct pci_device_id`: PCI_ANY_ID wildcards, and a class compared under `class_mask`.

    `override_only` is 6.1's PCI_ID_F_VFIO_DRIVER_OVERRIDE: the entry matches only while the device's
    `driver_override` names the driver (vfio-pci's whole table is one such entry).
    """

    vendor: PciId = PCI_ANY_ID
    device: PciId = PCI_ANY_ID
    subvendor: PciId = PCI_ANY_ID
    subdevice: PciId = PCI_ANY_ID
    class_code: Hex6 = _class(0)
    class_mask: Hex6 = 0
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


@dataclass(frozen=True, config=CONFIG)
class DriverSpec(Codec):
    """A PCI driver: its name in /sys/bus/pci/drivers, the module providing it (None = built in), its
    static id table, whether it leaves DMA ownership to the user (`driver_managed_dma`), and the kind of
    side effects binding it has (DRM nodes, a netdev, a block device, a vfio device...)."""

    name: str
    module: str | None
    id_table: tuple[MatchEntry, ...] = ()
    kind: str = "other"
    driver_managed_dma: bool = False
    fbdev: bool = False  # DRM drivers whose fbdev emulation registers /dev/fbN for each device
    # It has a sriov_configure callback (sysfs sriov_numvfs works through it). Its remove disables SR-IOV
    # (pci_disable_sriov), unless it is one that leaves the VFs ("driver left SR-IOV enabled after
    # remove", drivers/pci/iov.c pci_iov_remove: nvme does).
    sriov_configure: bool = False
    sriov_kept_on_remove: bool = False
    # A built-in driver's `module` link names this /sys/module entry (pcieport's `pcieportdrv` on newer
    # kernels); None: a built-in driver has no module link.
    builtin_module: str | None = None


@dataclass(frozen=True, config=CONFIG)
class ModuleSpec(Codec):
    """A loadable module: loaded at boot or not, and the modules it needs (loaded first by modprobe)."""

    name: str
    loaded: bool = True
    depends: tuple[str, ...] = ()


@dataclass(frozen=True, config=CONFIG)
class DeviceSpec(Codec):
    """One PCI function as the profile installs it. `driver` is the driver it is expected to have after
    boot (the tests check that the boot probe agrees); `parent` is the bridge it sits behind."""

    address: str
    vendor: Hex4
    device: Hex4
    subsystem_vendor: Hex4
    subsystem_device: Hex4
    class_code: Hex6 = _class()
    revision: Hex2 = 0
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
    namespaces: int = 1  # NVMe: 0 for a controller without a namespace (no block device)
    mount_tag: str | None = None  # virtio-9p / virtiofs tag
    irq: int = 0
    label: str = ""
    # SR-IOV: a physical function lists how many VFs it supports; each VF is listed (after its PF, in VF
    # order) with `physfn`, and is on the bus only while the PF's sriov_numvfs covers it.
    sriov_totalvfs: int = 0
    physfn: str | None = None
    numvfs_at_boot: int = 0  # VFs a boot script enables with autoprobe on (NVIDIA's sriov-manage -e ALL)

    @cached_property
    def identity(self) -> CardIdentity:
        return CardIdentity(
            self.vendor,
            self.device,
            self.subsystem_vendor,
            self.subsystem_device,
            self.class_code,
            self.revision,
        )


@dataclass(frozen=True, config=CONFIG)
class MdevTypeSpec(Codec):
    """A type a mediated-device parent offers: its directory under `mdev_supported_types/` (the parent
    driver's name, a dash and the type's own name: `mtty-2`), its `name` and `description` attributes (None:
    the driver has no such file) and how much of the parent's budget one instance takes."""

    id: str
    name: str | None
    description: str | None = None
    device_api: str = "vfio-pci"
    cost: int = 1


@dataclass(frozen=True, config=CONFIG)
class MdevParentSpec(Codec):
    """A parent of mediated devices, registered while its module is loaded (mdev_register_parent): a PCI
    function (`pci_address`) or a virtual device of class `virtual_class` (`sys/devices/virtual/<class>/
    <name>`, as the kernel's samples are). Its children are bound to the driver its module registers on the
    mdev bus (named like the module); `budget` is what its types draw from (mtty: 24 ports; mbochs: the
    `count` parameter, 256 MB)."""

    name: str
    module: str
    budget: int
    types: tuple[MdevTypeSpec, ...]
    pci_address: str | None = None
    virtual_class: str | None = None
    # A PCI parent is registered only while bound to this driver (NVIDIA's VFs: `nvidia`).
    requires_driver: str | None = None
    max_instances: int = 0  # at most this many mdevs on the parent (NVIDIA: one per VF); 0 = the budget's
    # Parents sharing a physical GPU draw from its `pool_budget` (framebuffer MiB); `homogeneous`: once an
    # mdev exists on the GPU, only types of its size can be created on any of them (NVIDIA's default).
    pool: str | None = None
    pool_budget: int = 0
    homogeneous: bool = False
    full_errno: str = "ENOSPC"  # what create answers past the capacity (the samples' probe; NVIDIA: EIO)


@dataclass(frozen=True, config=CONFIG)
class VendorTypeSpec(Codec):
    """A vGPU type of NVIDIA's vendor-VFIO framework: its decimal id (as `creatable_vgpu_types` lists it
    and `current_vgpu_type` takes it), its name and the framebuffer one instance takes (MiB)."""

    id: int
    name: str
    framebuffer_mb: int


@dataclass(frozen=True, config=CONFIG)
class VendorVgpuSpec(Codec):
    """A physical GPU whose SR-IOV VFs host vGPUs in NVIDIA's vendor-specific VFIO framework (vGPU 17+ on
    Linux 6.8+): while `module` is loaded, each VF bound to `nvidia` is a VFIO device of nvidia.ko with an
    `nvidia/` directory. One vGPU per VF; the GPU's `framebuffer_mb` is shared; `heterogeneous` is NVIDIA's
    mixed-size mode (off by default: once a vGPU exists only types of its size can be created)."""

    pf: str
    framebuffer_mb: int
    types: tuple[VendorTypeSpec, ...]
    module: str = "nvidia_vgpu_vfio"
    heterogeneous: bool = False


@dataclass(frozen=True, config=CONFIG)
class Mount(Codec):
    """A line of /proc/self/mountinfo (or of /proc/swaps when `fstype` is "swap"). A `/dev/<block>`
    source gets the block device's major:minor from the simulated tree; anything else is anonymous."""

    source: str
    mountpoint: str
    fstype: str
    options: str = "rw,relatime"


@dataclass(frozen=True, config=CONFIG)
class ProcessSpec(Codec):
    """A process running after boot. `hold_nvidia_gpus` opens every /dev/nvidiaN present when it starts
    (what nvidia-persistenced does)."""

    pid: int
    exe: str
    args: tuple[str, ...] = ()
    uid: int = 0
    fds: tuple[str, ...] = ()
    cgroup_unit: str | None = None
    hold_nvidia_gpus: bool = False


@dataclass(frozen=True, config=CONFIG)
class Profile(Codec):
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
    etc_files: EtcFiles = ()  # (path under /etc, content); an object of path -> content in JSON
    hugepages_2m: int = 0
    hugepages_1g: int = 0
    # `uname -r`: Linux 6.1 by default. Before 6.1 a VFIO device has no `vfio-dev/` (struct device of a
    # vfio_device, drivers/vfio/vfio_main.c, 6.1) and /sys/class/vfio-dev does not exist.
    kernel_release: str = "6.1.0-28-amd64"
    vfio_cdev: bool = False  # CONFIG_VFIO_DEVICE_CDEV (6.6+): /dev/vfio/devices/vfioN
    iommufd: bool = False  # CONFIG_IOMMUFD: /dev/iommu
    # The real nvidia driver's nv_pci_remove waits (an os_delay loop) while any process has /dev/nvidiaN
    # open, so unbinding a GPU that nvidia-persistenced still holds hangs until the daemon stops. On by
    # default, as on a real host: callers (vfiod's persistence hold, tests) must stop the unit first.
    nvidia_remove_waits_for_users: bool = True
    # /sys/class/vtconsole/vtconN/name in N order: one fbcon and one dummycon entry (see FBCON)
    vtconsoles: tuple[str, ...] = VTCONSOLES_DUMMY_AT_BOOT
    mdev_parents: tuple[MdevParentSpec, ...] = ()
    vendor_vgpus: tuple[VendorVgpuSpec, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)  # free-form notes carried with the scenario

    def kernel_at_least(self, major: int, minor: int) -> bool:
        """The profile's kernel is `major.minor` or newer (an unparsable release counts as new)."""
        found = re.match(r"(\d+)\.(\d+)", self.kernel_release)
        return found is None or (int(found[1]), int(found[2])) >= (major, minor)

    @property
    def vfio_dev_class(self) -> bool:
        """Whether VFIO devices show in sysfs (`<dev>/vfio-dev/vfioN`, /sys/class/vfio-dev): Linux 6.1+."""
        return self.kernel_at_least(6, 1)

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
            if ADDR_RE.fullmatch(d.address) is None:
                raise ValueError(f"{d.address!r} is not a canonical PCI address")
            if d.address in seen:
                raise ValueError(f"device {d.address} is listed twice")
            if d.parent is not None and d.parent not in seen:
                raise ValueError(f"{d.address}: its parent {d.parent} must be listed before it")
            if d.parent is not None and self.device(d.parent).header_type != 1:
                raise ValueError(f"{d.address}: its parent {d.parent} is not a bridge")
            if d.physfn is not None and (d.physfn not in seen or not self.device(d.physfn).sriov_totalvfs):
                raise ValueError(f"{d.address}: its physfn {d.physfn} must be an SR-IOV PF listed before it")
            if d.physfn is not None and self.device(d.physfn).parent != d.parent:
                raise ValueError(
                    f"{d.address}: a VF sits on its PF's bus (parent {self.device(d.physfn).parent})"
                )
            seen.add(d.address)
        for d in self.devices:
            vfs = [v for v in self.devices if v.physfn == d.address]
            if len(vfs) > d.sriov_totalvfs:
                raise ValueError(f"{d.address} lists {len(vfs)} VFs but supports {d.sriov_totalvfs}")
            if d.numvfs_at_boot > len(vfs):
                raise ValueError(f"{d.address} enables {d.numvfs_at_boot} VFs at boot but lists {len(vfs)}")
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
        for parent in self.mdev_parents:
            if (parent.pci_address is None) == (parent.virtual_class is None):
                raise ValueError(f"mdev parent {parent.name}: a PCI address or a virtual class, not both")
            if parent.pci_address is not None and parent.pci_address not in seen:
                raise ValueError(f"mdev parent {parent.name}: no device {parent.pci_address}")
            if parent.module not in modules:
                raise ValueError(f"mdev parent {parent.name} comes from module {parent.module}, not listed")
        for gpu in self.vendor_vgpus:
            if gpu.pf not in seen or not self.device(gpu.pf).sriov_totalvfs:
                raise ValueError(f"vendor-VFIO GPU {gpu.pf}: not an SR-IOV PF of the profile")
            if gpu.module not in modules:
                raise ValueError(f"vendor-VFIO GPU {gpu.pf} needs module {gpu.module}, not listed")
        kinds = sorted(self.vtconsole(i) for i in range(len(self.vtconsoles)))
        if [k for k, _ in kinds] != [DUMMYCON, FBCON]:
            raise ValueError(
                f"vtconsoles must be one dummy device and one frame buffer device: {self.vtconsoles}"
            )
        if not dict(kinds)[FBCON]:
            raise ValueError("fbcon registers through do_take_over_console: its vtconsole is '(M)'")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Profile:
        """A profile from JSON text: ValueError (pydantic's ValidationError) naming what is wrong."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a profile is a JSON object")
        return cls.from_dict(data)
