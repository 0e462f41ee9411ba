"""The sysfs trace harness: vfiod's binder and guards driving a host, with every sysfs write recorded.

The same scenarios run twice: in the QEMU guest on the real kernel (`RealRig`: `Host()` with its default
roots, i.e. the guest's real /sys, and `modprobe`), and on the host on the kernel simulator's `qemu-q35`
profile (`SimRig`). Each scenario's trace lists, in order, every sysfs write vfiod made (path, value,
result errno, duration, then the driver of every PCI function and the /dev/vfio nodes right after it), the
admin's own writes (unbinding a console), the errors vfiod raised and the checks the scenario made.
`compare` says where the simulator's trace differs from the kernel's: each difference is a simulator bug.

Standard library plus `vfiod.core`/`vfiod.host` only: the guest runs this with Debian's /usr/bin/python3.
`RealRig` refuses to start anywhere but in the e2e guest (it would write to the real /sys).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vfiod.core.binder import Binder, NativeDriver
from vfiod.core.errors import (
    DeviceBusy,
    HostCritical,
    IOMMUGroupConflict,
    SriovEnabled,
    VfiodError,
    VFIONotAvailable,
)
from vfiod.core.guard import (
    check_not_host_critical,
    plan_groups,
    require_no_dependents,
    require_not_in_use,
    vfio_holders,
)
from vfiod.core.system import ModuleLoader
from vfiod.host.backend import VFIO_GROUP_FLAGS_VIABLE
from vfiod.host.errors import SysfsWriteError
from vfiod.host.host import Host
from vfiod.host.pciaddr import DriverName, PciAddress
from vfiod.host.pcifunction import read_function
from vfiod.host.writes import DeadlinePolicy, WriteRecord

if TYPE_CHECKING:
    from vfiod_sim.model import Profile

log = logging.getLogger("vfiod.e2e.trace")

A = PciAddress.parse
VGA = A("0000:00:02.0")  # QEMU VGA, class 030000, bochs-drm, boot VGA
HDA = A("0000:00:02.1")  # intel-hda: the VGA's "HDMI audio", same IOMMU group
EDU = A("0000:00:07.0")  # edu: no native driver, alone in its group
NVME = A("0000:00:08.0")  # emulated NVMe, mounted on /mnt/data
ROOT_SHARE = A("0000:00:10.0")  # virtio-9p carrying the guest's root (tag hostroot)
BRIDGE = A("0000:01:00.0")  # pcie-pci-bridge, no driver
BR_E1000 = A("0000:02:01.0")  # e1000 behind the bridge
BR_EDU = A("0000:02:02.0")  # edu behind the bridge
SRIOV_PF = A("0000:00:09.0")  # QEMU NVMe with sriov_max_vfs=2 and no namespace
SRIOV_VFS = (A("0000:00:09.1"), A("0000:00:09.2"))  # its VFs once enabled (offset 1, stride 1)

PROFILE = "qemu-q35"
GUEST_MARKER = "e2e.root="  # on the kernel command line of the e2e guest only

HOLD_CODE = (
    "import os, sys, time\n"
    "fd = os.open(sys.argv[1], os.O_RDWR)\n"
    "print('held', flush=True)\n"
    "sys.stdin.read()\n"
)


class ScenarioFailed(AssertionError):
    """The kernel (or the simulator) did not do what the scenario expects of it."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ScenarioFailed(message)


# ----- rigs --------------------------------------------------------------------------------------------


class Rig:
    """Where a scenario runs: a Host, a module loader, a way to hold a node open and an admin's pen."""

    kind = "abstract"

    def __init__(self, host: Host, modules: ModuleLoader) -> None:
        self.host = host
        self.modules = modules

    def hold(self, logical: str) -> contextlib.AbstractContextManager[int]:
        """A process that keeps `logical` (e.g. /dev/vfio/6) open while the context lasts; yields its pid."""
        raise NotImplementedError

    def admin_write(self, logical: str, value: str) -> None:
        """A write an administrator makes by hand (not through vfiod)."""
        raise NotImplementedError

    def hold_device_file(self, group: int, addr: PciAddress) -> contextlib.AbstractContextManager[int]:
        """A VMM that got `addr`'s VFIO device file, then closed its group and container fds and keeps
        only the device file while the context lasts; yields its pid."""
        raise NotImplementedError

    def kernel_release(self) -> str:
        raise NotImplementedError


class Modprobe:
    """Module loading in the guest (no systemd there): what `modprobe@<module>.service` would do."""

    def __init__(self, host: Host) -> None:
        self._host = host

    def load(self, module: str) -> None:
        if self._host.module_loaded(module.replace("-", "_")):
            return
        proc = subprocess.run(
            ["/sbin/modprobe", module], capture_output=True, text=True, timeout=120, check=False
        )
        if proc.returncode != 0:
            raise VFIONotAvailable(f"modprobe {module} failed: {proc.stderr.strip()}")


