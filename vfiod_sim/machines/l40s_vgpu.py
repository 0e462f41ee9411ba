"""`l40s-vgpu`: a server with two NVIDIA L40S whose SR-IOV VFs host vGPUs in NVIDIA's vendor-specific VFIO
framework (vGPU 17+ on Linux 6.8+): no mdev, each VF bound to `nvidia` with an `nvidia/` directory."""

from __future__ import annotations

import dataclasses

from vfiod_sim.catalogue import bus_add_order, modules_and_drivers
from vfiod_sim.machines.a40_mdev import GPUS, sriov_gpu_board
from vfiod_sim.model import Profile, VendorTypeSpec, VendorVgpuSpec

L40S_FRAMEBUFFER = 49152  # MiB
L40S_VFS = 32
# Type ids are illustrative (NVIDIA's ids are not contiguous and change between driver branches); the
# sizes are NVIDIA's L40S Q and C series.
L40S_Q_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 48)
L40S_C_SIZES = (4, 6, 8, 12, 16, 24, 48)
L40S_FIRST_Q_ID = 1152
L40S_FIRST_C_ID = 1170


def l40s_types() -> tuple[VendorTypeSpec, ...]:
    q = [
        VendorTypeSpec(L40S_FIRST_Q_ID + i, f"NVIDIA L40S-{g}Q", g * 1024) for i, g in enumerate(L40S_Q_SIZES)
    ]
    c = [
        VendorTypeSpec(L40S_FIRST_C_ID + i, f"NVIDIA L40S-{g}C", g * 1024) for i, g in enumerate(L40S_C_SIZES)
    ]
    return (*q, *c)


def l40s_vgpu(heterogeneous: bool = False) -> Profile:
    """Two L40S (48 GiB, 32 VFs each, enabled at boot and bound to `nvidia`); `heterogeneous`: NVIDIA's
    mixed-size mode on both GPUs (off by default, as after every sriov-manage run)."""
    base, devices = sriov_gpu_board("26b9", "10de:1851", "NVIDIA L40S", L40S_VFS)
    modules, drivers = modules_and_drivers(
        [*(m.name for m in base.modules if m.loaded), "nvidia_vgpu_vfio"],
        [m.name for m in base.modules if not m.loaded],
    )
    return dataclasses.replace(
        base,
        name="l40s-vgpu",
        modules=modules,
        drivers=drivers,
        description="two NVIDIA L40S, 32 SR-IOV VFs each on nvidia, vendor-specific VFIO vGPU (vGPU 17+)",
        devices=bus_add_order(devices),
        vfio_cdev=True,
        vendor_vgpus=tuple(
            VendorVgpuSpec(
                pf=pf, framebuffer_mb=L40S_FRAMEBUFFER, types=l40s_types(), heterogeneous=heterogeneous
            )
            for pf, _ in GPUS
        ),
    )
