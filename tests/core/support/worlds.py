"""Simulated worlds for the manager tests: a kernel simulator, a registry and a manager on them, and a way
to restart the manager on the same state (the `env` fixture in conftest.py makes them)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from vfiod.core.context import Caller
from vfiod.core.manager import Manager
from vfiod.host.host import Host
from vfiod.host.pciaddr import PciAddress
from vfiod.host.writes import DeadlinePolicy, WriteRecord
from vfiod_sim import Profile, SimulatedKernel
from vfiod_sim.simulation import Simulation
from vfiod_sim.system import SimulatedUnits

PERSISTENCED = "nvidia-persistenced.service"
HM = Caller(uid=1000)
OTHER = Caller(uid=1001)
ADMIN = Caller(uid=0)


@dataclass
class Env:
    root: Path
    state: Path
    sim: Simulation
    manager: Manager
    writes: list[WriteRecord]

    @property
    def kernel(self) -> SimulatedKernel:
        return self.sim.kernel

    @property
    def host(self) -> Host:
        return self.sim.host

    @property
    def units(self) -> SimulatedUnits:
        return self.sim.units

    def reopen(self) -> Manager:
        """A fresh manager on the same state and kernel, as after a daemon restart."""
        self.manager.registry.close()
        self.manager = self.sim.manager(self.state, verify_timeout=1.0)
        return self.manager


MakeEnv = Callable[..., Env]


def make_envs(tmp_path: Path) -> Iterator[MakeEnv]:
    made: list[Env] = []

    def make(profile: str | Profile = "workstation-l4", deadline: float = 5.0) -> Env:
        root = tmp_path / f"sim{len(made)}"
        sim = Simulation.open(root, profile, deadlines=DeadlinePolicy(default=deadline, per_driver={}))
        writes: list[WriteRecord] = []
        sim.host.add_write_listener(writes.append)
        state = tmp_path / f"state{len(made)}"
        manager = sim.manager(state, verify_timeout=1.0)
        manager.startup()
        e = Env(root, state, sim, manager, writes)
        made.append(e)
        return e

    yield make
    for e in made:
        e.manager.registry.close()


def drivers(e: Env, *addrs: PciAddress) -> list[str | None]:
    return [e.host.driver(a) for a in addrs]
