"""`workstation-l4`: a desktop with an Intel iGPU on the console and an NVIDIA L4 with its HDMI audio."""

from __future__ import annotations

from vfiod_sim.catalogue import (
    DISK_MOUNTS,
    VFIO_MODULES,
    bus_add_order,
    dev,
    modules_and_drivers,
    nvidia_persistenced,
)
from vfiod_sim.model import ProcessSpec, Profile


def workstation_l4(*, iommu: bool = True) -> Profile:
    """A desktop with an Intel iGPU driving the console and an NVIDIA L4 (+ its HDMI audio) behind a
    root port, both functions in one IOMMU group."""
    g = (lambda n: n) if iommu else (lambda n: None)
    devices = (
        dev("0000:00:00.0", "8086:a700", "1043:8882", 0x060000, iommu_group=g(0), label="Host bridge"),
        dev(
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
        dev(
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
        dev(
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
        dev(
            "0000:00:14.0",
            "8086:7ae0",
            "1043:8882",
            0x0C0330,
            driver="xhci_hcd",
            iommu_group=g(4),
            irq=130,
            label="USB 3.2 xHCI",
        ),
        dev(
            "0000:00:1f.0",
            "8086:7a84",
            "1043:8882",
            0x060100,
            iommu_group=g(5),
            label="ISA bridge (LPC)",
        ),
        dev(
            "0000:00:1f.4",
            "8086:7aa3",
            "1043:8882",
            0x0C0500,
            driver="i801_smbus",
            iommu_group=g(5),
            irq=18,
            label="SMBus",
        ),
        dev(
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
        dev(
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
        dev(
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
        dev(
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
    modules, drivers = modules_and_drivers(
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
            *VFIO_MODULES,
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
        devices=bus_add_order(list(devices)),
        drivers=drivers,
        modules=modules,
        cmdline=cmdline,
        iommu=iommu,
        interrupt_remapping=True,
        numa_nodes=1,
        cpus_per_node=24,
        console_on_boot_vga=True,
        default_route_ifname="eno1",
        mounts=DISK_MOUNTS,
        processes=(
            nvidia_persistenced(),
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
