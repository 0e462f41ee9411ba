"""Rendering: (profile, state) -> tree. The sysfs, /dev and /proc entries of each key (a device with its
driver's side effects, an IOMMU group, a driver, a module, the global files), as a Debian 6.1 host shows
them.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable

from vfiod_sim import mdev, vendor_vgpu
from vfiod_sim.model import FBCON, CardIdentity
from vfiod_sim.state import DevState, KState, Topology
from vfiod_sim.tree import DIR, Tree, file_entry, put_link

# Device numbers shown in `dev` attributes (the dynamic ones are what a Debian 6.1 host usually gets).
DRM_MAJOR = 226
FB_MAJOR = 29
BLKEXT_MAJOR = 259
NVME_CHAR_MAJOR = 241
VFIO_CDEV_MAJOR = 508
SOUND_MAJOR = 116
NVIDIA_MAJOR = 195
HUGEPAGE_SIZES = ("2048kB", "1048576kB")


def _routing_id(addr: str) -> int:
    """bus << 8 | device << 3 | function: what sriov_offset and sriov_stride count in."""
    return int(addr[-7:-5], 16) << 8 | int(addr[-4:-2], 16) << 3 | int(addr[-1])


def stable_hex(text: str, n: int) -> str:
    """Deterministic pseudo-random hex (MACs, UUIDs) so a profile always builds the same tree."""
    out = ""
    i = 0
    while len(out) < n:
        out += f"{zlib.crc32(f'{text}/{i}'.encode()):08x}"
        i += 1
    return out[:n]


class Renderer:
    def __init__(self, topo: Topology, st: KState) -> None:
        self.topo = topo
        self.profile = topo.profile
        self.st = st

    def card(self, addr: str) -> CardIdentity:
        return self.st.cards.get(addr) or self.topo.devices[addr].identity

    def ifname(self, addr: str) -> str:
        spec = self.topo.devices[addr]
        if spec.ifname:
            return spec.ifname
        # systemd's predictable name for a function without one in the profile
        bus, slot, fn = int(addr[-7:-5], 16), int(addr[-4:-2], 16), int(addr[-1])
        return f"enp{bus}s{slot}" + (f"f{fn}" if self.topo.multifunction[addr] else "")

    def render(self, keys: Iterable[str]) -> Tree:
        tree: Tree = {}
        for key in keys:
            kind, _, name = key.partition(":")
            if kind == "dev":
                self.device(tree, name)
            elif kind == "grp":
                self.group(tree, int(name))
            elif kind == "drv":
                self.driver(tree, name)
            elif kind == "mod":
                self.module(tree, name)
            elif kind == "global":
                self.global_(tree)
            elif kind == "mdevp":
                self.mdev_parent(tree, name)
            elif kind == "mdev":
                self.mdev(tree, name)
        return tree

    # -- mediated devices ----------------------------------------------------------------------------

    def mdev_parent(self, t: Tree, name: str) -> None:
        """A registered parent: /sys/class/mdev_bus/<name>, its types and their attributes, and the mdev
        driver its module registered, with the links to its children."""
        topo, st = self.topo, self.st
        if not mdev.registered(topo, st, name):
            return
        spec = topo.mdev_parents[name]
        p = topo.mdev_parent_dir(name)
        if spec.virtual_class is not None:
            t[f"sys/devices/virtual/{spec.virtual_class}"] = DIR
            t[p] = DIR
        put_link(t, f"sys/class/mdev_bus/{name}", p)
        children = {u: m for u, m in st.mdevs.items() if m.parent == name}
        t[f"{p}/mdev_supported_types"] = DIR
        for ty in spec.types:
            d = f"{p}/mdev_supported_types/{ty.id}"
            t[d] = DIR
            if ty.name is not None:
                t[f"{d}/name"] = file_entry(ty.name + "\n")
            if ty.description is not None:
                t[f"{d}/description"] = file_entry(ty.description + "\n")
            t[f"{d}/device_api"] = file_entry(ty.device_api + "\n")
            t[f"{d}/available_instances"] = file_entry(f"{mdev.available(topo, st, name, ty.id)}\n")
            t[f"{d}/create"] = file_entry(b"", 0o200)
            t[f"{d}/devices"] = DIR
            for uuid, m in children.items():
                if m.type == ty.id:
                    put_link(t, f"{d}/devices/{uuid}", f"{p}/{uuid}")
        drv = f"sys/bus/mdev/drivers/{spec.module}"
        t[drv] = DIR
        for uuid in children:
            put_link(t, f"{drv}/{uuid}", f"{p}/{uuid}")

    def mdev(self, t: Tree, uuid: str) -> None:
        """One mediated device: its directory under the parent, its type and group links, its driver, its
        group (only itself) and the group node."""
        m = self.st.mdevs.get(uuid)
        if m is None:
            return
        p = f"{self.topo.mdev_parent_dir(m.parent)}/{uuid}"
        module = self.topo.mdev_parents[m.parent].module
        t[p] = DIR
        put_link(t, f"{p}/mdev_type", f"{self.topo.mdev_parent_dir(m.parent)}/mdev_supported_types/{m.type}")
        put_link(t, f"{p}/driver", f"sys/bus/mdev/drivers/{module}")
        t[f"{p}/remove"] = file_entry(b"", 0o200)
        t[f"{p}/uevent"] = file_entry(f"DRIVER={module}\n", 0o644)
        put_link(t, f"sys/bus/mdev/devices/{uuid}", p)
        base = f"sys/kernel/iommu_groups/{m.group}"
        t[base] = DIR
        t[f"{base}/devices"] = DIR
        t[f"{base}/type"] = file_entry("unknown\n", 0o644)  # an emulated IOMMU's group: no default domain
        t[f"{base}/reserved_regions"] = file_entry(b"")
        put_link(t, f"{base}/devices/{uuid}", p)
        put_link(t, f"{p}/iommu_group", base)
        t[f"dev/vfio/{m.group}"] = file_entry(b"", 0o600)
        if m.vfio >= 0:
            self.vfio_device(t, p, m.vfio)

    # -- a PCI function ------------------------------------------------------------------------------

    def config(self, addr: str, card: CardIdentity, ds: DevState) -> bytes:
        spec = self.topo.devices[addr]
        cfg = bytearray(256)
        struct.pack_into("<HH", cfg, 0x00, card.vendor, card.device)
        enabled = ds.driver is not None and self.topo.drivers[ds.driver].kind != "vfio"
        struct.pack_into("<HH", cfg, 0x04, 0x0406 if enabled else 0x0000, 0x0010)  # command, status
        struct.pack_into("<I", cfg, 0x08, (card.class_code << 8) | (card.revision & 0xFF))
        cfg[0x0E] = (spec.header_type & 0x7F) | (0x80 if self.topo.multifunction[addr] else 0)
        cfg[0x34] = 0x40  # capabilities pointer
        if spec.header_type == 1:
            secondary, subordinate = self.topo.bus_range(addr)
            cfg[0x18], cfg[0x19], cfg[0x1A] = int(addr[-7:-5], 16), secondary, subordinate
        else:
            struct.pack_into("<HH", cfg, 0x2C, card.subsystem_vendor, card.subsystem_device)
        cfg[0x3C] = spec.irq & 0xFF
        cfg[0x3D] = 1  # INTA#
        return bytes(cfg)

    def device(self, t: Tree, addr: str) -> None:
        ds = self.st.devices[addr]
        if not ds.present:
            return
        topo = self.topo
        spec = topo.devices[addr]
        card = self.card(addr)
        p = topo.devpath[addr]
        t[p] = DIR
        cls = card.class_code

        def f(name: str, text: str | bytes, mode: int = 0o444) -> None:
            t[f"{p}/{name}"] = file_entry(text, mode)

        modalias = (
            f"pci:v{card.vendor:08X}d{card.device:08X}sv{card.subsystem_vendor:08X}"
            f"sd{card.subsystem_device:08X}bc{cls >> 16:02X}sc{(cls >> 8) & 0xFF:02X}i{cls & 0xFF:02X}"
        )
        f("vendor", f"0x{card.vendor:04x}\n")
        f("device", f"0x{card.device:04x}\n")
        f("subsystem_vendor", f"0x{card.subsystem_vendor:04x}\n")
        f("subsystem_device", f"0x{card.subsystem_device:04x}\n")
        f("class", f"0x{cls:06x}\n")
        f("revision", f"0x{card.revision:02x}\n")
        f("driver_override", ("(null)" if ds.override is None else ds.override) + "\n", 0o644)
        f("numa_node", f"{spec.numa_node}\n", 0o644)
        if cls >> 8 == 0x0300:
            f("boot_vga", "1\n" if spec.boot_vga else "0\n")
        if spec.reset_method:  # both hidden when the function has no reset (pci-sysfs.c, pci.c)
            f("reset_method", spec.reset_method + "\n", 0o644)
            f("reset", b"", 0o200)
        f("modalias", modalias + "\n")
        driver_kind = topo.drivers[ds.driver].kind if ds.driver else None
        f("enable", "1\n" if ds.driver and driver_kind != "vfio" else "0\n", 0o644)
        f("irq", f"{spec.irq}\n")
        f("local_cpulist", self.cpulist(spec.numa_node) + "\n")
        uevent = [f"DRIVER={ds.driver}"] if ds.driver else []
        uevent += [
            f"PCI_CLASS={cls:X}",
            f"PCI_ID={card.vendor:04X}:{card.device:04X}",
            f"PCI_SUBSYS_ID={card.subsystem_vendor:04X}:{card.subsystem_device:04X}",
            f"PCI_SLOT_NAME={addr}",
            f"MODALIAS={modalias}",
        ]
        f("uevent", "\n".join(uevent) + "\n", 0o644)
        f("config", self.config(addr, card, ds), 0o644)
        f("remove", b"", 0o200)
        put_link(t, f"sys/bus/pci/devices/{addr}", p)
        group = topo.group_of(addr)
        if group is not None:
            put_link(t, f"{p}/iommu_group", f"sys/kernel/iommu_groups/{group}")
            put_link(t, f"sys/kernel/iommu_groups/{group}/devices/{addr}", p)
        if ds.driver:
            put_link(t, f"{p}/driver", f"sys/bus/pci/drivers/{ds.driver}")
            put_link(t, f"sys/bus/pci/drivers/{ds.driver}/{addr}", p)
        self.sriov(t, addr, ds, p)
        self.side_effects(t, addr, ds, p)
        if vendor_vgpu.registered(topo, self.st, addr):
            self.vendor_vgpu(t, addr, p)

    def vendor_vgpu(self, t: Tree, vf: str, p: str) -> None:
        """A vendor-VFIO VF's `nvidia/` directory (NVIDIA's R570/R580 listing; `gpu_instance_id` and
        `placement_id`, which read ENXIO until a vGPU exists, are not simulated)."""
        d = f"{p}/nvidia"
        t[d] = DIR
        t[f"{d}/creatable_vgpu_types"] = file_entry(vendor_vgpu.listing(self.topo, self.st, vf), 0o444)
        t[f"{d}/current_vgpu_type"] = file_entry(f"{self.st.vgpu_types.get(vf, 0)}\n", 0o644)
        t[f"{d}/vgpu_params"] = file_entry("\n", 0o644)
        t[f"{d}/warm_update"] = file_entry("0\n", 0o644)

    def sriov(self, t: Tree, addr: str, ds: DevState, p: str) -> None:
        """drivers/pci/iov.c: a PF's sriov_* attributes and virtfnN links, a VF's physfn link."""
        spec = self.topo.devices[addr]
        if spec.physfn is not None:
            put_link(t, f"{p}/physfn", self.topo.devpath[spec.physfn])
        if not spec.sriov_totalvfs:
            return
        vfs = self.topo.vfs[addr]
        t[f"{p}/sriov_totalvfs"] = file_entry(f"{spec.sriov_totalvfs}\n", 0o444)
        t[f"{p}/sriov_numvfs"] = file_entry(f"{ds.numvfs}\n", 0o644)
        t[f"{p}/sriov_drivers_autoprobe"] = file_entry("1\n" if ds.vf_autoprobe else "0\n", 0o644)
        if vfs:
            rids = [_routing_id(a) for a in (addr, *vfs[:2])]
            stride = rids[2] - rids[1] if len(rids) > 2 else 1
            t[f"{p}/sriov_offset"] = file_entry(f"{rids[1] - rids[0]}\n", 0o444)
            t[f"{p}/sriov_stride"] = file_entry(f"{stride}\n", 0o444)
            t[f"{p}/sriov_vf_device"] = file_entry(f"{self.topo.devices[vfs[0]].device:x}\n", 0o444)
        for i, vf in enumerate(vfs[: ds.numvfs]):
            put_link(t, f"{p}/virtfn{i}", self.topo.devpath[vf])

    def cpulist(self, node: int) -> str:
        n = self.profile.cpus_per_node
        if node < 0:
            return f"0-{self.profile.numa_nodes * n - 1}"
        return f"{node * n}-{(node + 1) * n - 1}"

    def vfio_device(self, t: Tree, p: str, n: int) -> None:
        """A VFIO device's struct device under its device `p` (6.1+): `vfio-dev/vfioN`, in the vfio-dev
        class, with its cdev and node on kernels with CONFIG_VFIO_DEVICE_CDEV."""
        d = f"{p}/vfio-dev/vfio{n}"
        t[f"{p}/vfio-dev"] = DIR
        t[d] = DIR
        put_link(t, f"{d}/device", p)
        put_link(t, f"sys/class/vfio-dev/vfio{n}", d)
        if self.profile.vfio_cdev:
            t[f"{d}/dev"] = file_entry(f"{VFIO_CDEV_MAJOR}:{n}\n")
            t[f"{d}/uevent"] = file_entry(
                f"MAJOR={VFIO_CDEV_MAJOR}\nMINOR={n}\nDEVNAME=vfio/devices/vfio{n}\n", 0o644
            )
            t[f"dev/vfio/devices/vfio{n}"] = file_entry(b"", 0o600)
        else:
            t[f"{d}/uevent"] = file_entry(b"", 0o644)

    def side_effects(self, t: Tree, addr: str, ds: DevState, p: str) -> None:
        """What a bound driver creates for the device: class devices under it and nodes in /dev."""
        m = ds.minors
        prof = self.profile

        def chardev(path: str, major: int, minor: int) -> None:
            t[f"{path}/dev"] = file_entry(f"{major}:{minor}\n")
            put_link(t, f"{path}/device", p)

        if "vfio" in m and prof.vfio_dev_class:
            self.vfio_device(t, p, m["vfio"])
        # virtio-gpu's DRM device and fbdev are the PCI function's too, not its virtio child's (measured)
        if "drm" in m:
            n = m["drm"]
            t[f"{p}/drm"] = DIR
            for name, minor, mode in ((f"card{n}", n, 0o660), (f"renderD{128 + n}", 128 + n, 0o666)):
                t[f"{p}/drm/{name}"] = DIR
                chardev(f"{p}/drm/{name}", DRM_MAJOR, minor)
                put_link(t, f"sys/class/drm/{name}", f"{p}/drm/{name}")
                t[f"dev/dri/{name}"] = file_entry(b"", mode)
            put_link(t, f"dev/dri/by-path/pci-{addr}-card", f"dev/dri/card{n}")
            put_link(t, f"dev/dri/by-path/pci-{addr}-render", f"dev/dri/renderD{128 + n}")
        if "fb" in m:
            n = m["fb"]
            t[f"{p}/graphics"] = DIR
            t[f"{p}/graphics/fb{n}"] = DIR
            chardev(f"{p}/graphics/fb{n}", FB_MAJOR, n)
            put_link(t, f"sys/class/graphics/fb{n}", f"{p}/graphics/fb{n}")
            t[f"dev/fb{n}"] = file_entry(b"", 0o660)
        if "nvidia" in m:
            n = m["nvidia"]
            t[f"dev/nvidia{n}"] = file_entry(b"", 0o666)
            gpu = f"proc/driver/nvidia/gpus/{addr}"
            t[gpu] = DIR
            spec = self.topo.devices[addr]
            model = spec.label or "NVIDIA GPU"
            if addr in self.st.cards:
                model = f"NVIDIA Device {self.card(addr).device:04x}"
            uid = stable_hex(f"{addr}/{self.card(addr)}", 32)
            t[f"{gpu}/information"] = file_entry(
                f"Model: \t\t {model}\nIRQ:   \t\t {spec.irq}\n"
                f"GPU UUID: \t GPU-{uid[:8]}-{uid[8:12]}-{uid[12:16]}-{uid[16:20]}-{uid[20:]}\n"
                "Video BIOS: \t 95.04.5a.00.02\nBus Type: \t PCIe\nDMA Size: \t 47 bits\n"
                f"DMA Mask: \t 0x7fffffffffff\nBus Location: \t {addr}\nDevice Minor: \t {n}\n"
                "GPU Excluded:\t No\n"
            )
        if "nvswitch" in m:
            t[f"dev/nvidia-nvswitch{m['nvswitch']}"] = file_entry(b"", 0o666)
        if "virtio" in m:
            n = m["virtio"]
            v = f"{p}/virtio{n}"
            t[v] = DIR
            spec = self.topo.devices[addr]
            # include/uapi/linux/virtio_ids.h: 1 net, 9 9p, 16 gpu
            virtio_id = (
                9 if spec.mount_tag is not None else 16 if self.card(addr).class_code >> 16 == 3 else 1
            )
            t[f"{v}/vendor"] = file_entry("0x1af4\n")
            t[f"{v}/device"] = file_entry(f"0x{virtio_id:04x}\n")
            if spec.mount_tag is not None:
                # net/9p/trans_virtio.c p9_mount_tag_show copies the tag with its NUL, no newline
                t[f"{v}/mount_tag"] = file_entry(spec.mount_tag.encode() + b"\0")
            put_link(t, f"sys/bus/virtio/devices/virtio{n}", v)
        if "net" in m:
            name = self.ifname(addr)
            parent = f"{p}/virtio{m['virtio']}" if "virtio" in m else p
            nd = f"{parent}/net/{name}"
            t[f"{parent}/net"] = DIR
            t[nd] = DIR
            mac = stable_hex(addr, 10)
            t[f"{nd}/address"] = file_entry("02:" + ":".join(mac[i : i + 2] for i in range(0, 10, 2)) + "\n")
            t[f"{nd}/ifindex"] = file_entry(f"{m['net']}\n")
            t[f"{nd}/operstate"] = file_entry("up\n")
            put_link(t, f"{nd}/device", parent)
            put_link(t, f"sys/class/net/{name}", nd)
        if "nvme" in m:
            k = m["nvme"]
            ctrl = f"{p}/nvme/nvme{k}"
            t[f"{p}/nvme"] = DIR
            t[ctrl] = DIR
            chardev(ctrl, NVME_CHAR_MAJOR, k)
            put_link(t, f"sys/class/nvme/nvme{k}", ctrl)
            t[f"dev/nvme{k}"] = file_entry(b"", 0o600)
        if "nvme" in m and "blk" in m:
            k, base = m["nvme"], m["blk"]
            ctrl = f"{p}/nvme/nvme{k}"
            disk = f"nvme{k}n1"
            blocks = [(disk, f"{ctrl}/{disk}", base)]
            parts = self.topo.devices[addr].partitions
            blocks += [(f"{disk}p{j}", f"{ctrl}/{disk}/{disk}p{j}", base + j) for j in range(1, parts + 1)]
            for name, path, minor in blocks:
                t[path] = DIR
                t[f"{path}/dev"] = file_entry(f"{BLKEXT_MAJOR}:{minor}\n")
                if name != disk:
                    t[f"{path}/partition"] = file_entry(f"{minor - base}\n")
                put_link(t, f"sys/class/block/{name}", path)
                put_link(t, f"sys/dev/block/{BLKEXT_MAJOR}:{minor}", path)
                t[f"dev/{name}"] = file_entry(b"", 0o660)
            put_link(t, f"{ctrl}/{disk}/device", ctrl)
        if "sound" in m:
            n = m["sound"]
            card_dir = f"{p}/sound/card{n}"
            t[f"{p}/sound"] = DIR
            t[card_dir] = DIR
            t[f"{card_dir}/number"] = file_entry(f"{n}\n")
            put_link(t, f"{card_dir}/device", p)
            put_link(t, f"sys/class/sound/card{n}", card_dir)
            # the card's control device (sound/core/control.c snd_ctl_dev_register): a class device under
            # the card and its node; an HDA controller without codecs has no pcm or hwdep devices
            control = f"{card_dir}/controlC{n}"
            t[control] = DIR
            t[f"{control}/dev"] = file_entry(f"116:{n * 32}\n")
            put_link(t, f"sys/class/sound/controlC{n}", control)
            t[f"dev/snd/controlC{n}"] = file_entry(b"", 0o660)

    # -- groups, drivers, modules, global ------------------------------------------------------------

    def group(self, t: Tree, group: int) -> None:
        members = [a for a in self.topo.groups.get(group, []) if self.st.devices[a].present]
        if not members:
            return  # iommu_group_release: the group goes with its last device
        base = f"sys/kernel/iommu_groups/{group}"
        t[base] = DIR
        t[f"{base}/devices"] = DIR
        t[f"{base}/type"] = file_entry(self.profile.iommu_domain_type + "\n", 0o644)
        t[f"{base}/reserved_regions"] = file_entry("0x00000000fee00000 0x00000000feefffff msi\n")
        if any("vfio" in self.st.devices[a].minors for a in members):
            t[f"dev/vfio/{group}"] = file_entry(b"", 0o600)

    def driver(self, t: Tree, name: str) -> None:
        if name not in self.st.drivers:
            return
        spec = self.topo.drivers[name]
        base = f"sys/bus/pci/drivers/{name}"
        t[base] = DIR
        for attr in ("bind", "unbind", "new_id", "remove_id", "uevent"):
            t[f"{base}/{attr}"] = file_entry(b"", 0o200)
        if spec.module is not None:
            put_link(t, f"{base}/module", f"sys/module/{spec.module}")
        elif spec.builtin_module is not None:
            t[f"sys/module/{spec.builtin_module}"] = DIR
            put_link(t, f"{base}/module", f"sys/module/{spec.builtin_module}")

    def module(self, t: Tree, name: str) -> None:
        if name not in self.st.modules:
            return
        base = f"sys/module/{name}"
        t[base] = DIR
        t[f"{base}/initstate"] = file_entry("live\n")
        users = [u for u in self.st.modules if name in self.topo.modules[u].depends]
        t[f"{base}/refcnt"] = file_entry(f"{len(users)}\n")
        t[f"{base}/holders"] = DIR
        for u in users:
            put_link(t, f"{base}/holders/{u}", f"sys/module/{u}")
        drivers = [d for d in self.topo.module_drivers[name] if d in self.st.drivers]
        if drivers:
            t[f"{base}/drivers"] = DIR
            for d in drivers:
                put_link(t, f"{base}/drivers/pci:{d}", f"sys/bus/pci/drivers/{d}")
        if name == "vfio_pci":
            # vfio_pci.c module_params with permissions; `ids` is mode 0 (__initdata): not in sysfs
            t[f"{base}/parameters"] = DIR
            for param in ("disable_denylist", "disable_idle_d3", "disable_vga", "enable_sriov", "nointxmask"):
                t[f"{base}/parameters/{param}"] = file_entry("N\n", 0o644)
        elif name == "mdev":
            for d in ("sys/bus/mdev", "sys/bus/mdev/devices", "sys/bus/mdev/drivers", "sys/class/mdev_bus"):
                t[d] = DIR
        elif name == "vfio":
            t["dev/vfio"] = DIR
            t["dev/vfio/vfio"] = file_entry(b"", 0o666)
            if self.profile.vfio_dev_class:
                t["sys/class/vfio-dev"] = DIR
            if self.profile.vfio_cdev:
                t["dev/vfio/devices"] = DIR
        elif name == "nvidia":
            t["dev/nvidiactl"] = file_entry(b"", 0o666)
            t["proc/driver/nvidia"] = DIR
            t["proc/driver/nvidia/gpus"] = DIR
            t["proc/driver/nvidia/version"] = file_entry(
                "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.183.01  Sun May 12 19:39:15 UTC 2024\n"
            )
        elif name == "nvidia_uvm":
            t["dev/nvidia-uvm"] = file_entry(b"", 0o666)
            t["dev/nvidia-uvm-tools"] = file_entry(b"", 0o666)
        elif name == "nvidia_modeset":
            t["dev/nvidia-modeset"] = file_entry(b"", 0o666)

    def global_(self, t: Tree) -> None:
        lines = []
        for m in self.st.modules:
            users = [u for u in self.st.modules if m in self.topo.modules[u].depends]
            deps = "".join(f"{u}," for u in users) or "-"
            mod_size = 16384 + (zlib.crc32(m.encode()) % 512) * 4096
            lines.append(f"{m} {mod_size} {len(users)} {deps} Live 0x0000000000000000\n")
        # /proc/modules lists the most recently loaded module first
        t["proc/modules"] = file_entry("".join(reversed(lines)))
        t["proc/sys/kernel/random/boot_id"] = file_entry(self.st.boot_id + "\n")
        t["proc/sys/kernel/osrelease"] = file_entry(self.profile.kernel_release + "\n")
        t["sys/bus/pci/drivers_autoprobe"] = file_entry("1\n" if self.st.autoprobe else "0\n", 0o644)
        for index in range(len(self.profile.vtconsoles)):
            # fbcon holds the consoles, or the dummy driver does (two drivers: one of them is bound)
            bound = (self.profile.vtconsole(index)[0] == FBCON) == self.st.fbcon_bound
            t[f"sys/devices/virtual/vtconsole/vtcon{index}/bind"] = file_entry(
                "1\n" if bound else "0\n", 0o644
            )
        for size in HUGEPAGE_SIZES:
            pages = self.st.hugepages.get(size, 0)
            base = f"sys/kernel/mm/hugepages/hugepages-{size}"
            t[f"{base}/nr_hugepages"] = file_entry(f"{pages}\n", 0o644)
            t[f"{base}/free_hugepages"] = file_entry(f"{pages}\n")
