"""Mediated devices as drivers/vfio/mdev (Linux 6.1) and the kernel's sample drivers make them: a parent's
types with their `available_instances` (what is left of the parent's budget, in whole instances), `create`
taking a uuid, each mdev in an IOMMU group of its own with its group node, and `remove`, which waits while
a VFIO device file of the mdev is open (vfio_unregister_group_dev waits for the device's users).

docs/kernel-rules.md (Mediated devices) names the kernel function each rule imitates.
"""

from __future__ import annotations

import errno
import re

from vfiod_sim.driver_core import Blocked, Core
from vfiod_sim.parsing import kstrtoul
from vfiod_sim.state import KState, MdevState, Topology
from vfiod_sim.tree import oserror

UUID_STRING_LEN = 36
_UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def registered(topo: Topology, st: KState, parent: str) -> bool:
    """mdev_register_parent runs in the parent module's init (the samples), or when the parent's driver
    takes it (NVIDIA's VFs, bound to `nvidia`): the parent exists while both hold."""
    spec = topo.mdev_parents[parent]
    if spec.module not in st.modules:
        return False
    if spec.pci_address is None:
        return True
    ds = st.devices[spec.pci_address]
    return ds.present and (spec.requires_driver is None or ds.driver == spec.requires_driver)


def _cost(topo: Topology, parent: str, type_id: str) -> int:
    return next(t.cost for t in topo.mdev_parents[parent].types if t.id == type_id)


def available(topo: Topology, st: KState, parent: str, type_id: str) -> int:
    """available_instances_show: mtty `avail_ports / nr_ports`, mbochs `avail_mbytes / type->mbytes`;
    NVIDIA's VFs 1 or 0: one vGPU per VF, the physical GPU's framebuffer, and in homogeneous mode only the
    size already on the GPU."""
    spec = topo.mdev_parents[parent]
    cost = _cost(topo, parent, type_id)
    mine = [m for m in st.mdevs.values() if m.parent == parent]
    n = max(0, spec.budget - sum(_cost(topo, m.parent, m.type) for m in mine)) // cost
    if spec.max_instances:
        n = min(n, max(0, spec.max_instances - len(mine)))
    if spec.pool is not None:
        members = set(topo.mdev_pool_members(parent))
        pooled = [m for m in st.mdevs.values() if m.parent in members]
        sizes = {_cost(topo, m.parent, m.type) for m in pooled}
        n = min(n, max(0, spec.pool_budget - sum(_cost(topo, m.parent, m.type) for m in pooled)) // cost)
        if spec.homogeneous and sizes - {cost}:
            n = 0
    return n


def _new_group(c: Core) -> int:
    """iommu_group_alloc: ida_alloc, the lowest id no group has. The profile's groups count as taken even
    while their devices are away (a VF's group is fixed in the profile, where the kernel would give it the
    next free id when it appears)."""
    taken = set(c.topo.groups) | {m.group for m in c.st.mdevs.values()}
    n = 0
    while n in taken:
        n += 1
    return n


def store_create(c: Core, parent: str, type_id: str, data: bytes) -> None:
    """drivers/vfio/mdev/mdev_sysfs.c create_store (a uuid, with at most a newline after it) ->
    mdev_device_create (-EEXIST for a uuid in use) -> the driver's probe (-ENOSPC past its budget)."""
    if not registered(c.topo, c.st, parent):
        raise oserror(errno.ENODEV, parent)
    if not UUID_STRING_LEN <= len(data) <= UUID_STRING_LEN + 1:
        raise oserror(errno.EINVAL)
    text = data[:UUID_STRING_LEN].decode("ascii", "replace")
    if _UUID_RE.fullmatch(text) is None:
        raise oserror(errno.EINVAL)
    uuid = text.lower()
    if uuid in c.st.mdevs:
        raise oserror(errno.EEXIST, f"mdev {uuid} exists")
    if available(c.topo, c.st, parent, type_id) < 1:
        code = getattr(errno, c.topo.mdev_parents[parent].full_errno)
        raise oserror(code, f"{type_id}: no instance can be created on {parent} now")
    # the driver's probe registers the VFIO device (vfio_register_emulated_iommu_dev): 6.1 and later give
    # it a struct device, vfioN, under the mdev (and a cdev with CONFIG_VFIO_DEVICE_CDEV)
    vfio = c.alloc("vfio") if c.profile.vfio_dev_class else -1
    c.st.mdevs[uuid] = MdevState(parent=parent, type=type_id, group=_new_group(c), vfio=vfio)
    c.mdev_uevent("add", uuid)


def mdev_cdevs(c: Core, uuid: str) -> list[str]:
    """The mdev's VFIO device cdev, on kernels with them: an open one holds the device as a device file
    does (vfio_device_fops_cdev_open takes a registration reference)."""
    m = c.st.mdevs[uuid]
    return [f"/dev/vfio/devices/vfio{m.vfio}"] if c.profile.vfio_cdev and m.vfio >= 0 else []


def store_remove(c: Core, uuid: str, data: bytes) -> None:
    """mdev_sysfs.c remove_store: kstrtoul; non-zero removes the mdev, whose driver's remove waits while
    a VFIO device file of it is open (vfio_unregister_group_dev waits for the device's users). A process
    holding only the group node does not hold the device: the remove goes ahead (measured on 6.1)."""
    if uuid not in c.st.mdevs:
        raise oserror(errno.ENODEV, uuid)
    value = kstrtoul(data)
    if value is None:
        raise oserror(errno.EINVAL)
    if not value:
        return
    holders = c.device_file_holders([uuid]) + c.holders(mdev_cdevs(c, uuid))
    if holders:
        raise Blocked(uuid, holders)
    c.forget_minor("vfio")
    del c.st.mdevs[uuid]
    c.mdev_uevent("remove", uuid)
