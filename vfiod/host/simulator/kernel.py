"""`SimulatedKernel`: a `KernelBackend` that keeps a Linux 6.1 /sys, /dev and /proc tree under a directory and
reacts to writes the way the kernel does (driver_override, bind, unbind, drivers_probe, remove, rescan,
new_id, vtconsole bind), plus the VFIO group status ioctl and group-node ownership.

This module owns the kernel's state and the rules that change it. Every piece of state is on disk under
`<root>/sim/` (state.json, with the profile in profile.json), so any process that opens the same root sees
the same kernel: a daemon can run in a child process, be killed, and restart against it. Mutations take
an flock on `sim/lock`; a write to a device's attributes, or a bind/unbind/drivers_probe naming it, first
takes that device's flock `sim/locks/<addr>` for its whole duration, as the kernel's device_lock is held
across probe and remove: a hung unbind blocks later writes to the same device and nothing else.

The tree is a pure function of (profile, state). It is partitioned into keys (one device, one IOMMU group,
one driver, one module, "global"); a mutation computes which keys changed, renders them before and after,
and applies the difference. The pending keys and the previous state are written to state.json first, so a
process killed mid-way leaves a tree that the next locker repairs. Symlinks are relative, so the tree can
be moved. docs/kernel-rules.md lists the rules imitated and where they live in Linux.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import json
import os
import posixpath
import re
import shutil
import struct
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vfiod.host.backend import VFIO_GROUP_FLAGS_VIABLE, NodeOwner
from vfiod.host.simulator import faults, processes
from vfiod.host.simulator.profiles import (
    FBCON,
    PCI_ANY_ID,
    CardIdentity,
    DeviceSpec,
    DriverSpec,
    MatchEntry,
    ModuleSpec,
    Profile,
)

POLL_INTERVAL = 0.02
PAGE_SIZE = 4096

# Device numbers shown in `dev` attributes (the dynamic ones are what a Debian 6.1 host usually gets).
DRM_MAJOR = 226
FB_MAJOR = 29
BLKEXT_MAJOR = 259
NVME_CHAR_MAJOR = 241
VFIO_CDEV_MAJOR = 508
SOUND_MAJOR = 116
NVIDIA_MAJOR = 195

_ADDR_RE = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")
_DRIVER_ATTR_RE = re.compile(r"sys/bus/pci/drivers/([^/]+)/(bind|unbind|new_id|remove_id|uevent)")
_VTCON_RE = re.compile(r"sys/devices/virtual/vtconsole/vtcon(\d+)/bind")
_HUGEPAGES_RE = re.compile(r"sys/kernel/mm/hugepages/hugepages-(\d+kB)/nr_hugepages")
_HEX_RE = re.compile(r"([+-]?)(?:0[xX])?([0-9a-fA-F]+)")
_SYNTH_ACTIONS = ("add", "remove", "change", "move", "online", "offline", "bind", "unbind")
HUGEPAGE_SIZES = ("2048kB", "1048576kB")
TMP_SUFFIX = ".sim-tmp"


def _oserror(code: int, detail: str = "") -> OSError:
    # OSError(ENOENT, ...) is a FileNotFoundError, OSError(EISDIR, ...) an IsADirectoryError, and so on.
    return OSError(code, os.strerror(code) + (f": {detail}" if detail else ""))


# ----- the tree: entries and how a difference is applied -----------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One path of the tree: a directory, a regular file (data = content) or a symlink (data = target)."""

    kind: str  # "d", "f" or "l"
    data: bytes = b""
    mode: int = 0o755


Tree = dict[str, Entry]  # path relative to the root ("sys/bus/pci/drivers_probe") -> entry

DIR = Entry("d")


def file_entry(content: str | bytes, mode: int = 0o444) -> Entry:
    return Entry("f", content.encode() if isinstance(content, str) else content, mode)


def _relpath(target: str, start: str) -> str:
    # posixpath.relpath for two normalised root-relative paths, without its abspath calls (hot at build)
    t = target.split("/")
    s = start.split("/") if start else []
    i = 0
    while i < len(t) and i < len(s) and t[i] == s[i]:
        i += 1
    return "/".join([".."] * (len(s) - i) + t[i:]) or "."


def put_link(tree: Tree, at: str, target: str) -> None:
    """A relative symlink at `at` to `target` (both relative to the root), so the tree can move."""
    tree[at] = Entry("l", _relpath(target, posixpath.dirname(at)).encode(), 0o777)


def _depth(path: str) -> int:
    return path.count("/")


