"""Guest side of the service suites: the installed vfiod package on the system bus of the QEMU guest.

`FastInit` installs the project's .deb into the (tmpfs-overlaid) clean bookworm root with `dpkg -i`, adds
the test users, and starts the stock system `dbus-daemon` and the real `polkitd` as a minimal init would;
vfiod is then started by the bus itself, from the package's activation file, on the first call. Callers
are users run through `setpriv` + `busctl --timeout=`; the D-Bus error name of a failed call is read from
busctl's own debug log (busctl prints only the message).

Scenarios are functions of a `Guest` (the bus, the users, the kernel) raising `trace.ScenarioFailed`; the
runner (guest_runner.py) reports each through TAP, with vfiod's log of that scenario beside it.
Standard library only: runs with Debian's /usr/bin/python3 in the guest.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import os
import re
import signal
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.e2e import qemu_vmm
from tests.e2e.trace import (
    BR_E1000,
    BR_EDU,
    EDU,
    HDA,
    HOLD_CODE,
    NVME,
    ROOT_SHARE,
    SRIOV_PF,
    SRIOV_VFS,
    VGA,
    ScenarioFailed,
    check,
    wait_for,
)
from vfiod.core import kernel_support
from vfiod.logevents import MessageId

BUS_NAME = "org.hypeman.Devices1"
MANAGER_PATH = "/org/hypeman/Devices1"
MANAGER_IFACE = "org.hypeman.Devices1.Manager"
ERROR_PREFIX = "org.hypeman.Devices1.Error."

HYPEMAN = "hypeman"  # the VM manager's user, member of group hypeman
HYPEMAN2 = "hypeman2"  # another member of group hypeman
STRANGER = "stranger"  # not in group hypeman
PYTHON = "/usr/bin/python3"
VMM = ["-m", "tests.e2e.vmm"]
SRC = "/out/src"

_ERROR_NAME_RE = re.compile(r"error-name=([A-Za-z0-9_.]+)")
_CALL_FAILED_RE = re.compile(r"Call failed: (.*)")


def sh(
    argv: Sequence[str], timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False, env=env)


def must(argv: Sequence[str], timeout: float = 120) -> str:
    proc = sh(argv, timeout)
    if proc.returncode != 0:
        raise ScenarioFailed(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


@contextlib.contextmanager
def holding(argv: Sequence[str], env: dict[str, str], what: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """A program that prints its JSON result, then `holding`, and keeps what it holds until its standard
    input closes (tests/e2e/vmm.py, fd_vmm.py): its pid and last result while it holds."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        result: dict[str, Any] = {}
        for line in proc.stdout:
            if line.startswith("{"):
                result = json.loads(line)
                if result.get("ok") is False:
                    raise ScenarioFailed(f"{what} could not take the device: {line.strip()}")
            if line.strip() == "holding":
                break
        else:
            raise ScenarioFailed(f"{what} exited before holding the device ({proc.wait()}): {result}")
        yield proc.pid, result
    finally:
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def kernel_before(major: int, minor: int) -> bool:
    """The guest's kernel is older than major.minor (as vfiod reads a release)."""
    found = kernel_support.version(os.uname().release)
    return found is not None and found < (major, minor)


def as_user(user: str, argv: Sequence[str]) -> list[str]:
    if user == "root":
        return list(argv)
    return ["setpriv", f"--reuid={user}", f"--regid={user_group(user)}", "--init-groups", *argv]


def user_group(user: str) -> str:
    return "hypeman" if user in (HYPEMAN, HYPEMAN2) else user


def unwrap(value: Any) -> Any:
    """busctl --json=short variants ({"type": "s", "data": ...}) to plain values."""
    if isinstance(value, dict):
        if set(value) == {"type", "data"}:
            return unwrap(value["data"])
        return {k: unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unwrap(v) for v in value]
    return value


@dataclass
class Reply:
    argv: list[str]
    ok: bool
    data: list[Any]
    error: str | None  # short error name (HostCritical), None on success
    message: str
    seconds: float

    def describe(self) -> str:
        if self.ok:
            return f"ok in {self.seconds:.2f} s: {json.dumps(self.data)[:1500]}"
        return f"{self.error or 'error'} in {self.seconds:.2f} s: {self.message}"


# ----- the guest's services ----------------------------------------------------------------------------


@dataclass
class Guest:
    out: Path
    say: Callable[[str], None] = print
    bus_log: Path = field(default_factory=lambda: Path("/out/logs/dbus-daemon.log"))
    polkit_log: Path = field(default_factory=lambda: Path("/out/logs/polkitd.log"))
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    # --- calls ---

    def call(
        self, user: str, method: str, signature: str, *args: str, timeout: int = 120, path: str = MANAGER_PATH
    ) -> Reply:
        argv = as_user(
            user,
            [
                "busctl",
                "--system",
                f"--timeout={timeout}",
                "--json=short",
                "call",
                BUS_NAME,
                path,
                MANAGER_IFACE,
                method,
                signature,
                *args,
            ],
        )
        env = dict(os.environ, SYSTEMD_LOG_LEVEL="debug", SYSTEMD_COLORS="0")
        started = time.monotonic()
        proc = sh(argv, timeout=timeout + 30, env=env)
        seconds = time.monotonic() - started
        if proc.returncode == 0 and not proc.stdout.strip():
            reply = Reply(argv, True, [], None, "", seconds)  # a method without out arguments
        elif proc.returncode == 0:
            try:
                parsed = json.loads(proc.stdout)
            except ValueError as e:
                raise ScenarioFailed(f"busctl printed no JSON: {proc.stdout[:500]!r}") from e
            reply = Reply(argv, True, unwrap(parsed.get("data", [])), None, "", seconds)
        else:
            names = _ERROR_NAME_RE.findall(proc.stderr)
            msg = _CALL_FAILED_RE.findall(proc.stderr)
            name = names[-1] if names else None
            short = name.removeprefix(ERROR_PREFIX) if name else None
            reply = Reply(argv, False, [], short, msg[-1] if msg else proc.stderr.strip()[-500:], seconds)
        self.say(f"{user}$ {method} {' '.join(args)} -> {reply.describe()}")
        return reply

    def expect_ok(self, user: str, method: str, signature: str, *args: str, timeout: int = 120) -> list[Any]:
        reply = self.call(user, method, signature, *args, timeout=timeout)
        if not reply.ok:
            raise ScenarioFailed(f"{user}: {method} {' '.join(args)} failed: {reply.describe()}")
        return reply.data

    def expect_error(self, user: str, name: str, method: str, signature: str, *args: str) -> Reply:
        reply = self.call(user, method, signature, *args)
        if reply.ok:
            raise ScenarioFailed(f"{user}: {method} {' '.join(args)} should fail with {name}, it succeeded")
        if reply.error != name:
            raise ScenarioFailed(f"{user}: {method} should fail with {name}, got {reply.describe()}")
        return reply

    def register(self, user: str, address: str, name: str) -> None:
        self.expect_ok(user, "RegisterDevice", "ssa{sv}", address, name, "0")

    def attach(self, user: str, instance: str, devices: list[str], include_group: bool = False) -> Reply:
        opts = ["1", "include_group", "b", "true"] if include_group else ["0"]
        return self.call(user, "Attach", "sasa{sv}", instance, str(len(devices)), *devices, *opts)

    def detach(self, user: str, instance: str, devices: Sequence[str] = ()) -> Reply:
        return self.call(user, "Detach", "sasa{sv}", instance, str(len(devices)), *devices, "0")

    # --- kernel state ---

    @staticmethod
    def driver(addr: str) -> str | None:
        try:
            return os.path.basename(os.readlink(f"/sys/bus/pci/devices/{addr}/driver"))
        except OSError:
            return None

    def drivers(self, *addrs: str) -> dict[str, str | None]:
        return {a: self.driver(a) for a in addrs}

    def show_drivers(self, when: str, *addrs: str) -> None:
        self.say(f"drivers {when}: " + ", ".join(f"{a[5:]}={self.driver(a) or '-'}" for a in addrs))

    def expect_drivers(self, want: dict[str, str | None], when: str) -> None:
        if not wait_for(lambda: self.drivers(*want) == want, 15):
            raise ScenarioFailed(f"{when}: drivers are {self.drivers(*want)}, expected {want}")
        self.show_drivers(when, *want)

    @staticmethod
    def group(addr: str) -> int:
        return int(os.path.basename(os.readlink(f"/sys/bus/pci/devices/{addr}/iommu_group")))

    def vfiod_pids(self) -> list[int]:
        out = sh(["pgrep", "-f", "vfiod run"]).stdout.split()
        return [int(p) for p in out if p.isdigit()]

    def log_position(self) -> int:
        try:
            return self.bus_log.stat().st_size
        except OSError:
            return 0

    def log_since(self, pos: int) -> str:
        try:
            with open(self.bus_log, encoding="utf-8", errors="replace") as f:
                f.seek(pos)
                return f.read()
        except OSError:
            return ""

    # --- VMM ---

    def vmm(
        self, user: str, node: str, addr: str, dma_mib: int = 1, unlimited: bool = False
    ) -> dict[str, Any]:
        argv = as_user(user, [PYTHON, *VMM, node, addr, "--dma-mib", str(dma_mib)])
        if not unlimited and dma_mib <= 1 and kernel_before(5, 16):
            # Before Linux 5.16 the default RLIMIT_MEMLOCK was 64 KiB (MLOCK_LIMIT), too little for even
            # 1 MiB of DMA: a VMM there always runs with a raised limit (what Attach's warning asks for).
            unlimited = True
        if unlimited:
            argv = ["prlimit", "--memlock=unlimited:unlimited", *argv]
        proc = sh(argv, timeout=120, env=dict(os.environ, PYTHONPATH=SRC))
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if not lines:
            raise ScenarioFailed(f"the VMM program printed nothing: {proc.stderr.strip()[-1500:]}")
        result: dict[str, Any] = json.loads(lines[-1])
        self.say(
            f"{user}$ vmm {node} {addr} {dma_mib} MiB{' (memlock unlimited)' if unlimited else ''}: {result}"
        )
        return result

    @contextlib.contextmanager
    def holding_vmm(self, user: str, node: str, addr: str, only_device: bool = False) -> Iterator[int]:
        argv = as_user(
            user, [PYTHON, *VMM, node, addr, "--hold-device", *(["--only-device"] if only_device else [])]
        )
        with holding(argv, dict(os.environ, PYTHONPATH=SRC), "the VMM") as (pid, _):
            self.say(f"{user}$ vmm {node} {addr} holds the device fd (pid {pid})")
            yield pid

    @contextlib.contextmanager
    def qemu(self, user: str, devices: Sequence[str]) -> Iterator[qemu_vmm.RunningQemu]:
        """A real QEMU as `user` (memlock unlimited, as hypeman's drop-in sets it) with `devices` passed
        through (PCI addresses, or mdev sysfs paths), paused, answering QMP."""
        import pwd

        prefix = ["prlimit", "--memlock=unlimited:unlimited", *as_user(user, [])]
        with qemu_vmm.running(prefix, pwd.getpwnam(user).pw_uid, devices) as q:
            shown = ", ".join(
                f"{f.qdev_id} {f.vendor_id}:{f.device_id} at {f.address}" for f in q.passed().values()
            )
            args = " ".join(qemu_vmm.device_args(devices))
            self.say(f"{user}$ qemu-system-x86_64 -S ... {args} (pid {q.pid}): {shown}")
            yield q

    # --- set-up (fast init) ---

    def install_package(self) -> str:
        debs = sorted(glob.glob(str(self.out / "pkg" / "*.deb")))
        check(len(debs) == 1, f"expected one .deb in {self.out / 'pkg'}, found {debs}")
        started = time.monotonic()
        out = must(["dpkg", "-i", debs[0]], timeout=600)
        self.say(f"dpkg -i {os.path.basename(debs[0])} took {time.monotonic() - started:.1f} s")
        return out

    def add_users(self) -> None:
        must(["useradd", "-m", "-g", "hypeman", "-s", "/bin/bash", HYPEMAN])
        must(["useradd", "-m", "-g", "hypeman", "-s", "/bin/bash", HYPEMAN2])
        must(["useradd", "-m", "-U", "-s", "/bin/bash", STRANGER])

    def start_bus(self) -> None:
        if not Path("/etc/machine-id").is_file() or not Path("/etc/machine-id").read_text().strip():
            must(["systemd-machine-id-setup"])
        os.makedirs("/run/dbus", exist_ok=True)
        log = open(self.bus_log, "ab")  # noqa: SIM115 - handed to the daemon
        bus = subprocess.Popen(
            ["dbus-daemon", "--system", "--nofork", "--nopidfile"], stdout=log, stderr=subprocess.STDOUT
        )
        self.procs.append(bus)
        check(
            wait_for(lambda: os.path.exists("/run/dbus/system_bus_socket"), 30),
            "the system bus did not start",
        )
        plog = open(self.polkit_log, "ab")  # noqa: SIM115 - handed to the daemon
        # polkitd must start as root: it switches to the polkitd user itself.
        polkitd = subprocess.Popen(
            ["/usr/lib/polkit-1/polkitd", "--no-debug"], stdout=plog, stderr=subprocess.STDOUT
        )
        self.procs.append(polkitd)

        def polkit_up() -> bool:
            proc = sh(
                ["busctl", "--system", "--timeout=5", "status", "org.freedesktop.PolicyKit1"], timeout=15
            )
            return proc.returncode == 0

        check(wait_for(polkit_up, 60), "polkitd did not take its bus name")
        self.say("system bus and polkitd are up")

    def load_boot_modules(self) -> None:
        """What systemd-modules-load does at boot: the package's modules-load.d entry (vfio-pci)."""
        proc = sh(["/lib/systemd/systemd-modules-load"], timeout=120)
        self.say(f"systemd-modules-load: exit {proc.returncode} {proc.stderr.strip()}")
        check(proc.returncode == 0, "systemd-modules-load failed")
        check(os.path.isdir("/sys/module/vfio_pci"), "vfio-pci is not loaded after systemd-modules-load")

    def stop_services(self) -> None:
        for pid in self.vfiod_pids():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


