"""Which PCI functions the host itself needs, and why.

Owns the answer to "would passing this function through take something away from the host": it backs a
mounted filesystem or active swap, it carries a default route, or it is the boot VGA with a console bound
to it. The answer is a sentence per function, used both as a bind refusal (`HostCritical`) and as
`host_critical` in discovery.

Everything is read through `Host` (sysfs, /proc) and nothing here raises for an unreadable or malformed
file: an unknown is skipped. Mounts that look disk-backed but cannot be traced to a PCI function are logged
as warnings, because a silent miss here is how a host loses its root disk.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from vfiod.host import procfs
from vfiod.host.host import Host
from vfiod.host.pciaddr import PCI_ADDRESS_PATTERN, PciAddress

log = logging.getLogger("vfiod.hostcritical")

_PCI_COMPONENT_RE = re.compile(PCI_ADDRESS_PATTERN)
_MAJMIN_RE = re.compile(r"(\d+):(\d+)")
# Interface and block device names come from /proc files; they become path components, so anything that
# could walk out of the directory is ignored.
_NAME_RE = re.compile(r"[^/\s\x00]+")

# Virtual file systems that are network-backed: covered by the default-route rule, not by a block device.
_NETWORK_FS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "fuse.sshfs", "afs"})
# Disk-backed file systems whose mountinfo entry names neither a real device number nor a /dev source:
# they cannot be traced from here, so they must at least be reported.
_UNTRACEABLE_DISK_FS = frozenset({"zfs"})
_SHARE_FS = frozenset({"9p", "virtiofs"})
# Block devices that live in memory or in a file on another (separately checked) mount.
_MEMORY_OR_FILE_BLOCK = ("loop", "zram", "ram", "nbd")

# Linux route flags (include/uapi/linux/route.h, ipv6_route.h).

_MAX_LISTED = 3
_MAX_DEPTH = 16


@dataclass
class _Uses:
    """Everything found for one function, in the order found, before it is phrased."""

    storage: list[str] = field(default_factory=list)
    routes: dict[str, set[str]] = field(default_factory=dict)  # route interface -> {"IPv4", "IPv6"}
    route_leaves: dict[str, set[str]] = field(default_factory=dict)  # route interface -> PCI-side ifnames
    console: str | None = None


def host_critical(host: Host) -> dict[PciAddress, str]:
    """Map each PCI function the host needs to a sentence (lower case, no final period) saying why.

    A function is listed when it backs a mounted filesystem or active swap (through partitions, dm, md,
    LUKS and LVM, down to the deepest PCI function on the path: the bridges above it are not listed),
    backs a 9p/virtiofs share that is mounted, carries the IPv4 or IPv6 default route (through bonds,
    bridges and VLANs), or is the boot VGA while a console is bound to it.
    """
    uses: dict[PciAddress, _Uses] = {}
    _storage(host, uses)
    _routes(host, uses)
    _console(host, uses)
    return {addr: _phrase(u) for addr, u in sorted(uses.items())}


# ----- paths ------------------------------------------------------------------------------------------


def _resolve(path: Path) -> Path | None:
    try:
        return path.resolve(strict=True)
    except (OSError, RuntimeError):
        return None


def deepest_pci_function(host: Host, real: Path) -> PciAddress | None:
    """The last PCI function on a resolved /sys/devices path: the endpoint, not the bridges above it."""
    try:
        rel = real.relative_to(host.roots.sys)
    except ValueError:
        rel = real
    for part in reversed(rel.parts):
        if _PCI_COMPONENT_RE.fullmatch(part):
            return PciAddress.parse(part)
    return None


# ----- storage ----------------------------------------------------------------------------------------


class _BlockResolver:
    """Traces a block device to the PCI functions under it, remembering what it already traced."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self._cache: dict[Path, frozenset[PciAddress]] = {}
        self._dm_names: dict[str, str] | None = None

    def by_name(self, name: str) -> frozenset[PciAddress] | None:
        if _NAME_RE.fullmatch(name) is None or name in (".", ".."):
            return None
        real = _resolve(self.host.roots.sys / "class/block" / name)
        return None if real is None else self.by_dir(real)

    def by_dev_path(self, source: str) -> frozenset[PciAddress] | None:
        """A `/dev/...` source: `/dev/sda1`, `/dev/mapper/vg-root`, `/dev/disk/by-uuid/...`."""
        name = self.block_name(source)
        return None if name is None else self.by_name(name)

    def block_name(self, source: str) -> str | None:
        if not source.startswith("/dev/"):
            return None
        try:
            node = self.host.from_logical(source)
        except ValueError:
            return None
        # by-uuid and friends are symlinks into /dev; reading a link is harmless.
        try:
            target = os.path.realpath(node)
        except OSError:
            target = str(node)
        name = os.path.basename(target)
        if name in ("", ".", ".."):
            return None
        if (self.host.roots.sys / "class/block" / name).exists():
            return name
        # /dev/mapper/<name> is only a name: the kernel's name is dm-N, found through dm/name.
        if "/mapper/" in source or "/mapper/" in target:
            return self.dm_names().get(os.path.basename(source))
        return name

    def dm_names(self) -> dict[str, str]:
        if self._dm_names is None:
            self._dm_names = {}
            block = self.host.roots.sys / "class/block"
            for name in self.host.list_dir(block):
                if name.startswith("dm-"):
                    dm_name = self.host.read_text(block / name / "dm/name")
                    if dm_name:
                        self._dm_names[dm_name] = name
        return self._dm_names

    def by_dir(self, real: Path, depth: int = 0) -> frozenset[PciAddress]:
        cached = self._cache.get(real)
        if cached is not None:
            return cached
        self._cache[real] = frozenset()  # cycle guard
        found: set[PciAddress] = set()
        addr = deepest_pci_function(self.host, real)
        if addr is not None:
            found.add(addr)
        elif depth < _MAX_DEPTH:
            # A partition of a virtual disk (md0p1, a dm partition): its disk is the parent directory.
            if (real / "partition").exists():
                found |= self.by_dir(real.parent, depth + 1)
            # dm, md, LUKS, LVM, bcache: the devices stacked under this one.
            for slave in self.host.list_dir(real / "slaves"):
                slave_real = _resolve(real / "slaves" / slave)
                if slave_real is not None:
                    found |= self.by_dir(slave_real, depth + 1)
            # Native NVMe multipath: the disk hangs off a virtual subsystem whose controllers are the
            # PCI functions.
            subsys = _nvme_subsystem(real)
            if subsys is not None:
                for entry in self.host.list_dir(subsys):
                    if re.fullmatch(r"nvme\d+", entry):
                        ctrl = _resolve(subsys / entry)
                        if ctrl is not None:
                            ctrl_addr = deepest_pci_function(self.host, ctrl)
                            if ctrl_addr is not None:
                                found.add(ctrl_addr)
        result = frozenset(found)
        self._cache[real] = result
        return result

    def btrfs_siblings(self, name: str) -> list[str]:
        """Every device of the multi-device btrfs that `name` belongs to (mountinfo names only one)."""
        root = self.host.roots.sys / "fs/btrfs"
        for fs_uuid in self.host.list_dir(root):
            members = self.host.list_dir(root / fs_uuid / "devices")
            if name in members:
                return members
        return [name]


