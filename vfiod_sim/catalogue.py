"""The driver and module catalogue the machines are built from: each driver's id table (trimmed to what
the machines need, but the shape of the real one: vendor and class for the GPU drivers, exact ids for NICs,
class alone for NVMe/AHCI/xHCI/HDA), each module's dependencies, and helpers that pick a machine's
modules and drivers, write a device line, and order devices as the PCI core adds them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from vfiod_sim.model import (
    PCI_ANY_ID,
    DeviceSpec,
    DriverSpec,
    MatchEntry,
    ModuleSpec,
    Mount,
    ProcessSpec,
    Profile,
)


def ids(vendor: int, device: int = PCI_ANY_ID) -> MatchEntry:
    return MatchEntry(vendor=vendor, device=device)


def klass(class_code: int, mask: int, vendor: int = PCI_ANY_ID) -> MatchEntry:
    return MatchEntry(vendor=vendor, class_code=class_code, class_mask=mask)


def _variant(name: str, *devices: tuple[int, int]) -> DriverSpec:
    table = tuple(MatchEntry(vendor=v, device=d, override_only=True) for v, d in devices)
    return DriverSpec(name, name, table, kind="vfio", driver_managed_dma=True)


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
        # The vfio variant drivers: override-only id tables (PCI_DRIVER_OVERRIDE_DEVICE_VFIO) of the devices
        # each serves, named after their modules (.name = KBUILD_MODNAME).
        _variant("virtio_vfio_pci", (0x1AF4, 0x1041)),  # drivers/vfio/pci/virtio/main.c: modern virtio-net
        _variant("mlx5_vfio_pci", (0x15B3, 0x101E)),  # drivers/vfio/pci/mlx5/main.c: ConnectX VFs
        _variant("pds_vfio_pci", (0x1DD8, 0x1003)),  # drivers/vfio/pci/pds/pci_drv.c
        _variant("qat_vfio_pci", (0x8086, 0x4941), (0x8086, 0x4943), (0x8086, 0x4945)),
        _variant("hisi_acc_vfio_pci", (0x19E5, 0xA256), (0x19E5, 0xA259), (0x19E5, 0xA251)),
        # drivers/vfio/pci/nvgrace-gpu/main.c: GH200 120 GB, 480 GB and another GH200 SKU
        _variant("nvgrace_gpu_vfio_pci", (0x10DE, 0x2342), (0x10DE, 0x2345), (0x10DE, 0x2348)),
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
        DriverSpec("igb", "igb", (ids(0x8086, 0x1533),), kind="net", sriov_configure=True),
        DriverSpec(
            "mlx5_core",
            "mlx5_core",
            (ids(0x15B3, 0x1021), ids(0x15B3, 0x101B), ids(0x15B3, 0x101E)),  # 101e: the VFs
            kind="net",
            sriov_configure=True,
        ),
        DriverSpec("virtio-pci", "virtio_pci", (ids(0x1AF4),), kind="virtio"),
        DriverSpec(
            "nvme",
            "nvme",
            (klass(0x010802, 0xFFFFFF),),
            kind="nvme",
            sriov_configure=True,
            sriov_kept_on_remove=True,
        ),
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
        ModuleSpec("virtio_vfio_pci", depends=("vfio_pci_core", "vfio", "virtio_pci")),
        ModuleSpec("mlx5_vfio_pci", depends=("vfio_pci_core", "vfio", "mlx5_core")),
        ModuleSpec("pds_vfio_pci", depends=("vfio_pci_core", "vfio")),
        ModuleSpec("qat_vfio_pci", depends=("vfio_pci_core", "vfio")),
        ModuleSpec("hisi_acc_vfio_pci", depends=("vfio_pci_core", "vfio")),
        ModuleSpec("nvgrace_gpu_vfio_pci", depends=("vfio_pci_core", "vfio")),
        ModuleSpec("mdev", depends=("vfio",)),
        ModuleSpec("mtty", depends=("mdev", "vfio")),  # samples/vfio-mdev, built out of tree
        ModuleSpec("mbochs", depends=("mdev", "vfio")),
        ModuleSpec("nvidia_vgpu_vfio", depends=("nvidia", "mdev", "vfio")),  # NVIDIA's vGPU manager (vGPU 16)
    )
}

VFIO_MODULES = ("vfio", "vfio_iommu_type1", "vfio_pci_core", "vfio_pci")
VARIANT_MODULES = (
    "virtio_vfio_pci",
    "mlx5_vfio_pci",
    "pds_vfio_pci",
    "qat_vfio_pci",
    "hisi_acc_vfio_pci",
    "nvgrace_gpu_vfio_pci",
)


def modules_and_drivers(
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


def dev(
    address: str,
    ids_: str,
    subsystem: str,
    class_code: int,
    **kw: Any,
) -> DeviceSpec:
    vendor, device = (int(x, 16) for x in ids_.split(":"))
    sv, sd = (int(x, 16) for x in subsystem.split(":"))
    return DeviceSpec(address, vendor, device, sv, sd, class_code, **kw)


def nvidia_persistenced() -> ProcessSpec:
    return ProcessSpec(
        pid=900,
        exe="/usr/bin/nvidia-persistenced",
        args=("/usr/bin/nvidia-persistenced", "--user", "nvidia-persistenced"),
        fds=("/dev/nvidiactl",),
        cgroup_unit="nvidia-persistenced.service",
        hold_nvidia_gpus=True,
    )


DISK_MOUNTS = (
    Mount("/dev/nvme0n1p2", "/", "ext4", "rw,relatime"),
    Mount("/dev/nvme0n1p1", "/boot/efi", "vfat", "rw,relatime"),
)


def bus_add_order(devices: list[DeviceSpec]) -> tuple[DeviceSpec, ...]:
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


def named_for_kernel(profile: Profile) -> Profile:
    """The catalogue's names as the profile's kernel has them (each measured in the real-kernel suite):
    bochs-drm's module was `bochs_drm` before 5.15 (drm/tiny/bochs.ko since); the built-in pcieport's
    `module` link names `pcieportdrv` on 6.12 and none on 6.1 (6.2 reworked portdrv into one file: the
    earliest it can have changed)."""
    drivers, modules = list(profile.drivers), list(profile.modules)
    if not profile.kernel_at_least(5, 15):
        drivers = [dataclasses.replace(d, module="bochs_drm") if d.module == "bochs" else d for d in drivers]
        modules = [dataclasses.replace(m, name="bochs_drm") if m.name == "bochs" else m for m in modules]
    if profile.kernel_at_least(6, 2):
        drivers = [
            dataclasses.replace(d, builtin_module="pcieportdrv") if d.name == "pcieport" else d
            for d in drivers
        ]
    return dataclasses.replace(profile, drivers=tuple(drivers), modules=tuple(modules))