# ----- scenarios (fast init) ---------------------------------------------------------------------------


def sc_package_installs(g: Guest) -> None:
    """dpkg -i of the project's .deb on a clean bookworm: it configures, creates group hypeman, runs."""
    out = g.install_package()
    check("Setting up vfiod" in out, f"dpkg did not configure vfiod:\n{out}")
    check(sh(["getent", "group", "hypeman"]).returncode == 0, "postinst did not create group hypeman")
    for path in (
        "/usr/sbin/vfiod",
        "/usr/share/dbus-1/system-services/org.hypeman.Devices1.service",
        "/usr/share/dbus-1/system.d/org.hypeman.Devices1.conf",
    ):
        check(os.path.exists(path), f"{path} is not installed")
    must(["/usr/sbin/vfiod", "--help"])
    g.add_users()
    # The fast init does what a boot would before anyone calls vfiod: modules-load.d, then the bus.
    g.load_boot_modules()
    g.start_bus()


def sc_bus_activation(g: Guest) -> None:
    """The first call (as hypeman) makes the bus start vfiod from the installed activation file."""
    check(not g.vfiod_pids(), "vfiod is already running before any call")
    data = g.expect_ok(HYPEMAN, "GetHostStatus", "a{sv}", "0")
    status = data[0]
    check(status.get("iommu_enabled") is True, f"GetHostStatus says the IOMMU is off: {status}")
    pids = g.vfiod_pids()
    check(len(pids) == 1, f"expected one activated vfiod, found {pids}")
    uid = os.stat(f"/proc/{pids[0]}").st_uid
    check(uid == 0, f"vfiod runs as uid {uid}, not root")


def sc_vga_console_refused(g: Guest) -> None:
    """The boot VGA with its console bound: Attach fails HostCritical and the console stays."""
    g.register(HYPEMAN, VGA, "vga")
    g.show_drivers("before", VGA, HDA)
    g.expect_error(HYPEMAN, "HostCritical", *_attach_args("vm-vga", ["vga"], include_group=True))
    g.expect_drivers({VGA: "bochs-drm", HDA: "snd_hda_intel"}, "after the refusal")
    binds = [Path(p).read_text().strip() for p in glob.glob("/sys/class/vtconsole/*/bind")]
    check("1" in binds, "the console should still be bound")


def _attach_args(instance: str, devices: list[str], include_group: bool) -> tuple[str, ...]:
    opts = ("1", "include_group", "b", "true") if include_group else ("0",)
    return ("Attach", "sasa{sv}", instance, str(len(devices)), *devices, *opts)


def pci_ids_names(vendor: str, device: str, path: str = "/usr/share/misc/pci.ids") -> tuple[str, str]:
    """(vendor name, device name) from the guest's pci.ids, "" where it has none."""
    vname = dname = ""
    in_vendor = False
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            if not line.startswith("\t"):
                in_vendor = line[:4].lower() == vendor
                if in_vendor:
                    vname = line[4:].strip()
                elif vname:
                    break
            elif in_vendor and not line.startswith("\t\t") and line[1:5].lower() == device:
                dname = line[5:].strip()
    return vname, dname


def unbind_console(g: Guest) -> None:
    """What an admin does before passing the boot VGA: the frame buffer console lets go of it (bochs-drm
    coming back after a Detach binds it again)."""
    for path in glob.glob("/sys/class/vtconsole/*/bind"):
        name = Path(path).parent.joinpath("name").read_text()
        if "frame buffer" in name and Path(path).read_text().strip() == "1":
            Path(path).write_text("0")
            g.say(f"admin: echo 0 > {path}")


def sc_vga_list_and_conflict(g: Guest) -> None:
    """Console unbound as an admin would: ListAvailable names both functions from pci.ids; Attach without
    include_group is an IOMMUGroupConflict and both keep their drivers."""
    unbind_console(g)
    listing = g.expect_ok(HYPEMAN, "ListAvailable", "a{sv}", "1", "all", "b", "true")[0]
    by_addr = {d["pci_address"]: d for d in listing}
    for addr in (VGA, HDA):
        check(addr in by_addr, f"ListAvailable does not list {addr}")
        d = by_addr[addr]
        vname, dname = pci_ids_names(d["vendor_id"], d["device_id"])
        g.say(
            f"{addr}: {d.get('vendor_name')!r} {d.get('device_name')!r} driver {d.get('current_driver')} "
            f"(pci.ids: {vname!r} {dname!r})"
        )
        # QEMU's 1234 vendor is not in bookworm's pci.ids: there vfiod shows the ids themselves.
        check(
            d.get("vendor_name") == (vname or d["vendor_id"])
            and d.get("device_name") == (dname or d["device_id"]),
            f"{addr}: names {d.get('vendor_name')!r} {d.get('device_name')!r}, "
            f"pci.ids says {vname!r} {dname!r}",
        )
    reply = g.expect_error(
        HYPEMAN, "IOMMUGroupConflict", *_attach_args("vm-vga", ["vga"], include_group=False)
    )
    check(HDA in reply.message and "snd_hda_intel" in reply.message, f"should name {HDA}: {reply.message}")
    g.expect_drivers({VGA: "bochs-drm", HDA: "snd_hda_intel"}, "after the conflict")


