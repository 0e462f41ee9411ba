"""`qemu-q35`: the QEMU q35 guest of the real-kernel suite, as the simulator sees it."""

from __future__ import annotations

from vfiod_sim.catalogue import (
    VFIO_MODULES,
    bus_add_order,
    dev,
    modules_and_drivers,
    named_for_kernel,
)
from vfiod_sim.model import VTCONSOLES_VGACON_REPLACED, Mount, Profile

DEFAULT_RELEASE = "6.1.0-28-amd64"  # Debian bookworm's, the suite's default guest kernel


def qemu_q35(kernel_release: str = DEFAULT_RELEASE) -> Profile:
    """The QEMU q35 guest of the real-kernel suite (tests/e2e/guest.py, Debian's 6.1 kernel): its devices,
    IOMMU groups, drivers, mounts and vtconsoles as that guest shows them (the `inventory` scenario).

    The IOMMU groups are numbered in the order intel-iommu meets the functions (bus 0 by devfn, then the
    buses behind the root port): VGA + intel-hda share 1 (one slot, no ACS), the pcie-pci-bridge and
    everything behind it share 12 (no ACS below a conventional bridge). The SR-IOV NVMe's VFs get the next
    free numbers when they are enabled (13, 14)."""
    devices = [
        dev("0000:00:00.0", "8086:29c0", "1af4:1100", 0x060000, iommu_group=0, label="Q35 host bridge"),
        dev(
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
        dev(
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
        dev(
            "0000:00:03.0",
            "1234:1111",
            "1af4:1100",
            0x038000,
            revision=0x02,
            driver="bochs-drm",
            iommu_group=2,
            label="bochs-display",
        ),
        dev(
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
        dev(
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
        dev(
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
        dev("0000:00:07.0", "1234:11e8", "1af4:1100", 0x00FF00, revision=0x10, iommu_group=6, label="edu"),
        # -device nvme,drive=nvm0,addr=0x8.0: an ext4 file system on the whole namespace, no partition
        dev(
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
        # -device nvme,subsys=subsys0,sriov_max_vfs=2,addr=0x9.0: an SR-IOV PF without namespaces; its VFs
        # (offset 1, stride 1) stay driverless in the suite (sriov_drivers_autoprobe 0: QEMU's nvme VFs
        # fail the nvme probe until flexible resources are assigned)
        dev(
            "0000:00:09.0",
            "1b36:0010",
            "1af4:1100",
            0x010802,
            revision=0x02,
            driver="nvme",
            iommu_group=8,
            sriov_totalvfs=2,
            namespaces=0,
            label="QEMU NVMe with SR-IOV",
        ),
        *(
            dev(
                f"0000:00:09.{vf}",
                "1b36:0010",
                "1af4:1100",
                0x010802,
                revision=0x02,
                iommu_group=12 + vf,
                physfn="0000:00:09.0",
                label=f"QEMU NVMe VF {vf}",
            )
            for vf in (1, 2)
        ),
        dev(
            "0000:00:10.0",
            "1af4:1009",
            "1af4:0009",
            0x000200,
            driver="virtio-pci",
            iommu_group=9,
            mount_tag="hostroot",
            irq=21,
            label="virtio-9p (hostroot)",
        ),
        dev(
            "0000:00:11.0",
            "1af4:1009",
            "1af4:0009",
            0x000200,
            driver="virtio-pci",
            iommu_group=10,
            mount_tag="out",
            irq=20,
            label="virtio-9p (out)",
        ),
        dev(
            "0000:00:1f.0",
            "8086:2918",
            "1af4:1100",
            0x060100,
            revision=0x02,
            driver="lpc_ich",
            iommu_group=11,
            label="ICH9 LPC",
        ),
        dev(
            "0000:00:1f.2",
            "8086:2922",
            "1af4:1100",
            0x010601,
            revision=0x02,
            driver="ahci",
            iommu_group=11,
            irq=19,
            label="ICH9 AHCI",
        ),
        dev(
            "0000:00:1f.3",
            "8086:2930",
            "1af4:1100",
            0x0C0500,
            revision=0x02,
            driver="i801_smbus",
            iommu_group=11,
            irq=18,
            label="ICH9 SMBus",
        ),
        # pcie-pci-bridge: class 0604 but a PCIe-to-PCI bridge, which pcieport's probe refuses
        dev(
            "0000:01:00.0",
            "1b36:000e",
            "0000:0000",
            0x060400,
            parent="0000:00:06.0",
            header_type=1,
            iommu_group=12,
            label="pcie-pci-bridge",
        ),
        dev(
            "0000:02:01.0",
            "8086:100e",
            "1af4:1100",
            0x020000,
            revision=0x03,
            driver="e1000",
            parent="0000:01:00.0",
            iommu_group=12,
            ifname="eth2",
            irq=22,
            label="e1000 behind the bridge",
        ),
        dev(
            "0000:02:02.0",
            "1234:11e8",
            "1af4:1100",
            0x00FF00,
            revision=0x10,
            parent="0000:01:00.0",
            iommu_group=12,
            label="edu behind the bridge",
        ),
    ]
    # The guest has no udev: its init loads the drivers the devices' modaliases name, which leaves out
    # vfio-pci (its table matches nothing by id), so /dev/vfio/vfio appears only after `modprobe vfio-pci`.
    modules, drivers = modules_and_drivers(
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
        [*VFIO_MODULES, "pci_stub"],
    )
    profile = Profile(
        name="qemu-q35",
        description="QEMU q35 guest with an emulated Intel IOMMU (the real-kernel suite's guest)",
        devices=bus_add_order(devices),
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
        kernel_release=kernel_release,
    )
    return named_for_kernel(profile)
