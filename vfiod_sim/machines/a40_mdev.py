"""`a40-mdev`: a server with two NVIDIA A40s whose SR-IOV VFs are vGPU parents (vGPU 16, mdev framework)."""

from __future__ import annotations

import dataclasses

from vfiod_sim.catalogue import bus_add_order, dev, modules_and_drivers
from vfiod_sim.machines.workstation_l4 import workstation_l4
from vfiod_sim.model import DeviceSpec, MdevParentSpec, MdevTypeSpec, Profile

A40_FRAMEBUFFER = 49152  # MiB
A40_VFS = 32
# Q-series sizes (GiB). The type ids are illustrative: NVIDIA's ids change between driver branches.
A40_Q_SIZES = (1, 2, 4, 8, 16, 24, 48)
A40_FIRST_TYPE_ID = 557
GPUS = (("0000:a2:00.0", "0000:00:01.0"), ("0000:b3:00.0", "0000:00:01.1"))


def a40_types() -> tuple[MdevTypeSpec, ...]:
    """mdev_supported_types/nvidia-<id>/ as NVIDIA's host driver shows them (name, description format)."""
    return tuple(
        MdevTypeSpec(
            f"nvidia-{A40_FIRST_TYPE_ID + i}",
            f"NVIDIA A40-{gib}Q",
            f"num_heads=4, frl_config=60, framebuffer={gib * 1024}M, max_resolution=7680x4320, "
            f"max_instance={A40_FRAMEBUFFER // (gib * 1024)}",
            cost=gib * 1024,
        )
        for i, gib in enumerate(A40_Q_SIZES)
    )


def vf_address(pf: str, n: int) -> str:
    """VF n of a PF at function 0 with offset 4, stride 1 (ARI, as an A10 or A40 shows them)."""
    devfn = 4 + n
    return f"{pf[:-4]}{devfn >> 3:02x}.{devfn & 7}"


def sriov_gpu_board(device_id: str, subsystem: str, label: str, vfs: int) -> tuple[Profile, list[DeviceSpec]]:
    """`workstation-l4`'s board with two SR-IOV GPUs instead of the L4, each behind its own root port, its
    `vfs` VFs enabled at boot (sriov-manage) and bound to `nvidia`: the base profile and its devices."""
    base = workstation_l4()
    devices: list[DeviceSpec] = [d for d in base.devices if not d.address.startswith("0000:a2:")]
    devices.append(
        dev(
            "0000:00:01.1",
            "8086:a70d",
            "1043:8882",
            0x060400,
            driver="pcieport",
            header_type=1,
            pcie_port=True,
            iommu_group=9,
            irq=122,
            label="PCIe root port (x16, second slot)",
        )
    )
    group = 10
    for pf, port in GPUS:
        devices.append(
            dev(
                pf,
                f"10de:{device_id}",
                subsystem,
                0x030200,
                revision=0xA1,
                driver="nvidia",
                parent=port,
                iommu_group=group,
                reset_method="flr bus",
                irq=186,
                label=label,
                sriov_totalvfs=vfs,
                numvfs_at_boot=vfs,
            )
        )
        group += 1
        for n in range(vfs):
            devices.append(
                dev(
                    vf_address(pf, n),
                    f"10de:{device_id}",
                    subsystem,
                    0x030200,
                    revision=0xA1,
                    parent=port,
                    iommu_group=group,
                    reset_method="flr",
                    label=f"{label} VF {n}",
                    physfn=pf,
                )
            )
            group += 1
    return base, devices


def a40_mdev() -> Profile:
    """Two A40s (`sriov_gpu_board`), every VF an mdev parent offering the A40 Q types: one vGPU per VF,
    the GPU's 48 GiB shared, one size per GPU (homogeneous mode), EIO past the capacity."""
    base, devices = sriov_gpu_board("2235", "10de:145a", "NVIDIA A40", A40_VFS)
    parents = [
        MdevParentSpec(
            name=vf_address(pf, n),
            module="nvidia_vgpu_vfio",
            budget=A40_FRAMEBUFFER,
            types=a40_types(),
            pci_address=vf_address(pf, n),
            requires_driver="nvidia",
            max_instances=1,
            pool=pf,
            pool_budget=A40_FRAMEBUFFER,
            homogeneous=True,
            full_errno="EIO",
        )
        for pf, _ in GPUS
        for n in range(A40_VFS)
    ]
    modules, drivers = modules_and_drivers(
        [*(m.name for m in base.modules if m.loaded), "nvidia_vgpu_vfio"],
        [m.name for m in base.modules if not m.loaded],
    )
    return dataclasses.replace(
        base,
        name="a40-mdev",
        modules=modules,
        drivers=drivers,
        description="two NVIDIA A40s, 32 SR-IOV VFs each bound to nvidia, each VF an mdev parent (vGPU 16)",
        devices=bus_add_order(devices),
        mdev_parents=tuple(parents),
    )
