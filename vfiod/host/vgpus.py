"""Both vGPU frameworks as one read model: the parents (mdev parents and NVIDIA vendor-VFIO VFs), the
vGPUs on them, and finding one vGPU again (an mdev by its uuid; a vendor-VFIO vGPU by its VF and type, as
the kernel gives it no uuid).
"""

from __future__ import annotations

from vfiod.host import mdev, vendor_vgpu
from vfiod.host.host import Host
from vfiod.host.mdev import Mdev, MdevParent

MDEV = "mdev"
VENDOR = vendor_vgpu.FRAMEWORK


def read_parents(host: Host) -> list[MdevParent]:
    return [*mdev.read_parents(host), *vendor_vgpu.read_parents(host)]


def read_vgpus(host: Host) -> list[Mdev]:
    return [*mdev.read_mdevs(host), *vendor_vgpu.read_vgpus(host)]


def find(host: Host, framework: str, uuid: str, parent: str, type_id: str) -> Mdev | None:
    """The vGPU still there: the mdev `uuid`, or the VF `parent` holding a vGPU of `type_id`."""
    if framework == VENDOR:
        vf = mdev.parse_address(parent)
        found = vendor_vgpu.read_vgpu(host, vf) if vf is not None else None
        return found if found is not None and found.type_id == type_id else None
    return mdev.read_mdev(host, uuid)


def framework_of(host: Host, parent: str) -> str:
    """A parent's framework: vendor-vfio for a VF with `nvidia/`, mdev otherwise."""
    vf = mdev.parse_address(parent)
    return VENDOR if vf is not None and vendor_vgpu.is_vendor_vf(host, vf) else MDEV


def same(framework: str, uuid: str, parent: str, type_id: str, live: Mdev) -> bool:
    """Whether the live vGPU is the one described: the mdev's uuid, or the vendor-VFIO VF and type."""
    if framework != live.framework:
        return False
    if live.framework == VENDOR:
        return (parent, type_id) == (live.parent, live.type_id)
    return uuid == live.uuid