def _nvme_subsystem(real: Path) -> Path | None:
    for parent in real.parents:
        if parent.parent.name == "nvme-subsystem":
            return parent
    return None


def _storage(host: Host, uses: dict[PciAddress, _Uses]) -> None:
    blocks = _BlockResolver(host)
    # One line per (function, source) so bind mounts of one disk do not repeat it.
    listed: dict[PciAddress, dict[str, tuple[str, str]]] = {}

    def record(addrs: Iterable[PciAddress], source: str, mountpoint: str, text: str) -> None:
        for addr in addrs:
            per = listed.setdefault(addr, {})
            prev = per.get(source)
            # The shortest mount point is the one a person recognises (/ rather than /etc/hosts).
            if prev is None or len(mountpoint) < len(prev[0]):
                per[source] = (mountpoint, text)

    for m in procfs.mounts(host):
        if m.fstype in _SHARE_FS:
            addr = _share_function(host, m.source, m.fstype)
            if addr is None:
                _unmapped(m, "no virtio device exports that tag")
            else:
                share = f'{m.mountpoint} ({m.fstype} share "{m.source}")'
                record([addr], f"{m.fstype}:{m.source}", m.mountpoint, share)
            continue
        if m.fstype in _NETWORK_FS:
            continue
        match = _MAJMIN_RE.fullmatch(m.majmin)
        if match is None:
            continue
        anonymous = match[1] == "0"
        reals: list[Path] = []
        if not anonymous:
            real = _resolve(host.roots.sys / "dev/block" / m.majmin)
            if real is not None:
                reals.append(real)
        # btrfs and bcachefs report an anonymous device number: only the source names the device(s).
        if not reals and m.source.startswith("/dev/"):
            for src in m.source.split(":") if m.fstype == "bcachefs" else [m.source]:
                name = blocks.block_name(src)
                if name is not None:
                    real = _resolve(host.roots.sys / "class/block" / name)
                    if real is not None:
                        reals.append(real)
        if m.fstype == "btrfs" and reals:
            # A multi-device btrfs names one device; its other devices back it just as much.
            for sibling in blocks.btrfs_siblings(reals[0].name):
                real = _resolve(host.roots.sys / "class/block" / sibling)
                if real is not None and real not in reals:
                    reals.append(real)
        if not reals:
            if anonymous and not m.source.startswith("/dev/") and m.fstype not in _UNTRACEABLE_DISK_FS:
                continue  # proc, tmpfs, overlay, cgroup...: nothing underneath
            _unmapped(m, "its block device is not in sysfs")
            continue
        found: set[PciAddress] = set()
        for real in reals:
            found |= blocks.by_dir(real)
        if not found:
            if not all(r.name.startswith(_MEMORY_OR_FILE_BLOCK) for r in reals):
                _unmapped(m, "no PCI device is under its block device")
            continue
        record(found, m.source, m.mountpoint, f"{m.mountpoint} ({m.fstype} on {m.source})")

    for source in procfs.swap_partitions(host):  # a swap file's filesystem is checked as a mount
        swap_found = blocks.by_dev_path(source)
        if not swap_found:
            if not os.path.basename(source).startswith(_MEMORY_OR_FILE_BLOCK):
                _unmapped(
                    procfs.Mount("unknown", "swap", "swap", source), "it is not a block device in sysfs"
                )
            continue
        record(swap_found, source, "swap", f"swap ({source})")

    for addr, per in listed.items():
        items = sorted(per.values(), key=lambda mt: (mt[0] == "swap", len(mt[0]), mt[0]))
        uses.setdefault(addr, _Uses()).storage.extend(text for _mp, text in items)


