"""The one gateway to sysfs, /dev, /proc and /etc.

A `Host` carries the four roots (default `/sys`, `/dev`, `/proc`, `/etc`) and is the only way any vfiod code
touches them, so tests and the demo point it at a simulated tree. Reads are plain file reads. Writes take
only validated PCI addresses and driver names, go through the `KernelBackend`, run in a worker thread with a
per-attribute deadline, and are logged with path, value, result and duration. A write that misses its
deadline raises `SysfsTimeout`; if it completes later, the late result is reported to listeners so the
caller can move the device to its real state.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from vfiod.host.backend import KernelBackend, LinuxKernel, NodeOwner
from vfiod.host.pciaddr import DriverName, InvalidDriverName, InvalidPciAddressText, PciAddress

log = logging.getLogger("vfiod.host")


@dataclass(frozen=True)
class HostRoots:
    """Where the kernel's file systems are mounted (a simulated tree puts them under one directory)."""

    sys: Path = Path("/sys")
    dev: Path = Path("/dev")
    proc: Path = Path("/proc")
    etc: Path = Path("/etc")

    @classmethod
    def under(cls, root: Path) -> HostRoots:
        return cls(sys=root / "sys", dev=root / "dev", proc=root / "proc", etc=root / "etc")


# Drivers whose probe or remove routinely takes seconds (GPU firmware load, memory training).
SLOW_DRIVERS: dict[str, float] = {
    "nvidia": 60.0,
    "nouveau": 60.0,
    "amdgpu": 60.0,
    "radeon": 30.0,
    "i915": 30.0,
    "xe": 30.0,
    "mlx5_core": 30.0,
}


@dataclass(frozen=True)
class DeadlinePolicy:
    """How long one sysfs write may take, by the driver it involves."""

    default: float = 10.0
    per_driver: dict[str, float] = field(default_factory=lambda: dict(SLOW_DRIVERS))

    def for_driver(self, driver: str | None) -> float:
        if driver is None:
            return self.default
        return max(self.default, self.per_driver.get(driver, self.default))


class HostError(Exception):
    """Base of the host layer's errors; the core maps them to the contract's names."""


class SysfsWriteError(HostError):
    """The kernel refused a write (the errno says why)."""

    def __init__(self, path: str, value: str, err: OSError) -> None:
        self.path = path
        self.value = value
        self.errno = err.errno or errno.EIO
        self.errname = errno.errorcode.get(self.errno, str(self.errno))
        super().__init__(f"writing {value!r} to {path} failed: {self.errname} ({os.strerror(self.errno)})")


class SysfsTimeout(HostError):
    """A write did not return within its deadline; it may still complete later."""

    def __init__(self, path: str, value: str, deadline: float) -> None:
        self.path = path
        self.value = value
        self.deadline = deadline
        super().__init__(f"writing {value!r} to {path} did not complete within {deadline:g} s")


class SysfsBusy(HostError):
    """A write refused before it started, because the kernel still has an earlier one: on this device
    (whose lock it holds, so this one would hang behind it), or too many writes past their deadline."""

    def __init__(self, path: str, value: str, reason: str) -> None:
        self.path = path
        self.value = value
        super().__init__(f"writing {value!r} to {path} was not tried: {reason}")


@dataclass(frozen=True)
class PendingWrite:
    """A write that missed its deadline and has not returned from the kernel yet."""

    path: str
    value: str
    pci_address: str | None
    since: float  # wall-clock time the write started

    def describe(self) -> str:
        started = time.strftime("%H:%M:%S", time.localtime(self.since))
        return (
            f"{self.path} <- {self.value!r} (pending since {started}, {time.time() - self.since:.0f} s ago)"
        )


class ProcUnreadable(HostError):
    """A process's /proc entry could not be read; a busy check must not treat that as 'free'."""

    def __init__(self, pid: int, what: str, err: OSError) -> None:
        self.pid = pid
        self.what = what
        self.errno = err.errno or errno.EIO
        super().__init__(f"cannot read /proc/{pid}/{what}: {os.strerror(self.errno)}")


