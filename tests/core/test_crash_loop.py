"""The crash loop: a child process running the manager is SIGKILLed at every journal point of Attach, Detach,
Bind, Unbind and Recover, on `workstation-l4` and `dgx-h100`, of SetVirtualFunctions (2 VFs to 3) on
`dgx-h100`, and of AttachVGPU and a vGPU's Detach on `mdev-samples` and `l40s-vgpu`; the restarted manager
must leave the registry and the simulated kernel in agreement, and a second restart must change nothing (no
intent is replayed over what came after it).

The points are not listed by hand: a first run of each operation with `VFIOD_TEST_TRACE_POINTS` records
every point it passes, and each of them is then killed in a fresh world. Every disagreement found is a
violation; the test prints the figures (points killed, violations) and asserts there are none.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.core.support.crashes import open_manager, violations
from vfiod.core.context import Caller
from vfiod.core.errors import VfiodError
from vfiod.core.manager import Manager
from vfiod.host import vgpus
from vfiod.host.pciaddr import PciAddress
from vfiod_sim import build, faults

HM = Caller(uid=1000)
ADMIN = Caller(uid=0)
PERSISTENCED = "nvidia-persistenced.service"
GPUS = {"workstation-l4": "0000:a2:00.0", "dgx-h100": "0000:1b:00.0"}
ACTIONS = ("attach", "detach", "bind", "unbind", "recover")
SRIOV_PF, SRIOV_VF = "0000:1c:00.0", "0000:1c:00.1"  # dgx-h100's first ConnectX-7 and its first VF
VGPU_PROFILES = {"mdev-samples": "mtty-2", "l40s-vgpu": "NVIDIA L40S-4Q"}  # an mdev; NVIDIA's vendor VFIO


@dataclass(frozen=True)
class World:
    profile: str
    sim_root: Path
    state: Path


def setup(world: World, action: str) -> None:
    """Bring a fresh world to what `action` starts from."""
    build(world.sim_root, world.profile)
    m = open_manager(world.sim_root, world.state)
    m.startup()
    if world.profile in GPUS:
        m.register(HM, GPUS[world.profile], "gpu")
    if action == "detach":
        m.attach(HM, "vm1", ["gpu"], include_group=True)
    elif action == "unbind":
        m.bind(ADMIN, "gpu", include_group=True)
    elif action == "recover":
        m.attach(HM, "vm1", ["gpu"], include_group=True)
        faults.inject(
            world.sim_root, "nv", kind="probe_fail", path="/sys/bus/pci/drivers_probe", driver="nvidia"
        )
        with pytest.raises(VfiodError):
            m.detach(HM, "vm1")
        faults.clear(world.sim_root, "nv")
        assert m.get_device("gpu").state == "stuck"
    elif action == "detach-vgpu":
        m.attach_vgpu(HM, "vm1", VGPU_PROFILES[world.profile])
    elif action == "sriov":
        m.set_virtual_functions(ADMIN, SRIOV_PF, 2)
        m.register(ADMIN, SRIOV_VF, "vf1")
        m.host.set_sriov_autoprobe(PciAddress.parse(SRIOV_PF), True)  # so that the change writes it too
    m.registry.close()


def perform(m: Manager, action: str, profile: str) -> None:
    if action == "attach":
        m.attach(HM, "vm1", ["gpu"], include_group=True)
    elif action == "detach":
        m.detach(HM, "vm1")
    elif action == "bind":
        m.bind(ADMIN, "gpu", include_group=True)
    elif action == "unbind":
        m.unbind(ADMIN, "gpu")
    elif action == "sriov":
        m.set_virtual_functions(ADMIN, SRIOV_PF, 3)
    elif action == "attach-vgpu":
        m.attach_vgpu(HM, "vm1", VGPU_PROFILES[profile])
    elif action == "detach-vgpu":
        m.detach(HM, "vm1")
    else:
        m.recover(ADMIN)


def _child(world: World, action: str, env: dict[str, str]) -> None:
    os.environ.update(env)
    perform(open_manager(world.sim_root, world.state), action, world.profile)
    os._exit(0)


def run_child(world: World, action: str, env: dict[str, str]) -> int | None:
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(world, action, env))
    proc.start()
    proc.join(60)
    return proc.exitcode


def points_of(tmp: Path, profile: str, action: str) -> list[str]:
    world = World(profile, tmp / "trace-sim", tmp / "trace-state")
    setup(world, action)
    trace = tmp / "points"
    env = {"VFIOD_TEST_HOOKS": "1", "VFIOD_TEST_TRACE_POINTS": str(trace)}
    assert run_child(world, action, env) == 0
    return trace.read_text(encoding="utf-8").split()


def killed_at(tmp: Path, profile: str, action: str, n: int, point: str) -> World:
    """A fresh world ready for `action`, whose child running it was SIGKILLed at `point`."""
    world = World(profile, tmp / f"sim{n}", tmp / f"state{n}")
    setup(world, action)
    status = run_child(world, action, {"VFIOD_TEST_HOOKS": "1", "VFIOD_TEST_CRASH_AT": point})
    assert status == -signal.SIGKILL, f"{point}: the child was not killed there (status {status})"
    return world


def snapshot(m: Manager) -> tuple[object, ...]:
    rows = sorted((str(r.pci_address), r.state) for r in m.registry.list_devices())
    atts = sorted((a.device_id, a.instance_id) for a in m.registry.all_attachments())
    kernel = sorted((a, m.host.driver(PciAddress.parse(a))) for a, _ in rows)
    return rows, atts, kernel


@pytest.mark.slow
@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("profile", sorted(GPUS))
def test_crash_loop(tmp_path: Path, profile: str, action: str) -> None:
    points = points_of(tmp_path, profile, action)
    assert points, "the operation passed no journal point"
    found: list[str] = []
    for n, point in enumerate(points):
        world = killed_at(tmp_path, profile, action, n, point)
        m = open_manager(world.sim_root, world.state)
        m.startup()
        found += [f"{point}: {v}" for v in violations(m, world.sim_root)]
        # the device works afterwards, and a second restart replays nothing over that later work
        try:
            then = _follow_up(m)
        except VfiodError as e:
            found.append(f"{point}: the device did not work after the restart: {e.message}")
            m.registry.close()
            continue
        before = snapshot(m)
        m.registry.close()
        m = open_manager(world.sim_root, world.state)
        report = m.startup()
        if snapshot(m) != before or report.counters.get("operations_recovered"):
            found.append(f"{point}: the restart after {then} changed {before} into {snapshot(m)}")
        found += [f"{point} (after {then}): {v}" for v in violations(m, world.sim_root)]
        m.registry.close()
    print(f"crash loop {profile} {action}: {len(points)} points killed, {len(found)} violations")
    assert found == []


def _follow_up(m: Manager) -> str:
    """An Attach on whatever start-up left (Detach first if it left the device attached)."""
    if m.get_device("gpu").state == "attached":
        m.detach(HM, "vm1")
    m.attach(HM, "vm2", ["gpu"], include_group=True)
    return "a new attach"


@pytest.mark.slow
def test_crash_loop_sriov(tmp_path: Path) -> None:
    """Killed anywhere in a change from 2 VFs to 3, the restart leaves 2 (nothing had happened yet) or 3 (it
    finished the change), never 0; the registered VF is on the bus again, and SetVirtualFunctions works."""
    points = points_of(tmp_path, "dgx-h100", "sriov")
    assert {"sriov:sriov_drivers_autoprobe#1", "sriov:disable#1", "sriov:enable#1"} <= set(points)
    found: list[str] = []
    pf = PciAddress.parse(SRIOV_PF)
    for n, point in enumerate(points):
        world = killed_at(tmp_path, "dgx-h100", "sriov", n, point)
        m = open_manager(world.sim_root, world.state)
        m.startup()
        count = m.host.attr(pf, "sriov_numvfs")
        if count not in ("2", "3"):
            found.append(f"{point}: the PF has {count} VFs after the restart")
        if m.get_device("vf1").state != "host":
            found.append(f"{point}: the registered VF is {m.get_device('vf1').state}")
        found += [f"{point}: {v}" for v in violations(m, world.sim_root)]
        try:
            m.set_virtual_functions(ADMIN, SRIOV_PF, 1)
        except VfiodError as e:
            found.append(f"{point}: SetVirtualFunctions failed after the restart: {e.message}")
        m.registry.close()
        m = open_manager(world.sim_root, world.state)
        report = m.startup()
        if report.counters.get("operations_recovered") or m.host.attr(pf, "sriov_numvfs") != "1":
            found.append(f"{point}: the second restart replayed something: {report.findings}")
        m.registry.close()
    print(f"crash loop dgx-h100 sriov: {len(points)} points killed, {len(found)} violations")
    assert found == []


@pytest.mark.slow
@pytest.mark.parametrize("action", ["attach-vgpu", "detach-vgpu"])
@pytest.mark.parametrize("profile", sorted(VGPU_PROFILES))
def test_crash_loop_vgpu(tmp_path: Path, profile: str, action: str) -> None:
    """Killed anywhere in an AttachVGPU or a vGPU's Detach (an mdev on `mdev-samples`, a vendor-VFIO vGPU
    on `l40s-vgpu`), the restart leaves no vGPU behind (the attach rolled back, the release completed), the
    nodes with root, and AttachVGPU works again."""
    points = points_of(tmp_path, profile, action)
    assert points, "the operation passed no journal point"
    found: list[str] = []
    for n, point in enumerate(points):
        world = killed_at(tmp_path, profile, action, n, point)
        m = open_manager(world.sim_root, world.state)
        m.startup()
        left = vgpus.read_vgpus(m.host)
        if left or m.registry.list_vgpus() or m.registry.all_attachments():
            found.append(f"{point}: left vGPUs {left}, rows {m.registry.list_vgpus()}")
        found += [f"{point}: {v}" for v in violations(m, world.sim_root)]
        try:
            m.attach_vgpu(HM, "vm2", VGPU_PROFILES[profile])
        except VfiodError as e:
            found.append(f"{point}: AttachVGPU failed after the restart: {e.message}")
        m.registry.close()
        m = open_manager(world.sim_root, world.state)
        report = m.startup()
        if report.counters.get("operations_recovered") or len(m.list_vgpus("vm2")) != 1:
            found.append(f"{point}: the second restart replayed something: {report.findings}")
        m.registry.close()
    print(f"crash loop {profile} {action}: {len(points)} points killed, {len(found)} violations")
    assert found == []