class RealRig(Rig):
    kind = "kernel"

    def __init__(self) -> None:
        with open("/proc/cmdline", encoding="utf-8") as f:
            cmdline = f.read()
        if GUEST_MARKER not in cmdline:
            raise RuntimeError("RealRig writes to the real /sys: it only runs inside the e2e QEMU guest")
        host = Host(deadlines=DeadlinePolicy(default=60.0))
        super().__init__(host, Modprobe(host))

    @contextlib.contextmanager
    def _hold(self, logical: str) -> Iterator[int]:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLD_CODE, logical],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            if line != "held":
                raise ScenarioFailed(f"the holder could not open {logical} (exit {proc.wait()})")
            yield proc.pid
        finally:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def hold(self, logical: str) -> contextlib.AbstractContextManager[int]:
        return self._hold(logical)

    @contextlib.contextmanager
    def _hold_device_file(self, group: int, addr: PciAddress) -> Iterator[int]:
        argv = [sys.executable, "-m", "tests.e2e.vmm", f"/dev/vfio/{group}", str(addr), "--hold-device"]
        proc = subprocess.Popen(
            [*argv, "--only-device"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        try:
            assert proc.stdout is not None
            if not any(line.strip() == "holding" for line in iter(proc.stdout.readline, "")):
                raise ScenarioFailed(f"the VMM could not take {addr}'s device file (exit {proc.wait()})")
            yield proc.pid
        finally:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(timeout=30)

    def hold_device_file(self, group: int, addr: PciAddress) -> contextlib.AbstractContextManager[int]:
        return self._hold_device_file(group, addr)

    def admin_write(self, logical: str, value: str) -> None:
        fd = os.open(self.host.from_logical(logical), os.O_WRONLY)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)

    def kernel_release(self) -> str:
        return os.uname().release


class SimRig(Rig):
    kind = "simulator"

    def __init__(self, root: Path, profile: str | Profile = PROFILE) -> None:
        from vfiod_sim.simulation import Simulation

        self.root = root
        sim = Simulation.open(root, profile, deadlines=DeadlinePolicy(default=60.0))
        self.kernel = sim.kernel
        super().__init__(sim.host, sim.modules)

    @contextlib.contextmanager
    def _hold(self, logical: str) -> Iterator[int]:
        from vfiod_sim import processes

        pid = processes.add_process(self.root, exe="/usr/bin/python3.11", fds=[logical])
        try:
            yield pid
        finally:
            processes.remove_process(self.root, pid)

    def hold(self, logical: str) -> contextlib.AbstractContextManager[int]:
        return self._hold(logical)

    @contextlib.contextmanager
    def _hold_device_file(self, group: int, addr: PciAddress) -> Iterator[int]:
        from vfiod_sim import processes

        pid = processes.add_process(self.root, exe="/usr/bin/python3.11")
        try:
            processes.open_vfio_device(self.root, pid, str(addr))
            yield pid
        finally:
            processes.remove_process(self.root, pid)

    def hold_device_file(self, group: int, addr: PciAddress) -> contextlib.AbstractContextManager[int]:
        return self._hold_device_file(group, addr)

    def admin_write(self, logical: str, value: str) -> None:
        self.kernel.write_attribute(self.host.from_logical(logical), value.encode())

    def kernel_release(self) -> str:
        return f"simulator:{PROFILE}"


# ----- the recorder ------------------------------------------------------------------------------------


def vtconsoles(host: Host) -> dict[str, list[str | None]]:
    vt = host.roots.sys / "class/vtconsole"
    return {n: [host.read_text(vt / n / "name"), host.read_text(vt / n / "bind")] for n in host.list_dir(vt)}


def driver_table(host: Host) -> dict[str, str | None]:
    return {str(a): host.driver(a) for a in host.pci_addresses()}


def vfio_nodes(host: Host) -> list[str]:
    return host.list_dir(host.roots.dev / "vfio")


def group_map(host: Host) -> dict[str, list[str]]:
    """IOMMU group number -> its members, so traces can name groups by members, not by number."""
    return {str(g): [str(m) for m in host.group_members(g)] for g in host.iommu_groups()}


class Recorder:
    """Collects one scenario's trace while it runs (installed as a `Host` write listener)."""

    def __init__(self, rig: Rig, say: Callable[[str], None]) -> None:
        self.rig = rig
        self.say = say
        self.entries: list[dict[str, Any]] = []

    def __enter__(self) -> Recorder:
        self.rig.host.add_write_listener(self._on_write)
        return self

    def __exit__(self, *exc: object) -> None:
        self.rig.host.remove_write_listener(self._on_write)

    def state(self) -> dict[str, Any]:
        host = self.rig.host
        return {
            "drivers": driver_table(host),
            "overrides": {str(a): host.attr(a, "driver_override") for a in host.pci_addresses()},
            "vfio": vfio_nodes(host),
        }

    def writes(self) -> int:
        return sum(1 for e in self.entries if e["kind"] in ("write", "admin"))

    def _on_write(self, rec: WriteRecord) -> None:
        entry: dict[str, Any] = {
            "kind": "write",
            "path": rec.path,
            "value": rec.value,
            "result": rec.result,
            "duration": round(rec.duration, 4),
            "late": rec.late,
            **self.state(),
        }
        self.entries.append(entry)
        self.say(f"write {rec.path} <- {rec.value!r}: {rec.result} ({rec.duration:.3f} s)")
        self._say_drivers(entry["drivers"], entry["vfio"])

    def _say_drivers(self, drivers: dict[str, str | None], vfio: list[str]) -> None:
        interesting = (VGA, HDA, EDU, BR_E1000, BR_EDU)
        shown = ", ".join(f"{a[5:]}={drivers.get(a) or '-'}" for a in interesting if a in drivers)
        self.say(f"   drivers after: {shown}; /dev/vfio: {' '.join(vfio) or '(none)'}")

    def admin(self, logical: str, value: str) -> None:
        started = time.monotonic()
        result = "ok"
        try:
            self.rig.admin_write(logical, value)
        except OSError as e:
            result = errno.errorcode.get(e.errno or errno.EIO, str(e.errno))
        entry: dict[str, Any] = {
            "kind": "admin",
            "path": logical,
            "value": value,
            "result": result,
            "duration": round(time.monotonic() - started, 4),
            **self.state(),
        }
        self.entries.append(entry)
        self.say(f"admin write {logical} <- {value!r}: {result}")

    def error(self, e: VfiodError) -> None:
        self.entries.append({"kind": "error", "name": e.name, "message": e.message})
        self.say(f"vfiod raised {e.name}: {e.message}")

    def check(self, what: str, value: Any) -> None:
        self.entries.append({"kind": "check", "what": what, "value": value})
        self.say(f"check {what}: {json.dumps(value, sort_keys=True)}")


@contextlib.contextmanager
def expect(rec: Recorder, cls: type[VfiodError]) -> Iterator[list[VfiodError]]:
    """The block must raise `cls` (recorded in the trace); yields the list the error is put in."""
    caught: list[VfiodError] = []
    try:
        yield caught
    except VfiodError as e:
        rec.error(e)
        if not isinstance(e, cls):
            raise ScenarioFailed(f"expected {cls.name}, vfiod raised {e.name}: {e.message}") from e
        caught.append(e)
        return
    raise ScenarioFailed(f"expected {cls.name}, but nothing was raised")


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= end:
            return False
        time.sleep(0.05)
    return True


# ----- scenarios ---------------------------------------------------------------------------------------


def _binder(rig: Rig) -> Binder:
    return Binder(rig.host, rig.modules, verify_timeout=30.0)


def _bind(
    rig: Rig, rec: Recorder, addrs: list[PciAddress], include_group: bool
) -> dict[PciAddress, NativeDriver]:
    """Plan and bind like the manager does: host-critical check, group plan, bind each group."""
    binder = _binder(rig)
    check_not_host_critical(rig.host, addrs, force=False)
    plans = plan_groups(rig.host, addrs, include_group=include_group)
    natives = {a: binder.native_of(a) for p in plans for a in p.to_bind}
    rec.check(
        "plan",
        [{"to_bind": [str(a) for a in p.to_bind], "joined": [str(a) for a in p.joined]} for p in plans],
    )
    for plan in plans:
        binder.bind_group(plan)
    return natives


def _must_refuse(rig: Rig, rec: Recorder, addrs: list[PciAddress], include_group: bool) -> None:
    """Ask for a bind that must be refused; if it is not, put everything back before the scenario fails."""
    _restore(rig, _bind(rig, rec, addrs, include_group))


def _restore(rig: Rig, natives: dict[PciAddress, NativeDriver]) -> None:
    binder = _binder(rig)
    for addr in sorted(natives):
        binder.restore(addr, natives[addr])


def _group_status(rig: Rig, rec: Recorder, group: int, label: str) -> int | None:
    """VFIO_GROUP_GET_STATUS through the Host's backend (LinuxKernel in the guest)."""
    try:
        flags = rig.host.group_status(group)
    except OSError as e:
        rec.check(label, {"errno": errno.errorcode.get(e.errno or errno.EIO, str(e.errno))})
        return None
    rec.check(label, {"flags": flags, "viable": bool(flags & VFIO_GROUP_FLAGS_VIABLE)})
    return flags


def _group_of(rig: Rig, addr: PciAddress) -> int:
    group = rig.host.iommu_group(addr)
    check(group is not None, f"{addr} has no IOMMU group (is intel_iommu=on?)")
    assert group is not None
    return group


def _expect_drivers(rig: Rig, want: dict[PciAddress, str | None], when: str) -> None:
    def ok() -> bool:
        return all(rig.host.driver(a) == d for a, d in want.items())

    if not wait_for(ok):
        found = {a: rig.host.driver(a) for a in want}
        raise ScenarioFailed(f"{when}: drivers are {found}, expected {want}")


def fb_consoles(rig: Rig) -> list[str]:
    """The vtconsoles that are frame buffer consoles (fbcon), as logical paths of their `bind`."""
    vt = rig.host.roots.sys / "class/vtconsole"
    out = []
    for name in rig.host.list_dir(vt):
        if "frame buffer" in (rig.host.read_text(vt / name / "name") or ""):
            out.append(f"/sys/class/vtconsole/{name}/bind")
    return out


def sc_inventory(rig: Rig, rec: Recorder) -> None:
    host = rig.host
    inv: dict[str, Any] = {}
    for addr in host.pci_addresses():
        inv[str(addr)] = {
            "class": read_function(host, addr).class_code,
            "id": f"{read_function(host, addr).vendor}:{read_function(host, addr).device}",
            "driver": host.driver(addr),
            "module": host.driver_module(addr),
            "group": host.iommu_group(addr),
            "boot_vga": host.attr(addr, "boot_vga"),
            "driver_override": host.attr(addr, "driver_override"),
        }
        rec.say(
            f"{addr} class {inv[addr]['class']} {inv[addr]['id']} group {inv[addr]['group']} "
            f"driver {inv[addr]['driver'] or '-'}"
        )
    rec.check("kernel", rig.kernel_release())
    rec.check("inventory", inv)
    rec.check("groups", group_map(host))
    rec.check("vtconsoles", vtconsoles(host))
    rec.check("vfio_pci loaded", host.module_loaded("vfio_pci"))
    check(host.driver(VGA) == "bochs-drm", f"{VGA} should start on bochs-drm, is on {host.driver(VGA)}")
    check(host.driver(HDA) == "snd_hda_intel", f"{HDA} should start on snd_hda_intel")
    check(host.driver(EDU) is None and host.driver(BR_EDU) is None, "edu has no native driver")
    check(host.iommu_group(VGA) == host.iommu_group(HDA), "VGA and intel-hda share an IOMMU group")
    check(
        host.iommu_group(BRIDGE) == host.iommu_group(BR_E1000) == host.iommu_group(BR_EDU),
        "the bridge and the two functions behind it share an IOMMU group",
    )


def sc_vga_console_host_critical(rig: Rig, rec: Recorder) -> None:
    """The boot VGA with its framebuffer console bound is refused HostCritical; nothing is written."""
    check(bool(fb_consoles(rig)), "no frame buffer console registered")
    with expect(rec, HostCritical) as caught:
        _must_refuse(rig, rec, [VGA], include_group=True)
    check("console" in caught[0].message, f"the refusal should name the console: {caught[0].message}")
    check(rec.writes() == 0, "a refusal must not write to sysfs")
    _expect_drivers(rig, {VGA: "bochs-drm", HDA: "snd_hda_intel"}, "after the refusal")


def sc_vga_group_conflict(rig: Rig, rec: Recorder) -> None:
    """With the console unbound (as an admin would), the VGA alone conflicts with its audio function."""
    for path in fb_consoles(rig):
        if rig.host.read_text(rig.host.from_logical(path)) == "1":
            rec.admin(path, "0")
    rec.check("vtconsoles", vtconsoles(rig.host))
    with expect(rec, IOMMUGroupConflict) as caught:
        _must_refuse(rig, rec, [VGA], include_group=False)
    msg = caught[0].message
    check(
        str(HDA) in msg and "snd_hda_intel" in msg, f"the conflict should name {HDA} on snd_hda_intel: {msg}"
    )
    check(sum(1 for e in rec.entries if e["kind"] == "write") == 0, "a refused plan must not write")
    _expect_drivers(rig, {VGA: "bochs-drm", HDA: "snd_hda_intel"}, "after the conflict")


def sc_vga_group_bind_restore(rig: Rig, rec: Recorder) -> None:
    """include_group: both functions move to vfio-pci, the group is viable; restore brings both back."""
    group = _group_of(rig, VGA)
    natives = _bind(rig, rec, [VGA], include_group=True)
    check(set(natives) == {VGA, HDA}, f"include_group should bind {VGA} and {HDA}, planned {sorted(natives)}")
    _expect_drivers(rig, {VGA: "vfio-pci", HDA: "vfio-pci"}, "after the bind")
    check(rig.host.vfio_group_node(group).exists(), f"/dev/vfio/{group} should exist")
    flags = _group_status(rig, rec, group, "group status after bind")
    check(flags is not None and bool(flags & VFIO_GROUP_FLAGS_VIABLE), "the group should be viable")
    _restore(rig, natives)
    _expect_drivers(rig, {VGA: "bochs-drm", HDA: "snd_hda_intel"}, "after the restore")
    check(wait_for(lambda: not rig.host.vfio_group_node(group).exists()), f"/dev/vfio/{group} should be gone")
    for addr in (VGA, HDA):
        check(rig.host.driver_override(addr) is None, f"{addr} driver_override should be cleared")


def sc_held_group_node(rig: Rig, rec: Recorder) -> None:
    """While a process keeps /dev/vfio/<n> open, restore refuses DeviceBusy without writing anything."""
    group = _group_of(rig, EDU)
    natives = _bind(rig, rec, [EDU], include_group=False)
    _expect_drivers(rig, {EDU: "vfio-pci"}, "after the bind")
    node = f"/dev/vfio/{group}"
    with rig.hold(node) as pid:
        rec.check("holders", [h.path for h in vfio_holders(rig.host, [EDU])])
        _group_status(rig, rec, group, "group status while held")
        before = rec.writes()
        with expect(rec, DeviceBusy) as caught:
            _restore(rig, natives)
        err = caught[0]
        check(
            isinstance(err, DeviceBusy) and any(p == pid for p, _ in err.holders),
            f"DeviceBusy names pid {pid}",
        )
        check(rec.writes() == before, "DeviceBusy must be raised before any write")
        _expect_drivers(rig, {EDU: "vfio-pci"}, "while held")
    _restore(rig, natives)
    _expect_drivers(rig, {EDU: None}, "after the restore")
    check(wait_for(lambda: not rig.host.vfio_group_node(group).exists()), f"{node} should be gone")


def sc_device_file_holder(rig: Rig, rec: Recorder) -> None:
    """A VMM keeps only edu's device file (group fd closed): /proc shows no group node, but the kernel
    still has the group open (EBUSY), so restore refuses DeviceBusy naming it, writing nothing."""
    group = _group_of(rig, EDU)
    natives = _bind(rig, rec, [EDU], include_group=False)
    with rig.hold_device_file(group, EDU) as pid:
        rec.check("node holders", [h.path for h in vfio_holders(rig.host, [EDU])])
        _group_status(rig, rec, group, "group status with only a device file held")
        before = rec.writes()
        with expect(rec, DeviceBusy) as caught:
            _restore(rig, natives)
        err = caught[0]
        named = isinstance(err, DeviceBusy) and any(p == pid for p, _ in err.holders)
        check(named, f"DeviceBusy names pid {pid}: {err.message}")
        check(rec.writes() == before, "DeviceBusy must be raised before any write")
    _restore(rig, natives)
    _expect_drivers(rig, {EDU: None}, "after the restore")


def sc_alsa_holder(rig: Rig, rec: Recorder) -> None:
    """A process holding intel-hda's sound card control node: binding the VGA's slot is refused DeviceBusy
    naming it before anything is written (snd_hda_intel's unbind would wait for it)."""
    cards = [c for c in rig.host.list_dir(rig.host.device_dir(HDA) / "sound") if c.startswith("card")]
    rec.check("sound cards", cards)
    check(len(cards) == 1, f"{HDA} should have one sound card: {cards}")
    node = f"/dev/snd/controlC{cards[0][4:]}"
    with rig.hold(node) as pid:
        before = rec.writes()
        with expect(rec, DeviceBusy) as caught:
            require_not_in_use(rig.host, [VGA, HDA], ignore_units=())
        err = caught[0]
        named = isinstance(err, DeviceBusy) and any(p == pid for p, _ in err.holders)
        check(named, f"DeviceBusy names pid {pid}: {err.message}")
        check(rec.writes() == before, "nothing is written")
    _expect_drivers(rig, {VGA: "bochs-drm", HDA: "snd_hda_intel"}, "after the refusal")


def sc_bridge_group(rig: Rig, rec: Recorder) -> None:
    """pcie-pci-bridge + e1000 + edu: edu alone conflicts with e1000; both together bind and come back."""
    group = _group_of(rig, BR_EDU)
    with expect(rec, IOMMUGroupConflict) as caught:
        _must_refuse(rig, rec, [BR_EDU], include_group=True)
    msg = caught[0].message
    check(str(BR_E1000) in msg and "e1000" in msg, f"the conflict should name {BR_E1000} on e1000: {msg}")
    natives = _bind(rig, rec, [BR_E1000, BR_EDU], include_group=False)
    _expect_drivers(rig, {BR_E1000: "vfio-pci", BR_EDU: "vfio-pci", BRIDGE: None}, "after the bind")
    flags = _group_status(rig, rec, group, "group status after bind")
    check(
        flags is not None and bool(flags & VFIO_GROUP_FLAGS_VIABLE), "a bridge without driver keeps it viable"
    )
    _restore(rig, natives)
    _expect_drivers(rig, {BR_E1000: "e1000", BR_EDU: None, BRIDGE: None}, "after the restore")
    check(wait_for(lambda: not rig.host.vfio_group_node(group).exists()), f"/dev/vfio/{group} should be gone")


def sc_nvme_host_critical(rig: Rig, rec: Recorder) -> None:
    """The NVMe disk whose filesystem is mounted on /mnt/data is refused HostCritical."""
    check(rig.host.device_exists(NVME), f"{NVME} (the NVMe disk) is not on the bus")
    with expect(rec, HostCritical) as caught:
        _must_refuse(rig, rec, [NVME], include_group=False)
    check("/mnt/data" in caught[0].message, f"the refusal should name /mnt/data: {caught[0].message}")
    check(rec.writes() == 0, "a refusal must not write to sysfs")
    _expect_drivers(rig, {NVME: "nvme"}, "after the refusal")


def sc_root_share_host_critical(rig: Rig, rec: Recorder) -> None:
    """The virtio-9p device carrying the guest's root is refused HostCritical."""
    with expect(rec, HostCritical) as caught:
        _must_refuse(rig, rec, [ROOT_SHARE], include_group=False)
    check("hostroot" in caught[0].message, f"the refusal should name the hostroot share: {caught[0].message}")
    check(rec.writes() == 0, "a refusal must not write to sysfs")
    _expect_drivers(rig, {ROOT_SHARE: "virtio-pci"}, "after the refusal")


def sc_sysfs_errors(rig: Rig, rec: Recorder) -> None:
    """The kernel's answers to writes that must fail, on edu (no driver): the errno of each, and that
    nothing changed. vfiod's error paths rely on these."""
    host = rig.host
    rig.modules.load("vfio_pci")
    e1000, vfio, missing = DriverName.parse("e1000"), DriverName.parse("vfio-pci"), DriverName.parse("nosuch")
    ghost = A("0000:00:1e.0")  # nothing in that slot

    def attempt(what: str, write: Callable[[], None]) -> None:
        try:
            write()
        except SysfsWriteError as e:
            rec.check(what, e.errname)
            return
        rec.check(what, "ok")

    attempt("unbind edu from e1000 (not bound)", lambda: host.unbind(EDU, e1000))
    attempt("bind edu to e1000 (no id match)", lambda: host.bind(EDU, e1000))
    attempt("bind edu to vfio-pci without override", lambda: host.bind(EDU, vfio))
    attempt("unbind from a driver that does not exist", lambda: host.unbind(EDU, missing))
    attempt("drivers_probe an empty slot", lambda: host.probe(ghost))
    attempt("driver_override of an empty slot", lambda: host.set_driver_override(ghost, vfio))
    attempt("override edu to vfio-pci", lambda: host.set_driver_override(EDU, vfio))
    attempt("bind edu to vfio-pci with override", lambda: host.bind(EDU, vfio))
    attempt("bind edu to vfio-pci again (already bound)", lambda: host.bind(EDU, vfio))
    attempt("drivers_probe edu while bound", lambda: host.probe(EDU))
    attempt("unbind edu from vfio-pci", lambda: host.unbind(EDU, vfio))
    attempt("clear the override", lambda: host.set_driver_override(EDU, None))
    attempt("drivers_probe edu (no driver wants it)", lambda: host.probe(EDU))
    _expect_drivers(rig, {EDU: None}, "at the end")
    check(host.driver_override(EDU) is None, "the override should be cleared")


def _sriov_state(rig: Rig) -> dict[str, Any]:
    pf = read_function(rig.host, SRIOV_PF)
    state: dict[str, Any] = {
        "pf": {
            "driver": rig.host.driver(SRIOV_PF),
            "totalvfs": pf.sriov_totalvfs,
            "numvfs": pf.sriov_numvfs,
            "virtfns": [str(v) for v in pf.virtfns],
        }
    }
    for vf in SRIOV_VFS:
        if rig.host.device_exists(vf):
            fn = read_function(rig.host, vf)
            members = rig.host.group_members(_group_of(rig, vf))
            state[str(vf)] = {
                "physfn": str(fn.physfn),
                "driver": fn.driver,
                "members": [str(m) for m in members],
            }
    return state


def sc_sriov_pf_refused(rig: Rig, rec: Recorder) -> None:
    """With two VFs enabled (driverless: sriov_drivers_autoprobe 0), the PF is refused SriovEnabled naming
    both, nothing written; each VF has its physfn and a group of its own; a VF asked for with include_group
    binds alone (never the PF or the other VF as a companion) and comes back."""
    rig.admin_write(f"/sys/bus/pci/devices/{SRIOV_PF}/sriov_drivers_autoprobe", "0")
    rig.admin_write(f"/sys/bus/pci/devices/{SRIOV_PF}/sriov_numvfs", "2")
    check(wait_for(lambda: all(rig.host.device_exists(v) for v in SRIOV_VFS)), "the VFs did not appear")
    rec.check("sr-iov", _sriov_state(rig))
    with expect(rec, SriovEnabled) as refused:
        require_no_dependents(rig.host, [SRIOV_PF])
    check(
        all(str(v) in refused[0].message for v in SRIOV_VFS), f"the VFs are not named: {refused[0].message}"
    )
    natives = _bind(rig, rec, [SRIOV_VFS[0]], include_group=True)
    check(sorted(natives) == [SRIOV_VFS[0]], f"include_group took more than the VF: {sorted(natives)}")
    _expect_drivers(rig, {SRIOV_VFS[0]: "vfio-pci", SRIOV_VFS[1]: None, SRIOV_PF: "nvme"}, "with VF 1 bound")
    _restore(rig, natives)
    _expect_drivers(rig, {SRIOV_VFS[0]: None, SRIOV_PF: "nvme"}, "after restoring VF 1")


def sc_sriov_pf_without_driver(rig: Rig, rec: Recorder) -> None:
    """What vfiod refuses, done by hand: nvme's remove leaves SR-IOV enabled (the VFs stay), vfio-pci's probe
    of the PF fails (EBUSY: "Cannot bind to PF with SR-IOV enabled") and leaves it driverless; nvme takes it
    back, and 0 to sriov_numvfs removes the VFs."""
    rig.admin_write("/sys/bus/pci/drivers/nvme/unbind", str(SRIOV_PF))
    rec.check("after unbinding nvme", _sriov_state(rig))
    rig.modules.load("vfio-pci")
    rig.admin_write(f"/sys/bus/pci/devices/{SRIOV_PF}/driver_override", "vfio-pci")
    rig.admin_write("/sys/bus/pci/drivers_probe", str(SRIOV_PF))  # the probe's own error is not returned
    rec.check("after vfio-pci's probe", _sriov_state(rig))
    rig.admin_write(f"/sys/bus/pci/devices/{SRIOV_PF}/driver_override", "\n")
    rig.admin_write("/sys/bus/pci/drivers_probe", str(SRIOV_PF))
    _expect_drivers(rig, {SRIOV_PF: "nvme"}, "after probing nvme again")
    rig.admin_write(f"/sys/bus/pci/devices/{SRIOV_PF}/sriov_numvfs", "0")
    check(wait_for(lambda: not any(rig.host.device_exists(v) for v in SRIOV_VFS)), "the VFs are still there")
    rec.check("after disabling the VFs", _sriov_state(rig))


Scenario = Callable[[Rig, Recorder], None]

# In order: each scenario starts where the previous one left the host (the console stays unbound).
SCENARIOS: dict[str, Scenario] = {
    "inventory": sc_inventory,
    "vga-console-host-critical": sc_vga_console_host_critical,
    "vga-group-conflict": sc_vga_group_conflict,
    "vga-group-bind-restore": sc_vga_group_bind_restore,
    "held-group-node": sc_held_group_node,
    "device-file-holder": sc_device_file_holder,
    "alsa-holder": sc_alsa_holder,
    "bridge-group": sc_bridge_group,
    "nvme-host-critical": sc_nvme_host_critical,
    "root-share-host-critical": sc_root_share_host_critical,
    "sysfs-errors": sc_sysfs_errors,
    "sriov-pf-refused": sc_sriov_pf_refused,
    "sriov-pf-without-driver": sc_sriov_pf_without_driver,
}


@dataclass
class ScenarioResult:
    name: str
    kind: str
    ok: bool
    failure: str | None
    duration: float
    entries: list[dict[str, Any]] = field(default_factory=list)
    log: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.name,
            "kind": self.kind,
            "ok": self.ok,
            "failure": self.failure,
            "duration": round(self.duration, 3),
            "entries": self.entries,
            "log": self.log,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ScenarioResult:
        return cls(
            name=data["scenario"],
            kind=data["kind"],
            ok=bool(data["ok"]),
            failure=data.get("failure"),
            duration=float(data.get("duration", 0.0)),
            entries=list(data.get("entries", [])),
            log=list(data.get("log", [])),
        )


def run_scenario(rig: Rig, name: str, echo: Callable[[str], None] | None = None) -> ScenarioResult:
    lines: list[str] = []

    def say(text: str) -> None:
        lines.append(text)
        if echo is not None:
            echo(f"[{name}] {text}")

    started = time.monotonic()
    failure: str | None = None
    with Recorder(rig, say) as rec:
        try:
            SCENARIOS[name](rig, rec)
        except ScenarioFailed as e:
            failure = str(e)
        except VfiodError as e:
            rec.error(e)
            failure = f"vfiod raised {e.name}: {e.message}"
        except Exception as e:
            failure = f"{type(e).__name__}: {e}"
            log.exception("scenario %s crashed", name)
    if failure:
        say(f"FAILED: {failure}")
    return ScenarioResult(
        name, rig.kind, failure is None, failure, time.monotonic() - started, rec.entries, lines
    )


def run_all(rig: Rig, echo: Callable[[str], None] | None = None) -> list[ScenarioResult]:
    return [run_scenario(rig, name, echo) for name in SCENARIOS]


# ----- comparing a kernel trace with a simulator trace ------------------------------------------------

_PID_RE = re.compile(r"\bpid \d+")


def _groups_of(results: list[ScenarioResult]) -> dict[str, str]:
    """Group number -> 'group(<first member>)', from the inventory scenario's trace."""
    for r in results:
        if r.name == "inventory":
            for e in r.entries:
                if e["kind"] == "check" and e["what"] == "groups":
                    return {g: f"group({m[0]})" if m else f"group({g})" for g, m in e["value"].items()}
    return {}


class Normalizer:
    """Names IOMMU groups by their first member: the numbers depend on enumeration order, not on rules."""

    def __init__(self, groups: dict[str, str]) -> None:
        self.groups = groups
        self._node_re = re.compile(r"/dev/vfio/(\d+)")
        self._group_re = re.compile(r"IOMMU group (\d+)")

    def text(self, s: str) -> str:
        s = self._node_re.sub(lambda m: f"/dev/vfio/{self.groups.get(m[1], m[1])}", s)
        s = self._group_re.sub(lambda m: f"IOMMU group {self.groups.get(m[1], m[1])}", s)
        return _PID_RE.sub("pid N", s)

    def nodes(self, names: list[str]) -> list[str]:
        return sorted(self.groups.get(n, n) for n in names)


def compare_inventory(real: ScenarioResult, sim: ScenarioResult) -> list[str]:
    def checks(r: ScenarioResult) -> dict[str, Any]:
        return {e["what"]: e["value"] for e in r.entries if e["kind"] == "check"}

    diffs: list[str] = []
    rc, sc = checks(real), checks(sim)
    rinv: dict[str, dict[str, Any]] = rc.get("inventory", {})
    sinv: dict[str, dict[str, Any]] = sc.get("inventory", {})
    for addr in sorted(set(rinv) | set(sinv)):
        if addr not in sinv:
            diffs.append(
                f"{addr}: on the kernel's bus ({rinv[addr]['id']} class {rinv[addr]['class']}), "
                "missing from the simulator"
            )
            continue
        if addr not in rinv:
            diffs.append(f"{addr}: in the simulator, not on the kernel's bus")
            continue
        for key in ("class", "id", "driver", "module", "boot_vga", "driver_override"):
            if rinv[addr].get(key) != sinv[addr].get(key):
                diffs.append(
                    f"{addr} {key}: kernel {rinv[addr].get(key)!r}, simulator {sinv[addr].get(key)!r}"
                )
    rgroups = sorted(sorted(m) for m in rc.get("groups", {}).values())
    sgroups = sorted(sorted(m) for m in sc.get("groups", {}).values())
    if rgroups != sgroups:
        diffs.append(f"IOMMU group membership: kernel {rgroups}, simulator {sgroups}")
    rnum = {a: v.get("group") for a, v in rinv.items()}
    snum = {a: v.get("group") for a, v in sinv.items()}
    numbering = [
        f"{a} kernel {rnum[a]} simulator {snum[a]}" for a in sorted(rnum) if a in snum and rnum[a] != snum[a]
    ]
    if numbering:
        diffs.append("IOMMU group numbers: " + "; ".join(numbering))
    for key in ("vtconsoles", "vfio_pci loaded"):
        if rc.get(key) != sc.get(key):
            diffs.append(f"{key}: kernel {rc.get(key)!r}, simulator {sc.get(key)!r}")
    return diffs


def compare(
    real: ScenarioResult,
    sim: ScenarioResult,
    real_norm: Normalizer,
    sim_norm: Normalizer,
) -> list[str]:
    """Every way `sim`'s trace differs from `real`'s (paths, values, results, drivers and /dev/vfio after
    each write, errors raised, checks made); durations are not compared."""
    if real.name == "inventory":
        return compare_inventory(real, sim)
    diffs: list[str] = []
    if real.ok != sim.ok:
        diffs.append(
            f"outcome: kernel {'passed' if real.ok else 'failed: ' + str(real.failure)}, "
            f"simulator {'passed' if sim.ok else 'failed: ' + str(sim.failure)}"
        )
    n = max(len(real.entries), len(sim.entries))
    for i in range(n):
        r = real.entries[i] if i < len(real.entries) else None
        s = sim.entries[i] if i < len(sim.entries) else None
        where = f"step {i + 1}"
        if r is None or s is None:
            e = r if s is None else s
            assert e is not None
            side = "kernel only" if s is None else "simulator only"
            diffs.append(f"{where} ({side}): {_describe(e, real_norm if s is None else sim_norm)}")
            continue
        if r["kind"] != s["kind"]:
            diffs.append(f"{where}: kernel {_describe(r, real_norm)} | simulator {_describe(s, sim_norm)}")
            continue
        if r["kind"] in ("write", "admin"):
            for key in ("path", "value", "result"):
                if r[key] != s[key]:
                    diffs.append(
                        f"{where} {r['path']!r} <- {r['value']!r}: {key} "
                        f"kernel {r[key]!r}, simulator {s[key]!r}"
                    )
            common = set(r["drivers"]) & set(s["drivers"])
            for addr in sorted(common):
                if r["drivers"][addr] != s["drivers"][addr]:
                    diffs.append(
                        f"{where} after {r['path']} <- {r['value']!r}: driver of {addr} kernel "
                        f"{r['drivers'][addr]!r}, simulator {s['drivers'][addr]!r}"
                    )
            rover, sover = r.get("overrides", {}), s.get("overrides", {})
            for addr in sorted(set(rover) & set(sover)):
                if rover[addr] != sover[addr]:
                    diffs.append(
                        f"{where} after {r['path']} <- {r['value']!r}: driver_override of {addr} kernel "
                        f"{rover[addr]!r}, simulator {sover[addr]!r}"
                    )
            rn, sn = real_norm.nodes(r["vfio"]), sim_norm.nodes(s["vfio"])
            if rn != sn:
                diffs.append(
                    f"{where} after {r['path']} <- {r['value']!r}: /dev/vfio kernel {rn}, simulator {sn}"
                )
        elif r["kind"] == "error":
            rm, sm = real_norm.text(r["message"]), sim_norm.text(s["message"])
            if r["name"] != s["name"] or rm != sm:
                diffs.append(f"{where} error: kernel {r['name']}: {rm!r} | simulator {s['name']}: {sm!r}")
        elif r["kind"] == "check":
            rv = _norm_value(r["value"], real_norm)
            sv = _norm_value(s["value"], sim_norm)
            if r["what"] != s["what"] or rv != sv:
                diffs.append(f"{where} check {r['what']}: kernel {rv!r} | simulator {s['what']} {sv!r}")
    return diffs


def _norm_value(value: Any, norm: Normalizer) -> Any:
    if isinstance(value, str):
        return norm.text(value)
    if isinstance(value, list):
        return [_norm_value(v, norm) for v in value]
    if isinstance(value, dict):
        return {k: _norm_value(v, norm) for k, v in value.items()}
    return value


def _describe(e: dict[str, Any], norm: Normalizer) -> str:
    if e["kind"] in ("write", "admin"):
        return f"{e['kind']} {e['path']} <- {e['value']!r}: {e['result']}"
    if e["kind"] == "error":
        return f"error {e['name']}: {norm.text(e['message'])}"
    return f"check {e['what']}: {_norm_value(e['value'], norm)!r}"


def normalizers(real: list[ScenarioResult], sim: list[ScenarioResult]) -> tuple[Normalizer, Normalizer]:
    return Normalizer(_groups_of(real)), Normalizer(_groups_of(sim))
