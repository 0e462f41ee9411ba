"""NVIDIA's vendor-specific VFIO framework (vGPU 17 and later on Linux 6.8+) as nvidia.ko shows it: each
SR-IOV VF of a vGPU-capable GPU stays bound to `nvidia`, which registers it with vfio-pci-core (so the VF
has `vfio-dev/` and its group node) and gives it an `nvidia/` directory. `creatable_vgpu_types` lists what
can be created on the VF now; writing a type id to `current_vgpu_type` creates the VF's one vGPU at once,
and `0` destroys it. No mdev, no uuid.

docs/kernel-rules.md (NVIDIA vendor-specific VFIO) ties each rule to its source.
"""

from __future__ import annotations

import errno

from vfiod_sim.driver_core import Core
from vfiod_sim.model import VendorTypeSpec
from vfiod_sim.parsing import kstrtol10
from vfiod_sim.state import KState, Topology
from vfiod_sim.tree import oserror

HEADER = "ID    : vGPU Name\n"
FILES = ("creatable_vgpu_types", "current_vgpu_type", "vgpu_params", "warm_update")


def registered(topo: Topology, st: KState, vf: str) -> bool:
    """The VF is one of nvidia.ko's VFIO devices: its GPU's vGPU module is loaded, it is bound to `nvidia`
    and it was never unbound from it since its VFs were enabled (an unbind breaks the registration: the
    rebound VF has no `nvidia/` and takes no vGPU until an SR-IOV cycle)."""
    gpu = topo.vendor_gpu_of.get(vf)
    ds = st.devices[vf]
    return (
        gpu is not None
        and gpu.module in st.modules
        and ds.present
        and ds.driver == "nvidia"
        and vf not in st.vfio_unregistered
    )


def _types(topo: Topology, vf: str) -> dict[int, VendorTypeSpec]:
    return {t.id: t for t in topo.vendor_gpu_of[vf].types}


def creatable(topo: Topology, st: KState, vf: str) -> list[VendorTypeSpec]:
    """What the VF lists: nothing while it holds a vGPU; else every type that fits the framebuffer its
    GPU's vGPUs leave, and in homogeneous mode (the default) only types of the size already on the GPU."""
    if not registered(topo, st, vf) or vf in st.vgpu_types:
        return []
    gpu = topo.vendor_gpu_of[vf]
    types = _types(topo, vf)
    used = [types[st.vgpu_types[v]] for v in topo.vfs[gpu.pf] if v in st.vgpu_types]
    free = gpu.framebuffer_mb - sum(t.framebuffer_mb for t in used)
    sizes = {t.framebuffer_mb for t in used}
    return [
        t
        for t in gpu.types
        if t.framebuffer_mb <= free and (gpu.heterogeneous or not sizes or t.framebuffer_mb in sizes)
    ]


def listing(topo: Topology, st: KState, vf: str) -> str:
    """`creatable_vgpu_types`: the header, then "%-5d : %s" per type (only the header when nothing fits)."""
    return HEADER + "".join(f"{t.id:<5d} : {t.name}\n" for t in creatable(topo, st, vf))


def store_current_type(c: Core, vf: str, data: bytes) -> None:
    """`current_vgpu_type` store: kstrtol base 10; a type id creates the vGPU (EPERM when the VF has one,
    EIO when the GPU cannot take that type now); 0 destroys it (EPERM when there is none, EBUSY while its
    VFIO device is open)."""
    if not registered(c.topo, c.st, vf):
        raise oserror(errno.ENODEV, vf)
    value = kstrtol10(data)
    if value is None or value < 0:
        raise oserror(errno.EINVAL)
    current = c.st.vgpu_types.get(vf)
    if value == 0:
        if current is None:
            raise oserror(errno.EPERM, "No vGPU exists on current device")
        if c.holders(c.vfio_nodes(vf)) or c.device_file_holders([vf]):
            raise oserror(errno.EBUSY, "The VFIO device must be closed before the vGPU type is cleared")
        del c.st.vgpu_types[vf]
        return
    if current is not None:
        raise oserror(errno.EPERM, f"vGPU device already created with type ID: {current}")
    if value not in {t.id for t in creatable(c.topo, c.st, vf)}:
        raise oserror(errno.EIO, f"vGPU type {value} cannot be created on {vf} now")
    c.st.vgpu_types[vf] = value