def sc_vga_attach(g: Guest) -> None:
    """include_group: both functions on vfio-pci, /dev/vfio/<n> belongs to hypeman, memlock warning."""
    reply = g.attach(HYPEMAN, "vm-vga", ["vga"], include_group=True)
    check(reply.ok, f"Attach failed: {reply.describe()}")
    records, warnings = reply.data[0], reply.data[1]
    check({r["pci_address"] for r in records} == {VGA, HDA}, f"attachments: {records}")
    g.expect_drivers({VGA: "vfio-pci", HDA: "vfio-pci"}, "after Attach")
    node = f"/dev/vfio/{g.group(VGA)}"
    st = os.stat(node)
    import pwd

    uid = pwd.getpwnam(HYPEMAN).pw_uid
    check(st.st_uid == uid and st.st_mode & 0o777 == 0o600, f"{node} is {st.st_uid} {oct(st.st_mode)}")
    check(any("memlock" in w.lower() or "MEMLOCK" in w for w in warnings), f"no memlock warning: {warnings}")
    # vfio-dev/ exists from Linux 6.1 only: before it, vfiod judges the bind by the driver and the node
    has_vfio_dev = os.path.isdir(f"/sys/bus/pci/devices/{VGA}/vfio-dev")
    check(has_vfio_dev != kernel_before(6, 1), f"vfio-dev/ {'is' if has_vfio_dev else 'is not'} there")
    dev = g.expect_ok(HYPEMAN, "GetDevice", "sa{sv}", "vga", "0")[0]
    check(dev["bound_to_vfio"] is True, f"bound_to_vfio: {dev}")
    shown = "present" if has_vfio_dev else "absent"
    g.say(f"kernel {os.uname().release}: vfio-dev/ {shown}, bound_to_vfio true")


