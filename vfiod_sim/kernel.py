"""`SimulatedKernel`: a `KernelBackend` that keeps a Linux 6.1 /sys, /dev and /proc tree under a directory and
reacts to writes the way the kernel does (driver_override, bind, unbind, drivers_probe, remove, rescan,
new_id, vtconsole bind), plus the VFIO group status ioctl and group-node ownership.

This module is the facade: the `KernelBackend` calls, boot, what an admin or the hardware does (modprobe,
unplug, a swapped card) and inspection. The rules are in `driver_core` and `writes`, the state and its
commit protocol in `state` and `transactions`, the tree in `render` and `tree`. The tree is a pure
function of (profile, state). Symlinks are relative, so the tree can be moved. docs/kernel-rules.md
lists the rules imitated and where they live in Linux.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from vfiod.host.backend import VFIO_GROUP_FLAGS_VIABLE, NodeOwner
from vfiod_sim import faults, nodes, processes
from vfiod_sim.driver_core import Core, Op
from vfiod_sim.model import PCI_ANY_ID, CardIdentity, MatchEntry, Profile
from vfiod_sim.state import DevState, KState, Topology, all_keys
from vfiod_sim.transactions import POLL_INTERVAL, Transactions
from vfiod_sim.tree import oserror
from vfiod_sim.writes import classify


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
        self.tx = Transactions(self.root, lambda: self.topology)

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

    # ----- KernelBackend ---------------------------------------------------------------------------

    def _logical(self, path: Path) -> str:
        p = os.path.abspath(path)
        rel = os.path.relpath(p, self.root)
        if rel == ".." or rel.startswith("../") or os.path.isabs(rel):
            raise oserror(errno.EACCES, f"{path} is outside the simulated tree {self.root}")
        return "/" + rel if rel != "." else "/"

    def _resolved_logical(self, path: Path) -> str:
        real = os.path.realpath(path)
        rel = os.path.relpath(real, self._root_real)
        if rel == ".." or rel.startswith("../"):
            raise oserror(errno.EACCES, f"{path} resolves outside the simulated tree")
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

    def _write(self, given: str, resolved: str, data: bytes) -> None:
        op, lock_addr = classify(self.topology, resolved[1:], data)
        if not data:
            return  # fs/sysfs/file.c sysfs_kf_write: a zero-length write is a no-op
        boot_id = self.boot_id()
        paths = (given, resolved) if given != resolved else (given,)
        with self.tx.device_locks([lock_addr] if lock_addr else []):
            self._write_faults(paths, data)
            self.tx.run(op, paths=paths, boot_id=boot_id, label=f"{given} <- {data!r}")

    def _write_faults(self, paths: tuple[str, ...], data: bytes) -> None:
        """hang / errno / delay faults, applied while the device lock is held (as a driver's slow or stuck
        remove holds it in the kernel)."""
        for fault in faults.load_all(self.root):
            if not fault.applies_to_write(paths, data):
                continue
            with self.tx.global_lock():
                if not faults.take(self.root, fault.name):
                    continue
            if fault.kind == "errno":
                raise oserror(fault.error_number(), f"injected fault {fault.name}")
            if fault.kind == "delay":
                time.sleep(fault.seconds)
            elif fault.kind == "hang":
                if faults.released(self.root, fault.name):
                    continue
                with self.tx.global_lock():
                    faults.set_hung(self.root, fault.name, True)
                try:
                    while not faults.released(self.root, fault.name):
                        time.sleep(POLL_INTERVAL)
                finally:
                    with self.tx.global_lock():
                        faults.set_hung(self.root, fault.name, False)
                if fault.then == "fail":
                    raise oserror(fault.error_number(), f"injected fault {fault.name} failed after release")

    def _node(self, node: Path) -> tuple[str, int]:
        logical = self._logical(node)
        return logical, nodes.vfio_group(logical, node)

    def vfio_group_status(self, node: Path) -> int:
        """open(/dev/vfio/N) + VFIO_GROUP_GET_STATUS: EBUSY if another process has the group open (one
        opener per group); VIABLE iff no member is bound to a driver that claims DMA ownership."""
        logical, group = self._node(node)
        with self.tx.global_lock():
            st = self.tx.load()
            mdevs = [u for u, m in st.mdevs.items() if m.group == group]
            if mdevs:  # an mdev's group: an emulated IOMMU, always viable; one opener as for any group
                if processes.holders(self.root, [logical]) or processes.vfio_device_holders(self.root, mdevs):
                    raise oserror(errno.EBUSY, f"{logical} is already open")
                return VFIO_GROUP_FLAGS_VIABLE
            members = [a for a in self.topology.groups.get(group, []) if st.devices[a].present]
            # vfio_group_fops_open: one opener; a device file holds the group file, so a VMM that closed
            # its group fd but kept a device fd (or a mapping of one) still has the group open
            if processes.holders(self.root, [logical]) or processes.vfio_device_holders(self.root, members):
                raise oserror(errno.EBUSY, f"{logical} is already open")
            if not members:
                raise oserror(errno.ENODEV, logical)
            viable = all(
                st.devices[a].driver is None
                or self.topology.drivers[str(st.devices[a].driver)].driver_managed_dma
                or "vfio" in st.devices[a].minors  # nvidia.ko as the VFIO driver of a vendor-VFIO VF
                for a in members
            )
        return VFIO_GROUP_FLAGS_VIABLE if viable else 0

    def set_node_owner(self, node: Path, owner: NodeOwner) -> None:
        """chown + chmod: for real as root; otherwise recorded in sim/nodes.json (an unprivileged demo)."""
        logical = self._logical(node)
        with self.tx.global_lock():
            nodes.set_owner(self.sim, logical, node, owner)

    def node_owner(self, node: Path) -> NodeOwner:
        return nodes.owner_of(self.sim, self._logical(node), node)

    # ----- boot ------------------------------------------------------------------------------------

    def _boot_state(self, prev: KState | None) -> tuple[KState, Core]:
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
        core = Core(self.root, topo, st, ())
        core.st = st
        core.quiet = True  # boot-time uevents happen before anyone listens (udev replays them)
        core.booting = True
        for addr in topo.order:
            if core.reachable(addr) and topo.devices[addr].physfn is None:  # VFs wait for sriov_numvfs
                st.devices[addr].present = True
        # built-in drivers register at device_initcall, then modules load in profile order
        for driver in prof.drivers:
            if driver.module is None:
                core.register_driver(driver.name)
        for module in prof.modules:
            if module.loaded:
                core.load_module(module.name)
        for addr in topo.order:  # a boot script enabling VFs (sriov-manage -e ALL): probed as they come
            if topo.devices[addr].numvfs_at_boot and st.devices[addr].present:
                core.sriov_enable(addr, topo.devices[addr].numvfs_at_boot)
        return st, core

    def boot(self, *, first: bool = False) -> None:
        """Start the kernel: the profile's boot state, its processes, no recorded node owners."""
        topo = self.topology
        with self.tx.global_lock():
            prev = None if first else self.tx.load()
            st, _core = self._boot_state(prev)
            self.tx.replace(prev, st, sorted(all_keys(topo, *([prev] if prev else []))))
            nodes.reset(self.sim)
            shutil.rmtree(self.sim / "blocked", ignore_errors=True)
            processes.reset(self.root, topo.profile)

    def reboot(self) -> None:
        """Reboot: a new boot_id; drivers back to native, overrides and new_ids gone, removed devices back,
        /dev/vfio nodes gone, only the profile's processes running. A swapped or unplugged card stays so."""
        self.boot()

    # ----- control: what an admin or the hardware does --------------------------------------------

    def _control(self, op: Op, label: str) -> None:
        self.tx.run(op, label=label)

    def load_module(self, name: str) -> None:
        """modprobe NAME: load it and its dependencies; its drivers probe every matching unbound device."""
        module = name.replace("-", "_")
        if module not in self.topology.modules:
            raise oserror(errno.ENOENT, f"modprobe: FATAL: Module {name} not found")
        self._control(lambda c: c.load_module(module), f"modprobe {module}")

    def unload_module(self, name: str) -> None:
        """rmmod NAME: EBUSY while another module needs it or a process holds its nodes; its drivers'
        devices are unbound first."""
        module = name.replace("-", "_")
        if module not in self.topology.modules:
            raise oserror(errno.ENOENT, f"rmmod: ERROR: Module {name} is not currently loaded")
        self._control(lambda c: c.unload_module(module), f"rmmod {module}")

    def sriov_manage(self, pf: str, *, enable: bool) -> None:
        """NVIDIA's /usr/lib/nvidia/sriov-manage -e|-d PF. `-d`: fails ("Cannot obtain unbindLock") while
        any process holds the GPU (its /dev/nvidiaN, a VF's VFIO nodes or device files); else every VF
        leaves the bus with its vGPU. `-e`: all VFs (`sriov_totalvfs`) join it and bind to `nvidia`; with
        VFs already enabled it changes nothing ("already has VFs enabled"), exit 0."""
        a = self._check_addr(pf)

        def op(c: Core) -> None:
            ds = c.st.devices[a]
            if not ds.present or ds.driver != "nvidia":
                raise oserror(errno.ENODEV, f"{a} is not an NVIDIA GPU bound to nvidia")
            vfs = c.topo.vfs[a][: ds.numvfs]
            if enable:
                if not ds.numvfs:
                    c.sriov_enable(a, c.topo.devices[a].sriov_totalvfs)
                return
            paths = {p for vf in vfs for p in c.vfio_nodes(vf)} | c.device_nodes(a)
            if c.holders(paths) or c.device_file_holders(vfs):
                raise oserror(errno.EBUSY, f"Cannot obtain unbindLock for {a}")
            c.sriov_disable(a)

        self._control(op, f"sriov-manage {'-e' if enable else '-d'} {a}")

    def _check_addr(self, addr: str) -> str:
        addr = str(addr)
        if addr not in self.topology.devices:
            raise KeyError(f"profile {self.profile.name} has no device {addr}")
        return addr

    def unplug(self, addr: str) -> None:
        """The card is pulled (surprise removal): it and everything behind it leave the bus, unbound
        without waiting for users. It stays gone across reboots until `replug`."""
        a = self._check_addr(addr)

        def op(c: Core) -> None:
            if a not in c.st.unplugged:
                c.st.unplugged.append(a)
            c.remove_device(a, force=True)

        self._control(op, f"unplug {a}")

    def replug(self, addr: str) -> None:
        """The card is back in its slot: it (and what is behind it) is added and probed."""
        a = self._check_addr(addr)

        def op(c: Core) -> None:
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

        def op(c: Core) -> None:
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

        def op(c: Core) -> None:
            c.st.extra_ids.setdefault(driver, []).append(entry)

        self._control(op, f"add match to {driver}")

    # ----- inspection ------------------------------------------------------------------------------

    def state(self) -> KState:
        """A snapshot of the kernel's state (read under the lock)."""
        with self.tx.global_lock():
            return self.tx.load()

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