@dataclass(frozen=True)
class WriteRecord:
    """One sysfs write as it happened: what the log, the trace and late-completion listeners see."""

    path: str  # logical path, e.g. /sys/bus/pci/drivers/vfio-pci/unbind
    value: str
    result: str  # "ok", an errno name, or "timeout"
    duration: float
    pci_address: str | None
    late: bool = False


WriteListener = Callable[[WriteRecord], None]


@dataclass(frozen=True)
class ProcessInfo:
    """What the busy checks need to know about a process holding something open."""

    pid: int
    uid: int | None
    exe: str
    comm: str
    cgroup: str


MAX_HUNG_WRITES: Final = 64  # writes left inside the kernel past their deadline, one thread each


class Host:
    """Access to one Linux host (real or simulated) through its roots."""

    def __init__(
        self,
        roots: HostRoots | None = None,
        backend: KernelBackend | None = None,
        deadlines: DeadlinePolicy | None = None,
    ) -> None:
        self.roots = roots or HostRoots()
        self.backend: KernelBackend = backend or LinuxKernel()
        self.deadlines = deadlines or DeadlinePolicy()
        self._listeners: list[WriteListener] = []
        self._listeners_lock = threading.Lock()
        # Writes that missed their deadline and are still in the kernel: path -> (pci address, value).
        self._pending: dict[int, PendingWrite] = {}
        self._pending_lock = threading.Lock()

    # ----- paths ---------------------------------------------------------------------------------------

    @property
    def pci_devices_dir(self) -> Path:
        return self.roots.sys / "bus/pci/devices"

    @property
    def pci_drivers_dir(self) -> Path:
        return self.roots.sys / "bus/pci/drivers"

    @property
    def iommu_groups_dir(self) -> Path:
        return self.roots.sys / "kernel/iommu_groups"

    def device_dir(self, addr: PciAddress) -> Path:
        return self.pci_devices_dir / addr

    def driver_dir(self, driver: DriverName) -> Path:
        return self.pci_drivers_dir / driver

    def vfio_group_node(self, group: int) -> Path:
        return self.roots.dev / "vfio" / str(int(group))

    def logical(self, path: Path) -> str:
        """The path as the kernel names it (`/sys/...`), whatever root it lives under."""
        for name in ("sys", "dev", "proc", "etc"):
            root: Path = getattr(self.roots, name)
            try:
                rel = path.relative_to(root)
            except ValueError:
                continue
            return f"/{name}" if str(rel) == "." else f"/{name}/{rel}"
        return str(path)

    def from_logical(self, logical: str) -> Path:
        """Map a kernel path (`/dev/vfio/12`) to where it lives under the roots."""
        for name in ("sys", "dev", "proc", "etc"):
            prefix = f"/{name}"
            if logical == prefix or logical.startswith(prefix + "/"):
                root: Path = getattr(self.roots, name)
                return root / logical[len(prefix) + 1 :] if logical != prefix else root
        raise ValueError(f"{logical!r} is not under /sys, /dev, /proc or /etc")

    # ----- generic reads -------------------------------------------------------------------------------

    @staticmethod
    def read_text(path: Path) -> str | None:
        """Contents of a small file, stripped; None if it does not exist or cannot be read."""
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.read().strip()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, OSError):
            return None

    @staticmethod
    def link_name(path: Path) -> str | None:
        """Base name of a symlink's target (`driver` -> `vfio-pci`), None if there is no link."""
        try:
            return os.path.basename(os.readlink(path))
        except OSError:
            return None

    @staticmethod
    def list_dir(path: Path) -> list[str]:
        try:
            return sorted(os.listdir(path))
        except OSError:
            return []

    # ----- PCI ----------------------------------------------------------------------------------------

    def pci_addresses(self) -> list[PciAddress]:
        out: list[PciAddress] = []
        for name in self.list_dir(self.pci_devices_dir):
            try:
                out.append(PciAddress.parse(name))
            except InvalidPciAddressText:
                continue
        return sorted(out)

    def device_exists(self, addr: PciAddress) -> bool:
        return self.device_dir(addr).is_dir()

    def attr(self, addr: PciAddress, name: str) -> str | None:
        return self.read_text(self.device_dir(addr) / name)

    def hex_attr(self, addr: PciAddress, name: str) -> str | None:
        """A `0x10de`-style attribute as `10de` (class as 6 digits)."""
        raw = self.attr(addr, name)
        if raw is None:
            return None
        raw = raw.lower()
        return raw[2:] if raw.startswith("0x") else raw

    def driver(self, addr: PciAddress) -> DriverName | None:
        name = self.link_name(self.device_dir(addr) / "driver")
        if name is None:
            return None
        try:
            return DriverName.parse(name)
        except InvalidDriverName:
            return None

    def driver_module(self, addr: PciAddress) -> DriverName | None:
        """The module providing the bound driver (`<dev>/driver/module`), None if built in or unbound."""
        name = self.link_name(self.device_dir(addr) / "driver" / "module")
        if name is None:
            return None
        try:
            return DriverName.parse(name)
        except InvalidDriverName:
            return None

    def driver_override(self, addr: PciAddress) -> str | None:
        raw = self.attr(addr, "driver_override")
        # Linux prints "(null)" when no override is set.
        if raw is None or raw in ("", "(null)"):
            return None
        return raw

    def iommu_group(self, addr: PciAddress) -> int | None:
        name = self.link_name(self.device_dir(addr) / "iommu_group")
        if name is None:
            return None
        try:
            return int(name)
        except ValueError:
            return None

    def iommu_groups(self) -> list[int]:
        out = []
        for name in self.list_dir(self.iommu_groups_dir):
            if name.isdigit():
                out.append(int(name))
        return sorted(out)

    def group_members(self, group: int) -> list[PciAddress]:
        out: list[PciAddress] = []
        for name in self.list_dir(self.iommu_groups_dir / str(int(group)) / "devices"):
            try:
                out.append(PciAddress.parse(name))
            except InvalidPciAddressText:
                continue
        return sorted(out)

    def has_vfio_dev(self, addr: PciAddress) -> bool:
        """The device is bound to vfio-pci or a vfio variant driver (it has a `vfio-dev/` directory)."""
        return bool(self.list_dir(self.device_dir(addr) / "vfio-dev"))

    def driver_loaded(self, driver: DriverName) -> bool:
        return self.driver_dir(driver).is_dir()

    def module_loaded(self, module: str) -> bool:
        return (self.roots.sys / "module" / module).is_dir()

    def real_device_path(self, addr: PciAddress) -> str:
        """The device's location in /sys/devices (the resolved bus link), as a logical path."""
        try:
            return self.logical(self.device_dir(addr).resolve(strict=True))
        except OSError:
            return self.logical(self.device_dir(addr))

    # ----- writes ------------------------------------------------------------------------------------

    def add_write_listener(self, listener: WriteListener) -> None:
        with self._listeners_lock:
            self._listeners.append(listener)

    def remove_write_listener(self, listener: WriteListener) -> None:
        with self._listeners_lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def set_driver_override(self, addr: PciAddress, driver: DriverName | None) -> None:
        """Set `driver_override`, or clear it (None) with "\\n": an empty write is a no-op in Linux."""
        value = "\n" if driver is None else driver
        self._write(self.device_dir(addr) / "driver_override", value, addr, self.deadlines.default)

    def unbind(self, addr: PciAddress, driver: DriverName) -> None:
        self._write(self.driver_dir(driver) / "unbind", addr, addr, self.deadlines.for_driver(driver))

    def bind(self, addr: PciAddress, driver: DriverName) -> None:
        self._write(self.driver_dir(driver) / "bind", addr, addr, self.deadlines.for_driver(driver))

    def probe(self, addr: PciAddress, expect_driver: DriverName | None = None) -> None:
        """`drivers_probe`: succeeds even when no driver claims the device; callers verify the result."""
        deadline = self.deadlines.for_driver(expect_driver)
        self._write(self.roots.sys / "bus/pci/drivers_probe", addr, addr, deadline)

    def _write(self, path: Path, value: str, addr: PciAddress | None, deadline: float) -> None:
        data = value.encode()
        logical = self.logical(path)
        self._refuse_behind_pending(logical, value, addr)
        state = _WriteState()
        wall_start = time.time()

        def work() -> None:
            started = time.monotonic()
            err: OSError | None = None
            try:
                self.backend.write_attribute(path, data)
            except OSError as e:
                err = e
            duration = time.monotonic() - started
            with state.lock:
                state.err = err
                state.duration = duration
                state.finished = True
                late = state.abandoned
                state.done.set()
            if late:
                with self._pending_lock:
                    self._pending.pop(id(state), None)
                record = WriteRecord(
                    logical, value, _result(err), duration, str(addr) if addr else None, late=True
                )
                self._log_write(record)
                self._notify(record)

        worker = threading.Thread(target=work, name=f"sysfs-write {logical}", daemon=True)
        started = time.monotonic()
        worker.start()
        if not state.done.wait(deadline):
            with state.lock:
                if not state.finished:
                    state.abandoned = True
                    with self._pending_lock:
                        self._pending[id(state)] = PendingWrite(
                            logical, value, str(addr) if addr else None, wall_start
                        )
            if state.abandoned:
                record = WriteRecord(
                    logical, value, "timeout", time.monotonic() - started, str(addr) if addr else None
                )
                self._log_write(record)
                self._notify(record)
                raise SysfsTimeout(logical, value, deadline)
        record = WriteRecord(logical, value, _result(state.err), state.duration, str(addr) if addr else None)
        self._log_write(record)
        self._notify(record)
        if state.err is not None:
            raise SysfsWriteError(logical, value, state.err)

    def pending_writes(self, addr: PciAddress | None = None) -> list[str]:
        """Writes that missed their deadline and have not returned yet (optionally only for `addr`): the
        kernel holds that device's lock, so any further write to it would hang too."""
        return sorted(f"{p.path} <- {p.value!r}" for p in self.pending(addr))

    def pending(self, addr: PciAddress | None = None) -> list[PendingWrite]:
        """The same writes, with when each started (oldest first)."""
        with self._pending_lock:
            found = [p for p in self._pending.values() if addr is None or p.pci_address == addr]
        return sorted(found, key=lambda p: p.since)

    def _refuse_behind_pending(self, logical: str, value: str, addr: PciAddress | None) -> None:
        """A write to a device with a write still in the kernel would only hang behind it (and pile up one
        more thread that lands it later, whatever has happened since); and the number of threads left
        inside the kernel is bounded. Such a write is refused, logged, and not tried."""
        with self._pending_lock:
            hung = len(self._pending)
            here = [p for p in self._pending.values() if addr is not None and p.pci_address == addr]
        if here:
            reason = f"{addr} still has {min(here, key=lambda p: p.since).describe()} in the kernel"
        elif hung >= MAX_HUNG_WRITES:
            reason = (
                f"{hung} writes are still inside the kernel past their deadline (at most {MAX_HUNG_WRITES})"
            )
        else:
            return
        log.warning(
            "sysfs write %s <- %r refused: %s",
            logical,
            value,
            reason,
            extra={
                "ACTION": "sysfs-write",
                "SYSFS_PATH": logical,
                "SYSFS_VALUE": value,
                "RESULT": "refused",
                "DURATION_MS": 0,
                **({"PCI_ADDRESS": str(addr)} if addr else {}),
            },
        )
        raise SysfsBusy(logical, value, reason)

    def _log_write(self, record: WriteRecord) -> None:
        level = logging.INFO if record.result == "ok" else logging.WARNING
        what = "late sysfs write completed" if record.late else "sysfs write"
        log.log(
            level,
            "%s %s <- %r: %s (%.3f s)",
            what,
            record.path,
            record.value,
            record.result,
            record.duration,
            extra={
                "ACTION": "sysfs-write",
                "SYSFS_PATH": record.path,
                "SYSFS_VALUE": record.value,
                "RESULT": record.result,
                "DURATION_MS": int(record.duration * 1000),
                "PCI_ADDRESS": record.pci_address or "",
                "LATE": int(record.late),
            },
        )

    def _notify(self, record: WriteRecord) -> None:
        with self._listeners_lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(record)
            except Exception:
                log.exception("write listener failed")

    # ----- VFIO group nodes --------------------------------------------------------------------------

    def group_status(self, group: int) -> int:
        """VFIO_GROUP_GET_STATUS flags of the group node (raises OSError, e.g. EBUSY if held open)."""
        return self.backend.vfio_group_status(self.vfio_group_node(group))

    def node_owner(self, group: int) -> NodeOwner:
        return self.backend.node_owner(self.vfio_group_node(group))

    def set_node_owner(self, group: int, owner: NodeOwner) -> None:
        node = self.vfio_group_node(group)
        self.backend.set_node_owner(node, owner)
        log.info(
            "group node %s now %d:%d %04o",
            self.logical(node),
            owner.uid,
            owner.gid,
            owner.mode,
            extra={"ACTION": "chown-node", "NODE": self.logical(node), "OWNER_UID": owner.uid},
        )

    # ----- /proc ---------------------------------------------------------------------------------------

    def pids(self) -> list[int]:
        return sorted(int(n) for n in self.list_dir(self.roots.proc) if n.isdigit())

    def fd_targets(self, pid: int) -> list[str]:
        """Targets of every open fd of a process; ProcUnreadable unless the process is simply gone."""
        fd_dir = self.roots.proc / str(pid) / "fd"
        try:
            names = os.listdir(fd_dir)
        except FileNotFoundError:
            return []  # the process exited while we looked
        except OSError as e:
            raise ProcUnreadable(pid, "fd", e) from e
        out = []
        for name in names:
            try:
                out.append(os.readlink(fd_dir / name))
            except FileNotFoundError:
                continue  # the fd was closed while we looked
            except OSError as e:
                raise ProcUnreadable(pid, f"fd/{name}", e) from e
        return out

    def process_info(self, pid: int) -> ProcessInfo:
        base = self.roots.proc / str(pid)
        try:
            exe = os.readlink(base / "exe")
        except OSError:
            exe = ""
        uid: int | None = None
        status = self.read_text(base / "status") or ""
        for line in status.splitlines():
            if line.startswith("Uid:"):
                parts = line.split()
                if len(parts) > 1 and parts[1].isdigit():
                    uid = int(parts[1])
        return ProcessInfo(
            pid=pid,
            uid=uid,
            exe=exe.removesuffix(" (deleted)"),
            comm=self.read_text(base / "comm") or "",
            cgroup=self.read_text(base / "cgroup") or "",
        )

    def memlock_limit(self, pid: int) -> tuple[int | None, int | None] | None:
        """(soft, hard) RLIMIT_MEMLOCK in bytes from /proc/<pid>/limits; None = unlimited; whole None =
        unreadable."""
        text = self.read_text(self.roots.proc / str(pid) / "limits")
        if text is None:
            return None
        for line in text.splitlines():
            if line.startswith("Max locked memory"):
                parts = line[len("Max locked memory") :].split()
                if len(parts) < 2:
                    return None

                def val(s: str) -> int | None:
                    return None if s == "unlimited" else int(s)

                try:
                    return val(parts[0]), val(parts[1])
                except ValueError:
                    return None
        return None

    def iter_holders(self, logical_paths: set[str]) -> Iterator[tuple[ProcessInfo, str]]:
        """Every (process, path) where a process has one of `logical_paths` open."""
        for pid in self.pids():
            targets = self.fd_targets(pid)
            hits = sorted({t for t in targets if t in logical_paths})
            if hits:
                info = self.process_info(pid)
                for hit in hits:
                    yield info, hit

    def boot_id(self) -> str:
        return self.read_text(self.roots.proc / "sys/kernel/random/boot_id") or ""

    def cmdline(self) -> str:
        return self.read_text(self.roots.proc / "cmdline") or ""


@dataclass
class _WriteState:
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: threading.Event = field(default_factory=threading.Event)
    err: OSError | None = None
    duration: float = 0.0
    finished: bool = False
    abandoned: bool = False


def _result(err: OSError | None) -> str:
    if err is None:
        return "ok"
    return errno.errorcode.get(err.errno or errno.EIO, str(err.errno))
