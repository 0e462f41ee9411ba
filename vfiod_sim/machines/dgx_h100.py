"""`dgx-h100`: an eight-GPU HGX H100 server behind PCIe switches, with NVSwitches and ConnectX NICs."""

from __future__ import annotations

from vfiod_sim.catalogue import (
    DISK_MOUNTS,
    VFIO_MODULES,
    bus_add_order,
    dev,
    modules_and_drivers,
    nvidia_persistenced,
)
from vfiod_sim.model import DeviceSpec, ProcessSpec, Profile


def dgx_h100() -> Profile:
    """8 x H100 SXM each behind its own PCIe switch port, 4 NVSwitches, 8 ConnectX-7, an ASPEED BMC VGA
    behind its own PCIe-to-PCI bridge (sharing that bridge's group), an NVMe root disk, two NUMA nodes."""
    devices: list[DeviceSpec] = [
        dev("0000:00:00.0", "8086:09a2", "8086:0000", 0x060000, iommu_group=0, label="Host bridge"),
    ]
    group = 1

    def port(addr: str, parent: str | None, irq: int, numa: int) -> None:
        nonlocal group
        devices.append(
            dev(
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
        dev(
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
        dev(
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
        dev(
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
            dev(
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
            dev(
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
            dev(
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
                sriov_totalvfs=4 if i == 0 else 0,
            )
        )
        group += 1
    # The first ConnectX-7 is an SR-IOV PF with 4 VFs (ARI: they follow it in its slot, 1c:00.1-4), each
    # in its own IOMMU group; none is enabled at boot.
    nic0 = f"0000:{gpu_buses[0] + 1:02x}:00.0"
    for vf in range(1, 5):
        devices.append(
            dev(
                f"{nic0[:-1]}{vf}",
                "15b3:101e",
                "15b3:0041",
                0x020000,
                driver="mlx5_core",
                parent=next(d.parent for d in devices if d.address == nic0),
                iommu_group=group,
                reset_method="flr",
                numa_node=0,
                label="ConnectX-7 Virtual Function",
                physfn=nic0,
            )
        )
        group += 1
    modules, drivers = modules_and_drivers(
        [
            "ast",
            "nvidia",
            "nvidia_modeset",
            "nvidia_drm",
            "nvidia_uvm",
            "mlx5_core",
            "nvme",
            *VFIO_MODULES,
        ],
        ["pci_stub", "nouveau"],
    )
    nvswitch_fds = ("/dev/nvidiactl", *(f"/dev/nvidia-nvswitch{i}" for i in range(4)))
    return Profile(
        name="dgx-h100",
        description=(
            "DGX H100: 8 GPUs, 4 NVSwitches, 8 ConnectX-7, ASPEED BMC console, NVMe root, 2 NUMA nodes"
        ),
        devices=bus_add_order(devices),
        drivers=drivers,
        modules=modules,
        cmdline="BOOT_IMAGE=/vmlinuz root=/dev/nvme0n1p2 ro intel_iommu=on iommu=pt",
        iommu=True,
        interrupt_remapping=True,
        numa_nodes=2,
        cpus_per_node=56,
        console_on_boot_vga=True,
        default_route_ifname="ens6f0np0",
        mounts=DISK_MOUNTS,
        processes=(
            nvidia_persistenced(),
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
