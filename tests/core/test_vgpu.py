"""AttachVGPU and the vGPU part of Detach on `mdev-samples`: create, verify, hand over and record; the
same call again; placement and its refusals (nothing created); a held node refusing Detach; keep_bound;
a failing parent rolled back and quarantined; start-up after a crash between the steps."""

from __future__ import annotations

import dataclasses
import os

import pytest

from tests.core.support.vgpus import break_mbochs_create
from tests.core.support.worlds import HM, OTHER, Env, MakeEnv
from vfiod.core.errors import (
    AlreadyExists,
    DeviceBusy,
    Failed,
    InvalidArgument,
    NoCapacity,
    NotAuthorized,
    ProfileNotFound,
)
from vfiod.core.ops import vgpu
from vfiod.host.backend import NodeOwner
from vfiod_sim import faults, processes

U1 = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"
U2 = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1002"
ROOT_0600 = NodeOwner(uid=0, gid=0, mode=0o600)


def vmm_holding(e: Env, group: int) -> int:
    return processes.add_process(
        e.root, exe="/usr/bin/qemu-system-x86_64", uid=HM.uid, fds=[f"/dev/vfio/{group}"]
    )


def mdevs(e: Env) -> list[str]:
    return e.host.list_dir(e.host.mdev_devices_dir)


def creates(e: Env, since: int = 0) -> list[str]:
    return [w.value for w in e.writes[since:] if w.path.endswith("/create")]


def test_attach_creates_hands_over_and_records(env: MakeEnv) -> None:
    e = env("mdev-samples")
    m = e.manager
    att, warnings = m.attach_vgpu(HM, "vm1", "mtty-2", uuid=U1)
    rec = att.to_record()
    assert rec["pci_address"] == "" and rec["sysfs_path"] == f"/sys/bus/mdev/devices/{U1}/"
    assert rec["device_config"] == {
        "path": f"/sys/bus/mdev/devices/{U1}/",
        "sysfsdev": f"/sys/bus/mdev/devices/{U1}",
        "uuid": U1,
    }
    assert mdevs(e) == [U1] and creates(e) == [U1]
    owner = e.host.node_owner(att.iommu_group)
    assert (owner.uid, owner.mode) == (HM.uid, 0o600) and rec[
        "vfio_group_path"
    ] == f"/dev/vfio/{att.iommu_group}"
    assert warnings == ["/dev/kvm is missing: the VMM needs KVM (load kvm_intel or kvm_amd)"]  # the guest's
    (v,) = m.list_vgpus("vm1")
    assert (v.id, v.managed, v.owner_uid, v.state, v.profile, v.parent) == (
        att.id,
        True,
        HM.uid,
        "attached",
        "Dual port serial",
        "mtty",
    )
    assert m.registry.open_intents() == []
    mark = len(e.writes)
    again, _ = m.attach_vgpu(HM, "vm1", "Dual port serial")  # the same profile by its name: the same vGPU
    assert again == dataclasses.replace(att, changed=False) and att.changed and e.writes[mark:] == []


def test_refusals_create_nothing(env: MakeEnv) -> None:
    e = env("mdev-samples")
    m = e.manager
    with pytest.raises(ProfileNotFound, match="no-such"):
        m.attach_vgpu(HM, "vm1", "no-such-type")
    with pytest.raises(InvalidArgument, match="does not offer"):
        m.attach_vgpu(HM, "vm1", "mtty-2", parent="mbochs")
    with pytest.raises(InvalidArgument, match="uuid"):
        m.attach_vgpu(HM, "vm1", "mtty-2", uuid="not-a-uuid")
    with pytest.raises(NotAuthorized):
        m.attach_vgpu(HM, "vm1", "mtty-2", owner_uid=OTHER.uid)
    e.host.create_mdev("mtty", "mtty-1", U1)  # made behind vfiod's back
    with pytest.raises(AlreadyExists):
        m.attach_vgpu(HM, "vm1", "mtty-2", uuid=U1)
    for n in range(4):
        m.attach_vgpu(HM, f"vm{n}", "mbochs-large")
    mark = len(e.writes)
    with pytest.raises(NoCapacity, match="on mbochs: none left"):
        m.attach_vgpu(HM, "vm9", "mbochs-large")
    assert e.writes[mark:] == [] and len(mdevs(e)) == 5
    assert len(m.registry.list_vgpus()) == 4 and m.registry.open_intents() == []
    m.detach(HM, "vm0")
    m.attach_vgpu(HM, "vm9", "mbochs-large")  # room again


