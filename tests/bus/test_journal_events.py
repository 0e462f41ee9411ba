"""The audit lines of calls over the bus: every outcome line names the instance and the PCI addresses the call
named or acted on, and its level and MESSAGE_ID say what an admin must do (a device left stuck: ERR; a
device the host needs refused: WARNING; a polkit denial: WARNING); ACTION is the method's one spelling."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import pytest

from tests.bus.conftest import Clients, StartVfiod
from tests.bus.support.harness import PolkitMock
from tests.bus.support.helpers import AUDIO, GPU, IGPU, attach, b, detach, ok, register
from tests.journal_catalog import assert_catalogued
from vfiod.bus.names import ACTION_INSPECT
from vfiod.config import Config
from vfiod.logevents import Action, MessageId
from vfiod_sim import faults


@pytest.fixture(autouse=True)
def _catalogued(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Whatever a test here logs with a MESSAGE_ID carries the fields its catalog entry shows."""
    yield
    assert_catalogued(caplog.get_records("call"))


def outcomes(caplog: pytest.LogCaptureFixture, method: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "vfiod.audit" and "RESULT" in r.__dict__ and r.__dict__.get("METHOD") == method
    ]


def test_detach_of_a_whole_instance_names_what_it_released(
    start_vfiod: StartVfiod, clients: Clients, caplog: pytest.LogCaptureFixture
) -> None:
    start_vfiod()
    caplog.set_level(logging.INFO, logger="vfiod")
    register(clients.root, GPU, "gpu")
    ok(attach(clients.root, "vm1", "gpu", include_group=b(True)))
    ok(detach(clients.root, "vm1"))  # no device named
    for method, action in (("Attach", "attach"), ("Detach", "detach")):
        [line] = outcomes(caplog, method)
        fields = line.__dict__
        assert (fields["ACTION"], fields["RESULT"], fields["INSTANCE_ID"]) == (action, "ok", "vm1")
        assert fields["PCI_ADDRESS"] == f"{GPU},{AUDIO}" and line.levelno == logging.INFO
        assert f"(instance vm1; {GPU}, {AUDIO})" in line.getMessage()


def test_a_device_left_stuck_makes_the_outcome_an_error(
    start_vfiod: StartVfiod, clients: Clients, caplog: pytest.LogCaptureFixture
) -> None:
    vfiod = start_vfiod()
    caplog.set_level(logging.INFO, logger="vfiod")
    register(clients.root, GPU, "gpu")
    ok(attach(clients.root, "vm1", "gpu", include_group=b(True)))
    faults.inject(vfiod.root, "probe", kind="errno", errno="EIO", path="/sys/bus/pci/drivers_probe")
    reply = detach(clients.root, "vm1")
    assert not reply.ok
    [line] = outcomes(caplog, "Detach")
    fields = line.__dict__
    assert line.levelno == logging.ERROR and "MESSAGE_ID" not in fields  # each device has its own line
    assert fields["INSTANCE_ID"] == "vm1" and GPU in fields["STUCK"].split(",")
    assert GPU in fields["PCI_ADDRESS"].split(",")
    settled = [r for r in caplog.records if r.__dict__.get("MESSAGE_ID") == MessageId.DEVICE_STUCK]
    assert settled and all(r.levelno == logging.ERROR for r in settled)
    assert {r.__dict__["PCI_ADDRESS"] for r in settled} == set(fields["STUCK"].split(","))
    assert {r.__dict__["INSTANCE_ID"] for r in settled} == {"vm1"}


def test_refusals_for_the_host_and_by_polkit_are_warnings(
    start_vfiod: StartVfiod, clients: Clients, polkit: PolkitMock, caplog: pytest.LogCaptureFixture
) -> None:
    start_vfiod()
    caplog.set_level(logging.INFO, logger="vfiod")
    register(clients.root, IGPU, "igpu")
    assert attach(clients.root, "vm3", "igpu").short == "HostCritical"
    [line] = outcomes(caplog, "Attach")
    assert line.levelno == logging.WARNING and line.__dict__["MESSAGE_ID"] == MessageId.HOST_CRITICAL_REFUSED
    assert (line.__dict__["PCI_ADDRESS"], line.__dict__["INSTANCE_ID"]) == (IGPU, "vm3")
    polkit.allow(ACTION_INSPECT)
    assert attach(clients.alice, "vm4", "igpu").short == "NotAuthorized"
    denied = [r for r in caplog.records if r.__dict__.get("MESSAGE_ID") == MessageId.CALL_DENIED]
    assert [(r.levelno, r.__dict__["CALLER_UID"], r.__dict__["PCI_ADDRESS"]) for r in denied] == [
        (logging.WARNING, clients.alice.uid, IGPU)
    ]


def test_attach_and_detach_say_where_their_time_went(
    start_vfiod: StartVfiod, clients: Clients, caplog: pytest.LogCaptureFixture
) -> None:
    # Through the systemd stand-in, so the persistence hold is part of it (linger 0: started in the call).
    start_vfiod(systemd=True, config=Config(persistence_linger=0))
    caplog.set_level(logging.INFO, logger="vfiod")
    register(clients.root, GPU, "gpu")
    ok(attach(clients.root, "vm1", "gpu", include_group=b(True)))
    ok(detach(clients.root, "vm1"))
    expected = {
        "Attach": {"IDENTIFY", "AUTHORIZE", "PLAN", "HOLDERS", "PERSISTENCE_STOP", "PERSISTENCE_START",
                   "MODULE_LOAD", "WRITE_DRIVER_OVERRIDE", "WRITE_UNBIND", "WRITE_DRIVERS_PROBE",
                   "VERIFY_WAIT", "VIABILITY", "GRANT", "REGISTRY_COMMIT"},
        "Detach": {"IDENTIFY", "AUTHORIZE", "HOLDERS", "PERSISTENCE_STOP", "PERSISTENCE_START", "GRANT",
                   "WRITE_DRIVER_OVERRIDE", "WRITE_UNBIND", "WRITE_DRIVERS_PROBE", "VERIFY_WAIT",
                   "REGISTRY_COMMIT"},
    }  # fmt: skip
    for method, phases in expected.items():
        [line] = outcomes(caplog, method)
        fields = line.__dict__
        found = {k.removeprefix("PHASE_").removesuffix("_MS") for k in fields if k.startswith("PHASE_")}
        assert phases <= found, f"{method}: {sorted(phases - found)} missing from {sorted(found)}"
        spent = sum(float(fields[f"PHASE_{p}_MS"]) for p in found)
        # The phases do not overlap, so together they are at most the whole call.
        assert "OTHER" in found  # what no phase accounts for makes up the rest
        assert 0 < spent <= float(fields["DURATION_MS"]) + 1.0  # each field is rounded to 0.1 ms
        assert "write drivers_probe" in line.getMessage() and " ms" in line.getMessage()
    # each sysfs write's own line carries its duration the same way (most writes take well under 1 ms)
    writes = [r.__dict__ for r in caplog.records if r.__dict__.get("ACTION") == Action.SYSFS_WRITE]
    assert writes and all(re.fullmatch(r"\d+\.\d", str(w["DURATION_MS"])) for w in writes), writes
