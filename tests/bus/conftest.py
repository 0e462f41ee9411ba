"""Fixtures of the bus tests: one private bus with the dbusmock polkitd per session (and one without any
polkitd), threads acting as root and two unprivileged users, and a fresh in-process vfiod per test on a
fresh simulated host."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.bus.support.harness import (
    Client,
    LoopThread,
    PolkitMock,
    PrivateBus,
    can_switch_thread_user,
    other_users,
)
from tests.bus.support.systemd_standin import SystemdStandin
from vfiod.bus.daemon import Daemon, Options
from vfiod.bus.names import ACTION_INSPECT
from vfiod.bus.service import Service
from vfiod.config import Config
from vfiod.core.manager import Manager
from vfiod_sim import SimulatedKernel, build

if shutil.which("dbus-daemon") is None:
    pytest.skip("dbus-daemon is not installed", allow_module_level=True)
if not can_switch_thread_user():
    pytest.skip(
        "the bus tests need root on x86_64/aarch64 (they act as other users)", allow_module_level=True
    )


@pytest.fixture(scope="session")
def bus() -> Iterator[PrivateBus]:
    b = PrivateBus()
    yield b
    b.close()


@pytest.fixture(scope="session")
def bare_bus() -> Iterator[PrivateBus]:
    """A bus without polkitd (vfiod then allows only root and its own uid)."""
    b = PrivateBus()
    yield b
    b.close()


@pytest.fixture(scope="session")
def uids() -> tuple[int, int]:
    return other_users()


@pytest.fixture(scope="session")
def threads(uids: tuple[int, int]) -> Iterator[dict[str, LoopThread]]:
    lts = {
        "root": LoopThread("client-root"),
        "alice": LoopThread("client-alice", uids[0]),
        "bob": LoopThread("client-bob", uids[1]),
        "daemon": LoopThread("vfiod"),
    }
    yield lts
    for lt in lts.values():
        lt.close()


@pytest.fixture(scope="session")
def polkit(bus: PrivateBus, threads: dict[str, LoopThread]) -> Iterator[PolkitMock]:
    control = Client(threads["root"], bus.address)
    mock = PolkitMock(bus.address, control)
    yield mock
    mock.close()
    control.close()


@dataclass
class Clients:
    root: Client
    alice: Client
    bob: Client
    extra: list[Client] = field(default_factory=list)

    def close(self) -> None:
        for c in (self.root, self.alice, self.bob, *self.extra):
            c.close()


@pytest.fixture
def clients(bus: PrivateBus, threads: dict[str, LoopThread], polkit: PolkitMock) -> Iterator[Clients]:
    """Fresh connections (so fresh unique names) as root, alice and bob on the polkit bus."""
    polkit.allow(ACTION_INSPECT)
    polkit.clear()
    cs = Clients(
        Client(threads["root"], bus.address),
        Client(threads["alice"], bus.address),
        Client(threads["bob"], bus.address),
    )
    yield cs
    cs.close()


@dataclass
class Running:
    """A vfiod running in-process on its own loop thread."""

    lt: LoopThread
    daemon: Daemon
    root: Path
    standin: SystemdStandin | None
    stopped: bool = False

    @property
    def kernel(self) -> SimulatedKernel:
        assert self.daemon.simulation is not None
        return self.daemon.simulation.kernel

    @property
    def manager(self) -> Manager:
        assert self.daemon.manager is not None
        return self.daemon.manager

    @property
    def service(self) -> Service:
        assert self.daemon.service is not None
        return self.daemon.service

    def trace_len(self) -> int:
        return len(self.kernel.trace())

    def stop(self) -> None:
        """Stop the daemon (once: a test may stop it before the fixture does)."""
        if self.daemon.bus is not None and not self.stopped:
            self.stopped = True
            self.lt.run(self.daemon.stop(), 60)
        if self.standin is not None:
            self.lt.run(self.standin.stop())
            self.standin = None


StartVfiod = Callable[..., Running]


@pytest.fixture
def start_vfiod(
    bus: PrivateBus, threads: dict[str, LoopThread], tmp_path: Path, polkit: PolkitMock
) -> Iterator[StartVfiod]:
    """`start_vfiod(profile=..., config=..., systemd=True, on=bus)`: a vfiod on a fresh simulated host."""
    started: list[Running] = []
    count = 0

    def start(
        profile: str = "workstation-l4",
        *,
        config: Config | None = None,
        systemd: bool = False,
        on: PrivateBus | None = None,
        early_job_removed: bool = False,
        config_path: Path | None = None,
    ) -> Running:
        nonlocal count
        count += 1
        address = (on or bus).address
        root = tmp_path / f"host{count}"
        lt = threads["daemon"]
        standin = None
        if systemd:
            build(root, profile)
            standin = lt.run(SystemdStandin.start(address, sim_root=root))
            standin.early_job_removed = early_job_removed
        options = Options(
            bus=address, simulate=profile, sim_root=root, drain_timeout=10.0, config_path=config_path
        )
        daemon = Daemon(options, config or Config())
        lt.run(daemon.start())
        running = Running(lt, daemon, root, standin)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()