def test_detach_refused_while_held_then_removes(env: MakeEnv) -> None:
    e = env("mdev-samples")
    m = e.manager
    att, _ = m.attach_vgpu(HM, "vm1", "mtty-2", uuid=U1)
    pid = vmm_holding(e, att.iommu_group)
    mark = len(e.writes)
    with pytest.raises(DeviceBusy, match="qemu-system-x86_64"):
        m.detach(HM, "vm1")
    assert e.writes[mark:] == [] and mdevs(e) == [U1] and m.list_vgpus("vm1")[0].state == "attached"
    assert e.host.node_owner(att.iommu_group).uid == HM.uid
    processes.remove_process(e.root, pid)
    m.detach(HM, "vm1")
    assert mdevs(e) == [] and m.list_vgpus() == [] and m.registry.open_intents() == []
    assert not e.host.vfio_group_node(att.iommu_group).exists()
    m.detach(HM, "vm1")  # already detached: success


def test_keep_bound_keeps_it_for_its_owner(env: MakeEnv) -> None:
    e = env("mdev-samples")
    m = e.manager
    att, _ = m.attach_vgpu(HM, "vm1", "mtty-2", uuid=U1)
    m.detach(HM, "vm1", keep_bound=True)
    (v,) = m.list_vgpus()
    assert (v.state, v.instance_id, v.managed) == ("vfio", "", True) and mdevs(e) == [U1]
    assert e.host.node_owner(att.iommu_group).uid == 0
    other, _ = m.attach_vgpu(OTHER, "vm3", "mtty-2")  # another owner gets a new one
    assert other.mdev_uuid != U1
    mark = len(e.writes)
    again, _ = m.attach_vgpu(HM, "vm2", "mtty-2")
    assert again.mdev_uuid == U1 and creates(e, mark) == []
    assert e.host.node_owner(att.iommu_group).uid == HM.uid


def test_a_failing_parent_is_rolled_back_and_quarantined(env: MakeEnv) -> None:
    e = env("mdev-samples")
    m = e.manager
    break_mbochs_create(e.root)
    for _ in range(2):
        with pytest.raises(Failed, match="create on mbochs failed"):
            m.attach_vgpu(HM, "vm1", "mbochs-small")
        assert mdevs(e) == [] and m.registry.list_vgpus() == [] and m.registry.open_intents() == []
    faults.clear(e.root, "create")
    with pytest.raises(NoCapacity, match="mbochs quarantined"):
        m.attach_vgpu(HM, "vm1", "mbochs-small")
    assert {p.type_id: p.available for p in m.list_profiles("mbochs")}["mbochs-small"] == 0


@pytest.mark.parametrize("point", ["created", "granted", "release"])
def test_start_up_rolls_back_or_completes(env: MakeEnv, point: str) -> None:
    """What a crash leaves, rebuilt by hand: the claim (and grant) intents and the kernel's state then."""
    e = env("mdev-samples")
    m = e.manager
    att, _ = m.attach_vgpu(HM, "vm1", "mtty-2", uuid=U1)
    row = m.registry.get_vgpu(att.id)
    assert row is not None
    if point != "release":
        m.registry.remove_attachment(row.id)  # as before the attachment was recorded
        m.registry.set_vgpu_state(row.id, "creating")
    op = vgpu.claim(m.deps, vgpu.RELEASE if point == "release" else vgpu.ATTACH, row)
    if point != "release":
        if point == "granted":
            op.grant(att.iommu_group, ROOT_0600)
        else:
            e.host.set_node_owner(att.iommu_group, ROOT_0600)
    m = e.reopen()
    report = m.startup()
    assert mdevs(e) == [] and m.registry.list_vgpus() == [] and m.registry.open_intents() == []
    assert m.registry.all_attachments() == []
    assert any(f"vGPU {U1}: an interrupted" in f for f in report.findings), report.findings
    assert os.path.exists(e.host.mdev_bus_dir / "mtty")
    m.attach_vgpu(HM, "vm1", "mtty-2")  # works afterwards


def test_vgpu_orphan_reaped_after_the_grace_unless_held(env: MakeEnv) -> None:
    e = env("mdev-samples")
    m = e.manager
    att, _ = m.attach_vgpu(HM, "gone", "mtty-2", uuid=U1)
    e.host.create_mdev("mtty", "mtty-1", U2)  # not vfiod's: reported, never touched
    report = m.reconcile(HM, ["alive"])  # created a moment ago: within the grace period
    assert (report.counters["grace"], report.counters["released"]) == (1, 0) and sorted(mdevs(e)) == sorted(
        [U1, U2]
    )
    assert report.counters["unmanaged_vgpus"] == 1
    assert f"mdev {U2} on mtty was not created by vfiod: left alone" in report.findings
    m.reconfigure(dataclasses.replace(m.config, vgpu_orphan_grace=0.0))
    pid = vmm_holding(e, att.iommu_group)
    report = m.reconcile(HM, ["alive"])
    assert report.counters["held"] == 1 and mdevs(e) == [U1, U2]
    processes.remove_process(e.root, pid)
    report = m.reconcile(HM, ["alive"])
    assert (
        report.counters["released"] == 1
        and mdevs(e) == [U2]
        and [v.managed for v in m.list_vgpus()] == [False]
    )