# The daemon rescans on every listing: say it once per mount per process at WARNING, then at DEBUG, so the
# journal keeps the news without repeating it on every call.
_warned: set[tuple[str, str, str]] = set()


def _unmapped(m: procfs.Mount, why: str) -> None:
    key = (m.mountpoint, m.source, m.majmin)
    level = logging.DEBUG if key in _warned else logging.WARNING
    _warned.add(key)
    log.log(
        level,
        "cannot tell which PCI device backs %s (%s on %s, device %s: %s); it is not protected from "
        "passthrough",
        m.mountpoint,
        m.fstype,
        m.source,
        m.majmin,
        why,
    )


def _share_function(host: Host, tag: str, fstype: str) -> PciAddress | None:
    """The PCI function of the virtio device exporting a 9p or virtiofs tag."""
    virtio = host.roots.sys / "bus/virtio/devices"
    candidates: list[Path] = []
    for dev in host.list_dir(virtio):
        for attr in ("mount_tag", "tag"):
            value = host.read_text(virtio / dev / attr)
            # virtio-9p's mount_tag ends in a NUL byte.
            if value is not None and value.rstrip("\x00").strip() == tag:
                candidates.append(virtio / dev)
    if fstype == "virtiofs":
        # Linux 6.9+ also lists virtiofs instances with their tag and device link.
        fs = host.roots.sys / "fs/virtiofs"
        for inst in host.list_dir(fs):
            if (host.read_text(fs / inst / "tag") or "").strip() == tag:
                candidates.append(fs / inst / "device")
    for cand in candidates:
        real = _resolve(cand)
        if real is not None:
            addr = deepest_pci_function(host, real)
            if addr is not None:
                return addr
    return None


# ----- network ----------------------------------------------------------------------------------------


