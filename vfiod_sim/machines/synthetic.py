"""`synthetic:N`: N functions for benchmarks (GPU + HDMI audio pairs, one group per pair)."""

from __future__ import annotations

from vfiod_sim.catalogue import (
    VFIO_MODULES,
    bus_add_order,
    dev,
    modules_and_drivers,
)
from vfiod_sim.model import DeviceSpec, Mount, Profile


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
                dev(
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
            dev(
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
    loaded = ["nvidia", "snd_hda_intel", *VFIO_MODULES] if n > 1 else [*VFIO_MODULES]
    if n % 2:
        loaded.insert(0, "e1000e")
    modules, drivers = modules_and_drivers(loaded, ["pci_stub"])
    return Profile(
        name=f"synthetic:{n}",
        description=f"{n} synthetic functions for benchmarks",
        devices=bus_add_order(devices),
        drivers=drivers,
        modules=modules,
        cmdline="BOOT_IMAGE=/vmlinuz root=/dev/ram0 ro intel_iommu=on iommu=pt",
        console_on_boot_vga=False,
        default_route_ifname="eno1" if n % 2 else None,
        mounts=(Mount("rootfs", "/", "tmpfs", "rw,relatime"),),
    )
