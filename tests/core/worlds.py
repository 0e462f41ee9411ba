"""Simulated worlds for the manager tests: a kernel simulator, a registry and a manager on them, and a way
to restart the manager on the same state (the `env` fixture in conftest.py makes them)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from vfiod.core.context import Caller
from vfiod.core.manager import Manager
from vfiod.core.registry import Registry
from vfiod.host.host import DeadlinePolicy, Host, HostRoots, WriteRecord
from vfiod.host.pciaddr import PciAddress
from vfiod_sim import SimulatedKernel, build
from vfiod_sim.system import SimulatedModules, SimulatedUnits

PERSISTENCED = "nvidia-persistenced.service"
HM = Caller(uid=1000)
OTHER = Caller(uid=1001)
ADMIN = Caller(uid=0)


@dataclass
class Env:
    root: Path
    state: Path
    kernel: SimulatedKernel
    host: Host
    units: SimulatedUnits
    manager: Manager
    writes: list[WriteRecord]

    def reopen(self) -> Manager:
        """A fresh manager on the same state and kernel, as after a daemon restart."""
        self.manager.registry.close()
        registry = Registry.open(self.state)
        self.manager = Manager(
            self.host, registry, SimulatedModules(self.kernel), self.units, verify_timeout=1.0
        )
        return self.manager


MakeEnv = Callable[..., Env]


def make_envs(tmp_path: Path) -> Iterator[MakeEnv]:
    made: list[Env] = []

    def make(profile: str = "workstation-l4", deadline: float = 5.0) -> Env:
        root = tmp_path / f"sim{len(made)}"
        kernel = build(root, profile)
        host = Host(
            HostRoots.under(root), backend=kernel, deadlines=DeadlinePolicy(default=deadline, per_driver={})
        )
        writes: list[WriteRecord] = []
        host.add_write_listener(writes.append)
        state = tmp_path / f"state{len(made)}"
        registry = Registry.open(state)
        units = SimulatedUnits(root)
        manager = Manager(host, registry, SimulatedModules(kernel), units, verify_timeout=1.0)
        manager.startup()
        e = Env(root, state, kernel, host, units, manager, writes)
        made.append(e)
        return e

    yield make
    for e in made:
        e.manager.registry.close()


def drivers(e: Env, *addrs: PciAddress) -> list[str | None]:
    return [e.host.driver(a) for a in addrs]
