"""Shared fixtures: a simulated host built from a profile in a temporary directory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vfiod.host.host import Host
from vfiod.host.writes import DeadlinePolicy, WriteRecord
from vfiod_sim import SimulatedKernel, processes
from vfiod_sim.simulation import Simulation


@dataclass
class SimHost:
    """A simulated kernel, a Host on it, and every sysfs write the Host made."""

    root: Path
    kernel: SimulatedKernel
    host: Host
    writes: list[WriteRecord] = field(default_factory=list)


SimFactory = Callable[..., SimHost]


@pytest.fixture
def sim(tmp_path: Path) -> SimFactory:
    """`sim("workstation-l4", deadline=0.5)` builds a profile and returns a SimHost on it."""
    count = 0

    def make(profile: str = "workstation-l4", *, deadline: float = 5.0, idle: bool = False) -> SimHost:
        """`idle`: stop the persistence daemon first, as vfiod's hold does, so a bare binder can unbind
        nvidia (whose remove waits for every user of /dev/nvidiaN, as on a real host)."""
        nonlocal count
        count += 1
        root = tmp_path / f"sim{count}"
        sim = Simulation.open(root, profile, deadlines=DeadlinePolicy(default=deadline, per_driver={}))
        sh = SimHost(root=root, kernel=sim.kernel, host=sim.host)
        sim.host.add_write_listener(sh.writes.append)
        if idle:
            processes.stop_unit(root, "nvidia-persistenced.service")
        return sh

    return make
