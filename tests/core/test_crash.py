"""Crash safety: a real child process running the manager is SIGKILLed at every journal step of Attach and
Detach; a restarted manager must leave the registry and the simulated kernel in agreement."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.core.support.crashes import open_manager, run_and_kill
from tests.machines import L4, L4_AUDIO
from vfiod.core.context import Caller
from vfiod.core.manager import Manager
from vfiod_sim import build, processes

HM = Caller(uid=1000)
PERSISTENCED = "nvidia-persistenced.service"

ATTACH_POINTS = [
    "journaled",
    "override#1",
    "unbind#1",
    "probe#1",
    "override#2",
    "unbind#2",
    "probe#2",
    "bound",
    "granted",
]
DETACH_POINTS = [
    "journaled",
    "override#1",
    "unbind#1",
    "probe#1",
    "clear-override#1",
    "override#2",
    "unbind#2",
    "probe#2",
    "clear-override#2",
    "restored",
]


def check_invariants(m: Manager, sim_root: Path, *, attached: bool) -> None:
    host = m.host
    group = host.iommu_group(L4)
    assert group is not None
    rows = {r.pci_address: r for r in m.registry.list_devices()}
    if attached:
        assert [host.driver(L4), host.driver(L4_AUDIO)] == ["vfio-pci", "vfio-pci"]
        assert {r.state for r in rows.values()} == {"attached"}
        assert host.node_owner(group).uid == HM.uid
    else:
        assert [host.driver(L4), host.driver(L4_AUDIO)] == ["nvidia", "snd_hda_intel"]
        assert host.driver_override(L4) is None and host.driver_override(L4_AUDIO) is None
        assert {r.state for r in rows.values()} == {"host"}
        assert not host.vfio_group_node(group).exists()
        assert m.registry.all_attachments() == []
    for r in rows.values():
        assert (m.registry.attachment_of_device(r.id) is not None) == (r.state == "attached")
    assert m.registry.open_intents() == []
    assert m.registry.all_holds() == []
    assert processes.unit_active(sim_root, PERSISTENCED)


@pytest.mark.slow
@pytest.mark.parametrize("point", ATTACH_POINTS)
def test_kill_during_attach(tmp_path: Path, point: str) -> None:
    sim_root, state = tmp_path / "sim", tmp_path / "state"
    build(sim_root, "workstation-l4")
    m = open_manager(sim_root, state)
    m.startup()
    m.register(HM, str(L4), "l4-gpu")
    m.registry.close()
    assert run_and_kill(sim_root, state, "attach", point) == -signal.SIGKILL
    m = open_manager(sim_root, state)
    report = m.startup()
    check_invariants(m, sim_root, attached=False)
    assert report.counters.get("operations_recovered", 0) >= (1 if point != "journaled" else 0)
    # and the device works normally afterwards
    m.attach(HM, "vm1", ["l4-gpu"], include_group=True)
    check_invariants(m, sim_root, attached=True)
    m.registry.close()


@pytest.mark.slow
@pytest.mark.parametrize("point", DETACH_POINTS)
def test_kill_during_detach(tmp_path: Path, point: str) -> None:
    sim_root, state = tmp_path / "sim", tmp_path / "state"
    build(sim_root, "workstation-l4")
    m = open_manager(sim_root, state)
    m.startup()
    m.register(HM, str(L4), "l4-gpu")
    m.attach(HM, "vm1", ["l4-gpu"], include_group=True)
    m.registry.close()
    assert run_and_kill(sim_root, state, "detach", point) == -signal.SIGKILL
    m = open_manager(sim_root, state)
    m.startup()
    check_invariants(m, sim_root, attached=False)
    m.registry.close()


def test_crash_hook_is_inert_without_the_hooks_switch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VFIOD_TEST_CRASH_AT", "attach:probe")
    monkeypatch.delenv("VFIOD_TEST_HOOKS", raising=False)
    sim_root, state = tmp_path / "sim", tmp_path / "state"
    build(sim_root, "workstation-l4")
    m = open_manager(sim_root, state)
    m.register(HM, str(L4), "l4-gpu")
    m.attach(HM, "vm1", ["l4-gpu"], include_group=True)
    check_invariants(m, sim_root, attached=True)
    m.registry.close()
