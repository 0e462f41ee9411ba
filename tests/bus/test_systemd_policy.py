"""systemd's job signals under a system-bus policy like the real one, with vfiod's own policy file
(dbus/org.hypeman.Devices1.conf) installed.

dbus-daemon applies a `send_destination="X"` rule to a broadcast signal whenever the receiving connection
owns X. vfiod's policy denies `send_destination="org.hypeman.Devices1"` except for its own interfaces, so
once vfiod owns its name, systemd's `JobRemoved` broadcasts are no longer delivered to the connection that
owns it; a client without the name still gets them. Under real systemd this made every StopUnit wait out
its deadline (the e2e systemd suite: "systemd did not finish the job"). The other bus tests use a bus that
allows everything, so they could not see it: this one runs dbus-daemon with a policy like the stock
system.conf, the systemd1 stand-in as root, and the package's policy file.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dbus_fast import NameFlag, RequestNameReply
from dbus_fast.aio import MessageBus

from tests.bus.conftest import StartVfiod
from tests.bus.support.harness import Client, LoopThread, PrivateBus
from tests.bus.support.helpers import GPU, attach, b, ok, register
from tests.bus.support.systemd_standin import SystemdStandin
from vfiod.bus.calls import Caller
from vfiod.bus.names import BUS_NAME
from vfiod.bus.systemd import SystemdClient
from vfiod.host.host import Host
from vfiod_sim import processes
from vfiod_sim.simulation import Simulation

UNIT = "nvidia-persistenced.service"
PACKAGE_POLICY = Path(__file__).resolve().parents[2] / "dbus" / "org.hypeman.Devices1.conf"

# The default context of dbus's system.conf, the root part of systemd's org.freedesktop.systemd1.conf,
# and vfiod's policy file as the package installs it.
SYSTEM_BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
  </policy>
  <policy user="root">
    <allow own="org.freedesktop.systemd1"/>
    <allow send_destination="org.freedesktop.systemd1"/>
  </policy>
  <include>{package_policy}</include>
</busconfig>
"""


class SystemPolicyBus(PrivateBus):
    """A dbus-daemon with a system bus policy (not the allow-everything one of `PrivateBus`)."""

    def __init__(self) -> None:  # the parent's set-up, with another configuration
        self.dir = Path(tempfile.mkdtemp(prefix="vfiod-sysbus-"))
        os.chmod(self.dir, 0o755)  # noqa: S103 (clients running as other users must reach the socket)
        socket = self.dir / "bus"
        conf = self.dir / "bus.conf"
        conf.write_text(
            SYSTEM_BUS_CONFIG.format(socket=socket, package_policy=PACKAGE_POLICY), encoding="utf-8"
        )
        self.address = f"unix:path={socket}"
        self.proc = subprocess.Popen(
            ["dbus-daemon", f"--config-file={conf}", "--nofork", "--nopidfile"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=lambda: ctypes.CDLL(None).prctl(1, signal.SIGTERM),  # noqa: PLW1509 (PDEATHSIG)
        )
        deadline = time.monotonic() + 10
        while not socket.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("dbus-daemon did not start")
            time.sleep(0.01)


@pytest.fixture(scope="module")
def system_bus() -> Iterator[SystemPolicyBus]:
    sb = SystemPolicyBus()
    yield sb
    sb.close()


@dataclass
class Rig:
    lt: LoopThread
    standin: SystemdStandin
    root: Path
    host: Host


@pytest.fixture
def rig(system_bus: SystemPolicyBus, threads: dict[str, LoopThread], tmp_path: Path) -> Iterator[Rig]:
    lt = threads["daemon"]
    root = tmp_path / "host"
    sim = Simulation.open(root, "workstation-l4")
    standin = lt.run(SystemdStandin.start(system_bus.address, sim_root=root))
    yield Rig(lt, standin, root, sim.host)
    lt.run(standin.stop())


def _client_on(rig: Rig, address: str, *, own_name: bool) -> tuple[MessageBus, SystemdClient]:
    async def connect() -> tuple[MessageBus, SystemdClient]:
        conn = await MessageBus(bus_address=address).connect()
        if own_name:
            reply = await conn.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
            assert reply is RequestNameReply.PRIMARY_OWNER
        client = SystemdClient(Caller(conn), rig.host, rig.lt.loop, unit_deadline=2.0)
        await client.subscribe()
        return conn, client

    return rig.lt.run(connect())


def test_the_connection_owning_vfiods_name_still_gets_broadcast_signals(
    system_bus: SystemPolicyBus, rig: Rig
) -> None:
    # The cause, shown on its own: without the policy's signal allow, the connection that owns
    # org.hypeman.Devices1 was never sent systemd's JobRemoved (nor polkit's Changed). With the shipped
    # policy both a connection without a name and the one owning vfiod's name hear the job finish.
    for own_name in (False, True):
        conn, client = _client_on(rig, system_bus.address, own_name=own_name)
        try:
            client.stop(UNIT)
            assert not processes.unit_active(rig.root, UNIT)
            client.start(UNIT)
            assert processes.unit_active(rig.root, UNIT)
        finally:
            conn.disconnect()


def test_vfiod_holds_units_while_owning_its_name(
    start_vfiod: StartVfiod, system_bus: SystemPolicyBus, threads: dict[str, LoopThread]
) -> None:
    # The e2e scenario persistence-attach in miniature: vfiod owns its name on a bus with the real policy,
    # and an Attach of the NVIDIA GPU stops nvidia-persistenced around the bind and starts it again.
    vfiod = start_vfiod(systemd=True, on=system_bus)
    assert vfiod.standin is not None
    units = vfiod.manager.units
    assert isinstance(units, SystemdClient)
    assert units.bus is not vfiod.daemon.bus  # a connection of its own, owning no name
    units.unit_deadline = 10.0  # fail in seconds, not after the 90 s of a real deadline
    root = Client(threads["root"], system_bus.address)
    try:
        register(root, GPU, "gpu")
        started = time.monotonic()
        ok(attach(root, "vm1", "gpu", include_group=b(True)))
        assert time.monotonic() - started < 10
    finally:
        root.close()
    calls = vfiod.standin.calls
    stop = calls.index(("StopUnit", UNIT))
    # Started again through systemd once the persistence linger (2 s by default) has passed.
    deadline = time.monotonic() + 15
    while ("StartUnit", UNIT) not in calls[stop:] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ("StartUnit", UNIT) in calls[stop:]
    assert processes.unit_active(vfiod.root, UNIT)
