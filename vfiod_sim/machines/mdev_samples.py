"""`mdev-samples` and `mdev-samples-iommufd`: the real-kernel suite's guest with the kernel's sample
mediated-device drivers loaded, on Debian's 6.1 and on the suite's own 6.12 with VFIO cdevs and iommufd
(where each mdev has its own `/dev/vfio/devices/vfioN`)."""

from __future__ import annotations

import dataclasses

from vfiod_sim.catalogue import modules_and_drivers
from vfiod_sim.machines.qemu_q35 import qemu_q35
from vfiod_sim.machines.qemu_q35_iommufd import qemu_q35_iommufd
from vfiod_sim.model import MdevParentSpec, MdevTypeSpec, Profile

MTTY_PORTS = 24  # samples/vfio-mdev/mtty.c MAX_MTTYS
MBOCHS_MBYTES = 256  # samples/vfio-mdev/mbochs.c max_mbytes (module parameter `count`)


def mdev_samples(base: Profile | None = None) -> Profile:
    """`qemu-q35` with `mtty` and `mbochs` loaded (built out of tree from the kernel's samples/vfio-mdev):
    two virtual parents (`/sys/devices/virtual/mtty/mtty`, `/sys/devices/virtual/mbochs/mbochs`). mtty's
    types take serial ports from 24 (mtty-1 one, mtty-2 two) and have no `description`; mbochs' take
    video memory from 256 MB (4, 16 and 64 MB)."""
    base = base or qemu_q35()
    loaded = [m.name for m in base.modules if m.loaded]
    modules, drivers = modules_and_drivers(
        [*loaded, "mtty", "mbochs"], [m.name for m in base.modules if not m.loaded]
    )
    mtty = MdevParentSpec(
        name="mtty",
        module="mtty",
        budget=MTTY_PORTS,
        virtual_class="mtty",
        types=(
            MdevTypeSpec("mtty-1", "Single port serial", cost=1),
            MdevTypeSpec("mtty-2", "Dual port serial", cost=2),
        ),
    )
    mbochs = MdevParentSpec(
        name="mbochs",
        module="mbochs",
        budget=MBOCHS_MBYTES,
        virtual_class="mbochs",
        types=tuple(
            MdevTypeSpec(
                f"mbochs-{size}",
                f"mbochs-{size}",
                f"virtual display, {mbytes} MB video memory",
                cost=mbytes,
            )
            for size, mbytes in (("small", 4), ("medium", 16), ("large", 64))
        ),
    )
    return dataclasses.replace(
        base,
        name="mdev-samples",
        description="the real-kernel suite's guest with the sample mdev drivers mtty and mbochs loaded",
        modules=modules,
        drivers=drivers,
        mdev_parents=(mtty, mbochs),
    )


def mdev_samples_iommufd() -> Profile:
    """`qemu-q35-iommufd` (Linux 6.12, VFIO cdevs, iommufd) with `mtty` and `mbochs` loaded: an mdev gets
    `vfio-dev/vfioN` and `/dev/vfio/devices/vfioN` like any VFIO device."""
    return dataclasses.replace(
        mdev_samples(qemu_q35_iommufd()),
        name="mdev-samples-iommufd",
        description="the real-kernel suite's guest on its Linux 6.12 with VFIO cdevs and iommufd, with the "
        "sample mdev drivers mtty and mbochs loaded",
    )
