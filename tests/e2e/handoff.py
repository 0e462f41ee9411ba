"""Guest side of the descriptor hand-over (Attach with `handoff` fd, OpenDevices) on the kernel with VFIO
device cdevs and iommufd (`VFIOD_E2E_KERNEL_TARBALL`), in the variant-driver boot: the installed package
under systemd, real dbus-daemon with the shipped policy, real polkitd with the shipped rules.

As hypeman: Attach in fd mode leaves `/dev/vfio/<group>` and the cdev root 0600 (a VMM that opens the
group itself is refused); OpenDevices hands a program the descriptors, with which it binds the device to
iommufd, reads its config space and maps DMA; a real QEMU 10 (fetched by the host, tests/e2e/qemu10.py)
takes them and lists the device; Detach while it runs answers DeviceBusy naming it, and after it has quit
the device goes home. The stranger may not open devices. An mdev of the kernel's `mtty` sample, asked for
in fd mode, gets its own cdev, which OpenDevices passes only with `allow_mdev`; QEMU 10 refuses it given by
`fd=` alone and runs it given `sysfsdev=` beside `fd=`, started by the installed `vfioctl open-devices`.
Standard library only, but for the fd VMM's D-Bus call (the package's own dbus_fast, /usr/lib/vfiod).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.e2e import qemu_vmm
from tests.e2e.service import (
    HYPEMAN,
    MTTY_IDS,
    PYTHON,
    SRC,
    STRANGER,
    Guest,
    Scenario,
    as_user,
    holding,
    must,
    registry_matches_kernel,
    sh,
)
from tests.e2e.trace import EDU, ScenarioFailed, check

FD_VMM = ["-m", "tests.e2e.fd_vmm"]
PACKAGE_LIBS = "/usr/lib/vfiod"
INSTANCE = "vm-fd"
MDEV_INSTANCE = "vm-fd-mdev"


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=f"{SRC}:{PACKAGE_LIBS}")


def _argv(extra: list[str]) -> list[str]:
    # memlock unlimited, as hypeman's drop-in sets it: iommufd charges pinned pages to RLIMIT_MEMLOCK
    return ["prlimit", "--memlock=unlimited:unlimited", *as_user(HYPEMAN, [PYTHON, *FD_VMM, *extra])]


def _fd_vmm(g: Guest, instance: str = INSTANCE, device: str = EDU, *flags: str) -> dict[str, Any]:
    proc = sh(_argv([instance, device, *flags]), timeout=120, env=_env())
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise ScenarioFailed(f"the fd VMM printed nothing: {proc.stderr.strip()[-1500:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    g.say(f"{HYPEMAN}$ fd_vmm {instance} {device} {' '.join(flags)}: {result}")
    return result


def _qemu_root() -> str:
    """The QEMU 10 the host unpacked into the cache (tests/e2e/qemu10.py), the newest if several."""
    found = sorted(glob.glob("/mnt/hostroot/qemu-*/usr/bin/qemu-system-x86_64"))
    if not found:
        raise ScenarioFailed("no QEMU 10 under /mnt/hostroot (the host fetches it before the boot)")
    return found[-1].removesuffix("/usr/bin/qemu-system-x86_64")


@contextlib.contextmanager
def _qemu_holding(
    g: Guest, instance: str = INSTANCE, device: str = EDU, *flags: str
) -> Iterator[dict[str, Any]]:
    """A real QEMU 10 as hypeman, given the descriptors OpenDevices passed (fd_vmm --qemu --hold)."""
    argv = _argv([instance, device, "--qemu", _qemu_root(), "--hold", *flags])
    with holding(argv, _env(), "QEMU") as (_, result):
        g.say(
            f"{HYPEMAN}$ qemu-system-x86_64 -S ... {result.get('qemu')} (pid {result.get('pid')}): {result}"
        )
        yield result


@contextlib.contextmanager
def _launched_by_vfioctl(
    g: Guest, instance: str, device: str, *options: str
) -> Iterator[qemu_vmm.RunningQemu]:
    """A real QEMU 10 as hypeman, started by the installed `vfioctl open-devices INSTANCE -- QEMU ...`,
    which writes the descriptors' numbers into `device` (-device's value) and execs QEMU with them."""
    root = _qemu_root()
    launcher = [*as_user(HYPEMAN, ["/usr/bin/vfioctl", "open-devices", *options, instance, "--"])]
    extra = [
        *("-L", f"{root}/usr/share/qemu", "-L", f"{root}/usr/share/seabios"),
        *("-object", "iommufd,id=iommufd0,fd={iommufd}", "-device", device),
    ]
    env = dict(os.environ, QEMU_MODULE_DIR=f"{root}/usr/lib/x86_64-linux-gnu/qemu")
    with qemu_vmm.running(
        ["prlimit", "--memlock=unlimited:unlimited", *launcher],
        pwd.getpwnam(HYPEMAN).pw_uid,
        [],
        binary=f"{root}/usr/bin/qemu-system-x86_64",
        extra=extra,
        env=env,
    ) as q:
        g.say(
            f"{HYPEMAN}$ vfioctl open-devices {' '.join(options)} {instance} -- qemu-system-x86_64 -S ... "
            f"{' '.join(extra[4:])} (pid {q.proc.pid}): query-pci {q.passed()}"
        )
        yield q


def _owner(path: str) -> tuple[int, str]:
    st = os.stat(path)
    return st.st_uid, oct(stat.S_IMODE(st.st_mode))


def sc_fd_handoff_attach(g: Guest) -> None:
    """The host says fd mode works; as hypeman, Attach with handoff fd binds the edu and changes no node:
    the group node and the cdev stay root 0600, and a VMM that opens the group itself is refused."""
    status = g.expect_ok("root", "GetHostStatus", "a{sv}", "0")[0]
    devices = Path("/proc/devices").read_text(encoding="ascii").split("Block devices:")[0]
    g.say(
        f"GetHostStatus vfio_cdev={status['vfio_cdev']} iommufd={status['iommufd']}; /proc/devices "
        f"has vfio-dev: {' vfio-dev' in devices}"
    )
    check(status["vfio_cdev"] is True and status["iommufd"] is True, f"GetHostStatus: {status}")
    g.register("root", EDU, "edu")
    reply = g.call(HYPEMAN, "Attach", "sasa{sv}", INSTANCE, "1", "edu", "1", "handoff", "s", "fd")
    check(reply.ok, f"Attach with handoff fd failed: {reply.describe()}")
    (rec,) = reply.data[0]
    g.expect_drivers({EDU: "vfio-pci"}, "after Attach")
    cdev = rec["vfio_cdev_path"]
    check(rec["handoff"] == "fd" and rec["vfio_group_path"] == "", f"the record: {rec}")
    name = os.path.basename(cdev)
    check(os.path.isfile(f"/sys/bus/pci/devices/{EDU}/vfio-dev/{name}/dev"), f"{cdev} is not {EDU}'s cdev")
    node = f"/dev/vfio/{g.group(EDU)}"
    owners = {node: _owner(node), cdev: _owner(cdev)}
    g.say(f"nodes after Attach in fd mode: {owners}")
    check(all(o == (0, "0o600") for o in owners.values()), f"a node changed owner: {owners}")
    res = g.vmm(HYPEMAN, node, EDU)  # the group interface, by itself: the node is not hypeman's
    check(res.get("ok") is False and res.get("errno") == "EACCES", f"hypeman opened the group node: {res}")


def sc_fd_handoff_open(g: Guest) -> None:
    """OpenDevices as hypeman: the program gets /dev/iommu and the cdev as descriptors, binds the device
    to iommufd, reads its ids (1234:11e8) from config space and maps 1 MiB of DMA; each call opens anew.
    The stranger is refused by polkit."""
    res = _fd_vmm(g)
    check(res.get("ok") is True, f"the fd VMM failed: {res}")
    check((res.get("vendor_id"), res.get("device_id")) == ("1234", "11e8"), f"config space: {res}")
    nodes = sorted(res.get("nodes", {}).values())
    check(nodes[0].startswith("/dev/iommu") and nodes[1].startswith("/dev/vfio/devices/vfio"), f"{nodes}")
    check(_fd_vmm(g).get("ok") is True, "a second OpenDevices did not work")
    reply = g.call(STRANGER, "OpenDevices", "sasa{sv}", INSTANCE, "0", "0")
    check(reply.error == "NotAuthorized", f"the stranger's OpenDevices: {reply.describe()}")


def sc_fd_handoff_qemu(g: Guest) -> None:
    """A real QEMU 10 as hypeman takes the descriptors (`-object iommufd,fd= -device vfio-pci,fd=`), the
    program that asked for them keeping no copy: `query-pci` lists 1234:11e8. While it runs, Detach
    answers DeviceBusy naming QEMU (opening a cdev never answers EBUSY: the /proc scan is the truth); after
    it has quit, Detach returns the edu to no driver."""
    with _qemu_holding(g) as q:
        passed = q.get("passed", {})
        check(passed.get("hostdev0", [None])[:2] == ["1234", "11e8"], f"query-pci: {passed}")
        reply = g.detach(HYPEMAN, INSTANCE)
        check(
            reply.error == "DeviceBusy" and str(q.get("pid")) in reply.message and "qemu" in reply.message,
            f"Detach while QEMU runs: {reply.describe()}",
        )
        g.expect_drivers({EDU: "vfio-pci"}, "after the refused Detach")
    reply = g.detach(HYPEMAN, INSTANCE)
    check(reply.ok, f"Detach failed: {reply.describe()}")
    g.expect_drivers({EDU: None}, "after Detach")
    registry_matches_kernel(g)


def sc_fd_handoff_mdev(g: Guest) -> None:
    """`mtty` on the same kernel: AttachVGPU of mtty-2 as hypeman with handoff fd creates an mdev with its
    own cdev (`<uuid>/vfio-dev/vfioN`, the rule the simulator follows) and changes no node, warning that a
    VMM needs its sysfs path. OpenDevices without allow_mdev: HandoffUnsupported. With it, a program binds
    the mdev's cdev to iommufd, reads mtty's 4348:3253 from config space and maps DMA; a real QEMU 10 given
    the descriptors with `fd=` alone fails (it asks iommufd for the hardware IOMMU's info), and started by
    `vfioctl open-devices --allow-mdev` with `sysfsdev=` beside `fd=` lists the card; Detach while QEMU runs:
    DeviceBusy naming it; after it has quit, Detach removes the mdev."""
    must(["modprobe", "mtty"])
    reply = g.call(HYPEMAN, "AttachVGPU", "ssa{sv}", MDEV_INSTANCE, "mtty-2", "1", "handoff", "s", "fd")
    check(reply.ok, f"AttachVGPU with handoff fd failed: {reply.describe()}")
    rec, warnings = reply.data[0], reply.data[1]
    uuid, cdev = rec["device_config"]["uuid"], rec["vfio_cdev_path"]
    check(rec["handoff"] == "fd" and rec["vfio_group_path"] == "", f"the record: {rec}")
    vfio_dev = f"/sys/bus/mdev/devices/{uuid}/vfio-dev"
    names = sorted(os.listdir(vfio_dev)) if os.path.isdir(vfio_dev) else []
    g.say(f"{vfio_dev}: {names}; the record's cdev {cdev}")
    check(names == [os.path.basename(cdev)] and os.path.isfile(f"{vfio_dev}/{names[0]}/dev"), f"{names}")
    node = f"/dev/vfio/{rec['iommu_group']}"
    owners = {node: _owner(node), cdev: _owner(cdev)}
    check(all(o == (0, "0o600") for o in owners.values()), f"a node changed owner: {owners}")
    check(any("allow_mdev" in w for w in warnings), f"no warning about the mdev: {warnings}")
    refused = g.call(HYPEMAN, "OpenDevices", "sasa{sv}", MDEV_INSTANCE, "0", "0")
    check(
        refused.error == "HandoffUnsupported" and "allow_mdev" in refused.message,
        f"OpenDevices of an mdev without allow_mdev: {refused.describe()}",
    )
    res = _fd_vmm(g, MDEV_INSTANCE, uuid, "--allow-mdev")
    check(res.get("ok") is True and (res.get("vendor_id"), res.get("device_id")) == MTTY_IDS, f"{res}")
    check(any("allow_mdev" in w for w in res.get("warnings", [])), f"OpenDevices said nothing: {res}")
    # fd= alone: QEMU takes the mdev for a physical device and asks iommufd for its IOMMU's hardware info
    alone = _fd_vmm(g, MDEV_INSTANCE, uuid, "--qemu", _qemu_root(), "--allow-mdev")
    g.say(f"QEMU with fd= alone: ok={alone.get('ok')} {alone.get('error', '')}")
    check(alone.get("ok") is False and "hardware info" in alone.get("error", ""), f"fd= alone: {alone}")
    device = "vfio-pci,fd={fd},iommufd=iommufd0,sysfsdev={sysfs},id=hostdev0"
    with _launched_by_vfioctl(g, MDEV_INSTANCE, device, "--allow-mdev") as q:
        passed = {k: (f.vendor_id, f.device_id) for k, f in q.passed().items()}
        check(passed.get("hostdev0") == MTTY_IDS, f"query-pci: {passed}")
        reply = g.detach(HYPEMAN, MDEV_INSTANCE)
        check(
            reply.error == "DeviceBusy" and str(q.proc.pid) in reply.message,  # vfioctl became QEMU
            f"Detach while QEMU runs: {reply.describe()}",
        )
        check(os.path.isdir(f"/sys/bus/mdev/devices/{uuid}"), "the mdev went away while QEMU held it")
    reply = g.detach(HYPEMAN, MDEV_INSTANCE)
    check(reply.ok, f"Detach failed: {reply.describe()}")
    check(not os.path.exists(f"/sys/bus/mdev/devices/{uuid}"), f"the mdev {uuid} is still there")
    registry_matches_kernel(g)


HANDOFF: dict[str, Scenario] = {
    "fd-handoff-attach": sc_fd_handoff_attach,
    "fd-handoff-open": sc_fd_handoff_open,
    "fd-handoff-qemu": sc_fd_handoff_qemu,
    "fd-handoff-mdev": sc_fd_handoff_mdev,
}

HANDOFF_DEPENDS: dict[str, str] = {
    "fd-handoff-open": "fd-handoff-attach",
    "fd-handoff-qemu": "fd-handoff-open",
}
