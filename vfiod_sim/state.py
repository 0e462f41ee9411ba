"""The kernel's state, and the profile seen as a topology.

`KState` is everything the kernel knows that the profile does not say (which functions are on the bus,
their drivers and overrides, loaded modules, dynamic ids, swapped cards...); it lives in `sim/state.json`.
`Topology` is what is derived once from a profile (sysfs paths, parents, groups, drivers by module).
The tree is partitioned into keys (one device, one IOMMU group, one driver, one module, "global"):
`dirty_keys` says which a change of state touches.
"""

from __future__ import annotations

import posixpath
from dataclasses import field
from functools import cached_property

from pydantic.dataclasses import dataclass

from vfiod_sim.model import (
    CONFIG,
    CardIdentity,
    Codec,
    DeviceSpec,
    DriverSpec,
    MatchEntry,
    MdevParentSpec,
    ModuleSpec,
    Profile,
    VendorVgpuSpec,
)


class Topology:
    """Lookups derived once from a profile: paths, parents, groups, drivers by module."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.devices: dict[str, DeviceSpec] = {d.address: d for d in profile.devices}
        self.order: list[str] = [d.address for d in profile.devices]
        self.children: dict[str, list[str]] = {a: [] for a in self.order}
        for d in profile.devices:
            if d.parent is not None:
                self.children[d.parent].append(d.address)
        self.devpath: dict[str, str] = {}
        for d in profile.devices:
            if d.parent is None:
                self.devpath[d.address] = f"sys/devices/pci{d.address[:-5]}/{d.address}"  # pci<domain>:<bus>
            else:
                self.devpath[d.address] = f"{self.devpath[d.parent]}/{d.address}"
        self.dir_to_addr = {p: a for a, p in self.devpath.items()}
        self.root_buses = sorted(
            {posixpath.dirname(self.devpath[a]) for a in self.order if not self.parent(a)}
        )
        self.groups: dict[int, list[str]] = profile.groups()
        self.drivers: dict[str, DriverSpec] = {d.name: d for d in profile.drivers}
        self.modules: dict[str, ModuleSpec] = {m.name: m for m in profile.modules}
        self.module_drivers: dict[str, list[str]] = {m: [] for m in self.modules}
        for drv in profile.drivers:
            if drv.module is not None:
                self.module_drivers[drv.module].append(drv.name)
        self.vfs: dict[str, list[str]] = {a: [] for a in self.order}  # PF -> its VFs in VF order
        for d in profile.devices:
            if d.physfn is not None:
                self.vfs[d.physfn].append(d.address)
        slots: dict[str, int] = {}
        for a in self.order:  # a VF is not a function of its slot's multi-function device
            slots[a[:-2]] = slots.get(a[:-2], 0) + (self.devices[a].physfn is None)
        self.multifunction = {a: slots[a[:-2]] > 1 for a in self.order}
        self.index = {a: i for i, a in enumerate(self.order)}

    @cached_property
    def mdev_parents(self) -> dict[str, MdevParentSpec]:
        return {p.name: p for p in self.profile.mdev_parents}

    @cached_property
    def vendor_gpu_of(self) -> dict[str, VendorVgpuSpec]:
        """A VF of a vendor-VFIO GPU -> that GPU."""
        gpus = {g.pf: g for g in self.profile.vendor_vgpus}
        return {vf: gpus[pf] for pf in gpus for vf in self.vfs[pf]}

    @cached_property
    def mdev_parent_of_addr(self) -> dict[str, str]:
        return {p.pci_address: n for n, p in self.mdev_parents.items() if p.pci_address is not None}

    def mdev_pool_members(self, parent: str) -> list[str]:
        """The parents sharing `parent`'s physical GPU (itself alone when it has no pool)."""
        pool = self.mdev_parents[parent].pool
        if pool is None:
            return [parent]
        return [n for n, p in self.mdev_parents.items() if p.pool == pool]

    @cached_property
    def mdev_dir_to_parent(self) -> dict[str, str]:
        return {self.mdev_parent_dir(n): n for n in self.mdev_parents}

    def mdev_parent_dir(self, name: str) -> str:
        """Where a parent's device directory is: the PCI function's, or sys/devices/virtual/<class>/<name>."""
        spec = self.mdev_parents[name]
        if spec.pci_address is not None:
            return self.devpath[spec.pci_address]
        return f"sys/devices/virtual/{spec.virtual_class}/{name}"

    def parent(self, addr: str) -> str | None:
        return self.devices[addr].parent

    def group_of(self, addr: str) -> int | None:
        return self.devices[addr].iommu_group if self.profile.iommu else None

    def descendants(self, addr: str) -> list[str]:
        out: list[str] = []
        for child in self.children[addr]:
            out.append(child)
            out.extend(self.descendants(child))
        return out

    def bus_range(self, addr: str) -> tuple[int, int]:
        """(secondary, subordinate) bus numbers of a bridge, from the devices behind it."""
        below = [int(a[-7:-5], 16) for a in self.descendants(addr)]
        own = int(addr[-7:-5], 16)
        if not below:
            return own + 1, own + 1
        return min(below), max(below)


