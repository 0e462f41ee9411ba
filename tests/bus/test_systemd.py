"""The systemd client against our systemd1 stand-in: unit state first, jobs awaited through JobRemoved
(also when it beats the reply), deadlines, missing units, modprobe@, and the stand-ins without systemd."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from tests.bus.support.harness import LoopThread, PrivateBus
from tests.bus.support.systemd_standin import SystemdStandin
from vfiod.bus.calls import Caller
from vfiod.bus.names import SYSTEMD_MANAGER_IFACE, SYSTEMD_PATH
from vfiod.bus.systemd import SystemdClient, UnitsLeftAlone
from vfiod.core.errors import Failed, Timeout, VFIONotAvailable
from vfiod.core.system import LoadedModulesOnly
from vfiod.host.host import Host, HostRoots
from vfiod_sim import SimulatedKernel, processes
from vfiod_sim.simulation import Simulation

UNIT = "nvidia-persistenced.service"


@dataclass
class Setup:
    lt: LoopThread
    standin: SystemdStandin
    client: SystemdClient
    kernel: SimulatedKernel
    root: Path
    bus: MessageBus


@pytest.fixture
def systemd(bus: PrivateBus, threads: dict[str, LoopThread], tmp_path: Path) -> Iterator[Setup]:
    lt = threads["daemon"]
    root = tmp_path / "host"
    sim = Simulation.open(root, "workstation-l4")
    standin = lt.run(SystemdStandin.start(bus.address, sim_root=root))

    async def connect() -> tuple[MessageBus, SystemdClient]:
        conn = await MessageBus(bus_address=bus.address).connect()
        client = SystemdClient(
            Caller(conn),
            sim.host,
            lt.loop,
            unit_deadline=0.5,
            modprobe_deadline=0.5,
        )
        await client.subscribe()
        return conn, client

    conn, client = lt.run(connect())
    setup = Setup(lt, standin, client, sim.kernel, root, conn)
    yield setup
    conn.disconnect()
    lt.run(setup.standin.stop())


def test_stop_and_start_wait_for_their_jobs(systemd: Setup) -> None:
    c, s = systemd.client, systemd.standin
    assert c.is_active(UNIT)
    c.stop(UNIT)
    assert not processes.unit_active(systemd.root, UNIT)
    assert not c.is_active(UNIT)
    c.stop(UNIT)  # not running: nothing to stop, no job
    assert [x for x in s.calls if x[0] == "StopUnit"] == [("StopUnit", UNIT)]
    c.start(UNIT)
    assert processes.unit_active(systemd.root, UNIT)
    assert ("Subscribe", "") in s.calls
    assert s.calls.index(("LoadUnit", UNIT)) < s.calls.index(("StopUnit", UNIT))  # state read first


def test_job_removed_before_the_reply(systemd: Setup) -> None:
    systemd.standin.early_job_removed = True
    systemd.client.stop(UNIT)
    systemd.client.start(UNIT)
    assert processes.unit_active(systemd.root, UNIT)


def test_a_missing_unit_is_nothing_to_stop(systemd: Setup) -> None:
    systemd.client.stop("no-such.service")
    assert not systemd.client.is_active("no-such.service")
    assert ("StopUnit", "no-such.service") not in systemd.standin.calls
    with pytest.raises(Failed, match=r"no-such\.service"):
        systemd.client.start("no-such.service")


def test_failed_and_hung_jobs(systemd: Setup) -> None:
    systemd.standin.job_results[UNIT] = "failed"
    with pytest.raises(Failed, match="'failed'"):
        systemd.client.stop(UNIT)
    systemd.standin.job_results.clear()
    systemd.standin.hang_units.add(UNIT)
    with pytest.raises(Timeout, match=r"within 0\.5 s"):
        systemd.client.stop(UNIT)


def test_job_removed_from_anyone_but_systemd_is_ignored(
    systemd: Setup, bus: PrivateBus, threads: dict[str, LoopThread]
) -> None:
    systemd.standin.hang_units.add(UNIT)
    faker = threads["root"]

    async def spoof() -> None:
        conn = await MessageBus(bus_address=bus.address).connect()
        for n in range(1, 5):
            conn.send(
                Message.new_signal(
                    SYSTEMD_PATH,
                    SYSTEMD_MANAGER_IFACE,
                    "JobRemoved",
                    "uoss",
                    [n, f"{SYSTEMD_PATH}/job/{n}", UNIT, "done"],
                )
            )
        await conn.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="Ping",
            )
        )
        conn.disconnect()

    faker.run(spoof())
    with pytest.raises(Timeout):
        systemd.client.stop(UNIT)


def test_modules_through_modprobe_units(systemd: Setup) -> None:
    systemd.kernel.unload_module("vfio_pci")
    host = Host(HostRoots.under(systemd.root), backend=systemd.kernel)
    assert not host.module_loaded("vfio_pci")
    systemd.client.load("vfio_pci")
    assert host.module_loaded("vfio_pci")
    assert ("StartUnit", "modprobe@vfio_pci.service") in systemd.standin.calls
    systemd.client.load("vfio_pci")  # loaded: no job
    assert systemd.standin.calls.count(("StartUnit", "modprobe@vfio_pci.service")) == 1
    systemd.kernel.unload_module("vfio_pci")
    systemd.standin.modprobe_works = False
    with pytest.raises(VFIONotAvailable, match="run: modprobe vfio_pci"):
        systemd.client.load("vfio_pci")
    with pytest.raises(VFIONotAvailable):
        systemd.client.load("bad name")


def test_never_from_the_event_loop(systemd: Setup) -> None:
    async def on_loop() -> None:
        systemd.client.stop(UNIT)

    with pytest.raises(RuntimeError, match="deadlock"):
        systemd.lt.run(on_loop())


def test_without_systemd(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="vfiod.systemd")
    units = UnitsLeftAlone()
    assert not units.is_active(UNIT)
    units.stop(UNIT)
    units.start(UNIT)
    assert len([r for r in caplog.records if "left alone" in r.getMessage()]) == 1
    sim = Simulation.open(tmp_path / "h", "workstation-l4")
    sim.kernel.unload_module("vfio_pci")
    with pytest.raises(VFIONotAvailable, match="modprobe vfio_pci"):
        LoadedModulesOnly(sim.host).load("vfio_pci")


def test_only_systemds_own_job_signals_count(systemd: Setup) -> None:
    # The bus only routes JobRemoved from systemd's owner to this match rule, but another match rule of the
    # same connection could let a broadcast through: the sender is checked too.
    fake = Message(
        message_type=MessageType.SIGNAL,
        path=SYSTEMD_PATH,
        interface=SYSTEMD_MANAGER_IFACE,
        member="JobRemoved",
        signature="uoss",
        body=[7, f"{SYSTEMD_PATH}/job/7", UNIT, "done"],
        sender=":1.9999",
    )
    systemd.client._on_message(fake)
    assert f"{SYSTEMD_PATH}/job/7" not in systemd.client._finished


def test_a_reexecuted_systemd_is_followed(systemd: Setup, bus: PrivateBus) -> None:
    # `systemctl daemon-reexec` (every systemd upgrade): systemd comes back on the bus under a new unique
    # name. Its JobRemoved must count again, and the client subscribes again.
    c = systemd.client
    c.stop(UNIT)
    old = systemd.standin
    systemd.lt.run(old.stop())
    new = systemd.lt.run(SystemdStandin.start(bus.address, sim_root=systemd.root))
    systemd.standin = new  # the fixture stops this one
    assert new.bus.unique_name != old.bus.unique_name
    deadline = time.monotonic() + 5
    while ("Subscribe", "") not in new.calls:
        assert time.monotonic() < deadline, "the client did not subscribe to the new systemd"
        time.sleep(0.01)
    c.start(UNIT)
    assert processes.unit_active(systemd.root, UNIT)
    assert ("StartUnit", UNIT) in new.calls
