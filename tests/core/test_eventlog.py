"""The journal lines of the events an admin looks for: a device left stuck is an error naming it, a write the
kernel finished late a warning, a quarantined vGPU parent an error (once), a host-critical device passed
by force a warning; devices handed over and taken back carry the instance and every PCI address, and the
caller learns which functions the call acted on (its outcome line's addresses)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest

from tests.core.support.vgpus import break_mbochs_create
from tests.core.support.worlds import ADMIN, HM, MakeEnv
from tests.journal_catalog import assert_catalogued
from tests.machines import IGPU, L4, L4_AUDIO
from vfiod.core.context import Caller
from vfiod.core.errors import Failed, NoCapacity, Timeout
from vfiod.logevents import Action, MessageId
from vfiod_sim import faults, processes

XORG_PID = 1500  # the simulated workstation's Xorg, holding /dev/dri/card0
OVERRIDE = f"/sys/bus/pci/devices/{L4}/driver_override"


@pytest.fixture(autouse=True)
def _catalogued(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Whatever a test here logs with a MESSAGE_ID carries the fields its catalog entry shows."""
    yield
    assert_catalogued(caplog.get_records("call"))


def with_id(caplog: pytest.LogCaptureFixture, message_id: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.__dict__.get("MESSAGE_ID") == message_id]


def test_a_device_left_stuck_is_an_error_and_its_late_write_a_warning(
    env: MakeEnv, caplog: pytest.LogCaptureFixture
) -> None:
    e = env(deadline=0.5)
    m = e.manager
    m.register(HM, str(L4), "l4-gpu")
    m.attach(HM, "vm1", ["l4-gpu"], include_group=True)
    caplog.set_level(logging.INFO)
    faults.inject(e.root, "hang", kind="hang", path=OVERRIDE, value="nvidia")
    with pytest.raises(Timeout):
        m.detach(HM, "vm1")
    [stuck] = with_id(caplog, MessageId.DEVICE_STUCK)
    assert stuck.levelno == logging.ERROR and stuck.__dict__["PCI_ADDRESS"] == str(L4)
    assert stuck.__dict__["DEVICE"] == "l4-gpu" and stuck.__dict__["ACTION"] == Action.SETTLE
    assert "vfioctl recover l4-gpu" in stuck.getMessage()
    assert with_id(caplog, MessageId.LATE_WRITE) == []
    faults.release(e.root, "hang")
    deadline = time.monotonic() + 10
    while not with_id(caplog, MessageId.LATE_WRITE):
        assert time.monotonic() < deadline, "the late write was not logged"
        time.sleep(0.02)
    [late] = with_id(caplog, MessageId.LATE_WRITE)
    assert late.levelno == logging.WARNING and late.__dict__["PCI_ADDRESS"] == str(L4)
    assert late.__dict__["RESULT"] == "ok" and late.__dict__["LATE"] == 1


def test_handing_over_and_taking_back_name_the_instance_and_every_function(
    env: MakeEnv, caplog: pytest.LogCaptureFixture
) -> None:
    m = env().manager
    m.register(HM, str(L4), "l4-gpu")
    caplog.set_level(logging.INFO)
    attach_caller = Caller(uid=HM.uid, touched=[])
    m.attach(attach_caller, "vm1", ["l4-gpu"], include_group=True)
    detach_caller = Caller(uid=HM.uid, touched=[])
    m.detach(detach_caller, "vm1")  # no device named: what it released is known only inside
    both = f"{L4},{L4_AUDIO}"
    [attached] = with_id(caplog, MessageId.ATTACHED)
    [detached] = with_id(caplog, MessageId.DETACHED)
    for record, action in ((attached, Action.ATTACH), (detached, Action.DETACH)):
        fields = record.__dict__
        assert (fields["ACTION"], fields["INSTANCE_ID"], fields["PCI_ADDRESS"]) == (action, "vm1", both)
        assert record.levelno == logging.INFO
    assert attach_caller.touched == detach_caller.touched == [str(L4), str(L4_AUDIO)]


def test_a_parent_is_quarantined_once_with_an_error(env: MakeEnv, caplog: pytest.LogCaptureFixture) -> None:
    e = env("mdev-samples")
    caplog.set_level(logging.INFO)
    break_mbochs_create(e.root)
    for _ in range(3):
        with pytest.raises((Failed, NoCapacity)):
            e.manager.attach_vgpu(HM, "vm1", "mbochs-small")  # the third: NoCapacity
    [quarantined] = with_id(caplog, MessageId.PARENT_QUARANTINED)
    assert quarantined.levelno == logging.ERROR and quarantined.__dict__["PARENT"] == "mbochs"
    assert "after 2 failures in a row" in quarantined.getMessage()


def test_a_host_critical_device_passed_by_force_is_a_warning(
    env: MakeEnv, caplog: pytest.LogCaptureFixture
) -> None:
    e = env()
    m = e.manager
    m.register(HM, str(IGPU), "igpu")
    processes.remove_process(e.root, XORG_PID)  # the display server let go of card0
    caplog.set_level(logging.INFO)
    m.attach(ADMIN, "vm1", ["igpu"], force=True)
    [forced] = with_id(caplog, MessageId.HOST_CRITICAL_FORCED)
    assert forced.levelno == logging.WARNING and forced.__dict__["PCI_ADDRESS"] == str(IGPU)
    assert "console" in forced.getMessage()