# ----- state --------------------------------------------------------------------------------------------


@dataclass(config=CONFIG)
class DevState(Codec):
    """One function: on the bus or not, its driver, its override, and the minors its driver allocated."""

    present: bool = False
    driver: str | None = None
    override: str | None = None
    minors: dict[str, int] = field(default_factory=dict)
    numvfs: int = 0  # an SR-IOV PF: its enabled VFs
    vf_autoprobe: bool = True  # an SR-IOV PF: sriov_drivers_autoprobe


@dataclass(config=CONFIG)
class MdevState(Codec):
    """One mediated device: its parent, its type, the IOMMU group the kernel gave it (a group of its own,
    numbered like any new group: the lowest free id) and, on 6.1 and later, the index of its VFIO device
    (`vfio-dev/vfioN`, from the same ida as every VFIO device's; -1 before 6.1)."""

    parent: str
    type: str
    group: int
    vfio: int = -1


@dataclass(config=CONFIG)
class KState(Codec):
    """Everything the kernel knows that the profile does not say. `cards` and `unplugged` are physical
    (a swapped card, an empty slot) and survive a reboot; the rest is reset by it."""

    boot_id: str
    generation: int
    devices: dict[str, DevState]
    modules: list[str] = field(default_factory=list)  # loaded, in load order
    drivers: list[str] = field(default_factory=list)  # registered, in registration order
    dynids: dict[str, list[MatchEntry]] = field(default_factory=dict)  # new_id / ids=
    extra_ids: dict[str, list[MatchEntry]] = field(default_factory=dict)  # add_driver_match
    cards: dict[str, CardIdentity] = field(default_factory=dict)
    unplugged: list[str] = field(default_factory=list)
    autoprobe: bool = True
    fbcon_bound: bool = False
    console_unbound_by_admin: bool = False
    hugepages: dict[str, int] = field(default_factory=dict)
    mdevs: dict[str, MdevState] = field(default_factory=dict)  # uuid -> the mediated device
    vgpu_types: dict[str, int] = field(default_factory=dict)  # vendor-VFIO VF -> its vGPU's type id
    vfio_unregistered: list[str] = field(default_factory=list)  # vendor VFs unbound from nvidia once
    seq: int = 0


def dirty_keys(topo: Topology, old: KState, new: KState) -> set[str]:
    keys: set[str] = set()
    for a in topo.order:
        if old.devices[a] != new.devices[a] or old.cards.get(a) != new.cards.get(a):
            keys.add(f"dev:{a}")
            if a in topo.mdev_parent_of_addr:  # a PCI parent comes and goes with its device and driver
                keys.add(f"mdevp:{topo.mdev_parent_of_addr[a]}")
            g = topo.group_of(a)
            if g is not None:
                keys.add(f"grp:{g}")
    if old.mdevs != new.mdevs:
        for uuid in set(old.mdevs) | set(new.mdevs):
            if old.mdevs.get(uuid) != new.mdevs.get(uuid):
                keys.add(f"mdev:{uuid}")
                for m in (old.mdevs.get(uuid), new.mdevs.get(uuid)):  # its siblings' capacity changes too
                    keys |= {f"mdevp:{p}" for p in (topo.mdev_pool_members(m.parent) if m else ())}
    if old.vgpu_types != new.vgpu_types:  # a vGPU changes what every VF of its GPU lists
        for vf in set(old.vgpu_types).symmetric_difference(new.vgpu_types) | {
            v for v in old.vgpu_types if old.vgpu_types[v] != new.vgpu_types.get(v)
        }:
            keys |= {f"dev:{v}" for v in topo.vfs[topo.vendor_gpu_of[vf].pf]}
    if old.drivers != new.drivers:
        keys |= {f"drv:{d}" for d in set(old.drivers) ^ set(new.drivers)}
    if old.modules != new.modules:
        keys |= {f"mod:{m}" for m in set(old.modules) | set(new.modules)}
        keys |= {f"mdevp:{p}" for p in topo.mdev_parents}
        keys.add("global")
    if (old.boot_id, old.autoprobe, old.fbcon_bound, old.hugepages) != (
        new.boot_id,
        new.autoprobe,
        new.fbcon_bound,
        new.hugepages,
    ):
        keys.add("global")
    return keys


def all_keys(topo: Topology, *states: KState) -> set[str]:
    """Every key of the tree, with the mediated devices of `states` (a reboot renders the old ones away)."""
    keys = {f"dev:{a}" for a in topo.order} | {f"grp:{g}" for g in topo.groups}
    keys |= {f"mdevp:{p}" for p in topo.mdev_parents} | {f"mdev:{u}" for st in states for u in st.mdevs}
    keys |= {f"drv:{d}" for d in topo.drivers} | {f"mod:{m}" for m in topo.modules}
    return keys | {"global"}
