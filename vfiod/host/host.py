"""The one gateway to sysfs, /dev, /proc and /etc.

A `Host` carries the roots (default `/sys`, `/dev`, `/proc`, `/etc`, and `/run`, `/lib`, `/usr` for
modprobe.d) and is the only way any vfiod code touches them, so tests and the demo point it at a simulated
tree. Reads are plain file reads (`pcifunction` reads a PCI function, `procfs` /proc and modprobe.d
through them). Writes take only validated PCI addresses and driver names, go through the `KernelBackend`,
run in a worker thread with a per-attribute deadline (`writes`), and are logged with path, value, result
and duration. A write that misses its deadline raises `SysfsTimeout`; if it completes later, the late
result is reported to listeners so the caller can move the device to its real state.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from vfiod import phases
from vfiod.host.backend import KernelBackend, LinuxKernel, NodeOwner
from vfiod.host.errors import SysfsBusy, SysfsTimeout, SysfsWriteError
from vfiod.host.pciaddr import (
    DriverName,
    InvalidPciAddressText,
    PciAddress,
    driver_from_link,
    group_from_link,
)
from vfiod.host.writes import (
    MAX_HUNG_WRITES,
    DeadlinePolicy,
    PendingWrite,
    WriteListener,
    WriteRecord,
    WriteState,
    result_name,
)
from vfiod.logevents import Action, MessageId

log = logging.getLogger("vfiod.host")


@dataclass(frozen=True)
class HostRoots:
    """Where the kernel's file systems are mounted (a simulated tree puts them under one directory)."""

    sys: Path = Path("/sys")
    dev: Path = Path("/dev")
    proc: Path = Path("/proc")
    etc: Path = Path("/etc")
    run: Path = Path("/run")
    lib: Path = Path("/lib")
    usr: Path = Path("/usr")

    @classmethod
    def under(cls, root: Path) -> HostRoots:
        return cls(
            sys=root / "sys",
            dev=root / "dev",
            proc=root / "proc",
            etc=root / "etc",
            run=root / "run",
            lib=root / "lib",
            usr=root / "usr",
        )


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
        # NVIDIA vendor-VFIO types as each physical GPU listed them once (PF -> type id -> name): a GPU
        # lists only what it can create now, and nothing when full, but its vGPUs' types still need names.
        self.vendor_types_seen: dict[str, dict[str, str]] = {}

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
    def read_text(path: Path | str) -> str | None:
        """Contents of a small file, stripped; None if it does not exist or cannot be read. os.open and
        os.read, not open(): a listing reads eight attributes of every function, and the buffered text
        layer costs more than the kernel's side of a sysfs read."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
        except OSError:
            return None
        finally:
            os.close(fd)
        return b"".join(chunks).decode("utf-8", "replace").strip()

    @staticmethod
    def link_name(path: Path | str) -> str | None:
        """Base name of a symlink's target (`driver` -> `vfio-pci`), None if there is no link."""
        try:
            return os.path.basename(os.readlink(path))
        except OSError:
            return None

    @staticmethod
    def list_dir(path: Path | str) -> list[str]:
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

    def _dev(self, addr: PciAddress) -> str:
        """The device's directory as a string ending in "/": the per-function reads join names to it
        without a Path object each (a listing of thousands of functions makes tens of thousands)."""
        return f"{self.roots.sys}/bus/pci/devices/{addr}/"

    def attr(self, addr: PciAddress, name: str) -> str | None:
        return self.read_text(self._dev(addr) + name)

    def has_attr(self, addr: PciAddress, name: str) -> bool:
        """Whether the device has the attribute file `name` (a relative path such as `nvidia/...`)."""
        return os.path.isfile(self._dev(addr) + name)

    def driver(self, addr: PciAddress) -> DriverName | None:
        return driver_from_link(self.link_name(self._dev(addr) + "driver"))

    def driver_module(self, addr: PciAddress) -> DriverName | None:
        """The module providing the bound driver (`<dev>/driver/module`), None if built in or unbound."""
        return driver_from_link(self.link_name(self._dev(addr) + "driver/module"))

    def driver_override(self, addr: PciAddress) -> str | None:
        raw = self.attr(addr, "driver_override")
        # Linux prints "(null)" when no override is set.
        if raw is None or raw in ("", "(null)"):
            return None
        return raw

    def iommu_group(self, addr: PciAddress) -> int | None:
        return group_from_link(self.link_name(self._dev(addr) + "iommu_group"))

    def iommu_groups(self) -> list[int]:
        out = []
        for name in self.list_dir(self.iommu_groups_dir):
            if name.isdigit():
                out.append(int(name))
        return sorted(out)

    def group_members(self, group: int) -> list[PciAddress]:
        out: list[PciAddress] = []
        for name in self.list_dir(f"{self.roots.sys}/kernel/iommu_groups/{int(group)}/devices"):
            try:
                out.append(PciAddress.parse(name))
            except InvalidPciAddressText:
                continue
        return sorted(out)

    def has_vfio_dev(self, addr: PciAddress) -> bool:
        """The device is bound to vfio-pci or a vfio variant driver (it has a `vfio-dev/` directory)."""
        return bool(self.list_dir(self._dev(addr) + "vfio-dev"))

    def driver_loaded(self, driver: DriverName) -> bool:
        return self.driver_dir(driver).is_dir()

    def module_loaded(self, module: str) -> bool:
        return (self.roots.sys / "module" / module).is_dir()

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

    def set_sriov_autoprobe(self, pf: PciAddress, on: bool) -> None:
        """`sriov_drivers_autoprobe`: whether VFs enabled from now on are probed by a host driver."""
        self._write(
            self.device_dir(pf) / "sriov_drivers_autoprobe", "1" if on else "0", pf, self.deadlines.default
        )

    def set_sriov_numvfs(self, pf: PciAddress, count: int, driver: DriverName | None) -> None:
        """`sriov_numvfs`: the PF's driver enables or disables its VFs, as slowly as that driver probes."""
        self._write(
            self.device_dir(pf) / "sriov_numvfs", str(int(count)), pf, self.deadlines.for_driver(driver)
        )

    @property
    def mdev_bus_dir(self) -> Path:
        return self.roots.sys / "class/mdev_bus"

    @property
    def mdev_devices_dir(self) -> Path:
        return self.roots.sys / "bus/mdev/devices"

    def create_mdev(self, parent: str, type_id: str, uuid: str) -> None:
        """Write `uuid` to a parent's type's `create` (the names as listed under /sys/class/mdev_bus)."""
        for part in (parent, type_id, uuid):
            if not part or "/" in part or part in (".", ".."):
                raise ValueError(f"{part!r} is not an mdev parent, type or uuid")
        create = self.mdev_bus_dir / parent / "mdev_supported_types" / type_id / "create"
        self._write(create, uuid, uuid, self.deadlines.default)

    def remove_mdev(self, uuid: str) -> None:
        """`remove` of an mdev: the kernel waits in it while the mdev's VFIO device is open."""
        if not uuid or "/" in uuid or uuid in (".", ".."):
            raise ValueError(f"{uuid!r} is not an mdev uuid")
        self._write(self.mdev_devices_dir / uuid / "remove", "1", uuid, self.deadlines.default)

    def set_vgpu_type(self, vf: PciAddress, type_id: int) -> None:
        """NVIDIA vendor-VFIO: write a type id to the VF's `nvidia/current_vgpu_type` (creates its vGPU at
        once); 0 destroys it."""
        value = int(type_id)
        if value < 0:
            raise ValueError(f"{type_id!r} is not a vGPU type id")
        path = self.device_dir(vf) / "nvidia" / "current_vgpu_type"
        self._write(path, str(value), vf, self.deadlines.default)

    def _write(self, path: Path, value: str, addr: str | None, deadline: float) -> None:
        """`addr`: the device the write locks in the kernel (a PCI address or an mdev's uuid)."""
        data = value.encode()
        logical = self.logical(path)
        self._refuse_behind_pending(logical, value, addr)
        state = WriteState()
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
                    logical, value, result_name(err), duration, str(addr) if addr else None, late=True
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
                phases.add(f"write {path.name}", time.monotonic() - started)
                record = WriteRecord(
                    logical, value, "timeout", time.monotonic() - started, str(addr) if addr else None
                )
                self._log_write(record)
                self._notify(record)
                raise SysfsTimeout(logical, value, deadline)
        phases.add(f"write {path.name}", state.duration)  # the kernel's own time for it
        record = WriteRecord(
            logical, value, result_name(state.err), state.duration, str(addr) if addr else None
        )
        self._log_write(record)
        self._notify(record)
        if state.err is not None:
            raise SysfsWriteError(logical, value, state.err)

    def pending_writes(self, addr: str | None = None) -> list[str]:
        """Writes that missed their deadline and have not returned yet (optionally only for `addr`): the
        kernel holds that device's lock, so any further write to it would hang too."""
        return sorted(f"{p.path} <- {p.value!r}" for p in self.pending(addr))

    def pending(self, addr: str | None = None) -> list[PendingWrite]:
        """The same writes, with when each started (oldest first)."""
        with self._pending_lock:
            found = [p for p in self._pending.values() if addr is None or p.pci_address == addr]
        return sorted(found, key=lambda p: p.since)

    def _refuse_behind_pending(self, logical: str, value: str, addr: str | None) -> None:
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
                "ACTION": Action.SYSFS_WRITE,
                "SYSFS_PATH": logical,
                "SYSFS_VALUE": value,
                "RESULT": "refused",
                "DURATION_MS": "0.0",
                "MESSAGE_ID": MessageId.WRITE_REFUSED,
                **({"PCI_ADDRESS": str(addr)} if addr else {}),
            },
        )
        raise SysfsBusy(logical, value, reason)

    def _log_write(self, record: WriteRecord) -> None:
        # A late write landed after its call failed: whatever it did, an admin must look (LATE_WRITE).
        level = logging.INFO if record.result == "ok" and not record.late else logging.WARNING
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
                "ACTION": Action.SYSFS_WRITE,
                "SYSFS_PATH": record.path,
                "SYSFS_VALUE": record.value,
                "RESULT": record.result,
                "DURATION_MS": f"{record.duration * 1000:.1f}",  # as the outcome line's: most take < 1 ms
                "PCI_ADDRESS": record.pci_address or "",
                "LATE": int(record.late),
                **({"MESSAGE_ID": MessageId.LATE_WRITE} if record.late else {}),
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

    def group_node_matches(self, group: int) -> bool | None:
        """Whether /dev/vfio/<group> is the character device `/sys/class/vfio/<group>/dev` names (None when
        sysfs does not say, or the node is gone)."""
        want = self.read_text(self.roots.sys / "class/vfio" / str(int(group)) / "dev")
        if not want:
            return None
        try:
            st = os.stat(self.vfio_group_node(group), follow_symlinks=False)
        except OSError:
            return None
        return stat.S_ISCHR(st.st_mode) and f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" == want.strip()

    def set_node_owner(self, group: int, owner: NodeOwner) -> None:
        node = self.vfio_group_node(group)
        self.backend.set_node_owner(node, owner)
        log.info(
            "group node %s now %d:%d %04o",
            self.logical(node),
            owner.uid,
            owner.gid,
            owner.mode,
            extra={"ACTION": Action.CHOWN_NODE, "NODE": self.logical(node), "OWNER_UID": owner.uid},
        )

    def boot_id(self) -> str:
        return self.read_text(self.roots.proc / "sys/kernel/random/boot_id") or ""

    def kernel_release(self) -> str:
        """`uname -r` (/proc/sys/kernel/osrelease); "" when it cannot be read."""
        return self.read_text(self.roots.proc / "sys/kernel/osrelease") or ""
