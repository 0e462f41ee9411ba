"""`build(root, profile)`: lay out a simulated host under `root` and boot its kernel.

This module owns the parts of the tree that do not change while the host runs: the sysfs skeleton (buses,
classes, root bridges, IOMMU unit, NUMA nodes, vtconsole names), /proc files fixed at boot (cmdline,
mountinfo, swaps, routes) and /etc. Everything that reacts to writes (devices, drivers, modules, groups,
/dev nodes, boot_id) is rendered by `SimulatedKernel.boot` from the profile and the kernel's state.

`root/sys`, `root/dev`, `root/proc` and `root/etc` are what `HostRoots.under(root)` expects; `root/sim`
holds the simulator's own files:

    sim/profile.json     the profile (devices, drivers, modules, ...), fixed at build
    sim/state.json       the kernel's state (drivers bound, overrides, minors, modules, boot id, ...)
    sim/lock             flock taken while the state and tree change
    sim/locks/<addr>     per-device flock, held for a whole write that concerns the device
    sim/faults/          injected faults (see faults.py)
    sim/trace.jsonl      every write: path, value, result, duration
    sim/uevents.jsonl    uevents: seq, action, devpath, subsystem, driver, pci_address
    sim/nodes.json       node owners recorded when not running as root
    sim/hidden-fd/<pid>  fd links of processes whose /proc/<pid>/fd was made unreadable
    sim/blocked/<addr>   present while an unbind of <addr> waits for a process to let go
"""

from __future__ import annotations

import os
from pathlib import Path

from vfiod_sim.kernel import SimulatedKernel
from vfiod_sim.machines import get_profile
from vfiod_sim.modalias import modules_alias
from vfiod_sim.model import Profile
from vfiod_sim.render import HUGEPAGE_SIZES
from vfiod_sim.state import Topology
from vfiod_sim.tree import DIR, Tree, apply_tree, file_entry, put_link

_CLASSES = ("block", "drm", "graphics", "iommu", "net", "nvme", "sound", "vtconsole")

# Intel VT-d extended capability register: bit 3 is interrupt remapping (IR).
ECAP_WITH_IR = "19e2ff0505e"
ECAP_WITHOUT_IR = "19e2ff05056"


def static_tree(topo: Topology) -> Tree:
    prof = topo.profile
    t: Tree = {}
    for d in (
        "sys",
        "sys/devices",
        "sys/devices/system",
        "sys/devices/system/node",
        "sys/devices/virtual",
        "sys/devices/virtual/vtconsole",
        "sys/bus",
        "sys/bus/pci",
        "sys/bus/pci/devices",
        "sys/bus/pci/drivers",
        "sys/bus/virtio",
        "sys/bus/virtio/devices",
        "sys/class",
        "sys/dev",
        "sys/dev/block",
        "sys/kernel",
        "sys/kernel/iommu_groups",
        "sys/kernel/mm",
        "sys/kernel/mm/hugepages",
        "sys/module",
        "dev",
        "dev/dri",
        "dev/dri/by-path",
        "dev/snd",
        "proc",
        "proc/self",
        "proc/net",
        "proc/sys",
        "proc/sys/kernel",
        "proc/sys/kernel/random",
        "proc/driver",
        "etc",
        "etc/modprobe.d",
        "etc/driverctl.d",
    ):
        t[d] = DIR
    for c in _CLASSES:
        t[f"sys/class/{c}"] = DIR
    for size in HUGEPAGE_SIZES:
        t[f"sys/kernel/mm/hugepages/hugepages-{size}"] = DIR
    for bus in topo.root_buses:
        t[bus] = DIR
    t["sys/bus/pci/drivers_probe"] = file_entry(b"", 0o200)
    t["sys/bus/pci/rescan"] = file_entry(b"", 0o200)

    n = prof.cpus_per_node
    for node in range(prof.numa_nodes):
        t[f"sys/devices/system/node/node{node}"] = DIR
        t[f"sys/devices/system/node/node{node}/cpulist"] = file_entry(f"{node * n}-{(node + 1) * n - 1}\n")
    online = "0" if prof.numa_nodes == 1 else f"0-{prof.numa_nodes - 1}"
    t["sys/devices/system/node/online"] = file_entry(online + "\n")
    t["sys/devices/system/node/possible"] = file_entry(online + "\n")

    if prof.iommu:
        base = "sys/devices/virtual/iommu/dmar0"
        t["sys/devices/virtual/iommu"] = DIR
        t[base] = DIR
        t[f"{base}/intel-iommu"] = DIR
        t[f"{base}/intel-iommu/ecap"] = file_entry(
            (ECAP_WITH_IR if prof.interrupt_remapping else ECAP_WITHOUT_IR) + "\n"
        )
        t[f"{base}/intel-iommu/cap"] = file_entry("d2008c40660462\n")
        t[f"{base}/intel-iommu/version"] = file_entry("1:0\n")
        put_link(t, "sys/class/iommu/dmar0", base)

    for index, name in enumerate(prof.vtconsoles):
        d = f"sys/devices/virtual/vtconsole/vtcon{index}"
        t[d] = DIR
        t[f"{d}/name"] = file_entry(name + "\n")
        put_link(t, f"sys/class/vtconsole/vtcon{index}", d)

    t["dev/null"] = file_entry(b"", 0o666)
    if prof.iommufd:
        t["dev/iommu"] = file_entry(b"", 0o660)
    t["proc/cmdline"] = file_entry(prof.cmdline + "\n")
    t["proc/net/route"] = file_entry(route_text(prof))
    t["proc/net/ipv6_route"] = file_entry(ipv6_route_text(prof))
    modules = f"lib/modules/{prof.kernel_release}"
    for d in ("lib", "lib/modules", modules):
        t[d] = DIR
    t[f"{modules}/modules.alias"] = file_entry(modules_alias(prof))
    for rel, text in prof.etc_files:
        parts = rel.split("/")
        for i in range(1, len(parts)):
            t["etc/" + "/".join(parts[:i])] = DIR
        t[f"etc/{rel}"] = file_entry(text, 0o644)
    return t


