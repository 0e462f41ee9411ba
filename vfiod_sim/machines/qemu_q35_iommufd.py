"""`qemu-q35-iommufd`: the real-kernel suite's guest booted with its own Linux 6.12 (built with IOMMUFD,
VFIO device cdevs and four vfio variant drivers as modules) and one more device, a modern virtio-net
(`virtio-net-pci,disable-legacy=on`, 1af4:1041) at 00:0a.0, which `virtio_vfio_pci`'s override-only id
table names, and a virtio-gpu (1af4:1050) at 00:0b.0, a GPU whose native driver is virtio-pci with its DRM
device on the virtio child: the machine of the vfio variant driver scenarios.
"""

from __future__ import annotations

import dataclasses

from vfiod_sim.catalogue import VFIO_MODULES, bus_add_order, dev, modules_and_drivers, named_for_kernel
from vfiod_sim.machines.qemu_q35 import qemu_q35
from vfiod_sim.model import Profile

VARIANT_NIC = "0000:00:0a.0"
VIRTIO_GPU = "0000:00:0b.0"  # virtio-gpu-pci: a GPU whose native driver is virtio-pci
# What that kernel builds of the variant drivers (the other two are for hardware QEMU has no model of).
BUILT_VARIANTS = ("virtio_vfio_pci", "mlx5_vfio_pci", "pds_vfio_pci", "qat_vfio_pci")


def qemu_q35_iommufd() -> Profile:
    """qemu-q35 plus the modern virtio-net and a virtio-gpu. intel-iommu numbers groups in the order it
    meets functions (bus 0 by devfn), so 00:0a.0 and 00:0b.0 take 9 and 10 and every later group moves up
    by two."""
    base = qemu_q35(kernel_release="6.12.117")
    devices = [
        dataclasses.replace(d, iommu_group=d.iommu_group + 2)
        if d.iommu_group is not None and d.iommu_group >= 9
        else d
        for d in base.devices
    ]
    devices.append(
        dev(
            VARIANT_NIC,
            "1af4:1041",
            "1af4:1100",
            0x020000,
            revision=0x01,
            driver="virtio-pci",
            iommu_group=9,
            ifname="eth3",
            irq=21,
            label="virtio-net (modern only)",
        ),
    )
    devices.append(
        dev(
            VIRTIO_GPU,
            "1af4:1050",
            "1af4:1100",
            0x038000,  # QEMU's virtio-gpu-pci is a "display controller", not VGA-compatible
            revision=0x01,
            driver="virtio-pci",
            iommu_group=10,
            label="virtio-gpu",
        )
    )
    loaded = [m.name for m in base.modules if m.loaded]
    available = [m.name for m in base.modules if not m.loaded and m.name not in VFIO_MODULES]
    modules, drivers = modules_and_drivers(loaded, [*VFIO_MODULES, *available, *BUILT_VARIANTS])
    return named_for_kernel(
        dataclasses.replace(
            base,
            name="qemu-q35-iommufd",
            description="the real-kernel suite's guest on its Linux 6.12 with IOMMUFD, VFIO cdevs and vfio "
            "variant drivers, plus a modern virtio-net",
            devices=bus_add_order(devices),
            drivers=drivers,
            modules=modules,
            kernel_release="6.12.117",
            vfio_cdev=True,
            iommufd=True,
        )
    )
