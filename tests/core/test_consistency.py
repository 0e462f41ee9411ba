"""Crash and hang consistency: intents are never replayed over later work, a grant is journaled before the
node changes hands, and a device with a write pending or an intent open stays `stuck`."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import pytest

from tests.core.support.crashes import open_manager, run_and_kill
from tests.core.support.worlds import ADMIN, HM, OTHER, Env, MakeEnv, drivers
from tests.machines import L4, L4_AUDIO
from vfiod.core import recovery
from vfiod.core.access import KERNEL_DEFAULT
from vfiod.core.errors import NativeDriverNotRestored, Timeout
from vfiod.core.ops import attach as attach_op
from vfiod.host.backend import NodeOwner
from vfiod_sim import build, faults


def wait_no_pending(e: object, timeout: float = 10.0) -> None:
    host = e.host  # type: ignore[attr-defined]
    for _ in range(int(timeout / 0.05)):
        if not host.pending_writes():
            return
        threading.Event().wait(0.05)
    raise AssertionError("the late write never completed")


def attached_to(e: object, instance: str) -> None:
    m = e.manager  # type: ignore[attr-defined]
    dev = m.get_device("l4-gpu")
    assert (dev.state, dev.attached_to) == ("attached", instance), dev
    assert drivers(e, L4, L4_AUDIO) == ["vfio-pci", "vfio-pci"]  # type: ignore[arg-type]


# ----- 1. intents never replayed over later work ------------------------------------------------------


def stuck_after_a_failed_detach(env: MakeEnv) -> Env:
    """vm1 attached, then a Detach whose nvidia probe fails: the GPU is stuck, its intents left open."""
    e = env()
    e.manager.register(HM, str(L4), "l4-gpu")
    e.manager.attach(HM, "vm1", ["l4-gpu"], include_group=True)
    faults.inject(e.root, "nv", kind="probe_fail", path="/sys/bus/pci/drivers_probe", driver="nvidia")
    with pytest.raises(NativeDriverNotRestored):
        e.manager.detach(HM, "vm1")
    return e


def test_intent_of_a_failed_detach_is_not_replayed_after_recover_and_a_new_attach(env: MakeEnv) -> None:
    e = stuck_after_a_failed_detach(env)
    m = e.manager
    assert m.registry.open_intents()  # the stuck function's intents stay: a write may have happened
    faults.clear(e.root, "nv")
    assert m.recover(ADMIN).counters["recovered"] == 1
    assert m.registry.open_intents() == []  # Recover settled the device: the old detach is closed
    m.attach(HM, "vm2", ["l4-gpu"], include_group=True)
    m = e.reopen()
    report = m.startup()
    attached_to(e, "vm2")
    assert report.counters.get("operations_recovered", 0) == 0
    assert m.registry.open_intents() == []


def test_intent_of_a_late_completion_is_settled(env: MakeEnv) -> None:
    """A hung unbind times out (stuck), then the kernel finishes it; Recover puts the device back, a new
    Attach follows, and a restart leaves that attachment alone."""
    e = env(deadline=0.5)
    m = e.manager
    m.register(HM, str(L4), "l4-gpu")
    faults.inject(e.root, "hang", kind="hang", path="/sys/bus/pci/drivers/nvidia/unbind")
    with pytest.raises(Timeout):
        m.attach(HM, "vm1", ["l4-gpu"], include_group=True)
    faults.release(e.root, "hang")
    wait_no_pending(e)
    assert m.get_device("l4-gpu").state == "stuck"  # driverless with a stray override
    m.recover(ADMIN)
    m.attach(HM, "vm2", ["l4-gpu"], include_group=True)
    m = e.reopen()
    m.startup()
    attached_to(e, "vm2")
    assert m.registry.open_intents() == []


def test_intent_older_than_its_device_generation_is_closed_not_replayed(env: MakeEnv) -> None:
    e = env()
    m = e.manager
    row = m.register(HM, str(L4), "l4-gpu")
    m.attach(HM, "vm1", ["l4-gpu"], include_group=True)
    # an intent that a path forgot to close, from before the device was last settled
    stale = m.registry.journal_function(
        action="detach",
        boot_id=m.boot_id,
        operation="detach-0ld",
        device_id=row.id,
        pci_address=str(L4),
        iommu_group=row.iommu_group,
        from_driver="nvidia",
        native_module="nvidia",
        to_driver="",
    )
    m.registry.update_device(row.id, settled_through=stale)
    m = e.reopen()
    report = m.startup()
    attached_to(e, "vm1")
    assert report.counters["superseded_intents"] == 1
    assert m.registry.open_intents() == []


def test_intent_of_a_reconciled_instance_is_closed(env: MakeEnv) -> None:
    e = stuck_after_a_failed_detach(env)
    m = e.manager
    faults.clear(e.root, "nv")
    m.recover(ADMIN)
    m.attach(HM, "vm2", ["l4-gpu"], include_group=True)
    assert m.reconcile(HM, []).counters["released"] == 2
    assert m.registry.open_intents() == []
    m = e.reopen()
    m.startup()
    assert m.get_device("l4-gpu").state == "host" and drivers(e, L4) == ["nvidia"]


# ----- 2. the grant is journaled first ----------------------------------------------------------------


@pytest.mark.parametrize("point", ["grant", "granted"])
def test_grant_crash_around_the_chown_leaves_no_node_with_the_caller(tmp_path: Path, point: str) -> None:
    sim_root, state = tmp_path / "sim", tmp_path / "state"
    build(sim_root, "workstation-l4")
    m = open_manager(sim_root, state)
    m.startup()
    m.register(HM, str(L4), "l4-gpu")
    group = m.host.iommu_group(L4)
    assert group is not None
    m.registry.close()
    assert run_and_kill(sim_root, state, "attach", point) == -signal.SIGKILL
    m = open_manager(sim_root, state)
    m.startup()
    assert m.registry.all_attachments() == [] and m.registry.open_intents() == []
    assert drivers_of(m) == ["nvidia", "snd_hda_intel"]
    # the next user's attach records root as the previous owner, and Detach gives the node back to it
    m.attach(OTHER, "vm2", ["l4-gpu"], include_group=True)
    assert m.host.node_owner(group).uid == OTHER.uid
    (att, _) = m.registry.attachments_in_group(group)
    assert att.node_prev is None or att.node_prev.uid == 0
    m.detach(OTHER, "vm2")
    m.registry.close()


def drivers_of(m: object) -> list[str | None]:
    host = m.host  # type: ignore[attr-defined]
    return [host.driver(L4), host.driver(L4_AUDIO)]


def test_grant_a_registry_failure_after_the_chown_gives_the_node_back(
    env: MakeEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    e = env()
    m = e.manager
    m.register(HM, str(L4), "l4-gpu")
    group = m.host.iommu_group(L4)
    assert group is not None

    def broken(*a: object, **k: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(attach_op, "_record_attachments", broken)
    with pytest.raises(OSError, match="disk full"):
        m.attach(HM, "vm1", ["l4-gpu"], include_group=True)
    assert m.host.node_owner(group).uid == 0


def test_grant_a_leaked_node_goes_back_to_root_at_start(env: MakeEnv) -> None:
    e = env()
    m = e.manager
    m.register(HM, str(L4), "l4-gpu")
    m.bind(ADMIN, "l4-gpu", include_group=True)
    group = m.host.iommu_group(L4)
    assert group is not None
    m.host.set_node_owner(group, NodeOwner(uid=HM.uid, gid=0, mode=0o600))  # a grant nobody recorded
    m = e.reopen()
    report = m.startup()
    assert m.host.node_owner(group) == KERNEL_DEFAULT
    assert report.counters["nodes_taken_back"] == 1
    assert any(f"/dev/vfio/{group} was owned by uid {HM.uid}" in f for f in report.findings)
    # and an attach by someone else does not record the leaked uid as the previous owner
    m.host.set_node_owner(group, NodeOwner(uid=HM.uid, gid=0, mode=0o600))
    m.attach(OTHER, "vm2", ["l4-gpu"], include_group=True)
    m.detach(OTHER, "vm2", keep_bound=True)
    assert m.host.node_owner(group) == KERNEL_DEFAULT


# ----- 3. stuck stays stuck while a write is pending or an intent is open ------------------------------


def test_stuck_a_refresh_during_a_hung_detach_keeps_the_device_stuck(env: MakeEnv) -> None:
    e = env(deadline=0.5)
    m = e.manager
    m.register(HM, str(L4), "l4-gpu")
    m.attach(HM, "vm1", ["l4-gpu"], include_group=True)
    path = f"/sys/bus/pci/devices/{L4}/driver_override"
    faults.inject(e.root, "hang", kind="hang", path=path, value="nvidia")
    with pytest.raises(Timeout):
        m.detach(HM, "vm1")
    assert m.get_device("l4-gpu").state == "stuck"
    m.refresh_device(str(L4))  # what a uevent does: the device is on vfio-pci with its attachment
    assert m.get_device("l4-gpu").state == "stuck"
    with pytest.raises(Timeout, match=r"has not finished .*driver_override <- 'nvidia'"):
        m.attach(HM, "vm1", ["l4-gpu"], include_group=True)
    faults.release(e.root, "hang")
    wait_no_pending(e)
    # the late override landed on a device still on vfio-pci with an open detach: still stuck
    assert m.get_device("l4-gpu").state == "stuck"
    m = e.reopen()
    m.startup()  # the interrupted detach is completed, not reverted
    dev = m.get_device("l4-gpu")
    assert (dev.state, dev.attached_to) == ("host", "") and drivers(e, L4) == ["nvidia"]


def test_stuck_start_up_refresh_with_an_open_intent_on_vfio_is_stuck(env: MakeEnv) -> None:
    """An intent that start-up could not finish (its function vanished mid-way, say) keeps a device that is
    on vfio-pci with its attachment `stuck` rather than `attached`."""
    e = env()
    m = e.manager
    row = m.register(HM, str(L4), "l4-gpu")
    m.attach(HM, "vm1", ["l4-gpu"], include_group=True)
    m.registry.journal_write(
        action="unbind",
        boot_id="another-boot-of-a-test",
        operation="detach-x",
        pci_address=str(L4),
        from_driver="nvidia",
        to_driver="",
    )
    recovery.refresh_one(m.deps, m.registry.get_device(row.id))  # type: ignore[arg-type]
    assert m.get_device("l4-gpu").state == "stuck"
