"""Injected faults on the simulated kernel: hang (with the device lock held, released from outside, late
completion reported to Host's listeners), errno, delay, probe_nothing, probe_fail, counts and clearing."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import SimFactory
from tests.machines import HDA, L4, L4_AUDIO, NIC, NVIDIA, VFIO
from vfiod.host.errors import SysfsBusy, SysfsTimeout, SysfsWriteError
from vfiod.host.pciaddr import DriverName
from vfiod.host.writes import WriteRecord
from vfiod_sim import SimulatedKernel, faults


def test_hang_holds_the_device_lock_until_released(sim: SimFactory) -> None:
    sh = sim(deadline=0.2, idle=True)
    faults.inject(sh.root, "stuck", kind="hang", path="/sys/bus/pci/drivers/nvidia/unbind", value=str(L4))
    late: list[WriteRecord] = []
    arrived = threading.Event()

    def listener(record: WriteRecord) -> None:
        if record.late:
            late.append(record)
            arrived.set()

    sh.host.add_write_listener(listener)
    with pytest.raises(SysfsTimeout):
        sh.host.unbind(L4, NVIDIA)
    assert faults.wait_hung(sh.root, "stuck", 2.0)
    fault = faults.load(sh.root, "stuck")
    assert fault is not None and fault.hung
    assert sh.host.driver(L4) == "nvidia"  # nothing happened yet
    # Host does not even try a second write to the same device (it would wait for the device lock)...
    with pytest.raises(SysfsBusy):
        sh.host.set_driver_override(L4, VFIO)
    # ...and the simulated kernel does hold that lock: the same write made directly waits for it
    override = sh.host.device_dir(L4) / "driver_override"
    blocked = threading.Thread(target=lambda: sh.host.backend.write_attribute(override, b"vfio-pci"))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive()
    # ...a write to another device does not
    sh.host.set_driver_override(NIC, VFIO)
    assert sh.host.driver_override(NIC) == "vfio-pci"
    faults.release(sh.root, "stuck")
    assert arrived.wait(3.0)
    blocked.join(3.0)
    assert not blocked.is_alive()
    assert [(r.path, r.result) for r in late] == [("/sys/bus/pci/drivers/nvidia/unbind", "ok")]
    assert sh.host.driver(L4) is None and sh.host.driver_override(L4) == "vfio-pci"
    assert not faults.is_hung(sh.root, "stuck")
    # released for good: the same write no longer hangs
    sh.host.probe(L4)
    sh.host.unbind(L4, VFIO)


def test_hang_then_fail(sim: SimFactory) -> None:
    sh = sim(idle=True)
    faults.inject(
        sh.root, "h", kind="hang", path="/sys/bus/pci/drivers/*/unbind", errno="EIO", then="fail", count=1
    )
    errors: list[str] = []

    def run() -> None:
        try:
            sh.host.unbind(L4_AUDIO, HDA)
        except SysfsWriteError as e:
            errors.append(e.errname)

    t = threading.Thread(target=run)
    t.start()
    assert faults.wait_hung(sh.root, "h", 2.0)
    faults.release(sh.root, "h")
    t.join(3.0)
    assert errors == ["EIO"]
    assert sh.host.driver(L4_AUDIO) == "snd_hda_intel"
    sh.host.unbind(L4_AUDIO, HDA)  # count exhausted: no hang any more


def test_clearing_a_hang_releases_it(sim: SimFactory) -> None:
    sh = sim(idle=True)
    faults.inject(sh.root, "h", kind="hang", path=f"/sys/bus/pci/devices/{L4}/driver_override")
    t = threading.Thread(target=lambda: sh.host.set_driver_override(L4, VFIO))
    t.start()
    assert faults.wait_hung(sh.root, "h", 2.0)
    faults.clear(sh.root)
    t.join(3.0)
    assert not t.is_alive() and sh.host.driver_override(L4) == "vfio-pci"


def test_errno_fault_changes_nothing_and_counts_down(sim: SimFactory) -> None:
    sh = sim(idle=True)
    faults.inject(
        sh.root, "busy", kind="errno", path="/sys/bus/pci/drivers/nvidia/unbind", errno="EBUSY", count=2
    )
    for _ in range(2):
        with pytest.raises(SysfsWriteError) as e:
            sh.host.unbind(L4, NVIDIA)
        assert e.value.errname == "EBUSY"
        assert sh.host.driver(L4) == "nvidia"
    fault = faults.load(sh.root, "busy")
    assert fault is not None and fault.count == 0
    sh.host.unbind(L4, NVIDIA)
    assert sh.host.driver(L4) is None
    assert [t["result"] for t in sh.kernel.trace()] == ["EBUSY", "EBUSY", "ok"]


def test_value_narrows_a_fault(sim: SimFactory) -> None:
    sh = sim(idle=True)
    faults.inject(sh.root, "f", kind="errno", path="/sys/bus/pci/drivers_probe", value=f"{L4}\n", errno="EIO")
    sh.host.probe(L4_AUDIO)  # another value: no fault
    with pytest.raises(SysfsWriteError) as e:
        sh.host.probe(L4)  # sysfs_streq: the trailing newline does not matter
    assert e.value.errname == "EIO"


def test_delay(sim: SimFactory) -> None:
    sh = sim(idle=True)
    faults.inject(sh.root, "slow", kind="delay", path="/sys/bus/pci/drivers/nvidia/unbind", seconds=0.25)
    started = time.monotonic()
    sh.host.unbind(L4, NVIDIA)
    assert time.monotonic() - started >= 0.25
    assert sh.host.driver(L4) is None
    assert sh.kernel.trace()[-1]["duration"] >= 0.25


def test_probe_nothing(sim: SimFactory) -> None:
    sh = sim(idle=True)
    faults.inject(sh.root, "n", kind="probe_nothing", pci_address=str(L4), driver="vfio-pci")
    sh.host.set_driver_override(L4, VFIO)
    sh.host.unbind(L4, NVIDIA)
    sh.host.probe(L4)  # still success
    assert sh.host.driver(L4) is None
    with pytest.raises(SysfsWriteError) as e:
        sh.host.bind(L4, VFIO)
    assert e.value.errname == "ENODEV"
    # only vfio-pci is affected
    sh.host.set_driver_override(L4, None)
    sh.host.probe(L4)
    assert sh.host.driver(L4) == "nvidia"


def test_probe_fail_lets_the_next_driver_try(sim: SimFactory) -> None:
    sh = sim(idle=True)
    sh.kernel.add_driver_match("pci-stub", vendor="10de", device="27b8")
    sh.kernel.load_module("pci_stub")  # loaded after nvidia: tried second
    assert sh.host.driver(L4) == "nvidia"
    faults.inject(sh.root, "dead", kind="probe_fail", driver="nvidia", pci_address=str(L4), errno="EIO")
    sh.host.unbind(L4, NVIDIA)
    sh.host.probe(L4)
    assert sh.host.driver(L4) == "pci-stub"
    sh.host.unbind(L4, DriverName.parse("pci-stub"))
    with pytest.raises(SysfsWriteError) as e:
        sh.host.bind(L4, NVIDIA)
    assert e.value.errname == "EIO"
    faults.clear(sh.root, "dead")
    sh.host.bind(L4, NVIDIA)
    assert sh.host.driver(L4) == "nvidia"


def test_probe_fault_with_a_path_applies_only_to_that_write(sim: SimFactory) -> None:
    sh = sim(idle=True)
    faults.inject(
        sh.root, "p", kind="probe_fail", path="/sys/bus/pci/drivers_probe", driver="nvidia", errno="ENODEV"
    )
    sh.host.unbind(L4, NVIDIA)
    sh.host.bind(L4, NVIDIA)  # a bind is another path
    sh.host.unbind(L4, NVIDIA)
    sh.host.probe(L4)
    assert sh.host.driver(L4) is None


def test_fault_files_are_plain_json(sim: SimFactory) -> None:
    sh = sim(idle=True)
    faults.inject(sh.root, "x", kind="errno", path="/sys/bus/pci/rescan", errno="EPERM")
    data = json.loads((sh.root / "sim/faults/x.json").read_text())
    assert data["kind"] == "errno" and data["errno"] == "EPERM" and data["count"] is None
    with pytest.raises(ValueError):
        faults.inject(sh.root, "../escape", kind="errno", path="/x")
    with pytest.raises(ValueError):
        faults.inject(sh.root, "y", kind="explode", path="/x")
    with pytest.raises(ValueError):
        faults.inject(sh.root, "y", kind="errno", path="/x", errno="ENOTANERRNO")
    with pytest.raises(ValueError, match="a hang fault needs a path"):
        faults.inject(sh.root, "y", kind="hang")
    with pytest.raises(ValueError, match="count"):
        faults.inject(sh.root, "y", kind="delay", path="/x", count=-1)
    with pytest.raises(ValueError, match="then"):
        faults.inject(sh.root, "y", kind="hang", path="/x", then="explode")
    assert not (sh.root / "sim/faults/y.json").exists()  # nothing refused was written
    (sh.root / "sim/faults/z.json").write_text('{"kind": "errno", "path": "/x", "colour": "red"}')
    assert faults.load(sh.root, "z") is None  # a file that does not validate applies to nothing
    with pytest.raises(OSError) as e:
        sh.kernel.write_attribute(sh.root / "sys/bus/pci/rescan", b"1")
    assert e.value.errno == errno.EPERM
    assert faults.wait_hung(sh.root, "x", 0.05) is False


def test_a_write_hung_across_a_reboot_fails_with_enodev(sim: SimFactory) -> None:
    sh = sim(idle=True)
    faults.inject(sh.root, "h", kind="hang", path="/sys/bus/pci/drivers/nvidia/unbind")
    errors: list[str] = []

    def run() -> None:
        try:
            sh.host.unbind(L4, NVIDIA)
        except SysfsWriteError as e:
            errors.append(e.errname)

    t = threading.Thread(target=run)
    t.start()
    assert faults.wait_hung(sh.root, "h", 2.0)
    sh.kernel.reboot()
    faults.release(sh.root, "h")
    t.join(3.0)
    assert errors == ["ENODEV"]  # the kernel it was written to is gone
    assert sh.host.driver(L4) == "nvidia"


def _hang_in_child(root: str) -> None:
    SimulatedKernel(Path(root)).write_attribute(
        Path(root) / "sys/bus/pci/drivers/nvidia/unbind", str(L4).encode()
    )


def test_killing_a_hung_writer_frees_the_device(sim: SimFactory) -> None:
    sh = sim(idle=True)
    faults.inject(sh.root, "h", kind="hang", path="/sys/bus/pci/drivers/nvidia/unbind")
    child = multiprocessing.get_context("fork").Process(target=_hang_in_child, args=(str(sh.root),))
    child.start()
    assert faults.wait_hung(sh.root, "h", 5.0)
    assert child.pid is not None
    os.kill(child.pid, signal.SIGKILL)
    child.join(5.0)
    assert not faults.is_hung(sh.root, "h")  # its marker names a dead process
    faults.clear(sh.root)
    sh.host.set_driver_override(L4, VFIO)  # the device lock died with the process
    assert sh.host.driver(L4) == "nvidia"  # and the unbind never happened
