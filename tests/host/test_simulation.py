"""The one factory for vfiod on a simulated machine: build or reopen, the errors it names, a manager."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.machines import L4_AUDIO
from vfiod.core.context import Caller
from vfiod_sim.simulation import Simulation, SimulationError


def test_build_then_reopen_the_same_machine(tmp_path: Path) -> None:
    root = tmp_path / "host"
    first = Simulation.open(root, "workstation-l4")
    first.kernel.write_attribute(root / f"sys/bus/pci/devices/{L4_AUDIO}/driver/unbind", L4_AUDIO.encode())
    again = Simulation.open(root)  # another process opening the same root sees the same kernel
    assert again.profile.name == "workstation-l4"
    assert again.host.driver(L4_AUDIO) is None
    reused = Simulation.open(root, "dgx-h100", reuse=True)  # a restarted `vfiod run --simulate`
    assert reused.profile.name == "workstation-l4"
    with pytest.raises(SimulationError, match=re.escape(str(root))):
        Simulation.open(root, "workstation-l4")  # never built over an existing tree


def test_errors_name_the_profile_or_the_root(tmp_path: Path) -> None:
    with pytest.raises(SimulationError, match=r"no simulator profile named 'nope'.*workstation-l4"):
        Simulation.open(tmp_path / "a", "nope")
    with pytest.raises(SimulationError, match="synthetic:N needs a positive count"):
        Simulation.open(tmp_path / "b", "synthetic:0")
    with pytest.raises(SimulationError, match=re.escape(str(tmp_path / "c"))):
        Simulation.open(tmp_path / "c")  # nothing to reopen


def test_a_manager_on_the_machine(tmp_path: Path) -> None:
    sim = Simulation.open(tmp_path / "host", "workstation-l4")
    manager = sim.manager(tmp_path / "state")
    try:
        manager.startup()
        manager.register(Caller(uid=0), L4_AUDIO, "audio")
        assert [d.name for d in manager.list_devices()] == ["audio"]
        assert manager.host is sim.host
    finally:
        manager.registry.close()