def _remove_path(path: str, kind: str) -> None:
    try:
        if kind == "d":
            try:
                os.rmdir(path)
            except OSError as e:
                if e.errno != errno.ENOTEMPTY:
                    raise
                # A write-then-rename interrupted by a killed process can leave its temporary file here.
                # Anything else belongs to another key: keep the directory rather than lose it.
                for name in os.listdir(path):
                    if name.endswith(TMP_SUFFIX):
                        os.unlink(os.path.join(path, name))
                with contextlib.suppress(OSError):
                    os.rmdir(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


def _write_new(path: str, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)  # the umask must not decide an attribute's mode
    finally:
        os.close(fd)


def _replace_file(path: str, data: bytes, mode: int) -> None:
    # Write-then-rename: a reader (Host in another thread or process) sees the old or the new value.
    head, tail = os.path.split(path)
    tmp = os.path.join(head, f".{tail}{TMP_SUFFIX}")
    _write_new(tmp, data, mode)
    os.replace(tmp, path)


def _matches_disk(path: str, entry: Entry) -> bool:
    try:
        if entry.kind == "d":
            return os.path.isdir(path) and not os.path.islink(path)
        if entry.kind == "l":
            return os.readlink(path) == entry.data.decode()
        if os.path.islink(path) or not os.path.isfile(path):
            return False
        with open(path, "rb") as f:
            return f.read() == entry.data
    except OSError:
        return False


def apply_tree(root: Path, old: Tree, new: Tree, *, verify: bool = False) -> list[str]:
    """Turn the on-disk tree from `old` into `new`: removals deepest first, then creations shallowest
    first. With `verify`, every entry of `new` is checked on disk (repair after an interrupted update).
    Returns the removed paths."""
    base = str(root)
    doomed = [
        p
        for p, e in old.items()
        if (n := new.get(p)) is None or n.kind != e.kind or (n.kind == "l" and n != e)
    ]
    doomed_set = set(doomed)
    for p in sorted(doomed, key=_depth, reverse=True):
        _remove_path(f"{base}/{p}", old[p].kind)
    for p in sorted(new, key=_depth):
        e = new[p]
        o = old.get(p)
        existed = o is not None and p not in doomed_set
        if existed and o == e and not verify:
            continue
        path = f"{base}/{p}"
        if verify:
            if _matches_disk(path, e):
                continue
            if os.path.lexists(path):
                _remove_path(path, "d" if os.path.isdir(path) and not os.path.islink(path) else "f")
                existed = False
        if e.kind == "d":
            with contextlib.suppress(FileExistsError):
                os.mkdir(path)
        elif e.kind == "l":
            with contextlib.suppress(FileNotFoundError):
                if existed or verify:
                    os.unlink(path)
            os.symlink(e.data.decode(), path)
        elif existed:
            _replace_file(path, e.data, e.mode)
        else:
            _write_new(path, e.data, e.mode)
    return doomed


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    """An exclusive flock for the duration of the block. Each call opens the file anew, so two threads of
    one process exclude each other as two processes do."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# ----- the profile as a topology ------------------------------------------------------------------------


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
                self.devpath[d.address] = f"sys/devices/pci{d.address[:4]}:{d.address[5:7]}/{d.address}"
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
        slots: dict[str, int] = {}
        for a in self.order:
            slots[a[:10]] = slots.get(a[:10], 0) + 1
        self.multifunction = {a: slots[a[:10]] > 1 for a in self.order}
        self.index = {a: i for i, a in enumerate(self.order)}

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
        below = [int(a[5:7], 16) for a in self.descendants(addr)]
        own = int(addr[5:7], 16)
        if not below:
            return own + 1, own + 1
        return min(below), max(below)


# ----- state --------------------------------------------------------------------------------------------


@dataclass
class DevState:
    """One function: on the bus or not, its driver, its override, and the minors its driver allocated."""

    present: bool = False
    driver: str | None = None
    override: str | None = None
    minors: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "present": self.present,
            "driver": self.driver,
            "override": self.override,
            "minors": self.minors,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DevState:
        return cls(
            present=bool(d["present"]),
            driver=d.get("driver"),
            override=d.get("override"),
            minors={str(k): int(v) for k, v in d.get("minors", {}).items()},
        )


@dataclass
class KState:
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
    seq: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "boot_id": self.boot_id,
            "generation": self.generation,
            "devices": {a: d.to_dict() for a, d in self.devices.items()},
            "modules": self.modules,
            "drivers": self.drivers,
            "dynids": {k: [e.to_dict() for e in v] for k, v in self.dynids.items()},
            "extra_ids": {k: [e.to_dict() for e in v] for k, v in self.extra_ids.items()},
            "cards": {a: c.to_dict() for a, c in self.cards.items()},
            "unplugged": self.unplugged,
            "autoprobe": self.autoprobe,
            "fbcon_bound": self.fbcon_bound,
            "console_unbound_by_admin": self.console_unbound_by_admin,
            "hugepages": self.hugepages,
            "seq": self.seq,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KState:
        return cls(
            boot_id=str(d["boot_id"]),
            generation=int(d["generation"]),
            devices={a: DevState.from_dict(x) for a, x in d["devices"].items()},
            modules=[str(m) for m in d.get("modules", [])],
            drivers=[str(m) for m in d.get("drivers", [])],
            dynids={k: [MatchEntry.from_dict(e) for e in v] for k, v in d.get("dynids", {}).items()},
            extra_ids={k: [MatchEntry.from_dict(e) for e in v] for k, v in d.get("extra_ids", {}).items()},
            cards={a: CardIdentity.from_dict(c) for a, c in d.get("cards", {}).items()},
            unplugged=[str(a) for a in d.get("unplugged", [])],
            autoprobe=bool(d.get("autoprobe", True)),
            fbcon_bound=bool(d.get("fbcon_bound", False)),
            console_unbound_by_admin=bool(d.get("console_unbound_by_admin", False)),
            hugepages={str(k): int(v) for k, v in d.get("hugepages", {}).items()},
            seq=int(d.get("seq", 0)),
        )


def _dirty_keys(topo: Topology, old: KState, new: KState) -> set[str]:
    keys: set[str] = set()
    for a in topo.order:
        if old.devices[a] != new.devices[a] or old.cards.get(a) != new.cards.get(a):
            keys.add(f"dev:{a}")
            g = topo.group_of(a)
            if g is not None:
                keys.add(f"grp:{g}")
    if old.drivers != new.drivers:
        keys |= {f"drv:{d}" for d in set(old.drivers) ^ set(new.drivers)}
    if old.modules != new.modules:
        keys |= {f"mod:{m}" for m in set(old.modules) | set(new.modules)}
        keys.add("global")
    if (old.boot_id, old.autoprobe, old.fbcon_bound, old.hugepages) != (
        new.boot_id,
        new.autoprobe,
        new.fbcon_bound,
        new.hugepages,
    ):
        keys.add("global")
    return keys


def _all_keys(topo: Topology) -> set[str]:
    keys = {f"dev:{a}" for a in topo.order} | {f"grp:{g}" for g in topo.groups}
    keys |= {f"drv:{d}" for d in topo.drivers} | {f"mod:{m}" for m in topo.modules}
    return keys | {"global"}


# ----- rendering: (profile, state) -> tree --------------------------------------------------------------


def _stable_hex(text: str, n: int) -> str:
    """Deterministic pseudo-random hex (MACs, UUIDs) so a profile always builds the same tree."""
    out = ""
    i = 0
    while len(out) < n:
        out += f"{zlib.crc32(f'{text}/{i}'.encode()):08x}"
        i += 1
    return out[:n]


class _Renderer:
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
        bus, slot, fn = int(addr[5:7], 16), int(addr[8:10], 16), int(addr[11])
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
        return tree

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
            cfg[0x18], cfg[0x19], cfg[0x1A] = int(addr[5:7], 16), secondary, subordinate
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
        if spec.reset_method:
            f("reset_method", spec.reset_method + "\n", 0o644)
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
        self.side_effects(t, addr, ds, p)

    def cpulist(self, node: int) -> str:
        n = self.profile.cpus_per_node
        if node < 0:
            return f"0-{self.profile.numa_nodes * n - 1}"
        return f"{node * n}-{(node + 1) * n - 1}"

    def side_effects(self, t: Tree, addr: str, ds: DevState, p: str) -> None:
        """What a bound driver creates for the device: class devices under it and nodes in /dev."""
        m = ds.minors
        prof = self.profile

        def chardev(path: str, major: int, minor: int) -> None:
            t[f"{path}/dev"] = file_entry(f"{major}:{minor}\n")
            put_link(t, f"{path}/device", p)

        if "vfio" in m:
            n = m["vfio"]
            d = f"{p}/vfio-dev/vfio{n}"
            t[f"{p}/vfio-dev"] = DIR
            t[d] = DIR
            put_link(t, f"{d}/device", p)
            put_link(t, f"sys/class/vfio-dev/vfio{n}", d)
            if prof.vfio_cdev:
                t[f"{d}/dev"] = file_entry(f"{VFIO_CDEV_MAJOR}:{n}\n")
                t[f"{d}/uevent"] = file_entry(
                    f"MAJOR={VFIO_CDEV_MAJOR}\nMINOR={n}\nDEVNAME=vfio/devices/vfio{n}\n", 0o644
                )
                t[f"dev/vfio/devices/vfio{n}"] = file_entry(b"", 0o600)
            else:
                t[f"{d}/uevent"] = file_entry(b"", 0o644)
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
            uid = _stable_hex(f"{addr}/{self.card(addr)}", 32)
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
            virtio_id = 9 if spec.mount_tag is not None else 1
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
            mac = _stable_hex(addr, 10)
            t[f"{nd}/address"] = file_entry("02:" + ":".join(mac[i : i + 2] for i in range(0, 10, 2)) + "\n")
            t[f"{nd}/ifindex"] = file_entry(f"{m['net']}\n")
            t[f"{nd}/operstate"] = file_entry("up\n")
            put_link(t, f"{nd}/device", parent)
            put_link(t, f"sys/class/net/{name}", nd)
        if "nvme" in m:
            k, base = m["nvme"], m["blk"]
            ctrl = f"{p}/nvme/nvme{k}"
            t[f"{p}/nvme"] = DIR
            t[ctrl] = DIR
            chardev(ctrl, NVME_CHAR_MAJOR, k)
            put_link(t, f"sys/class/nvme/nvme{k}", ctrl)
            t[f"dev/nvme{k}"] = file_entry(b"", 0o600)
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
        elif name == "vfio":
            t["dev/vfio"] = DIR
            t["dev/vfio/vfio"] = file_entry(b"", 0o666)
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


# ----- the kernel's rules, applied to one state -------------------------------------------------------


class _Blocked(Exception):
    """The operation must wait (an unbind of a device a process still uses); nothing was changed."""

    def __init__(self, addr: str, holders: list[tuple[int, str]]) -> None:
        super().__init__(addr)
        self.addr = addr
        self.holders = holders


def _kstrtoul(data: bytes) -> int | None:
    """lib/kstrtox.c kstrtoul(buf, 0): decimal, 0x hex or 0 octal, one trailing newline allowed."""
    s = data.split(b"\0", 1)[0]
    if s.endswith(b"\n"):
        s = s[:-1]
    text = s.decode("ascii", "replace").removeprefix("+")
    if re.fullmatch(r"0[xX][0-9a-fA-F]+", text):
        return int(text, 16)
    if re.fullmatch(r"0[0-7]*", text):
        return int(text, 8)
    if re.fullmatch(r"[1-9][0-9]*", text):
        return int(text)
    return None


def _simple_strtoul(data: bytes) -> int:
    """simple_strtoul(buf, NULL, 0): the leading number (0x hex, 0 octal, decimal), 0 if there is none."""
    m = re.match(rb"\s*(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)", data)
    if m is None:
        return 0
    text = m[1].decode()
    if text[:2] in ("0x", "0X"):
        return int(text, 16)
    return int(text, 8) if text.startswith("0") else int(text)


def _scan_hex(data: bytes, limit: int) -> list[int]:
    """sscanf(buf, "%x %x ...") : the fields converted before the first that does not parse."""
    text = data.split(b"\0", 1)[0].decode("ascii", "replace")
    out: list[int] = []
    i = 0
    while len(out) < limit:
        while i < len(text) and text[i].isspace():
            i += 1
        m = _HEX_RE.match(text, i)
        if m is None:
            break
        value = int(m[2], 16)
        out.append((-value if m[1] == "-" else value) & 0xFFFFFFFF)
        i = m.end()
    return out


class _Core:
    """One transaction: the rules of drivers/base and drivers/pci applied to a copy of the state."""

    def __init__(self, kernel: SimulatedKernel, topo: Topology, old: KState, paths: tuple[str, ...]) -> None:
        self.kernel = kernel
        self.root = kernel.root
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
        name = faults.streq_form(value).decode("utf-8", "surrogateescape")
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
        return bool(self.holders(paths))

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
        if spec.kind == "pcieport" and not dev.pcie_port:
            return errno.ENODEV  # pcie_portdrv_probe: not a root/switch port
        self.attach(addr, driver)
        return 0

    def _used(self, kind: str) -> set[int]:
        used = self._minor_cache.get(kind)
        if used is None:
            used = {d.minors[kind] for d in self.st.devices.values() if kind in d.minors}
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
            m["vfio"] = self.alloc("vfio")
        elif spec.kind == "drm":
            m["drm"] = self.alloc("drm")
            if spec.fbdev:
                m["fb"] = self.alloc("fb")
        elif spec.kind == "gpu-nvidia":
            if cls >> 16 == 0x03:
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
        elif spec.kind == "nvme":
            m["nvme"] = self.alloc("nvme")
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
        close it; nvidia's remove waits while /dev/nvidiaN is open."""
        ds = self.st.devices[addr]
        if ds.driver is None:
            return []
        paths: set[str] = set()
        if "vfio" in ds.minors:
            paths |= self.vfio_nodes(addr)
        if "nvidia" in ds.minors and self.profile.nvidia_remove_waits_for_users:
            paths.add(f"/dev/nvidia{ds.minors['nvidia']}")
        return self.holders(paths)

    def detach(self, addr: str, *, force: bool = False) -> None:
        """device_release_driver: remove the driver's side effects; blocks while the device is in use."""
        ds = self.st.devices[addr]
        if ds.driver is None:
            return
        if not force:
            blockers = self.release_blockers(addr)
            if blockers:
                raise _Blocked(addr, blockers)
        ds.driver = None
        self.free_minors(ds)
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
        self.uevent("remove", addr, None)

    def rescan(self) -> None:
        for addr in self.topo.order:  # bus-add order: bridges before what is behind them
            parent = self.topo.parent(addr)
            if self.st.devices[addr].present or not self.reachable(addr):
                continue
            if parent is None or self.st.devices[parent].present:
                self.add_device(addr)

    # -- modules ------------------------------------------------------------------------------------

    def vfio_pci_ids(self) -> list[MatchEntry]:
        """The `ids=` module parameter as modprobe would pass it: the kernel command line
        (vfio-pci.ids= / vfio_pci.ids=) and `options vfio-pci ids=` in /etc/modprobe.d."""
        specs: list[str] = []
        for token in self.profile.cmdline.split():
            key, _, value = token.partition("=")
            if key in ("vfio-pci.ids", "vfio_pci.ids"):
                specs.append(value)
        for _path, text in sorted(self.profile.etc_files):
            if not _path.startswith("modprobe.d/"):
                continue
            for line in text.splitlines():
                words = line.split()
                if len(words) >= 3 and words[0] == "options" and words[1].replace("-", "_") == "vfio_pci":
                    specs += [w[len("ids=") :] for w in words[2:] if w.startswith("ids=")]
        out = []
        for spec in ",".join(specs).split(","):
            # vfio_pci_fill_ids: sscanf("%x:%x:%x:%x:%x:%x"), at least vendor:device
            fields = _scan_hex(spec.replace(":", " ").encode(), 6)
            if len(fields) < 2 or not spec.strip():
                continue
            v, d, *rest = fields
            sv = rest[0] if len(rest) > 0 else PCI_ANY_ID
            sd = rest[1] if len(rest) > 1 else PCI_ANY_ID
            c = rest[2] if len(rest) > 2 else 0
            cm = rest[3] if len(rest) > 3 else 0
            out.append(MatchEntry(v, d, sv, sd, c, cm))
        return out

    def register_driver(self, driver: str) -> None:
        self.st.drivers.append(driver)
        if driver == "vfio-pci":
            self.st.dynids[driver] = self.vfio_pci_ids()
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
            raise _oserror(errno.ENOENT, f"rmmod: ERROR: Module {name} is not currently loaded")
        users = [u for u in self.st.modules if name in self.topo.modules[u].depends]
        if users:
            raise _oserror(errno.EBUSY, f"rmmod: ERROR: Module {name} is in use by: {' '.join(users)}")
        if self.module_in_use(name):
            raise _oserror(errno.EBUSY, f"rmmod: ERROR: Module {name} is in use")
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


# ----- the kernel ---------------------------------------------------------------------------------------

_Op = Callable[[_Core], None]


class SimulatedKernel:
    """A Linux 6.1 kernel, as far as vfiod can tell, living in the directory `root` (built by `build`)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.abspath(root))
        self._root_real = os.path.realpath(self.root)
        if self._root_real == "/":
            # the simulated tree is never the host's own /sys, /dev and /proc
            raise ValueError("a simulated kernel cannot live at /")
        self.sim = self.root / "sim"
        self._topology: Topology | None = None

    # ----- files of sim/ ---------------------------------------------------------------------------

    @property
    def profile(self) -> Profile:
        return self.topology.profile

    @property
    def topology(self) -> Topology:
        if self._topology is None:
            text = (self.sim / "profile.json").read_text(encoding="utf-8")
            self._topology = Topology(Profile.from_json(text))
        return self._topology

    def _global_lock(self) -> contextlib.AbstractContextManager[None]:
        return _flock(self.sim / "lock")

    def _device_locks(self, addrs: Iterable[str]) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        for a in sorted(set(addrs)):
            stack.enter_context(_flock(self.sim / "locks" / a))
        return stack

    def _read_state_file(self) -> dict[str, Any]:
        data = json.loads((self.sim / "state.json").read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("sim/state.json is not an object")
        return data

    def _save(self, st: KState, pending: dict[str, Any] | None = None) -> None:
        tmp = self.sim / f".state.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"state": st.to_dict(), "pending": pending}), encoding="utf-8")
        os.replace(tmp, self.sim / "state.json")

    def _load(self) -> KState:
        """The current state (caller holds the global lock), finishing an update a killed process left."""
        data = self._read_state_file()
        st = KState.from_dict(data["state"])
        pending = data.get("pending")
        if pending:
            prev = KState.from_dict(pending["prev"])
            keys = [str(k) for k in pending["keys"]]
            topo = self.topology
            old_tree = _Renderer(topo, prev).render(keys) if not pending.get("fresh") else {}
            self._apply(old_tree, _Renderer(topo, st).render(keys), verify=True)
            self._save(st)
        return st

    def _apply(self, old: Tree, new: Tree, *, verify: bool = False) -> None:
        removed = apply_tree(self.root, old, new, verify=verify)
        gone = [p for p in removed if p.startswith("dev/")]
        if gone:
            self._forget_owners(gone)

    def _commit(self, core: _Core) -> None:
        old, new = core.old, core.st
        for ev in core.uevents:
            new.seq += 1
            ev["seq"] = new.seq
        keys = sorted(_dirty_keys(self.topology, old, new))
        if keys:
            self._save(new, pending={"keys": keys, "prev": old.to_dict()})
            topo = self.topology
            self._apply(_Renderer(topo, old).render(keys), _Renderer(topo, new).render(keys))
        self._save(new)
        if core.uevents:
            now = time.time()
            with open(self.sim / "uevents.jsonl", "a", encoding="utf-8") as f:
                f.write("".join(json.dumps({**ev, "ts": now}) + "\n" for ev in core.uevents))

    def _forget_owners(self, removed: list[str]) -> None:
        """A node that disappears loses its recorded owner: Linux recreates it root:root 0600."""
        path = self.sim / "nodes.json"
        try:
            owners = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return
        logical = {"/" + p for p in removed}
        kept = {k: v for k, v in owners.items() if k not in logical}
        if kept != owners:
            path.write_text(json.dumps(kept), encoding="utf-8")

    # ----- running an operation --------------------------------------------------------------------

    def _transact(
        self, op: _Op, *, paths: tuple[str, ...] = (), boot_id: str | None = None, label: str = ""
    ) -> None:
        """Run `op` on the state under the global lock and commit it; retry while it is blocked (a device
        still in use), without holding the global lock in between."""
        marker: Path | None = None
        try:
            while True:
                with self._global_lock():
                    st = self._load()
                    if boot_id is not None and st.boot_id != boot_id:
                        # the kernel the write was issued to is gone (reboot): its file is a dead kernfs node
                        raise _oserror(errno.ENODEV, "the simulated kernel rebooted during the write")
                    core = _Core(self, self.topology, st, paths)
                    try:
                        op(core)
                    except _Blocked as b:
                        if marker is None:
                            marker = self.sim / "blocked" / b.addr
                            marker.parent.mkdir(exist_ok=True)
                            marker.write_text(
                                json.dumps({"operation": label, "holders": b.holders, "pid": os.getpid()})
                                + "\n",
                                encoding="utf-8",
                            )
                    else:
                        self._commit(core)
                        return
                time.sleep(POLL_INTERVAL)
        finally:
            if marker is not None:
                with contextlib.suppress(FileNotFoundError):
                    marker.unlink()

    # ----- KernelBackend ---------------------------------------------------------------------------

    def _logical(self, path: Path) -> str:
        p = os.path.abspath(path)
        rel = os.path.relpath(p, self.root)
        if rel == ".." or rel.startswith("../") or os.path.isabs(rel):
            raise _oserror(errno.EACCES, f"{path} is outside the simulated tree {self.root}")
        return "/" + rel if rel != "." else "/"

    def _resolved_logical(self, path: Path) -> str:
        real = os.path.realpath(path)
        rel = os.path.relpath(real, self._root_real)
        if rel == ".." or rel.startswith("../"):
            raise _oserror(errno.EACCES, f"{path} resolves outside the simulated tree")
        return "/" + rel

    def write_attribute(self, path: Path, data: bytes) -> None:
        """One write(2) of `data` to a sysfs attribute of the simulated tree, with the kernel's result."""
        given = self._logical(path)  # never touch anything outside the tree
        _ = self.topology  # and only a tree `build` made (sim/profile.json): FileNotFoundError otherwise
        started = time.monotonic()
        resolved = given
        result = "ok"
        try:
            # open(O_WRONLY) without O_CREAT: ENOENT for a missing attribute, EISDIR for a directory
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            os.close(fd)
            resolved = self._resolved_logical(path)
            self._write(given, resolved, bytes(data))
        except OSError as e:
            result = errno.errorcode.get(e.errno or errno.EIO, str(e.errno))
            raise
        finally:
            self._trace(given, resolved, data, result, time.monotonic() - started)

    def _trace(self, given: str, resolved: str, data: bytes, result: str, duration: float) -> None:
        record: dict[str, Any] = {
            "ts": time.time(),
            "pid": os.getpid(),
            "path": given,
            "value": data.decode("utf-8", "backslashreplace"),
            "result": result,
            "duration": round(duration, 6),
        }
        if resolved != given:
            record["resolved"] = resolved
        # One O_APPEND write per record: records from concurrent writers do not interleave.
        fd = os.open(self.sim / "trace.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())
        finally:
            os.close(fd)

    def _classify(self, rel: str, data: bytes) -> tuple[_Op, str | None]:
        """The operation a write to `rel` performs, and the device whose lock it takes (if any)."""
        topo = self.topology
        parent, name = posixpath.split(rel)
        named = faults.streq_form(data).decode("utf-8", "surrogateescape")
        named_addr = named if named in topo.devices else None
        if parent in topo.dir_to_addr:
            addr = topo.dir_to_addr[parent]
            if name == "driver_override":
                return (lambda c: _op_driver_override(c, addr, data)), addr
            if name == "remove":
                return (lambda c: _op_remove(c, addr, data)), addr
            if name == "uevent":
                return (lambda c: _op_device_uevent(c, addr, data)), addr
            raise _oserror(errno.EACCES, f"/{rel} is read-only")
        m = _DRIVER_ATTR_RE.fullmatch(rel)
        if m is not None:
            driver, attr = m[1], m[2]
            if attr == "bind":
                return (lambda c: _op_bind(c, driver, data)), named_addr
            if attr == "unbind":
                return (lambda c: _op_unbind(c, driver, data)), named_addr
            if attr == "new_id":
                return (lambda c: _op_new_id(c, driver, data)), None
            if attr == "remove_id":
                return (lambda c: _op_remove_id(c, driver, data)), None
            return (lambda c: _op_driver_uevent(c, driver, data)), None
        if rel == "sys/bus/pci/drivers_probe":
            return (lambda c: _op_drivers_probe(c, data)), named_addr
        if rel == "sys/bus/pci/drivers_autoprobe":
            return (lambda c: _op_autoprobe(c, data)), None
        if rel == "sys/bus/pci/rescan":
            return (lambda c: _op_rescan(c, data)), None
        m = _VTCON_RE.fullmatch(rel)
        if m is not None:
            index = int(m[1])
            return (lambda c: _op_vtcon_bind(c, index, data)), None
        m = _HUGEPAGES_RE.fullmatch(rel)
        if m is not None:
            size = m[1]
            return (lambda c: _op_hugepages(c, size, data)), None
        raise _oserror(errno.EACCES, f"/{rel} is not a writable attribute of the simulator")

    def _write(self, given: str, resolved: str, data: bytes) -> None:
        op, lock_addr = self._classify(resolved[1:], data)
        if not data:
            return  # fs/sysfs/file.c sysfs_kf_write: a zero-length write is a no-op
        boot_id = self.boot_id()
        paths = (given, resolved) if given != resolved else (given,)
        with self._device_locks([lock_addr] if lock_addr else []):
            self._write_faults(paths, data)
            self._transact(op, paths=paths, boot_id=boot_id, label=f"{given} <- {data!r}")

    def _write_faults(self, paths: tuple[str, ...], data: bytes) -> None:
        """hang / errno / delay faults, applied while the device lock is held (as a driver's slow or stuck
        remove holds it in the kernel)."""
        for fault in faults.load_all(self.root):
            if not fault.applies_to_write(paths, data):
                continue
            with self._global_lock():
                if not faults.take(self.root, fault.name):
                    continue
            if fault.kind == "errno":
                raise _oserror(fault.error_number(), f"injected fault {fault.name}")
            if fault.kind == "delay":
                time.sleep(fault.seconds)
            elif fault.kind == "hang":
                if faults.released(self.root, fault.name):
                    continue
                with self._global_lock():
                    faults.set_hung(self.root, fault.name, True)
                try:
                    while not faults.released(self.root, fault.name):
                        time.sleep(POLL_INTERVAL)
                finally:
                    with self._global_lock():
                        faults.set_hung(self.root, fault.name, False)
                if fault.then == "fail":
                    raise _oserror(fault.error_number(), f"injected fault {fault.name} failed after release")

    def _node_logical(self, node: Path) -> tuple[str, int]:
        logical = self._logical(node)
        m = re.fullmatch(r"/dev/vfio/(\d+)", logical)
        if not os.path.lexists(node):
            raise _oserror(errno.ENOENT, str(node))
        if m is None:
            raise _oserror(errno.ENOTTY, f"{logical} is not a VFIO group node")
        return logical, int(m[1])

    def vfio_group_status(self, node: Path) -> int:
        """open(/dev/vfio/N) + VFIO_GROUP_GET_STATUS: EBUSY if another process has the group open (one
        opener per group); VIABLE iff no member is bound to a driver that claims DMA ownership."""
        logical, group = self._node_logical(node)
        with self._global_lock():
            st = self._load()
            if processes.holders(self.root, [logical]):
                raise _oserror(errno.EBUSY, f"{logical} is already open")
            members = [a for a in self.topology.groups.get(group, []) if st.devices[a].present]
            if not members:
                raise _oserror(errno.ENODEV, logical)
            viable = all(
                st.devices[a].driver is None
                or self.topology.drivers[str(st.devices[a].driver)].driver_managed_dma
                for a in members
            )
        return VFIO_GROUP_FLAGS_VIABLE if viable else 0

    def set_node_owner(self, node: Path, owner: NodeOwner) -> None:
        """chown + chmod: for real as root; otherwise recorded in sim/nodes.json (an unprivileged demo)."""
        logical = self._logical(node)
        with self._global_lock():
            if not os.path.lexists(node):
                raise _oserror(errno.ENOENT, str(node))
            if os.geteuid() == 0:
                os.chown(node, owner.uid, owner.gid, follow_symlinks=False)
                os.chmod(node, owner.mode & 0o7777)
                return
            path = self.sim / "nodes.json"
            try:
                owners = json.loads(path.read_text(encoding="utf-8"))
            except (FileNotFoundError, ValueError):
                owners = {}
            owners[logical] = [owner.uid, owner.gid, owner.mode & 0o7777]
            path.write_text(json.dumps(owners, sort_keys=True), encoding="utf-8")

    def node_owner(self, node: Path) -> NodeOwner:
        logical = self._logical(node)
        st = os.stat(node, follow_symlinks=False)  # FileNotFoundError when the node is gone
        if os.geteuid() == 0:
            return NodeOwner(uid=st.st_uid, gid=st.st_gid, mode=st.st_mode & 0o7777)
        try:
            owners = json.loads((self.sim / "nodes.json").read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            owners = {}
        rec = owners.get(logical)
        if rec is None:
            return NodeOwner(uid=0, gid=0, mode=st.st_mode & 0o7777)
        return NodeOwner(uid=int(rec[0]), gid=int(rec[1]), mode=int(rec[2]))

    # ----- boot ------------------------------------------------------------------------------------

    def _boot_state(self, prev: KState | None) -> tuple[KState, _Core]:
        topo = self.topology
        prof = topo.profile
        st = KState(
            boot_id=str(uuid.uuid4()),
            generation=(prev.generation + 1) if prev else 1,
            devices={a: DevState() for a in topo.order},
            cards=dict(prev.cards) if prev else {},
            unplugged=list(prev.unplugged) if prev else [],
            hugepages={"2048kB": prof.hugepages_2m, "1048576kB": prof.hugepages_1g},
            seq=prev.seq if prev else 0,
        )
        core = _Core(self, topo, st, ())
        core.st = st
        core.quiet = True  # boot-time uevents happen before anyone listens (udev replays them)
        core.booting = True
        for addr in topo.order:
            if core.reachable(addr):
                st.devices[addr].present = True
        # built-in drivers register at device_initcall, then modules load in profile order
        for driver in prof.drivers:
            if driver.module is None:
                core.register_driver(driver.name)
        for module in prof.modules:
            if module.loaded:
                core.load_module(module.name)
        return st, core

    def boot(self, *, first: bool = False) -> None:
        """Start the kernel: the profile's boot state, its processes, no recorded node owners."""
        topo = self.topology
        with self._global_lock():
            prev = None if first else self._load()
            st, _core = self._boot_state(prev)
            keys = sorted(_all_keys(topo))
            if first:
                self._save(st, pending={"keys": keys, "prev": st.to_dict(), "fresh": True})
                self._apply({}, _Renderer(topo, st).render(keys))
            else:
                assert prev is not None
                self._save(st, pending={"keys": keys, "prev": prev.to_dict()})
                self._apply(_Renderer(topo, prev).render(keys), _Renderer(topo, st).render(keys))
            self._save(st)
            with contextlib.suppress(FileNotFoundError):
                (self.sim / "nodes.json").unlink()
            shutil.rmtree(self.sim / "blocked", ignore_errors=True)
            processes.reset(self.root, topo.profile)

    def reboot(self) -> None:
        """Reboot: a new boot_id; drivers back to native, overrides and new_ids gone, removed devices back,
        /dev/vfio nodes gone, only the profile's processes running. A swapped or unplugged card stays so."""
        self.boot()

    # ----- control: what an admin or the hardware does --------------------------------------------

    def _control(self, op: _Op, label: str) -> None:
        self._transact(op, label=label)

    def load_module(self, name: str) -> None:
        """modprobe NAME: load it and its dependencies; its drivers probe every matching unbound device."""
        module = name.replace("-", "_")
        if module not in self.topology.modules:
            raise _oserror(errno.ENOENT, f"modprobe: FATAL: Module {name} not found")
        self._control(lambda c: c.load_module(module), f"modprobe {module}")

    def unload_module(self, name: str) -> None:
        """rmmod NAME: EBUSY while another module needs it or a process holds its nodes; its drivers'
        devices are unbound first."""
        module = name.replace("-", "_")
        if module not in self.topology.modules:
            raise _oserror(errno.ENOENT, f"rmmod: ERROR: Module {name} is not currently loaded")
        self._control(lambda c: c.unload_module(module), f"rmmod {module}")

    def _check_addr(self, addr: str) -> str:
        addr = str(addr)
        if addr not in self.topology.devices:
            raise KeyError(f"profile {self.profile.name} has no device {addr}")
        return addr

    def unplug(self, addr: str) -> None:
        """The card is pulled (surprise removal): it and everything behind it leave the bus, unbound
        without waiting for users. It stays gone across reboots until `replug`."""
        a = self._check_addr(addr)

        def op(c: _Core) -> None:
            if a not in c.st.unplugged:
                c.st.unplugged.append(a)
            c.remove_device(a, force=True)

        self._control(op, f"unplug {a}")

    def replug(self, addr: str) -> None:
        """The card is back in its slot: it (and what is behind it) is added and probed."""
        a = self._check_addr(addr)

        def op(c: _Core) -> None:
            if a in c.st.unplugged:
                c.st.unplugged.remove(a)
            c.rescan()

        self._control(op, f"replug {a}")

    def replace_card(
        self,
        addr: str,
        vendor: str | int,
        device: str | int,
        *,
        subsystem_vendor: str | int | None = None,
        subsystem_device: str | int | None = None,
        class_code: str | int | None = None,
        revision: str | int | None = None,
    ) -> None:
        """A different card now sits at `addr` (ids as hex strings or ints): the old one is removed, the
        new one added and probed. Subsystem ids default to the new vendor/device, class to the old one's."""
        a = self._check_addr(addr)

        def num(v: str | int | None, default: int) -> int:
            if v is None:
                return default
            return v if isinstance(v, int) else int(v, 16)

        def op(c: _Core) -> None:
            old = c.card(a)
            v, d = num(vendor, 0), num(device, 0)
            c.st.cards[a] = CardIdentity(
                v,
                d,
                num(subsystem_vendor, v),
                num(subsystem_device, d),
                num(class_code, old.class_code),
                num(revision, old.revision),
            )
            if c.st.devices[a].present:
                c.remove_device(a, force=True)
                c.rescan()

        self._control(op, f"replace card {a}")

    def add_driver_match(
        self,
        driver: str,
        *,
        vendor: str | int = PCI_ANY_ID,
        device: str | int = PCI_ANY_ID,
        subvendor: str | int = PCI_ANY_ID,
        subdevice: str | int = PCI_ANY_ID,
        class_code: str | int = 0,
        class_mask: str | int = 0,
    ) -> None:
        """Add an entry to `driver`'s static id table (as a newer module version would have it), until the
        next reboot. Unlike new_id it probes nothing by itself."""
        if driver not in self.topology.drivers:
            raise KeyError(f"profile {self.profile.name} has no driver {driver}")

        def num(v: str | int) -> int:
            return v if isinstance(v, int) else int(v, 16)

        entry = MatchEntry(
            num(vendor), num(device), num(subvendor), num(subdevice), num(class_code), num(class_mask)
        )

        def op(c: _Core) -> None:
            c.st.extra_ids.setdefault(driver, []).append(entry)

        self._control(op, f"add match to {driver}")

    # ----- inspection ------------------------------------------------------------------------------

    def state(self) -> KState:
        """A snapshot of the kernel's state (read under the lock)."""
        with self._global_lock():
            return self._load()

    def driver_of(self, addr: str) -> str | None:
        return self.state().devices[self._check_addr(addr)].driver

    def boot_id(self) -> str:
        try:
            return (self.root / "proc/sys/kernel/random/boot_id").read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return ""

    def uevents(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.sim / "uevents.jsonl")

    def trace(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.sim / "trace.jsonl")

    def blocked(self) -> list[str]:
        """Devices whose unbind (or remove) is waiting now for a process to let go of them."""
        out = []
        try:
            names = sorted(os.listdir(self.sim / "blocked"))
        except FileNotFoundError:
            return []
        for name in names:
            try:
                info = json.loads((self.sim / "blocked" / name).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if faults.pid_alive(int(info.get("pid", 0))):  # not a marker left by a killed writer
                out.append(name)
        return out

    def wait_blocked(self, addr: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while addr not in self.blocked():
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_INTERVAL / 2)
        return True

    def block_devnums(self) -> dict[str, str]:
        """Block device name -> "major:minor", as sys/class/block shows them now."""
        out = {}
        base = self.root / "sys/class/block"
        for name in sorted(os.listdir(base)) if base.is_dir() else []:
            with contextlib.suppress(OSError):
                out[name] = (base / name / "dev").read_text(encoding="utf-8").strip()
        return out


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# ----- the write operations (each runs on one transaction) -------------------------------------------


def _require_present(c: _Core, addr: str) -> None:
    if not c.st.devices[addr].present:
        # the attribute belonged to a device removed since the file was opened: a dead kernfs node
        raise _oserror(errno.ENODEV, addr)


def _op_driver_override(c: _Core, addr: str, data: bytes) -> None:
    """drivers/pci/pci-sysfs.c driver_override_store -> drivers/base/driver.c driver_set_override."""
    _require_present(c, addr)
    if len(data) >= PAGE_SIZE - 1:
        raise _oserror(errno.EINVAL, "driver_override longer than PAGE_SIZE - 2")
    s = data.split(b"\0", 1)[0]  # strlen: Python's b"...\0" stops here
    cut = s.find(b"\n")
    value = s if cut < 0 else s[:cut]
    c.st.devices[addr].override = value.decode("utf-8", "surrogateescape") if value else None


def _op_remove(c: _Core, addr: str, data: bytes) -> None:
    """drivers/pci/pci-sysfs.c remove_store: kstrtoul; non-zero removes the device and all below it."""
    _require_present(c, addr)
    value = _kstrtoul(data)
    if value is None:
        raise _oserror(errno.EINVAL)
    if value:
        c.remove_device(addr)


def _op_device_uevent(c: _Core, addr: str, data: bytes) -> None:
    """drivers/base/core.c uevent_store -> kobject_synth_uevent: emit the named action, change nothing."""
    _require_present(c, addr)
    words = data.split(b"\0", 1)[0].split()
    action = words[0].decode("ascii", "replace") if words else ""
    if action not in _SYNTH_ACTIONS:
        raise _oserror(errno.EINVAL, f"unknown uevent action {action!r}")
    c.uevent(action, addr, c.st.devices[addr].driver)


def _require_driver(c: _Core, driver: str) -> None:
    if driver not in c.st.drivers:
        raise _oserror(errno.ENODEV, f"driver {driver} was unregistered")


def _op_bind(c: _Core, driver: str, data: bytes) -> None:
    """drivers/base/bus.c bind_store -> device_driver_attach."""
    _require_driver(c, driver)
    addr = c.find_device(data)
    if addr is None or not c.match(driver, addr):
        raise _oserror(errno.ENODEV)
    r = c.probe(driver, addr)  # -EBUSY if it already has a driver
    if r:
        raise _oserror(abs(r))


def _op_unbind(c: _Core, driver: str, data: bytes) -> None:
    """drivers/base/bus.c unbind_store: only the driver the device is bound to can unbind it."""
    _require_driver(c, driver)
    addr = c.find_device(data)
    if addr is None or c.st.devices[addr].driver != driver:
        raise _oserror(errno.ENODEV)
    c.detach(addr)


def _op_drivers_probe(c: _Core, data: bytes) -> None:
    """drivers/base/bus.c drivers_probe_store -> bus_rescan_devices_helper -> device_attach."""
    addr = c.find_device(data)
    if addr is None:
        raise _oserror(errno.ENODEV)
    if c.device_attach(addr) < 0:
        raise _oserror(errno.EINVAL)  # drivers_probe_store's initial err: a core error reads as EINVAL


def _op_autoprobe(c: _Core, data: bytes) -> None:
    """drivers/base/bus.c drivers_autoprobe_store: '0' turns it off, anything else on."""
    c.st.autoprobe = not data.startswith(b"0")


def _op_rescan(c: _Core, data: bytes) -> None:
    """drivers/pci/pci-sysfs.c rescan_store: non-zero re-adds removed functions and probes them."""
    value = _kstrtoul(data)
    if value is None:
        raise _oserror(errno.EINVAL)
    if value:
        c.rescan()


def _entry_from_fields(fields: list[int]) -> MatchEntry:
    return MatchEntry(
        fields[0],
        fields[1],
        fields[2] if len(fields) > 2 else PCI_ANY_ID,
        fields[3] if len(fields) > 3 else PCI_ANY_ID,
        fields[4] if len(fields) > 4 else 0,
        fields[5] if len(fields) > 5 else 0,
    )


def _op_new_id(c: _Core, driver: str, data: bytes) -> None:
    """drivers/pci/pci-driver.c new_id_store: EEXIST if the driver already matches those ids, else
    pci_add_dynid, which probes every unbound device the new id matches (driver_attach)."""
    _require_driver(c, driver)
    fields = _scan_hex(data, 7)
    if len(fields) < 2:
        raise _oserror(errno.EINVAL)
    entry = _entry_from_fields(fields)
    if len(fields) != 7:
        dummy = CardIdentity(entry.vendor, entry.device, entry.subvendor, entry.subdevice, entry.class_code)
        known = [
            *c.st.dynids.get(driver, []),
            *c.topo.drivers[driver].id_table,
            *c.st.extra_ids.get(driver, []),
        ]
        if any(e.matches(dummy) and not e.override_only for e in known):
            raise _oserror(errno.EEXIST)
    c.st.dynids.setdefault(driver, []).append(entry)
    c.driver_attach(driver)


def _op_remove_id(c: _Core, driver: str, data: bytes) -> None:
    """drivers/pci/pci-driver.c remove_id_store: drop the first dynamic id that matches; ENODEV if none."""
    _require_driver(c, driver)
    fields = _scan_hex(data, 6)
    if len(fields) < 2:
        raise _oserror(errno.EINVAL)
    want = _entry_from_fields(fields)
    ids_ = c.st.dynids.get(driver, [])
    for i, e in enumerate(ids_):
        if (
            e.vendor == want.vendor
            and e.device == want.device
            and want.subvendor in (PCI_ANY_ID, e.subvendor)
            and want.subdevice in (PCI_ANY_ID, e.subdevice)
            and not ((e.class_code ^ want.class_code) & want.class_mask)
        ):
            del ids_[i]
            return
    raise _oserror(errno.ENODEV)


def _op_driver_uevent(c: _Core, driver: str, data: bytes) -> None:
    _require_driver(c, driver)
    words = data.split(b"\0", 1)[0].split()
    if not words or words[0].decode("ascii", "replace") not in _SYNTH_ACTIONS:
        raise _oserror(errno.EINVAL)


def _op_vtcon_bind(c: _Core, index: int, data: bytes) -> None:
    """drivers/tty/vt/vt.c store_bind, with the profile's two vtconsoles (fbcon and the dummy driver).
    vt_bind and vt_unbind act only on a driver registered as a module ("(M)"). vt_bind takes the consoles
    from the system driver ("(S)"): with none (both "(M)") it does nothing. vt_unbind of the bound driver
    hands the consoles to the other registered one (do_unbind_con_driver's backup)."""
    bind = _simple_strtoul(data) != 0
    has_fb = any("fb" in d.minors for d in c.st.devices.values())
    kind, module = c.profile.vtconsole(index)
    if not module:
        return
    is_fbcon = kind == FBCON
    bound = is_fbcon == c.st.fbcon_bound
    if bind:
        system = any(not c.profile.vtconsole(i)[1] for i in range(len(c.profile.vtconsoles)))
        if is_fbcon and not bound and system and has_fb:  # fbcon takes the consoles from "(S) dummy"
            c.st.fbcon_bound = True
            c.st.console_unbound_by_admin = False
    elif bound:
        if is_fbcon:
            c.st.fbcon_bound = False
            c.st.console_unbound_by_admin = True
        elif has_fb:  # the dummy driver hands the consoles (back) to fbcon
            c.st.fbcon_bound = True
            c.st.console_unbound_by_admin = False


def _op_hugepages(c: _Core, size: str, data: bytes) -> None:
    value = _kstrtoul(data)
    if value is None:
        raise _oserror(errno.EINVAL)
    c.st.hugepages[size] = value