def sc_grant_kept(g: Guest) -> None:
    """udev's rules re-applied to the attached group's node, as a `udevadm trigger` with an admin's
    `SUBSYSTEM=="vfio", GROUP="kvm", MODE="0666"` rule would (the root has no udevd: the test does udev's
    part): the node is widened, then the kernel's change uevent is raised through
    /sys/class/vfio/<n>/uevent; vfiod puts hypeman's grant back (owner, mode 0600) and logs a warning. The
    node is the group's own: its rdev is the one /sys/class/vfio/<n>/dev names."""
    import grp
    import pwd

    group = g.group(VGA)
    node = f"/dev/vfio/{group}"
    uid = pwd.getpwnam(HYPEMAN).pw_uid
    st = os.stat(node)
    sys_dev = Path(f"/sys/class/vfio/{group}/dev").read_text().strip()
    check(f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" == sys_dev, f"{node} is not {sys_dev}")
    kvm = grp.getgrnam("kvm").gr_gid if "kvm" in {e.gr_name for e in grp.getgrall()} else 0
    os.chown(node, 0, kvm)
    os.chmod(node, 0o666)  # noqa: S103 - the widening under test
    pos = g.log_position()
    started = time.monotonic()
    Path(f"/sys/class/vfio/{group}/uevent").write_text("change")

    def granted() -> bool:
        now = os.stat(node)
        return now.st_uid == uid and now.st_mode & 0o777 == 0o600

    check(
        wait_for(granted, 10),
        f"{node} was not given back: {oct(os.stat(node).st_mode)} uid {os.stat(node).st_uid}",
    )
    g.say(
        f"{node} (rdev {sys_dev}) widened to root:{kvm} 0666; hypeman's 0600 again after "
        f"{time.monotonic() - started:.2f} s"
    )
    check(wait_for(lambda: "behind vfiod's back" in g.log_since(pos), 5), "vfiod logged no warning about it")
    res = g.vmm(HYPEMAN, node, VGA)
    check(res.get("ok") is True, f"the VMM failed after the grant was put back: {res}")


def sc_vmm_uses_group(g: Guest) -> None:
    """As hypeman, a ctypes VMM opens the container and the group, gets the device fd, reads the vendor
    id and maps/unmaps 1 MiB of DMA."""
    node = f"/dev/vfio/{g.group(VGA)}"
    res = g.vmm(HYPEMAN, node, VGA)
    check(res.get("ok") is True and res.get("vendor_id") == "1234", f"the VMM failed: {res}")


def sc_vmm_qemu_uses_group(g: Guest) -> None:
    """As hypeman, a real QEMU takes both functions of the group (-device vfio-pci,host=): query-pci lists
    them with their ids, its /proc/<pid>/fd holds the group node; a stranger's QEMU cannot open the node."""
    node = f"/dev/vfio/{g.group(VGA)}"
    with g.qemu(HYPEMAN, [VGA, HDA]) as q:
        ids = {k: (f.vendor_id, f.device_id) for k, f in q.passed().items()}
        check(ids == {"hostdev0": ("1234", "1111"), "hostdev1": ("8086", "2668")}, f"query-pci: {ids}")
        fds = {os.readlink(f"/proc/{q.pid}/fd/{n}") for n in os.listdir(f"/proc/{q.pid}/fd")}
        check(node in fds and "/dev/vfio/vfio" in fds, f"QEMU's fds: {sorted(fds)}")
    try:
        with g.qemu(STRANGER, [VGA]):
            raise ScenarioFailed("a stranger's QEMU opened hypeman's group")
    except qemu_vmm.QemuFailed as e:
        g.say(f"stranger's QEMU: {e}")
        check("Permission denied" in str(e), f"expected EACCES: {e}")
    g.expect_drivers({VGA: "vfio-pci", HDA: "vfio-pci"}, "after QEMU quit")


def sc_memlock(g: Guest) -> None:
    """256 MiB of DMA fails ENOMEM under the default RLIMIT_MEMLOCK and works with it unlimited."""
    node = f"/dev/vfio/{g.group(VGA)}"
    res = g.vmm(HYPEMAN, node, VGA, dma_mib=256)
    check(res.get("ok") is False and res.get("errno") == "ENOMEM", f"expected ENOMEM: {res}")
    res = g.vmm(HYPEMAN, node, VGA, dma_mib=256, unlimited=True)
    check(res.get("ok") is True, f"with memlock unlimited the map should work: {res}")


def sc_held_detach(g: Guest) -> None:
    """A real QEMU holds both functions: Detach is DeviceBusy naming its pid and executable at once; after
    it quits, Detach works and both functions are back on their drivers."""
    node = f"/dev/vfio/{g.group(VGA)}"
    with g.qemu(HYPEMAN, [VGA, HDA]) as q:
        pid = q.pid
        reply = g.detach(HYPEMAN, "vm-vga")
        check(not reply.ok and reply.error == "DeviceBusy", f"expected DeviceBusy: {reply.describe()}")
        check(str(pid) in reply.message, f"DeviceBusy should name pid {pid}: {reply.message}")
        check("qemu-system-x86_64" in reply.message, f"DeviceBusy should name QEMU: {reply.message}")
        check(reply.seconds < 20, f"DeviceBusy took {reply.seconds:.1f} s")
        g.expect_drivers({VGA: "vfio-pci", HDA: "vfio-pci"}, "while held")
    reply = g.detach(HYPEMAN, "vm-vga")
    check(reply.ok, f"Detach failed: {reply.describe()}")
    g.expect_drivers({VGA: "bochs-drm", HDA: "snd_hda_intel"}, "after Detach")
    check(wait_for(lambda: not os.path.exists(node), 10), f"{node} is still there")


def sc_device_fd_holder(g: Guest) -> None:
    """The VMM closed its group and container fds and keeps only the device fd (/proc shows just
    `anon_inode:[vfio-device]`): Detach answers DeviceBusy at once, writes nothing and leaves nothing
    `stuck` (the kernel still has the group open); after the VMM exits, Detach works."""
    unbind_console(g)
    reply = g.attach(HYPEMAN, "vm-vga", ["vga"], include_group=True)
    check(reply.ok, f"Attach failed: {reply.describe()}")
    node = f"/dev/vfio/{g.group(VGA)}"
    with g.holding_vmm(HYPEMAN, node, VGA, only_device=True) as pid:
        fds = [os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")]
        check(node not in fds and "anon_inode:[vfio-device]" in fds, f"the VMM's fds: {fds}")
        reply = g.detach(HYPEMAN, "vm-vga")
        check(not reply.ok and reply.error == "DeviceBusy", f"expected DeviceBusy: {reply.describe()}")
        check(str(pid) in reply.message, f"DeviceBusy should name pid {pid}: {reply.message}")
        check(reply.seconds < 20, f"DeviceBusy took {reply.seconds:.1f} s")
        g.expect_drivers({VGA: "vfio-pci", HDA: "vfio-pci"}, "while the device fd is held")
        check(_overrides(VGA, HDA) == {VGA: "vfio-pci", HDA: "vfio-pci"}, "an override was cleared")
    registry_matches_kernel(g)
    reply = g.detach(HYPEMAN, "vm-vga")
    check(reply.ok, f"Detach failed: {reply.describe()}")
    g.expect_drivers({VGA: "bochs-drm", HDA: "snd_hda_intel"}, "after Detach")


def sc_alsa_holder(g: Guest) -> None:
    """A process holding the HDA function's sound card (/dev/snd/controlC<n>): Attach of the VGA with its
    slot answers DeviceBusy naming it and writes nothing (snd_card_free would wait for it); once it lets
    go, Attach and Detach work."""
    cards = glob.glob(f"/sys/bus/pci/devices/{HDA}/sound/card*/controlC*")
    check(bool(cards), f"{HDA} has no sound card")
    node = f"/dev/snd/{os.path.basename(cards[0])}"
    unbind_console(g)
    holder = subprocess.Popen(
        [PYTHON, "-c", HOLD_CODE, node], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        check(holder.stdout.readline().strip() == "held", f"could not open {node}")
        reply = g.attach(HYPEMAN, "vm-vga", ["vga"], include_group=True)
        check(not reply.ok and reply.error == "DeviceBusy", f"expected DeviceBusy: {reply.describe()}")
        check(str(holder.pid) in reply.message and node in reply.message, f"not named: {reply.message}")
        g.expect_drivers({VGA: "bochs-drm", HDA: "snd_hda_intel"}, "after the refusal")
        check(_overrides(VGA, HDA) == {VGA: "(null)", HDA: "(null)"}, "an override was written")
    finally:
        if holder.stdin is not None:
            holder.stdin.close()
        holder.wait(timeout=30)
    unbind_console(g)
    reply = g.attach(HYPEMAN, "vm-vga", ["vga"], include_group=True)
    check(reply.ok, f"Attach failed once the card was closed: {reply.describe()}")
    reply = g.detach(HYPEMAN, "vm-vga")
    check(reply.ok, f"Detach failed: {reply.describe()}")
    g.expect_drivers({VGA: "bochs-drm", HDA: "snd_hda_intel"}, "after Detach")


def sc_bridge_group(g: Guest) -> None:
    """pcie-pci-bridge + e1000 + edu: attach both, use edu, detach: e1000 back, edu without driver."""
    g.register("root", BR_E1000, "br-e1000")
    g.register("root", BR_EDU, "br-edu")
    reply = g.attach(HYPEMAN, "vm-bridge", ["br-e1000", "br-edu"])
    check(reply.ok, f"Attach failed: {reply.describe()}")
    g.expect_drivers({BR_E1000: "vfio-pci", BR_EDU: "vfio-pci", "0000:01:00.0": None}, "after Attach")
    res = g.vmm(HYPEMAN, f"/dev/vfio/{g.group(BR_EDU)}", BR_EDU)
    check(res.get("ok") is True and res.get("vendor_id") == "1234", f"the VMM failed on edu: {res}")
    reply = g.detach(HYPEMAN, "vm-bridge")
    check(reply.ok, f"Detach failed: {reply.describe()}")
    g.expect_drivers({BR_E1000: "e1000", BR_EDU: None}, "after Detach")


def sc_authorization(g: Guest) -> None:
    """A stranger may not Attach or Detach; hypeman may not Bind, nor detach another user's attachment."""
    g.register("root", EDU, "edu")
    g.expect_error(STRANGER, "NotAuthorized", *_attach_args("vm-x", ["edu"], include_group=False))
    reply = g.attach(HYPEMAN, "vm-edu", ["edu"])
    check(reply.ok, f"Attach failed: {reply.describe()}")
    g.expect_error(STRANGER, "NotAuthorized", "Detach", "sasa{sv}", "vm-edu", "0", "0")
    g.expect_error(HYPEMAN2, "NotOwner", "Detach", "sasa{sv}", "vm-edu", "0", "0")
    g.expect_error(HYPEMAN, "NotAuthorized", "Bind", "sa{sv}", "edu", "0")
    g.expect_drivers({EDU: "vfio-pci"}, "after the refusals")
    reply = g.detach(HYPEMAN, "vm-edu")
    check(reply.ok, f"Detach failed: {reply.describe()}")
    g.expect_drivers({EDU: None}, "after Detach")


def sc_host_critical(g: Guest) -> None:
    """The mounted NVMe disk and the 9p device carrying the root are refused HostCritical; the guest
    keeps both."""
    g.register("root", NVME, "nvme")
    g.register("root", ROOT_SHARE, "rootshare")
    g.expect_error(HYPEMAN, "HostCritical", *_attach_args("vm-disk", ["nvme"], include_group=False))
    g.expect_error(HYPEMAN, "HostCritical", *_attach_args("vm-share", ["rootshare"], include_group=False))
    g.expect_drivers({NVME: "nvme", ROOT_SHARE: "virtio-pci"}, "after the refusals")
    check(os.path.exists("/mnt/data/vfiod-e2e-data"), "/mnt/data is no longer readable")
    check(os.path.exists("/usr/bin/python3"), "the root file system is gone")


def sc_sriov_pf_refused(g: Guest) -> None:
    """Two VFs enabled by the admin (driverless): Attach and Bind of the PF answer SriovEnabled naming them
    and write nothing; Unbind of the PF on nvme is the usual no-op; ListAvailable shows the PF's VFs and
    each VF's physfn; hypeman gets one VF alone (include_group takes neither the PF nor the other VF), a
    VMM uses it, and Detach leaves it driverless again."""
    pf, (vf1, vf2) = str(SRIOV_PF), (str(v) for v in SRIOV_VFS)
    sysfs = Path(f"/sys/bus/pci/devices/{pf}")
    (sysfs / "sriov_drivers_autoprobe").write_text("0")
    (sysfs / "sriov_numvfs").write_text("2")
    g.say(f"admin: echo 0 > {sysfs}/sriov_drivers_autoprobe; echo 2 > {sysfs}/sriov_numvfs")
    check(wait_for(lambda: os.path.exists(f"/sys/bus/pci/devices/{vf2}"), 10), "the VFs did not appear")
    g.register("root", pf, "sriov-pf")
    reply = g.expect_error("root", "SriovEnabled", *_attach_args("vm-pf", ["sriov-pf"], include_group=False))
    check(vf1 in reply.message and vf2 in reply.message, f"the VFs are not named: {reply.message}")
    g.expect_error("root", "SriovEnabled", "Bind", "sa{sv}", "sriov-pf", "0")
    g.expect_drivers({pf: "nvme", vf1: None, vf2: None}, "after the refusals")
    check(_overrides(pf) == {pf: "(null)"}, f"an override was written: {_overrides(pf)}")
    g.expect_ok("root", "Unbind", "sa{sv}", "sriov-pf", "0")  # not on vfio: nothing to do
    listing = {
        d["pci_address"]: d
        for d in g.expect_ok(HYPEMAN, "ListAvailable", "a{sv}", "1", "all", "b", "true")[0]
    }
    shown = {k: listing[pf].get(k) for k in ("sriov_totalvfs", "sriov_numvfs", "virtfns", "physfn")}
    check(
        shown == {"sriov_totalvfs": 2, "sriov_numvfs": 2, "virtfns": [vf1, vf2], "physfn": ""}, f"PF: {shown}"
    )
    check(listing[vf1].get("physfn") == pf and not listing[pf]["passthrough_ready"], f"VF: {listing[vf1]}")
    g.register("root", vf1, "sriov-vf1")
    reply = g.attach(HYPEMAN, "vm-vf", ["sriov-vf1"], include_group=True)
    check(reply.ok, f"Attach of the VF failed: {reply.describe()}")
    check([r["pci_address"] for r in reply.data[0]] == [vf1], f"attachments: {reply.data[0]}")
    g.expect_drivers({vf1: "vfio-pci", vf2: None, pf: "nvme"}, "after Attach")
    res = g.vmm(HYPEMAN, f"/dev/vfio/{g.group(vf1)}", vf1)
    check(res.get("ok") is True and res.get("vendor_id") == "1b36", f"the VMM failed on the VF: {res}")
    reply = g.detach(HYPEMAN, "vm-vf")
    check(reply.ok, f"Detach failed: {reply.describe()}")
    g.expect_drivers({vf1: None, pf: "nvme"}, "after Detach")
    for name in ("sriov-vf1", "sriov-pf"):
        g.expect_ok("root", "UnregisterDevice", "sa{sv}", name, "0")
    (sysfs / "sriov_numvfs").write_text("0")
    check(wait_for(lambda: not os.path.exists(f"/sys/bus/pci/devices/{vf1}"), 10), "the VFs are still there")


def _numvfs(pf: str) -> tuple[str, str]:
    sysfs = Path(f"/sys/bus/pci/devices/{pf}")
    return (sysfs / "sriov_numvfs").read_text().strip(), (
        sysfs / "sriov_drivers_autoprobe"
    ).read_text().strip()


def _set_vfs(g: Guest, user: str, pf: str, count: int) -> list[str]:
    return list(g.expect_ok(user, "SetVirtualFunctions", "sua{sv}", pf, str(count), "0")[0])


def sc_sriov_vf_counts(g: Guest) -> None:
    """SetVirtualFunctions as root on the NVMe PF: 2, the same 2 again, 0, 1, then 2 (which the kernel
    accepts only after a 0: vfiod writes it), each answered with the VFs once they are on the bus, each VF
    driverless (autoprobe 0) in its own IOMMU group; hypeman and a stranger are refused, nothing changes."""
    pf, (vf1, vf2) = str(SRIOV_PF), (str(v) for v in SRIOV_VFS)
    start = g.log_position()
    for count, expected in ((2, [vf1, vf2]), (2, [vf1, vf2]), (0, []), (1, [vf1]), (2, [vf1, vf2])):
        vfs = _set_vfs(g, "root", pf, count)
        check(vfs == expected, f"SetVirtualFunctions {count} answered {vfs}, not {expected}")
        check(_numvfs(pf) == (str(count), "0"), f"after {count}: sriov_numvfs, autoprobe = {_numvfs(pf)}")
        for vf in expected:
            check(g.driver(vf) is None and g.group(vf) != g.group(pf), f"{vf}: {g.driver(vf)} {g.group(vf)}")
    g.expect_error(HYPEMAN, "NotAuthorized", "SetVirtualFunctions", "sua{sv}", pf, "0", "0")
    g.expect_error(STRANGER, "NotAuthorized", "SetVirtualFunctions", "sua{sv}", pf, "0", "0")
    g.expect_error("root", "InvalidArgument", "SetVirtualFunctions", "sua{sv}", pf, "3", "0")
    g.expect_error("root", "InvalidArgument", "SetVirtualFunctions", "sua{sv}", vf1, "1", "0")
    check(_numvfs(pf) == ("2", "0"), f"a refusal changed the PF: {_numvfs(pf)}")
    writes = [line for line in g.log_since(start).splitlines() if "sriov_numvfs <- '" in line]
    values = [line.split("sriov_numvfs <- '")[1].split("'")[0] for line in writes]
    check(values == ["2", "0", "1", "0", "2"], f"the sriov_numvfs writes were {values}")


def sc_sriov_vf_attached(g: Guest) -> None:
    """A VF set up by SetVirtualFunctions is an ordinary device: hypeman attaches it, its group node is
    hypeman's, an unprivileged program (the ctypes VMM, as hypeman) reads its config space; the VF count
    cannot change while it is attached (InUse, nothing written) and can once it is detached; the registered
    VF goes missing with its VF and comes back with it."""
    pf, (vf1, vf2) = str(SRIOV_PF), (str(v) for v in SRIOV_VFS)
    g.register("root", vf2, "sriov-vf2")
    reply = g.attach(HYPEMAN, "vm-vf", ["sriov-vf2"])
    check(reply.ok, f"Attach of the VF failed: {reply.describe()}")
    node = f"/dev/vfio/{g.group(vf2)}"
    import pwd

    st = os.stat(node)
    check(st.st_uid == pwd.getpwnam(HYPEMAN).pw_uid and st.st_mode & 0o777 == 0o600, f"{node}: {st}")
    res = g.vmm(HYPEMAN, node, vf2)
    check(res.get("ok") is True and res.get("vendor_id") == "1b36", f"the VMM failed on the VF: {res}")
    reply = g.expect_error("root", "InUse", "SetVirtualFunctions", "sua{sv}", pf, "1", "0")
    check("vm-vf" in reply.message, f"InUse should name the instance: {reply.message}")
    g.expect_drivers({vf1: None, vf2: "vfio-pci", pf: "nvme"}, "after the refusal")
    check(_numvfs(pf) == ("2", "0"), f"the refusal changed the PF: {_numvfs(pf)}")
    reply = g.detach(HYPEMAN, "vm-vf")
    check(reply.ok, f"Detach failed: {reply.describe()}")
    check(_set_vfs(g, "root", pf, 1) == [vf1], "SetVirtualFunctions 1 after Detach")
    state = g.expect_ok("root", "GetDevice", "sa{sv}", "sriov-vf2", "0")[0]["state"]
    check(state == "missing", f"the registered VF whose VF is gone is {state}")
    check(_set_vfs(g, "root", pf, 2) == [vf1, vf2], "SetVirtualFunctions 2")
    state = g.expect_ok("root", "GetDevice", "sa{sv}", "sriov-vf2", "0")[0]["state"]
    check(state == "host", f"the registered VF back on the bus is {state}")
    g.expect_ok("root", "UnregisterDevice", "sa{sv}", "sriov-vf2", "0")
    check(_set_vfs(g, "root", pf, 0) == [], "SetVirtualFunctions 0")
    registry_matches_kernel(g)


MDEV_BUS = Path("/sys/bus/mdev/devices")
MTTY_IDS = ("4348", "3253")  # samples/vfio-mdev/mtty.c: the emulated serial card's vendor and device


def _mdevs() -> list[str]:
    return sorted(os.listdir(MDEV_BUS)) if MDEV_BUS.is_dir() else []


def _attach_vgpu(g: Guest, user: str, instance: str, profile: str) -> Reply:
    return g.call(user, "AttachVGPU", "ssa{sv}", instance, profile, "0")


def _vgpus(g: Guest) -> list[dict[str, Any]]:
    return list(g.expect_ok("root", "ListVGPUs", "a{sv}", "0")[0])


def sc_mdev_profiles(g: Guest) -> None:
    """The sample drivers built out of tree (mtty, mbochs) loaded: hypeman's ListProfiles shows their types
    as the kernel offers them (mtty's virtual parent, no description; mbochs' video memory as
    framebuffer_mb), with what can be created now."""
    for module in ("mtty", "mbochs"):
        must(["modprobe", module])
    profiles = {p["type_id"]: p for p in g.expect_ok(HYPEMAN, "ListProfiles", "a{sv}", "0")[0]}
    want = {"mtty-1", "mtty-2", "mbochs-small", "mbochs-medium", "mbochs-large"}
    check(set(profiles) == want, f"profiles: {sorted(profiles)}")
    mtty2, large = profiles["mtty-2"], profiles["mbochs-large"]
    shown = (mtty2["name"], mtty2["available"], mtty2["parents"], mtty2["description"], mtty2["framework"])
    check(shown == ("Dual port serial", 12, ["mtty"], "", "mdev"), f"mtty-2: {mtty2}")
    check((large["framebuffer_mb"], large["available"]) == (64, 4), f"mbochs-large: {large}")
    only = g.expect_ok(HYPEMAN, "ListProfiles", "a{sv}", "1", "parent", "s", "mtty")[0]
    check({p["type_id"] for p in only} == {"mtty-1", "mtty-2"}, f"parent mtty: {only}")


def sc_mdev_attach_used(g: Guest) -> None:
    """AttachVGPU of mtty-2 as hypeman: an mdev whose group node is hypeman's, with its VFIO device under it
    (`vfio-dev/vfioN`, no cdev on Debian's 6.1: the simulator's rule M7); the unprivileged VMM opens
    the container and the group, gets the device by its uuid and reads 4348:3253 from its config space; the
    same call again gives the same vGPU; Detach while the VMM holds it is DeviceBusy naming it, after it
    exits the mdev and its node are gone. A stranger is refused."""
    import pwd

    g.expect_error(STRANGER, "NotAuthorized", "AttachVGPU", "ssa{sv}", "vm-x", "mtty-2", "0")
    reply = _attach_vgpu(g, HYPEMAN, "vm-mdev", "mtty-2")
    check(reply.ok, f"AttachVGPU failed: {reply.describe()}")
    att = reply.data[0]
    uuid, node = att["device_config"]["uuid"], att["vfio_group_path"]
    check(att["device_config"]["sysfsdev"] == f"/sys/bus/mdev/devices/{uuid}", f"record: {att}")
    check(_mdevs() == [uuid], f"the mdev bus has {_mdevs()}")
    check(os.readlink(MDEV_BUS / uuid / "mdev_type").endswith("/mtty-2"), "the mdev is not of type mtty-2")
    # 6.1: the mdev's VFIO device has its struct device under it, vfio-dev/vfioN (no cdev on Debian's)
    vfio_dev = MDEV_BUS / uuid / "vfio-dev"
    names = sorted(os.listdir(vfio_dev)) if vfio_dev.is_dir() else []
    g.say(f"{vfio_dev}: {names}")
    check(
        len(names) == 1 and names[0].startswith("vfio") and not (vfio_dev / names[0] / "dev").exists(),
        f"{vfio_dev}: {names}",
    )
    st = os.stat(node)
    check(st.st_uid == pwd.getpwnam(HYPEMAN).pw_uid and st.st_mode & 0o777 == 0o600, f"{node}: {st}")
    res = g.vmm(HYPEMAN, node, uuid)
    check(res.get("ok") is True and (res.get("vendor_id"), res.get("device_id")) == MTTY_IDS, f"VMM: {res}")
    again = _attach_vgpu(g, HYPEMAN, "vm-mdev", "Dual port serial")
    check(
        again.ok and again.data[0]["device_config"]["uuid"] == uuid, f"not the same vGPU: {again.describe()}"
    )
    (v,) = _vgpus(g)
    check(
        (v["uuid"], v["managed"], v["instance_id"], v["state"]) == (uuid, True, "vm-mdev", "attached"), f"{v}"
    )
    with g.holding_vmm(HYPEMAN, node, uuid) as pid:
        reply = g.detach(HYPEMAN, "vm-mdev")
        check(not reply.ok and reply.error == "DeviceBusy", f"expected DeviceBusy: {reply.describe()}")
        check(str(pid) in reply.message, f"DeviceBusy should name pid {pid}: {reply.message}")
        check(_mdevs() == [uuid], "the mdev went away while held")
    reply = g.detach(HYPEMAN, "vm-mdev")
    check(reply.ok, f"Detach failed: {reply.describe()}")
    check(_mdevs() == [] and not os.path.exists(node), f"left behind: {_mdevs()}, {node}")
    check(_vgpus(g) == [], f"ListVGPUs after Detach: {_vgpus(g)}")


def sc_vmm_qemu_uses_mdev(g: Guest) -> None:
    """A real QEMU takes an mdev by its sysfs path (-device vfio-pci,sysfsdev=, the Attachment's
    device_config.sysfsdev): query-pci shows mtty's 4348:3253; Detach while it runs is DeviceBusy naming
    it; after it quits the mdev is removed."""
    reply = _attach_vgpu(g, HYPEMAN, "vm-qemu-mdev", "mtty-2")
    check(reply.ok, f"AttachVGPU failed: {reply.describe()}")
    att = reply.data[0]
    uuid, sysfsdev = att["device_config"]["uuid"], att["device_config"]["sysfsdev"]
    with g.qemu(HYPEMAN, [sysfsdev]) as q:
        ids = {k: (f.vendor_id, f.device_id) for k, f in q.passed().items()}
        check(ids == {"hostdev0": MTTY_IDS}, f"query-pci: {ids}")
        reply = g.detach(HYPEMAN, "vm-qemu-mdev")
        check(not reply.ok and reply.error == "DeviceBusy", f"expected DeviceBusy: {reply.describe()}")
        check(str(q.pid) in reply.message, f"DeviceBusy should name pid {q.pid}: {reply.message}")
        check(_mdevs() == [uuid], "the mdev went away while QEMU had it")
    reply = g.detach(HYPEMAN, "vm-qemu-mdev")
    check(reply.ok, f"Detach failed: {reply.describe()}")
    check(_mdevs() == [], f"left behind: {_mdevs()}")


def sc_mdev_capacity(g: Guest) -> None:
    """mbochs' 256 MB: four mbochs-large vGPUs, the fifth is NoCapacity and creates nothing; one detached,
    the next fits."""
    for n in range(4):
        reply = _attach_vgpu(g, HYPEMAN, f"vm-big{n}", "mbochs-large")
        check(reply.ok, f"AttachVGPU {n} failed: {reply.describe()}")
    before = _mdevs()
    reply = _attach_vgpu(g, HYPEMAN, "vm-big4", "mbochs-large")
    check(not reply.ok and reply.error == "NoCapacity", f"expected NoCapacity: {reply.describe()}")
    check(_mdevs() == before and len(before) == 4, f"the refusal changed the bus: {_mdevs()}")
    check(g.detach(HYPEMAN, "vm-big0").ok, "Detach of vm-big0 failed")
    reply = _attach_vgpu(g, HYPEMAN, "vm-big4", "mbochs-large")
    check(reply.ok, f"AttachVGPU after a Detach failed: {reply.describe()}")
    for n in range(1, 5):
        check(g.detach(HYPEMAN, f"vm-big{n}").ok, f"Detach of vm-big{n} failed")
    check(_mdevs() == [], f"left behind: {_mdevs()}")


def _mdevctl_pairs(doc: Any) -> set[tuple[str, str]]:
    """(uuid, type) of every device `mdevctl list --dumpjson` shows ([{parent: [{uuid: {mdev_type}}]}])."""
    out: set[tuple[str, str]] = set()
    for by_parent in doc if isinstance(doc, list) else [doc]:
        for devices in by_parent.values():
            for entry in devices:
                for uuid, conf in entry.items():
                    out.add((uuid, conf.get("mdev_type", "")))
    return out


def sc_mdev_mdevctl(g: Guest) -> None:
    """Debian's mdevctl sees what vfiod sees: `mdevctl list --dumpjson` names the same mdevs and types as
    ListVGPUs; an mdev made outside vfiod is listed as not managed, and Detach leaves it alone."""
    mdevctl = sorted(glob.glob("/mnt/hostroot/mdevctl-*/usr/bin/mdevctl"))
    check(len(mdevctl) == 1, f"mdevctl binaries: {mdevctl}")
    for sub in ("callouts", "notifiers"):  # what the package would have made
        os.makedirs(f"/etc/mdevctl.d/scripts.d/{sub}", exist_ok=True)
        os.makedirs(f"/usr/lib/mdevctl/scripts.d/{sub}", exist_ok=True)
    outsider = "83b8f4f2-509f-382f-3c1e-e6bfe0fa0fff"
    Path("/sys/class/mdev_bus/mtty/mdev_supported_types/mtty-1/create").write_text(outsider)
    reply = _attach_vgpu(g, HYPEMAN, "vm-ctl", "mtty-1")
    check(reply.ok, f"AttachVGPU failed: {reply.describe()}")
    mine = reply.data[0]["device_config"]["uuid"]
    listed = json.loads(must([mdevctl[0], "list", "--dumpjson"]) or "{}")
    ours = {(v["uuid"], v["type_id"]) for v in _vgpus(g)}
    check(_mdevctl_pairs(listed) == ours == {(mine, "mtty-1"), (outsider, "mtty-1")}, f"{listed} vs {ours}")
    managed = {v["uuid"]: v["managed"] for v in _vgpus(g)}
    check(managed == {mine: True, outsider: False}, f"managed: {managed}")
    check(g.detach(HYPEMAN, "vm-ctl").ok, "Detach failed")
    check(_mdevs() == [outsider], f"after Detach: {_mdevs()}")
    (MDEV_BUS / outsider / "remove").write_text("1")


def sc_mdev_crash(g: Guest) -> None:
    """vfiod is SIGKILLed after writing the uuid to `create` and before verifying and handing it over (test
    hook); the next call activates it again, and start-up removes the mdev and forgets it: nothing leaked,
    the registry agrees with the kernel, and AttachVGPU works again."""
    daemon = start_crashing_vfiod(g, "attach-vgpu:verify#1")
    before = set(_mdevs())
    reply = _attach_vgpu(g, HYPEMAN, "vm-crash", "mtty-2")
    check(not reply.ok, f"AttachVGPU should not return: the daemon was to die ({reply.describe()})")
    expect_killed(daemon)
    leaked = sorted(set(_mdevs()) - before)
    check(len(leaked) == 1, f"the crash point is after create: one new mdev should exist, found {leaked}")
    g.say(f"vfiod died by SIGKILL with mdev {leaked[0]} created and not handed over")
    g.expect_ok("root", "ListVGPUs", "a{sv}", "0")  # activates vfiod; start-up recovers in the background
    check(wait_for(lambda: set(_mdevs()) == before, 60), f"start-up left {sorted(set(_mdevs()) - before)}")
    check(all(v["uuid"] != leaked[0] for v in _vgpus(g)), f"ListVGPUs after recovery: {_vgpus(g)}")
    registry_matches_kernel(g)
    reply = _attach_vgpu(g, HYPEMAN, "vm-crash", "mtty-2")
    check(reply.ok, f"AttachVGPU after recovery failed: {reply.describe()}")
    check(g.detach(HYPEMAN, "vm-crash").ok, "Detach after recovery failed")
    check(set(_mdevs()) == before, f"Detach after recovery left {sorted(set(_mdevs()) - before)}")


def _overrides(*addrs: str) -> dict[str, str]:
    return {a: Path(f"/sys/bus/pci/devices/{a}/driver_override").read_text().strip() for a in addrs}


def registry_matches_kernel(g: Guest) -> None:
    """ListDevices (as root) against sysfs: every registered device's live driver is the kernel's, and a
    device in state `host` is on its native driver, not on vfio."""
    devices = g.expect_ok("root", "ListDevices", "a{sv}", "0")[0]
    for d in devices:
        if d["type"] == "vgpu":  # an mdev: its directory and driver, not a PCI function's
            mdev = Path(d["sysfs_path"])
            live = os.path.basename(os.readlink(mdev / "driver")) if (mdev / "driver").exists() else ""
            check(d["driver"] == live, f"{d['name']}: registry says driver {d['driver']!r}, kernel {live!r}")
            check(d["state"] not in ("creating", "destroying", "stuck"), f"{d['name']} is left {d['state']}")
            continue
        addr = d["pci_address"]
        kernel = g.driver(addr) or ""
        check(d["driver"] == kernel, f"{d['name']}: registry says driver {d['driver']!r}, kernel {kernel!r}")
        if d["state"] == "host":
            check(
                not d["bound_to_vfio"] and kernel == d["native_driver"],
                f"{d['name']} is in state host but on {kernel!r} (native {d['native_driver']!r})",
            )
        check(d["state"] not in ("binding", "releasing", "stuck"), f"{d['name']} is left {d['state']}")


def start_crashing_vfiod(g: Guest, point: str) -> subprocess.Popen[bytes]:
    """Stop the bus-activated vfiod and start one by hand that SIGKILLs itself at `point` (test hook, only
    with VFIOD_TEST_HOOKS=1); returns once it owns its name."""
    for pid in g.vfiod_pids():
        os.kill(pid, signal.SIGTERM)
    check(wait_for(lambda: not g.vfiod_pids(), 30), "the activated vfiod did not stop on SIGTERM")
    env = dict(os.environ, VFIOD_TEST_HOOKS="1", VFIOD_TEST_CRASH_AT=point)
    log = open(g.bus_log, "ab")  # noqa: SIM115 - handed to the daemon
    daemon = subprocess.Popen(["/usr/sbin/vfiod", "run"], env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()

    def owned() -> bool:
        return sh(["busctl", "--system", "--timeout=5", "status", BUS_NAME], timeout=15).returncode == 0

    check(wait_for(owned, 60), "the hand-started vfiod did not take its name")
    return daemon


def expect_killed(daemon: subprocess.Popen[bytes]) -> None:
    try:
        status = daemon.wait(timeout=30)
    except subprocess.TimeoutExpired as e:
        daemon.kill()
        raise ScenarioFailed("vfiod did not die at the crash point") from e
    check(status == -signal.SIGKILL, f"vfiod ended with {status}, not SIGKILL")


def sc_crash_mid_attach(g: Guest) -> None:
    """vfiod is SIGKILLed between unbind and bind (test hook, only with VFIOD_TEST_HOOKS=1) in an Attach of
    the bridge group; the next call activates it again, and start-up recovery puts every function back
    on its driver, with the registry agreeing with the kernel."""
    daemon = start_crashing_vfiod(g, "attach:probe#1")
    g.show_drivers("before", BR_E1000, BR_EDU)
    reply = g.attach(HYPEMAN, "vm-crash", ["br-e1000", "br-edu"])
    check(not reply.ok, f"Attach should not return: the daemon was to die mid-way ({reply.describe()})")
    expect_killed(daemon)
    g.say(
        f"vfiod died by SIGKILL; kernel now: {g.drivers(BR_E1000, BR_EDU)} overrides {_overrides(BR_E1000)}"
    )
    check(g.driver(BR_E1000) is None, "the crash point is after e1000's unbind: it should have no driver now")

    # The next call activates vfiod again (without the hook). It takes its name first and finishes the
    # interrupted Attach in the background (calls on those devices answer Recovering meanwhile): wait
    # until the registry and the kernel agree, then check once more with the message.
    def recovered() -> bool:
        try:
            registry_matches_kernel(g)
        except ScenarioFailed:
            return False
        return g.drivers(BR_E1000, BR_EDU) == {BR_E1000: "e1000", BR_EDU: None}

    wait_for(recovered, 60)
    registry_matches_kernel(g)
    g.expect_drivers({BR_E1000: "e1000", BR_EDU: None}, "after recovery")
    overrides = _overrides(BR_E1000, BR_EDU)
    check(all(v in ("", "(null)") for v in overrides.values()), f"overrides left behind: {overrides}")
    reply = g.attach(HYPEMAN, "vm-crash", ["br-e1000", "br-edu"])
    check(reply.ok, f"Attach after recovery failed: {reply.describe()}")
    reply = g.detach(HYPEMAN, "vm-crash")
    check(reply.ok, f"Detach failed: {reply.describe()}")
    g.expect_drivers({BR_E1000: "e1000", BR_EDU: None}, "after Detach")
    registry_matches_kernel(g)


def sc_reset_warnings(g: Guest) -> None:
    """What the kernel shows of each function's resets (reset_method, 5.15+, and reset, both absent for a
    function without one) beside what `vfiod check --all --json` warns: a function with no reset at all
    is warned about, one with a function-level reset is not."""
    proc = sh(["/usr/sbin/vfiod", "check", "--all", "--json"])
    check(proc.returncode in (0, 1), f"vfiod check failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    records = {r["pci_address"]: r for r in json.loads(proc.stdout)["devices"]}
    seen = {"none": 0, "flr": 0}
    for addr, rec in sorted(records.items()):
        sysfs = Path(f"/sys/bus/pci/devices/{addr}")
        methods = (sysfs / "reset_method").read_text().split() if (sysfs / "reset_method").exists() else []
        has_reset = (sysfs / "reset").exists()
        warned = [w for w in rec["warnings"] if "reset" in w]
        shown = f"reset_method {' '.join(methods) or '-'}, reset {'yes' if has_reset else 'no'}"
        g.say(f"{addr} {rec['class']}: {shown}: {'; '.join(warned) or 'no warning'}")
        check(rec["reset_methods"] == methods, f"{addr}: vfiod reads {rec['reset_methods']}, sysfs {methods}")
        if not methods and not has_reset and not rec["blockers"]:
            seen["none"] += 1
            check(any("no reset method" in w for w in warned), f"{addr} has no reset and no warning")
        if "flr" in methods:
            seen["flr"] += 1
            check(not warned, f"{addr} has an FLR and is warned about: {warned}")
    g.say(f"functions without any reset: {seen['none']}, with an FLR: {seen['flr']}")
    check(seen["none"] >= 1, "no function without a reset was found (QEMU's edu has none)")


_OUTCOME_RE = re.compile(
    r"(Attach|Detach) by uid (\d+) \(instance vm-timing[^)]*\): ok \(([\d.]+) s: ([^)]*)\)"
)
RAW_TO_VFIO = """set -e
for a in "$@"; do echo vfio-pci > /sys/bus/pci/devices/$a/driver_override; done
for a in "$@"; do echo $a > /sys/bus/pci/devices/$a/driver/unbind; done
for a in "$@"; do echo $a > /sys/bus/pci/drivers_probe; done
"""
RAW_BACK = """set -e
for a in "$@"; do echo > /sys/bus/pci/devices/$a/driver_override; done
for a in "$@"; do echo $a > /sys/bus/pci/drivers/vfio-pci/unbind; done
for a in "$@"; do echo $a > /sys/bus/pci/drivers_probe; done
"""


def sc_attach_timing(g: Guest) -> None:
    """Attach and Detach of the VGA group (GPU + audio) beside the raw shell sequence that does the same
    writes (driver_override, unbind, drivers_probe per function, and back), medians of 3 rounds each: the
    raw sequence as root, vfiod as root and as hypeman (polkit's decision included), each call's round trip
    through busctl and vfiod's own time with the phases of its outcome line. Printed, not asserted."""
    fns, natives = [VGA, HDA], g.drivers(VGA, HDA)
    group = g.group(VGA)

    def raw(script: str, want: dict[str, str | None]) -> float:
        started = time.monotonic()
        proc = sh(["sh", "-c", script, "raw", *fns])
        check(proc.returncode == 0, f"the raw sequence failed: {proc.stderr.strip()}")
        check(wait_for(lambda: g.drivers(*fns) == want, 15), f"raw: drivers are {g.drivers(*fns)}")
        return time.monotonic() - started

    rows: list[tuple[str, float, float, str, str]] = []
    attach_raw, detach_raw = [], []
    for _ in range(3):
        unbind_console(g)  # bochs-drm takes the console again whenever it comes back
        attach_raw.append(raw(RAW_TO_VFIO, dict.fromkeys(fns, "vfio-pci")))
        check(os.path.exists(f"/dev/vfio/{group}"), f"/dev/vfio/{group} did not appear")
        detach_raw.append(raw(RAW_BACK, natives))
    rows.append(
        ("raw shell sequence (root)", statistics.median(attach_raw), statistics.median(detach_raw), "-", "-")
    )
    phases_seen: dict[str, str] = {}
    for user in ("root", HYPEMAN):
        pos = g.log_position()
        client: dict[str, list[float]] = {"Attach": [], "Detach": []}
        for _ in range(3):
            unbind_console(g)
            reply = g.attach(user, "vm-timing", ["vga"], include_group=True)
            check(reply.ok, f"Attach as {user} failed: {reply.describe()}")
            client["Attach"].append(reply.seconds)
            reply = g.detach(user, "vm-timing")
            check(reply.ok, f"Detach as {user} failed: {reply.describe()}")
            client["Detach"].append(reply.seconds)
            g.expect_drivers(natives, f"after Detach as {user}")
        own: dict[str, list[float]] = {"Attach": [], "Detach": []}
        check(wait_for(functools.partial(_outcomes_logged, g, pos, 6), 10), "no outcome lines in the log")
        for method, _uid, seconds, spent in _OUTCOME_RE.findall(g.log_since(pos)):
            own[method].append(float(seconds))
            phases_seen[f"{method} as {user}"] = spent
        rows.append(
            (
                f"vfiod as {user} (busctl round trip)",
                statistics.median(client["Attach"]),
                statistics.median(client["Detach"]),
                f"{statistics.median(own['Attach']):.3f} s",
                f"{statistics.median(own['Detach']):.3f} s",
            )
        )
    g.say(f"Attach/Detach of {VGA} + {HDA} on Linux {os.uname().release}, medians of 3:")
    g.say(f"  {'':36} {'attach':>8} {'detach':>8}   vfiod's own: attach  detach")
    for what, att, det, own_att, own_det in rows:
        g.say(f"  {what:36} {att:7.3f}s {det:7.3f}s   {own_att:>19} {own_det:>7}")
    for what, spent in phases_seen.items():
        g.say(f"  phases of the last {what}: {spent}")


def _outcomes_logged(g: Guest, pos: int, count: int) -> bool:
    return len(_OUTCOME_RE.findall(g.log_since(pos))) >= count


Scenario = Callable[[Guest], None]

FAST_INIT: dict[str, Scenario] = {
    "package-installs": sc_package_installs,
    "bus-activation": sc_bus_activation,
    "vga-console-refused": sc_vga_console_refused,
    "vga-list-and-conflict": sc_vga_list_and_conflict,
    "vga-attach": sc_vga_attach,
    "grant-kept": sc_grant_kept,
    "vmm-uses-group": sc_vmm_uses_group,
    "vmm-qemu-uses-group": sc_vmm_qemu_uses_group,
    "memlock": sc_memlock,
    "held-detach": sc_held_detach,
    "device-fd-holder": sc_device_fd_holder,
    "alsa-holder": sc_alsa_holder,
    "bridge-group": sc_bridge_group,
    "authorization": sc_authorization,
    "host-critical": sc_host_critical,
    "sriov-pf-refused": sc_sriov_pf_refused,
    "sriov-vf-counts": sc_sriov_vf_counts,
    "sriov-vf-attached": sc_sriov_vf_attached,
    "mdev-profiles": sc_mdev_profiles,
    "mdev-attach-used": sc_mdev_attach_used,
    "vmm-qemu-uses-mdev": sc_vmm_qemu_uses_mdev,
    "mdev-capacity": sc_mdev_capacity,
    "mdev-mdevctl": sc_mdev_mdevctl,
    "mdev-crash": sc_mdev_crash,
    "crash-mid-attach": sc_crash_mid_attach,
    "attach-timing": sc_attach_timing,
    "reset-warnings": sc_reset_warnings,
}

# Scenarios that make no sense once an earlier one failed (they build on its state).
DEPENDS: dict[str, str] = {
    "bus-activation": "package-installs",
    "vga-console-refused": "bus-activation",
    "vga-list-and-conflict": "bus-activation",
    "vga-attach": "vga-list-and-conflict",
    "grant-kept": "vga-attach",
    "vmm-uses-group": "vga-attach",
    "vmm-qemu-uses-group": "vga-attach",
    "memlock": "vga-attach",
    "held-detach": "vga-attach",
    "device-fd-holder": "held-detach",
    "alsa-holder": "held-detach",
    "bridge-group": "bus-activation",
    "authorization": "bus-activation",
    "host-critical": "bus-activation",
    "sriov-pf-refused": "bus-activation",
    "sriov-vf-counts": "bus-activation",
    "sriov-vf-attached": "sriov-vf-counts",
    "mdev-profiles": "bus-activation",
    "mdev-attach-used": "mdev-profiles",
    "vmm-qemu-uses-mdev": "mdev-profiles",
    "mdev-capacity": "mdev-profiles",
    "mdev-mdevctl": "mdev-profiles",
    "mdev-crash": "mdev-profiles",
    "crash-mid-attach": "bridge-group",
    "attach-timing": "alsa-holder",
    "reset-warnings": "bus-activation",
}


# ----- scenarios (systemd as PID 1) --------------------------------------------------------------------

FAKE_UNIT = "fake-persistenced.service"
CAP_SYS_ADMIN = 21


def journal_cursor() -> str:
    out = must(["journalctl", "-n", "1", "--show-cursor", "--no-pager", "-o", "cat"])
    for line in out.splitlines():
        if line.startswith("-- cursor: "):
            return line[len("-- cursor: ") :].strip()
    raise ScenarioFailed(f"journalctl showed no cursor: {out[-300:]!r}")


def journal_since(cursor: str) -> list[dict[str, Any]]:
    out = must(["journalctl", f"--after-cursor={cursor}", "-o", "json", "--no-pager"], timeout=60)
    entries = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return sorted(entries, key=lambda e: int(e.get("__MONOTONIC_TIMESTAMP", 0)))


def unit_prop(unit: str, prop: str) -> str:
    return must(["systemctl", "show", unit, "-p", prop, "--value"]).strip()


def check_hold_order(g: Guest, entries: list[dict[str, Any]], what: str) -> None:
    """In the journal, the persistence unit stopped before vfiod's first sysfs write of the call and
    started again after its last one."""

    def job(e: dict[str, Any], kind: str) -> bool:
        return e.get("UNIT") == FAKE_UNIT and e.get("JOB_TYPE") == kind and e.get("JOB_RESULT") == "done"

    stops = [i for i, e in enumerate(entries) if job(e, "stop")]
    writes = [i for i, e in enumerate(entries) if e.get("ACTION") == "sysfs-write"]
    check(bool(stops), f"{what}: the journal shows no stop of {FAKE_UNIT}")
    check(
        bool(writes),
        f"{what}: the journal shows no ACTION=sysfs-write record: vfiod's sysfs write log is missing",
    )
    starts = [i for i, e in enumerate(entries) if job(e, "start") and i > stops[0]]
    check(bool(starts), f"{what}: the journal shows no start of {FAKE_UNIT} after its stop")
    for i in (stops[0], writes[0], writes[-1], starts[0]):
        e = entries[i]
        g.say(f"journal [{int(e.get('__MONOTONIC_TIMESTAMP', 0)) / 1e6:.3f}] {e.get('MESSAGE')}")
    check(stops[0] < writes[0], f"{what}: vfiod wrote to sysfs before {FAKE_UNIT} was stopped")
    check(writes[-1] < starts[0], f"{what}: {FAKE_UNIT} was started again before vfiod's last sysfs write")


def check_key_event(
    g: Guest, entries: list[dict[str, Any]], message_id: str, method: str, instance: str, addrs: set[str]
) -> None:
    """The call's key event is in the journal once, with the instance and every function, and
    `journalctl -x` explains it from the catalog the package installed (systemd's dpkg trigger compiled
    it); the call's outcome line (logger vfiod.audit) names the same instance and functions at INFO."""
    events = [e for e in entries if e.get("MESSAGE_ID") == message_id]
    check(len(events) == 1, f"{method}: {len(events)} journal entries with MESSAGE_ID={message_id}")
    event = events[0]
    check(
        event.get("INSTANCE_ID") == instance and set(event.get("PCI_ADDRESS", "").split(",")) == addrs,
        f"{method}: the key event names {event.get('INSTANCE_ID')} {event.get('PCI_ADDRESS')}",
    )
    outcome = [e for e in entries if e.get("METHOD") == method and e.get("RESULT") == "ok"]
    check(len(outcome) == 1, f"{method}: {len(outcome)} outcome lines")
    line = outcome[0]
    check(
        (line.get("PRIORITY"), line.get("INSTANCE_ID"), set(line.get("PCI_ADDRESS", "").split(",")))
        == ("6", instance, addrs),
        f"{method}: outcome line {line.get('PRIORITY')} {line.get('INSTANCE_ID')} {line.get('PCI_ADDRESS')}",
    )
    explained = must(["journalctl", "-x", "--no-pager", "-n", "1", f"MESSAGE_ID={message_id}"])
    g.say(f"journalctl -x of MESSAGE_ID={message_id}:\n{explained.strip()[:600]}")
    check("Defined-By: vfiod" in explained, f"{method}: journalctl -x has no catalog text for the event")


def sc_systemd_boot(g: Guest) -> None:
    """systemd is PID 1, the system is up, and neither dbus, polkit nor vfiod failed."""
    comm = Path("/proc/1/comm").read_text().strip()
    check(comm == "systemd", f"PID 1 is {comm}")
    state = sh(["systemctl", "is-system-running", "--wait"], timeout=120).stdout.strip()
    failed = sh(["systemctl", "--failed", "--no-legend", "--plain"]).stdout.strip()
    g.say(f"system {state}; failed units: {failed or 'none'}")
    for unit in ("dbus.service", "vfiod.service", "polkit.service", FAKE_UNIT):
        check(unit not in failed, f"{unit} failed")
    check(unit_prop(FAKE_UNIT, "ActiveState") == "active", f"{FAKE_UNIT} is not running")


def sc_systemd_activation(g: Guest) -> None:
    """Stopped, vfiod.service is started by systemd on the bus's request (SystemdService=), under its
    sandbox, after modprobe@vfio_pci.service."""
    must(["systemctl", "stop", "vfiod.service"])
    check(unit_prop("vfiod.service", "ActiveState") == "inactive", "vfiod.service did not stop")
    status = g.expect_ok(HYPEMAN, "GetHostStatus", "a{sv}", "0")[0]
    check(status.get("vfio_pci_loaded") is True, f"vfio-pci not loaded: {status}")
    check(unit_prop("vfiod.service", "ActiveState") == "active", "vfiod.service is not active after the call")
    pid = int(unit_prop("vfiod.service", "MainPID"))
    check(pid > 0, "vfiod.service has no main process")
    cgroup = Path(f"/proc/{pid}/cgroup").read_text()
    check("vfiod.service" in cgroup, f"vfiod (pid {pid}) is not in its unit's cgroup: {cgroup}")
    fields = dict(
        line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line
    )
    cap_eff = int(fields.get("CapEff", "0").strip(), 16)
    g.say(f"vfiod pid {pid}: CapEff {fields.get('CapEff', '').strip()} NoNewPrivs {fields.get('NoNewPrivs')}")
    check(not cap_eff & (1 << CAP_SYS_ADMIN), "vfiod runs with CAP_SYS_ADMIN")
    check(fields.get("NoNewPrivs", "").strip() == "1", "vfiod runs without NoNewPrivileges")
    result = unit_prop("modprobe@vfio_pci.service", "Result")
    entered = unit_prop("modprobe@vfio_pci.service", "InactiveExitTimestampMonotonic")
    g.say(f"modprobe@vfio_pci.service: Result={result} InactiveExitTimestampMonotonic={entered}")
    check(result == "success" and entered not in ("", "0"), "modprobe@vfio_pci.service did not run")


def wait_restarted(unit: str, before: str, what: str) -> str:
    """The unit's new MainPID once vfiod started it again: after the persistence linger (2 s by default)."""
    deadline = time.monotonic() + 20
    while True:
        pid = unit_prop(unit, "MainPID")
        if pid not in ("", "0") and pid != before:
            return pid
        check(time.monotonic() < deadline, f"{what}: {unit} was not restarted ({before} -> {pid})")
        time.sleep(0.2)


def sc_persistence_attach(g: Guest) -> None:
    """Attach of the VGA group under systemd: fake-persistenced (vendor 1234 in vfiod.toml) is stopped
    before the first bind write and started after the last, once the linger has passed; the group is usable
    by hypeman."""
    unbind_console(g)
    g.register(HYPEMAN, VGA, "vga")
    before = unit_prop(FAKE_UNIT, "MainPID")
    cursor = journal_cursor()
    reply = g.attach(HYPEMAN, "vm-vga", ["vga"], include_group=True)
    check(reply.ok, f"Attach failed: {reply.describe()}")
    g.expect_drivers({VGA: "vfio-pci", HDA: "vfio-pci"}, "after Attach")
    after = wait_restarted(FAKE_UNIT, before, "Attach")
    g.say(f"{FAKE_UNIT}: pid {before} before, {after} after")
    entries = journal_since(cursor)
    check_hold_order(g, entries, "Attach")
    check_key_event(g, entries, MessageId.ATTACHED, "Attach", "vm-vga", {VGA, HDA})
    res = g.vmm(HYPEMAN, f"/dev/vfio/{g.group(VGA)}", VGA)
    check(res.get("ok") is True, f"the VMM failed: {res}")


def sc_persistence_detach(g: Guest) -> None:
    """Detach: the unit is held stopped again around the unbinds; both functions are back."""
    cursor = journal_cursor()
    before = unit_prop(FAKE_UNIT, "MainPID")
    reply = g.detach(HYPEMAN, "vm-vga")
    check(reply.ok, f"Detach failed: {reply.describe()}")
    g.expect_drivers({VGA: "bochs-drm", HDA: "snd_hda_intel"}, "after Detach")
    wait_restarted(FAKE_UNIT, before, "Detach")
    entries = journal_since(cursor)
    check_hold_order(g, entries, "Detach")
    check_key_event(g, entries, MessageId.DETACHED, "Detach", "vm-vga", {VGA, HDA})
    check(unit_prop(FAKE_UNIT, "ActiveState") == "active", f"{FAKE_UNIT} is not running after Detach")


def sc_persistence_linger(g: Guest) -> None:
    """An Attach and a Detach back to back share one stop/start cycle of the persistence unit: the Detach
    comes within the linger, finds the unit still stopped and takes the hold without a new stop."""
    unbind_console(g)  # bochs-drm took the console back at Detach
    cursor = journal_cursor()
    before = unit_prop(FAKE_UNIT, "MainPID")
    started = time.monotonic()
    check(g.attach(HYPEMAN, "vm-linger", ["vga"], include_group=True).ok, "Attach failed")
    check(g.detach(HYPEMAN, "vm-linger").ok, "Detach failed")
    took = time.monotonic() - started
    g.expect_drivers({VGA: "bochs-drm", HDA: "snd_hda_intel"}, "after Detach")
    wait_restarted(FAKE_UNIT, before, "Attach + Detach")
    entries = journal_since(cursor)

    def jobs(kind: str) -> int:
        return sum(
            1
            for e in entries
            if e.get("UNIT") == FAKE_UNIT and e.get("JOB_TYPE") == kind and e.get("JOB_RESULT") == "done"
        )

    shared = [e for e in entries if "held again without a new stop" in str(e.get("MESSAGE", ""))]
    g.say(f"Attach + Detach in {took:.2f} s: {jobs('stop')} stop(s), {jobs('start')} start(s) of {FAKE_UNIT}")
    check(jobs("stop") == 1 and jobs("start") == 1, f"{FAKE_UNIT}: not one stop/start cycle for both calls")
    check(len(shared) == 1, f"vfiod logged {len(shared)} shared holds, not 1")


def sc_metrics_textfile(g: Guest) -> None:
    """Under the unit's sandbox (ProtectSystem=strict, UMask=0077) vfiod writes its metrics textfile where
    Debian's prometheus-node-exporter reads it, mode 0644, and it follows the device's state."""
    path = Path("/var/lib/prometheus/node-exporter/vfiod.prom")
    unbind_console(g)  # bochs-drm took the console back at Detach
    reply = g.attach(HYPEMAN, "vm-metrics", ["vga"], include_group=True)
    check(reply.ok, f"Attach failed: {reply.describe()}")
    deadline = time.monotonic() + 10
    while 'vfiod_devices{state="attached"} 2' not in (path.read_text() if path.exists() else ""):
        check(time.monotonic() < deadline, f"{path} never showed the attachment")
        time.sleep(0.2)
    mode = path.stat().st_mode & 0o777
    g.say(f"{path}: mode {mode:04o}, {len(path.read_text().splitlines())} lines")
    check(mode == 0o644, f"{path} has mode {mode:04o}, not 0644")
    check(sorted(p.name for p in path.parent.iterdir()) == ["vfiod.prom"], "a temporary file was left behind")
    check(g.detach(HYPEMAN, "vm-metrics").ok, "Detach failed")


SYSTEMD: dict[str, Scenario] = {
    "systemd-boot": sc_systemd_boot,
    "systemd-activation": sc_systemd_activation,
    "persistence-attach": sc_persistence_attach,
    "persistence-detach": sc_persistence_detach,
    "persistence-linger": sc_persistence_linger,
    "metrics-textfile": sc_metrics_textfile,
}

SYSTEMD_DEPENDS: dict[str, str] = {
    "systemd-activation": "systemd-boot",
    "persistence-attach": "systemd-activation",
    "persistence-detach": "persistence-attach",
    "persistence-linger": "persistence-detach",
    "metrics-textfile": "persistence-linger",
}
