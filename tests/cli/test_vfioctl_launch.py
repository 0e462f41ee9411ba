"""`vfioctl open-devices INSTANCE [DEV...] -- COMMAND` (vfiod/cli/vfioctl_launch.py): the placeholders and,
against the real service on a private bus (`vfiod run --simulate mdev-samples-iommufd`), a command that
starts with exactly the descriptors OpenDevices passed (the simulated host's /dev/iommu and the device's
cdev, at the numbers written into its arguments) and none of vfioctl's own; the refusals (an unknown
placeholder before any call, a node-mode attachment, an mdev without --allow-mdev) with their exit
statuses."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cli.support.buses import private_bus
from vfiod.cli import vfioctl
from vfiod.cli.vfioctl_bus import CallError
from vfiod.cli.vfioctl_launch import Received, check_placeholders, substitute

REPO = Path(__file__).resolve().parents[2]
VFIOD, VFIOCTL = REPO / ".venv/bin/vfiod", REPO / ".venv/bin/vfioctl"
EDU = "0000:00:07.0"
MDEV = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"

# the program vfioctl starts: what its arguments say and which descriptors it has
SHOW = (
    "import json, os, sys\n"
    "fds = {}\n"
    "for n in os.listdir('/proc/self/fd'):\n"
    "    try: fds[n] = os.readlink(f'/proc/self/fd/{n}')\n"
    "    except OSError: pass  # the listing's own, closed by now\n"
    "print(json.dumps({'argv': sys.argv[1:], 'fds': fds}))"
)


def test_placeholders() -> None:
    one = Received(7, (("i" * 24, f"/sys/bus/pci/devices/{EDU}/", 8),))
    assert substitute(["fd={iommufd}", "vfio-pci,fd={fd},sysfsdev={sysfs}", '{"fd": "{fd}"}'], one) == [
        "fd=7",
        f"vfio-pci,fd=8,sysfsdev=/sys/bus/pci/devices/{EDU}",
        '{"fd": "8"}',  # other braces stay (QEMU's JSON options)
    ]
    two = Received(
        3, (("a" * 24, f"/sys/bus/pci/devices/{EDU}/", 4), ("b" * 24, f"/sys/bus/mdev/devices/{MDEV}/", 5))
    )
    assert substitute([f"{{fd:{EDU}}}", f"{{fd:{MDEV}}}", "{sysfs:" + "b" * 24 + "}"], two) == [
        "4",
        "5",
        f"/sys/bus/mdev/devices/{MDEV}",
    ]
    with pytest.raises(CallError, match="OpenDevices passed 2"):
        substitute(["{fd}"], two)
    with pytest.raises(CallError, match=r"no device '0000:09:00.0' among those passed"):
        substitute(["{fd:0000:09:00.0}"], two)
    with pytest.raises(CallError, match="takes no key"):
        check_placeholders(["-object", "iommufd,id=i0,fd={iommufd:x}"])


@dataclass
class Service:
    address: str
    root: Path


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    with private_bus() as addr, tempfile.TemporaryDirectory(prefix="vfioctl-launch-") as tmp:
        root = Path(tmp) / "host"
        argv = [str(VFIOD), "run", "--bus", addr, "--simulate", "mdev-samples-iommufd"]
        argv += ["--sim-root", str(root)]
        with (Path(tmp) / "vfiod.log").open("w") as log:
            proc = subprocess.Popen(
                [*argv, "--state-dir", f"{tmp}/state"], stdout=log, stderr=subprocess.STDOUT
            )
        try:
            end = time.monotonic() + 20
            while subprocess.run(
                ["busctl", f"--address={addr}", "status", "org.hypeman.Devices1"],
                capture_output=True,
                check=False,
            ).returncode:
                if proc.poll() is not None or time.monotonic() > end:
                    pytest.fail(f"vfiod did not come up:\n{(Path(tmp) / 'vfiod.log').read_text()}")
                time.sleep(0.1)
            yield Service(addr, root)
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def launch(service: Service, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [VFIOCTL, "--address", service.address, "open-devices", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def ctl(service: Service, *args: str) -> int:
    return vfioctl.main(["--address", service.address, "--json", *args])


def test_the_command_gets_the_descriptors_and_nothing_else(
    service: Service, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl(service, "register", EDU, "--name", "edu") == 0
    capsys.readouterr()
    assert ctl(service, "attach", "vm1", "edu", "--handoff", "fd") == 0
    cdev = json.loads(capsys.readouterr().out.strip())["attachments"][0]["vfio_cdev_path"]
    run = launch(service, "vm1", "--", sys.executable, "-c", SHOW, "{iommufd}", "fd={fd}", "{sysfs}")
    assert run.returncode == 0, run.stderr
    shown = json.loads(run.stdout)
    iommufd, fd_arg, sysfs = shown["argv"]
    fd = fd_arg.removeprefix("fd=")
    assert sysfs == f"/sys/bus/pci/devices/{EDU}"
    assert shown["fds"][iommufd] == str(service.root / "dev/iommu")
    assert shown["fds"][fd] == str(service.root / cdev.lstrip("/"))
    # stdin, stdout, stderr and the two descriptors: no bus socket, nothing else of vfioctl's
    assert sorted(shown["fds"]) == sorted(["0", "1", "2", iommufd, fd]), shown["fds"]
    assert ctl(service, "detach", "vm1") == 0


def test_refusals_and_their_exit_statuses(service: Service, capsys: pytest.CaptureFixture[str]) -> None:
    run = launch(service, "vm1", "--", "true", "{iommufd:0}")
    assert run.returncode == 2 and "takes no key" in run.stderr  # before any call
    run = launch(service, "vm1")
    assert run.returncode == 2 and "name the VMM to start after --" in run.stderr
    assert ctl(service, "attach", "vm2", "edu") == 0  # node mode
    run = launch(service, "vm2", "--", "true")
    assert run.returncode == 5 and "HandoffUnsupported" in run.stderr
    assert ctl(service, "detach", "vm2") == 0
    assert ctl(service, "attach-vgpu", "vm3", "mtty-1", "--uuid", MDEV, "--handoff", "fd") == 0
    run = launch(service, "vm3", "--", sys.executable, "-c", SHOW, "{fd}", "{sysfs}")
    assert run.returncode == 5 and "allow_mdev" in run.stderr
    run = launch(service, "--allow-mdev", "vm3", "--", sys.executable, "-c", SHOW, "{fd}", "{sysfs}")
    assert run.returncode == 0, run.stderr
    shown = json.loads(run.stdout)
    assert shown["argv"][1] == f"/sys/bus/mdev/devices/{MDEV}" and "vfioctl: warning:" in run.stderr
    assert shown["fds"][shown["argv"][0]].startswith(str(service.root / "dev/vfio/devices/vfio"))
    assert ctl(service, "detach", "vm3") == 0
    capsys.readouterr()