def route_text(prof: Profile) -> str:
    """/proc/net/route (net/ipv4/fib_trie.c fib_route_seq_show): each line padded to 127 characters,
    addresses in network byte order printed as little-endian hex."""
    rows = ["Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT"]
    ifname = prof.default_route_ifname
    if ifname:
        rows.append(f"{ifname}\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0")
        rows.append(f"{ifname}\t0001A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0")
    return "".join(f"{r:<127}\n" for r in rows)


def ipv6_route_text(prof: Profile) -> str:
    """/proc/net/ipv6_route (net/ipv6/route.c rt6_info_seq_show)."""
    zero = "0" * 32
    link_local = "fe80" + "0" * 28
    gateway = "fe80" + "0" * 27 + "1"
    rows = [f"{'0' * 31}1 80 {zero} 00 {zero} 00000000 00000001 00000000 00000001       lo"]
    ifname = prof.default_route_ifname
    if ifname:
        rows[:0] = [
            f"{zero} 00 {zero} 00 {gateway} 00000400 00000001 00000000 00450003 {ifname:>8}",
            f"{link_local} 40 {zero} 00 {zero} 00000100 00000001 00000000 00000001 {ifname:>8}",
        ]
    return "".join(r + "\n" for r in rows)


def _escape(path: str) -> str:
    """mountinfo and /proc/swaps escape space, tab, newline and backslash as octal."""
    return "".join(f"\\{ord(ch):03o}" if ch in " \t\n\\" else ch for ch in path)


def mounts_text(prof: Profile, devnums: dict[str, str]) -> tuple[str, str]:
    """(/proc/self/mountinfo, /proc/swaps) for the profile's mounts; a `/dev/<block>` source gets the
    major:minor the kernel gave that block device."""
    anon = iter(range(40, 1000))
    lines = []
    swaps = ["Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority"]
    root_id = 26
    next_id = 27
    mounts = sorted(prof.mounts, key=lambda m: (m.mountpoint != "/", m.mountpoint))
    for m in mounts:
        if m.fstype == "swap":
            swaps.append(f"{_escape(m.source)}\tpartition\t8388604\t\t0\t\t-2")
            continue
        name = os.path.basename(m.source) if m.source.startswith("/dev/") else ""
        majmin = devnums.get(name) or f"0:{next(anon)}"
        if m.mountpoint == "/":
            ident, parent, tag = root_id, 1, "shared:1"
        else:
            ident, parent, tag = next_id, root_id, f"shared:{next_id}"
            next_id += 1
        where = f"{ident} {parent} {majmin} / {_escape(m.mountpoint)}"
        lines.append(f"{where} {m.options} {tag} - {m.fstype} {m.source} rw")
    for mp, fstype, source, majmin, opts in (
        ("/sys", "sysfs", "sysfs", "0:20", "rw,nosuid,nodev,noexec,relatime"),
        ("/proc", "proc", "proc", "0:21", "rw,nosuid,nodev,noexec,relatime"),
        ("/dev", "devtmpfs", "udev", "0:5", "rw,nosuid,relatime"),
        ("/run", "tmpfs", "tmpfs", "0:25", "rw,nosuid,nodev,noexec,relatime"),
    ):
        lines.append(f"{next_id} {root_id} {majmin} / {mp} {opts} shared:{next_id} - {fstype} {source} rw")
        next_id += 1
    return "".join(line + "\n" for line in lines), "".join(s + "\n" for s in swaps)


def _check_root(root: Path) -> None:
    real = Path(os.path.realpath(root))
    if real == Path("/") or real.parent == real:
        raise ValueError("refusing to build a simulated host over /")
    if real.exists():
        if not real.is_dir():
            raise NotADirectoryError(str(root))
        if any(real.iterdir()):
            raise FileExistsError(f"{root} is not empty: build a simulated host in a new or empty directory")


def build(root: Path | str, profile: Profile | str) -> SimulatedKernel:
    """Lay out `profile` (a Profile or a name for `get_profile`) under `root` (new or empty) and boot it."""
    prof = get_profile(profile) if isinstance(profile, str) else profile
    prof.validate()
    root = Path(os.path.abspath(root))
    _check_root(root)
    (root / "sim" / "locks").mkdir(parents=True, exist_ok=True)
    (root / "sim" / "faults").mkdir()
    (root / "sim" / "profile.json").write_text(prof.to_json(), encoding="utf-8")
    kernel = SimulatedKernel(root)
    apply_tree(root, {}, static_tree(kernel.topology))
    kernel.boot(first=True)
    # mountinfo names block devices by the numbers the kernel gave them at boot
    mountinfo, swaps = mounts_text(prof, kernel.block_devnums())
    apply_tree(root, {}, {"proc/self/mountinfo": file_entry(mountinfo), "proc/swaps": file_entry(swaps)})
    return kernel
