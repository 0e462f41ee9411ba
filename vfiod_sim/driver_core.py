"""The driver core: the rules of drivers/base and drivers/pci (match, probe, bind, unbind, remove,
rescan, module load and unload, minor numbers, uevents) applied to a copy of the state in one
transaction. docs/kernel-rules.md names the Linux function each rule imitates.
"""

from __future__ import annotations

import copy
import errno
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from vfiod_sim import faults, processes
from vfiod_sim.model import CardIdentity
from vfiod_sim.module_params import vfio_pci_ids
from vfiod_sim.parsing import streq_form
from vfiod_sim.state import DevState, KState, Topology
from vfiod_sim.tree import oserror


class Blocked(Exception):
    """The operation must wait (an unbind of a device a process still uses); nothing was changed."""

    def __init__(self, addr: str, holders: list[tuple[int, str]]) -> None:
        super().__init__(addr)
        self.addr = addr
        self.holders = holders


class Core:
    """One transaction: the rules of drivers/base and drivers/pci applied to a copy of the state."""

    def __init__(self, root: Path, topo: Topology, old: KState, paths: tuple[str, ...]) -> None:
        self.root = root
        self.topo = topo
        self.profile = topo.profile
        self.old = old
        self.st = copy.deepcopy(old)
        self.paths = paths  # the logical paths of the write being served, for probe faults
        self.uevents: list[dict[str, Any]] = []
        self.quiet = False
        self.booting = False  # no process exists yet: nothing can hold a node
        self._minor_cache: dict[str, set[int]] = {}

    # -- lookups --------------------------------------------------------------------------------------

    def card(self, addr: str) -> CardIdentity:
        return self.st.cards.get(addr) or self.topo.devices[addr].identity

    def find_device(self, value: bytes) -> str | None:
        """bus_find_device_by_name: the device whose name sysfs_streq-matches the written value."""
        name = streq_form(value).decode("utf-8", "surrogateescape")
        ds = self.st.devices.get(name)
        return name if ds is not None and ds.present else None

    def holders(self, paths: Iterable[str]) -> list[tuple[int, str]]:
        if self.booting:
            return []
        return processes.holders(self.root, paths)

    def vfio_nodes(self, addr: str) -> set[str]:
        out = set()
        group = self.topo.group_of(addr)
        if group is not None:
            out.add(f"/dev/vfio/{group}")
        if self.profile.vfio_cdev and "vfio" in self.st.devices[addr].minors:
            out.add(f"/dev/vfio/devices/vfio{self.st.devices[addr].minors['vfio']}")
        return out

    def group_user_owned(self, group: int) -> bool:
        """A process holds the group node or a member's cdev: taken as a VMM that has claimed the group's
        DMA ownership (VFIO_GROUP_SET_CONTAINER / iommufd bind)."""
        paths = {f"/dev/vfio/{group}"}
        for a in self.topo.groups.get(group, []):
            paths |= self.vfio_nodes(a)
        return bool(self.holders(paths)) or bool(self.device_file_holders(self.topo.groups.get(group, [])))

    def device_nodes(self, addr: str) -> set[str]:
        m = self.st.devices[addr].minors
        out: set[str] = set()
        if "vfio" in m:
            out |= self.vfio_nodes(addr)
        if "drm" in m:
            out |= {f"/dev/dri/card{m['drm']}", f"/dev/dri/renderD{128 + m['drm']}"}
        if "fb" in m:
            out.add(f"/dev/fb{m['fb']}")
        if "nvidia" in m:
            out.add(f"/dev/nvidia{m['nvidia']}")
        if "nvswitch" in m:
            out.add(f"/dev/nvidia-nvswitch{m['nvswitch']}")
        if "sound" in m:
            out.add(f"/dev/snd/controlC{m['sound']}")
        return out

    # -- uevents --------------------------------------------------------------------------------------

    def uevent(self, action: str, addr: str, driver: str | None, subsystem: str = "pci") -> None:
        if self.quiet:
            return
        self.uevents.append(
            {
                "action": action,
                "devpath": "/" + self.topo.devpath[addr].removeprefix("sys/"),
                "subsystem": subsystem,
                "driver": driver,
                "pci_address": addr,
            }
        )

    def vfio_group_uevent(self, action: str, addr: str) -> None:
        """The group node's class device (/devices/virtual/vfio/<n>) comes with the group's first VFIO
        device and goes with its last (drivers/vfio/group.c vfio_create_group / vfio_group_release): the
        `add` udev applies its node rules to."""
        group = self.topo.group_of(addr)
        if self.quiet or group is None:
            return
        members = [a for a in self.topo.groups.get(group, []) if a != addr]
        if any("vfio" in self.st.devices[a].minors for a in members):
            return  # the group already had (or still has) its node
        node = {"action": action, "devpath": f"/devices/virtual/vfio/{group}", "subsystem": "vfio"}
        self.uevents.append({**node, "driver": None})

    def mdev_uevent(self, action: str, uuid: str) -> None:
        if self.quiet:
            return
        m = self.st.mdevs.get(uuid) or self.old.mdevs[uuid]
        path = f"{self.topo.mdev_parent_dir(m.parent)}/{uuid}"
        driver = self.topo.mdev_parents[m.parent].module
        self.uevents.append(
            {
                "action": action,
                "devpath": "/" + path.removeprefix("sys/"),
                "subsystem": "mdev",
                "driver": driver,
            }
        )

    # -- matching and probing -------------------------------------------------------------------------

    def match(self, driver: str, addr: str) -> bool:
        """drivers/pci/pci-driver.c pci_match_device (via pci_bus_match)."""
        ds = self.st.devices[addr]
        if ds.override is not None and ds.override != driver:
            return False
        card = self.card(addr)
        if any(e.matches(card) for e in self.st.dynids.get(driver, [])):
            return True
        table = (*self.topo.drivers[driver].id_table, *self.st.extra_ids.get(driver, []))
        if any(e.matches(card) and (not e.override_only or ds.override is not None) for e in table):
            return True
        # "driver_override will always match, send a dummy id"
        return ds.override is not None

    def probe(self, driver: str, addr: str) -> int:
        """drivers/base/dd.c __driver_probe_device + really_probe. 0: bound. A positive errno: the driver's
        probe refused (callers may try the next driver). A negative errno: a core error (EBUSY)."""
        ds = self.st.devices[addr]
        if not ds.present:
            return -errno.ENODEV
        if ds.driver is not None:
            return -errno.EBUSY
        spec = self.topo.drivers[driver]
        dev = self.topo.devices[addr]
        group = self.topo.group_of(addr)
        # really_probe -> pci_dma_configure -> iommu_device_use_default_domain: a DMA-owning driver cannot
        # bind into a group a user (a VMM) owns.
        if not spec.driver_managed_dma and group is not None and self.group_user_owned(group):
            return -errno.EBUSY
        for fault in faults.load_all(self.root):
            if fault.applies_to_probe(self.paths, driver, addr) and faults.take(self.root, fault.name):
                return errno.ENODEV if fault.kind == "probe_nothing" else fault.error_number("EIO")
        # vfio_pci_core_register_device: hdr_type != PCI_HEADER_TYPE_NORMAL -> -EINVAL;
        # vfio_group_find_or_alloc: no iommu_group and no noiommu -> -EINVAL
        if spec.kind == "vfio" and (dev.header_type != 0 or group is None):
            return errno.EINVAL
        # vfio_pci_core_register_device: "Cannot bind to PF with SR-IOV enabled"
        if spec.kind == "vfio" and ds.numvfs:
            return errno.EBUSY
        # NVIDIA's vendor-VFIO VFs: vfio-pci's probe of one fails with -EINVAL
        if spec.kind == "vfio" and addr in self.topo.vendor_gpu_of:
            return errno.EINVAL
        if spec.kind == "pcieport" and not dev.pcie_port:
            return errno.ENODEV  # pcie_portdrv_probe: not a root/switch port
        self.attach(addr, driver)
        return 0

    def _used(self, kind: str) -> set[int]:
        used = self._minor_cache.get(kind)
        if used is None:
            used = {d.minors[kind] for d in self.st.devices.values() if kind in d.minors}
            if kind == "vfio":  # one ida numbers every VFIO device, mediated ones too
                used |= {m.vfio for m in self.st.mdevs.values() if m.vfio >= 0}
            self._minor_cache[kind] = used
        return used

    def alloc(self, kind: str, start: int = 0) -> int:
        """The lowest free minor of `kind` (ida_alloc / idr_alloc hand out the lowest free id)."""
        used = self._used(kind)
        n = start
        while n in used:
            n += 1
        used.add(n)
        return n

    def alloc_range(self, kind: str, count: int) -> int:
        used: set[int] = set()
        for d in self.st.devices.values():
            if kind in d.minors:
                used |= set(range(d.minors[kind], d.minors[kind] + d.minors.get(f"{kind}_count", 1)))
        base = 0
        while any(base + i in used for i in range(count)):
            base += 1
        return base

    def forget_minor(self, kind: str) -> None:
        """A minor of `kind` held outside `devices` (an mdev's) was freed."""
        self._minor_cache.pop(kind, None)

    def free_minors(self, ds: DevState, kinds: Iterable[str] | None = None) -> None:
        for kind in list(ds.minors) if kinds is None else list(kinds):
            if kind in ds.minors:
                self._minor_cache.pop(kind, None)
                del ds.minors[kind]

    def attach(self, addr: str, driver: str) -> None:
        """driver_bound: the driver's side effects (class devices and nodes) and the bind uevent."""
        ds = self.st.devices[addr]
        spec = self.topo.drivers[driver]
        cls = self.card(addr).class_code
        ds.driver = driver
        m = ds.minors
        if spec.kind == "vfio":
            self.vfio_group_uevent("add", addr)
            m["vfio"] = self.alloc("vfio")
        elif spec.kind == "drm":
            m["drm"] = self.alloc("drm")
            if spec.fbdev:
                m["fb"] = self.alloc("fb")
        elif spec.kind == "gpu-nvidia":
            gpu = self.topo.vendor_gpu_of.get(addr)
            if gpu is not None and gpu.module in self.st.modules and addr not in self.st.vfio_unregistered:
                self.vfio_group_uevent("add", addr)
                m["vfio"] = self.alloc("vfio")  # nvidia.ko registers the VF with vfio-pci-core
            if cls >> 16 == 0x03 and self.topo.devices[addr].physfn is None:  # a VF has no /dev/nvidiaN
                m["nvidia"] = self.alloc("nvidia")
                if "nvidia_drm" in self.st.modules:
                    m["drm"] = self.alloc("drm")
            elif cls >> 8 == 0x0680:
                m["nvswitch"] = self.alloc("nvswitch")
        elif spec.kind == "net":
            m["net"] = self.alloc("net", 2)  # ifindex 1 is lo
        elif spec.kind == "virtio":
            m["virtio"] = self.alloc("virtio")
            if self.topo.devices[addr].mount_tag is None and cls >> 16 == 0x02:
                m["net"] = self.alloc("net", 2)
            elif cls >> 16 == 0x03:  # virtio-gpu: a DRM device and fbdev of the PCI function
                m["drm"], m["fb"] = self.alloc("drm"), self.alloc("fb")
        elif spec.kind == "nvme":
            m["nvme"] = self.alloc("nvme")
            if self.topo.devices[addr].namespaces:
                count = 1 + self.topo.devices[addr].partitions
                m["blk"] = self.alloc_range("blk", count)
                m["blk_count"] = count
        elif spec.kind == "audio":
            m["sound"] = self.alloc("sound")
        # fbcon takes the consoles over when a frame buffer registers, unless an admin unbound it
        takeover = self.profile.console_on_boot_vga and not self.st.console_unbound_by_admin
        if "fb" in m and not self.st.fbcon_bound and takeover:
            self.st.fbcon_bound = True
        self.uevent("bind", addr, driver)

    def release_blockers(self, addr: str) -> list[tuple[int, str]]:
        """Who makes the driver's remove wait: vfio_unregister_group_dev waits for the device's users to
        close it (its group node, cdev or a device file); nvidia's remove waits while /dev/nvidiaN is open;
        snd_card_free waits until every file of the sound card is closed."""
        ds = self.st.devices[addr]
        if ds.driver is None:
            return []
        paths: set[str] = set()
        if "vfio" in ds.minors:
            paths |= self.vfio_nodes(addr)
        if "nvidia" in ds.minors and self.profile.nvidia_remove_waits_for_users:
            paths.add(f"/dev/nvidia{ds.minors['nvidia']}")
        if "sound" in ds.minors:
            paths.add(f"/dev/snd/controlC{ds.minors['sound']}")
        blockers = self.holders(paths)
        if "vfio" in ds.minors:
            blockers += [(pid, processes.VFIO_DEVICE_FILE) for pid, _ in self.device_file_holders([addr])]
        return blockers

    def device_file_holders(self, addrs: Iterable[str]) -> list[tuple[int, str]]:
        """Processes holding a VFIO device file of one of `addrs`: each keeps its group's file open."""
        if self.booting:
            return []
        return processes.vfio_device_holders(self.root, addrs)

    def detach(self, addr: str, *, force: bool = False) -> None:
        """device_release_driver: remove the driver's side effects; blocks while the device is in use."""
        ds = self.st.devices[addr]
        if ds.driver is None:
            return
        if not force:
            blockers = self.release_blockers(addr)
            if blockers:
                raise Blocked(addr, blockers)
        spec = self.topo.drivers[ds.driver]
        if ds.numvfs and spec.sriov_configure and not spec.sriov_kept_on_remove:
            self.sriov_disable(addr)  # the PF driver's remove: pci_disable_sriov
        if ds.driver == "nvidia" and addr in self.topo.vendor_gpu_of:
            # the vGPU goes, and the VF's vfio-pci-core registration is broken until an SR-IOV cycle
            self.st.vgpu_types.pop(addr, None)
            if addr not in self.st.vfio_unregistered:
                self.st.vfio_unregistered.append(addr)
        ds.driver = None
        had_vfio = "vfio" in ds.minors
        self.free_minors(ds)
        if had_vfio:
            self.vfio_group_uevent("remove", addr)
        if self.st.fbcon_bound and not any("fb" in d.minors for d in self.st.devices.values()):
            self.st.fbcon_bound = False  # the last frame buffer went away: back to the dummy console
        self.uevent("unbind", addr, None)

    def device_attach(self, addr: str) -> int:
        """__device_attach: try the registered drivers in order. 1 bound (or already bound), 0 nothing
        matched or every matching probe refused, <0 a core error that stops the walk."""
        if self.st.devices[addr].driver is not None:
            return 1
        for driver in list(self.st.drivers):
            if not self.match(driver, addr):
                continue
            r = self.probe(driver, addr)
            if r == 0:
                return 1
            if r < 0:
                return r
            # a positive (driver) error: "ignore errors returned by ->probe so that the next driver can try"
        return 0

    def driver_attach(self, driver: str) -> None:
        """driver_attach: offer every unbound device to a (new) driver; probe errors are ignored."""
        for addr in self.topo.order:
            ds = self.st.devices[addr]
            if ds.present and ds.driver is None and self.match(driver, addr):
                self.probe(driver, addr)

    # -- devices coming and going -------------------------------------------------------------------

    def reachable(self, addr: str) -> bool:
        """Physically there: neither it nor a bridge above it was unplugged."""
        a: str | None = addr
        while a is not None:
            if a in self.st.unplugged:
                return False
            a = self.topo.parent(a)
        return True

    def add_device(self, addr: str) -> None:
        """pci_device_add + pci_bus_add_device: a fresh pci_dev (no override), then probe."""
        self.st.devices[addr] = DevState(present=True)
        self.uevent("add", addr, None)
        if self.st.autoprobe:
            self.device_attach(addr)

    def remove_device(self, addr: str, *, force: bool = False) -> None:
        """pci_stop_and_remove_bus_device: everything behind a bridge first, then the device itself."""
        for child in reversed(self.topo.descendants(addr)):
            self.remove_one(child, force=force)
        self.remove_one(addr, force=force)

    def remove_one(self, addr: str, *, force: bool) -> None:
        ds = self.st.devices[addr]
        if not ds.present:
            return
        self.detach(addr, force=force)
        self.st.devices[addr] = DevState(present=False)
        if addr in self.st.vfio_unregistered:  # a VF that comes back is a new pci_dev, registered afresh
            self.st.vfio_unregistered.remove(addr)
        self.uevent("remove", addr, None)

    def sriov_enable(self, pf: str, count: int) -> None:
        """drivers/pci/iov.c sriov_enable: the first `count` VFs join the bus (pci_iov_add_virtfn), probed
        only while the PF's sriov_drivers_autoprobe is on."""
        ds = self.st.devices[pf]
        ds.numvfs = count
        for vf in self.topo.vfs[pf][:count]:
            self.st.devices[vf] = DevState(present=True)
            self.uevent("add", vf, None)
            if self.st.autoprobe and ds.vf_autoprobe:
                self.device_attach(vf)

    def sriov_disable(self, pf: str) -> None:
        """sriov_disable: every enabled VF leaves the bus, the last first; each unbind waits for its users."""
        ds = self.st.devices[pf]
        for vf in reversed(self.topo.vfs[pf][: ds.numvfs]):
            self.remove_one(vf, force=False)
        ds.numvfs = 0

    def rescan(self) -> None:
        for addr in self.topo.order:  # bus-add order: bridges before what is behind them
            parent = self.topo.parent(addr)
            if self.st.devices[addr].present or not self.reachable(addr):
                continue
            if self.topo.devices[addr].physfn is not None:
                continue  # a VF comes only with sriov_numvfs
            if parent is None or self.st.devices[parent].present:
                self.add_device(addr)

    # -- modules ------------------------------------------------------------------------------------

    def register_driver(self, driver: str) -> None:
        self.st.drivers.append(driver)
        if driver == "vfio-pci":
            self.st.dynids[driver] = vfio_pci_ids(self.profile)
        if self.st.autoprobe:
            self.driver_attach(driver)

    def load_module(self, name: str) -> None:
        if name in self.st.modules:
            return
        spec = self.topo.modules[name]
        for dep in spec.depends:
            self.load_module(dep)
        self.st.modules.append(name)
        for driver in self.topo.module_drivers[name]:
            self.register_driver(driver)
        if name == "nvidia_drm":
            # nvidia-drm registers a DRM device for every GPU nvidia already drives
            for addr in self.topo.order:
                ds = self.st.devices[addr]
                if "nvidia" in ds.minors and "drm" not in ds.minors:
                    ds.minors["drm"] = self.alloc("drm")

    def module_in_use(self, name: str) -> list[tuple[int, str]]:
        nodes: set[str] = set()
        if name == "vfio":
            nodes.add("/dev/vfio/vfio")
            nodes |= {f"/dev/vfio/{g}" for g in self.topo.groups}
        elif name == "nvidia":
            nodes.add("/dev/nvidiactl")
        elif name == "nvidia_uvm":
            nodes |= {"/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"}
        elif name == "nvidia_modeset":
            nodes.add("/dev/nvidia-modeset")
        drivers = set(self.topo.module_drivers.get(name, []))
        for addr in self.topo.order:
            ds = self.st.devices[addr]
            if ds.driver in drivers:
                nodes |= self.device_nodes(addr)
            elif name == "nvidia_drm" and "nvidia" in ds.minors and "drm" in ds.minors:
                nodes |= {f"/dev/dri/card{ds.minors['drm']}", f"/dev/dri/renderD{128 + ds.minors['drm']}"}
        return self.holders(nodes)

    def unload_module(self, name: str) -> None:
        """delete_module: refused while another module uses it or a process holds one of its nodes; a
        PCI driver's devices are unbound (pci_unregister_driver), bound or not."""
        if name not in self.st.modules:
            raise oserror(errno.ENOENT, f"rmmod: ERROR: Module {name} is not currently loaded")
        users = [u for u in self.st.modules if name in self.topo.modules[u].depends]
        if users:
            raise oserror(errno.EBUSY, f"rmmod: ERROR: Module {name} is in use by: {' '.join(users)}")
        if self.module_in_use(name):
            raise oserror(errno.EBUSY, f"rmmod: ERROR: Module {name} is in use")
        for driver in self.topo.module_drivers[name]:
            if driver not in self.st.drivers:
                continue
            for addr in self.topo.order:
                if self.st.devices[addr].driver == driver:
                    self.detach(addr)
            self.st.drivers.remove(driver)
            self.st.dynids.pop(driver, None)
        if name == "nvidia_drm":
            for ds in self.st.devices.values():
                if "nvidia" in ds.minors:
                    self.free_minors(ds, ["drm"])
        self.st.modules.remove(name)


Op = Callable[[Core], None]  # one operation of a transaction