def _iface_functions(host: Host, ifname: str, seen: set[str]) -> dict[PciAddress, str]:
    """PCI functions under a network interface, following bonds, bridges, VLANs, macvlans and teams,
    each with the PCI-side interface name."""
    if ifname in seen or len(seen) > 64 or _NAME_RE.fullmatch(ifname) is None or ifname in (".", ".."):
        return {}
    seen.add(ifname)
    net = host.roots.sys / "class/net"
    real = _resolve(net / ifname)
    if real is None:
        return {}
    addr = deepest_pci_function(host, real)
    if addr is not None:
        return {addr: ifname}
    lowers: list[str] = []
    for entry in host.list_dir(real):
        if entry.startswith("lower_"):
            lowers.append(entry[len("lower_") :])
    lowers.extend(host.list_dir(real / "brif"))
    lowers.extend((host.read_text(real / "bonding/slaves") or "").split())
    out: dict[PciAddress, str] = {}
    for lower in sorted(set(lowers)):
        out.update(_iface_functions(host, lower, seen))
    return out


def _routes(host: Host, uses: dict[PciAddress, _Uses]) -> None:
    for ifname, families in sorted(procfs.default_route_interfaces(host).items()):
        found = _iface_functions(host, ifname, set())
        if not found:
            log.debug("default route via %s has no PCI device under it", ifname)
        for addr, leaf in found.items():
            u = uses.setdefault(addr, _Uses())
            u.routes.setdefault(ifname, set()).update(families)
            u.route_leaves.setdefault(ifname, set()).add(leaf)


# ----- console ----------------------------------------------------------------------------------------

# Frame buffers the firmware set up (efifb, vesafb, simplefb/simpledrm): they live in the boot VGA's
# memory but their `device` is a platform device, not the PCI function.
_FIRMWARE_FB_RE = re.compile(r"(efi|vesa|simple)-framebuffer")


def _console(host: Host, uses: dict[PciAddress, _Uses]) -> None:
    vt = host.roots.sys / "class/vtconsole"
    fb_console: str | None = None
    vga_console: str | None = None
    for name in host.list_dir(vt):
        if host.read_text(vt / name / "bind") != "1":
            continue
        desc = host.read_text(vt / name / "name") or ""
        if "frame buffer" in desc and fb_console is None:
            fb_console = name
        # vgacon ("(S) VGA+") drives the boot VGA's legacy text mode directly.
        elif "VGA" in desc and vga_console is None:
            vga_console = name
    if fb_console is None and vga_console is None:
        return
    targets: dict[PciAddress, str] = {}
    firmware_console: str | None = vga_console
    if fb_console is not None:
        graphics = host.roots.sys / "class/graphics"
        for fb in host.list_dir(graphics):
            if not fb.startswith("fb"):
                continue
            real = _resolve(graphics / fb / "device")
            if real is None:
                continue
            addr = deepest_pci_function(host, real)
            if addr is not None:
                targets.setdefault(addr, fb_console)
            elif _FIRMWARE_FB_RE.search(real.name):
                firmware_console = firmware_console or fb_console
    candidates = dict(targets)
    if firmware_console is not None:
        for addr in _boot_vga_functions(host):
            candidates.setdefault(addr, firmware_console)
    for addr, vtcon in sorted(candidates.items()):
        if host.read_text(host.device_dir(addr) / "boot_vga") == "1":
            uses.setdefault(addr, _Uses()).console = vtcon


def _boot_vga_functions(host: Host) -> list[PciAddress]:
    out = []
    for addr in host.pci_addresses():
        if host.read_text(host.device_dir(addr) / "boot_vga") == "1":
            out.append(addr)
    return out


# ----- phrasing ---------------------------------------------------------------------------------------


def _phrase(u: _Uses) -> str:
    parts: list[str] = []
    if u.storage:
        shown = u.storage[:_MAX_LISTED]
        rest = len(u.storage) - len(shown)
        if rest:
            parts.append("backs " + ", ".join(shown) + f" and {rest} more")
        else:
            parts.append("backs " + _join(shown))
    if u.routes:
        routes = []
        for ifname, families in sorted(u.routes.items()):
            leaves = sorted(u.route_leaves.get(ifname, set()) - {ifname})
            through = f" (through {_join(leaves)})" if leaves else ""
            routes.append(f"the {' and '.join(sorted(families))} default route via {ifname}{through}")
        parts.append("carries " + _join(routes))
    if u.console is not None:
        parts.append(
            "is the boot VGA with the console bound to it (unbind it: echo 0 > "
            f"/sys/class/vtconsole/{u.console}/bind)"
        )
    return "; it also ".join(parts)


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]
