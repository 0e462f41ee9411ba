"""AttachVGPU and Detach on NVIDIA's vendor-specific VFIO framework (`l40s-vgpu`: two L40S, 32 VFs each on
`nvidia`): profiles by type id, the type id written to the VF's `current_vgpu_type` and read back, the VF
never unbound, its group node handed over; Detach refused while held, then 0 written; a failing VF rolled
back and quarantined; 64 concurrent AttachVGPUs never over-commit a GPU and spread least-loaded; start-up
after a crash; the VF refused as a whole-function passthrough; Recover of a parent (its quarantine) and of a
physical GPU (an SR-IOV cycle with NVIDIA's sriov-manage, refused while a vGPU on it is in use)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import cast

import pytest

from tests.core.support.vgpus import attach_vgpus_concurrently
from tests.core.support.worlds import ADMIN, HM, Env, MakeEnv
from vfiod.core.errors import DeviceBusy, Failed, InUse, InvalidArgument, NoCapacity
from vfiod.core.journal import Operation
from vfiod.core.manager import Manager
from vfiod.core.ops import gpu_recover, vgpu
from vfiod.host.backend import NodeOwner
from vfiod.host.pciaddr import PciAddress
from vfiod_sim import faults, processes

PF_A, PF_B = "0000:a2:00.0", "0000:b3:00.0"
Q4, Q8, Q48 = "NVIDIA L40S-4Q", "NVIDIA L40S-8Q", "NVIDIA L40S-48Q"
U1 = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"
ROOT_0600 = NodeOwner(uid=0, gid=0, mode=0o600)


def current(e: Env, vf: str) -> str:
    return (e.host.device_dir(PciAddress.parse(vf)) / "nvidia" / "current_vgpu_type").read_text().strip()


def gpu_of(vf: str) -> str:
    return PF_A if vf.startswith("0000:a2:") else PF_B


def rebinds(e: Env, since: int = 0) -> list[str]:
    return [w.path for w in e.writes[since:] if w.path.endswith(("/bind", "/unbind", "/driver_override"))]


def test_vgpu_vendor_profiles_by_type_id(env: MakeEnv) -> None:
    m = env("l40s-vgpu").manager
    got = {p.name: p for p in m.list_profiles()}
    p4 = got[Q4]
    assert (p4.type_id, p4.framework, p4.framebuffer_mb, p4.device_api) == (
        "1155",
        "vendor-vfio",
        4096,
        "vfio-pci",
    )
    assert (p4.available, len(p4.parents), got[Q48].available) == (24, 64, 2)  # 12 per GPU; 1 per GPU
    status = m.host_status()
    assert (status["gpu_mode"], status["vgpu_parents"], status["gpu_slots_total"]) == ("vgpu", 64, 0)


def test_vgpu_vendor_attach_writes_the_type_and_hands_the_vf_over(env: MakeEnv) -> None:
    e = env("l40s-vgpu")
    m = e.manager
    att, _ = m.attach_vgpu(HM, "vm1", "1155", uuid=U1)  # by type id
    vf = att.pci_address
    rec = att.to_record()
    assert rec["sysfs_path"] == f"/sys/bus/pci/devices/{vf}/"
    assert rec["device_config"] == {
        "path": f"/sys/bus/pci/devices/{vf}/",
        "sysfsdev": f"/sys/bus/pci/devices/{vf}",
        "uuid": U1,
    }
    assert current(e, vf) == "1155" and rebinds(e) == []
    assert [w.value for w in e.writes if w.path.endswith("current_vgpu_type")] == ["1155"]
    assert e.host.driver(PciAddress.parse(vf)) == "nvidia"
    owner = e.host.node_owner(att.iommu_group)
    assert (owner.uid, owner.mode) == (HM.uid, 0o600)
    (v,) = m.list_vgpus("vm1")
    assert (v.framework, v.uuid, v.profile, v.parent, v.physical_gpu, v.state, v.managed) == (
        "vendor-vfio",
        U1,
        Q4,
        vf,
        gpu_of(vf),
        "attached",
        True,
    )
    dev = m.get_device(att.id)
    assert (dev.type, dev.pci_address, dev.driver, dev.bound_to_vfio) == ("vgpu", vf, "nvidia", True)
    mark = len(e.writes)
    again, _ = m.attach_vgpu(HM, "vm1", Q4)  # idempotent, by name
    assert again == dataclasses.replace(att, changed=False) and att.changed and e.writes[mark:] == []
    got = {p.name: p for p in m.list_profiles()}
    assert (got[Q4].available, got[Q8].available) == (23, 6)  # homogeneous: the used GPU takes 4 GiB only


def test_vgpu_vendor_detach_refused_while_held_then_destroys(env: MakeEnv) -> None:
    e = env("l40s-vgpu")
    m = e.manager
    att, _ = m.attach_vgpu(HM, "vm1", Q4)
    vf = att.pci_address
    pid = processes.add_process(
        e.root, exe="/usr/bin/qemu-system-x86_64", uid=HM.uid, fds=[f"/dev/vfio/{att.iommu_group}"]
    )
    mark = len(e.writes)
    with pytest.raises(DeviceBusy, match="qemu-system-x86_64"):
        m.detach(HM, "vm1")
    assert e.writes[mark:] == [] and current(e, vf) == "1155"
    processes.remove_process(e.root, pid)
    m.detach(HM, "vm1")
    assert current(e, vf) == "0" and m.list_vgpus() == [] and m.registry.open_intents() == []
    assert e.host.node_owner(att.iommu_group).uid == 0 and rebinds(e) == []


def test_vgpu_vendor_failing_vf_rolled_back_and_quarantined(env: MakeEnv) -> None:
    e = env("l40s-vgpu")
    m = e.manager
    first = "0000:a2:00.4"
    faults.inject(
        e.root, "create", kind="errno", errno="EIO", path=f"/sys/devices/*/{first}/nvidia/current_vgpu_type"
    )
    for _ in range(2):
        with pytest.raises(Failed, match=f"create on {first} failed"):
            m.attach_vgpu(HM, "vm1", Q48, parent=first)
        assert current(e, first) == "0" and m.registry.list_vgpus() == [] and m.registry.open_intents() == []
    faults.clear(e.root, "create")
    with pytest.raises(NoCapacity, match=f"{first} quarantined"):
        m.attach_vgpu(HM, "vm1", Q48, parent=first)
    att, _ = m.attach_vgpu(HM, "vm1", Q48)  # the other GPU first: A has a quarantined VF
    assert gpu_of(att.pci_address) == PF_B
    assert any(q.startswith(first) for q in cast(list[str], m.host_status()["quarantined"]))


def test_vgpu_vendor_64_concurrent_attaches_never_over_commit(env: MakeEnv) -> None:
    e = env("l40s-vgpu")
    m = e.manager
    assert attach_vgpus_concurrently(m, Q4, 64) == {"ok": 24, "NoCapacity": 40}
    found = m.list_vgpus()
    assert Counter(gpu_of(v.parent) for v in found) == {PF_A: 12, PF_B: 12}
    assert len({v.parent for v in found}) == 24 and m.registry.open_intents() == []
    assert {p.name: p.available for p in m.list_profiles()}[Q4] == 0


def test_vgpu_vendor_least_loaded_order(env: MakeEnv) -> None:
    m = env("l40s-vgpu").manager
    order = [gpu_of(m.attach_vgpu(HM, f"vm{n}", Q4)[0].pci_address) for n in range(4)]
    assert order[0] != order[1] and order[2] != order[3] and Counter(order) == {PF_A: 2, PF_B: 2}


@pytest.mark.parametrize("point", ["created", "granted", "release"])
def test_vgpu_vendor_start_up_rolls_back_or_completes(env: MakeEnv, point: str) -> None:
    e = env("l40s-vgpu")
    m = e.manager
    att, _ = m.attach_vgpu(HM, "vm1", Q4, uuid=U1)
    row = m.registry.get_vgpu(att.id)
    assert row is not None
    if point != "release":
        m.registry.remove_attachment(row.id)
        m.registry.set_vgpu_state(row.id, "creating")
    op = vgpu.claim(m.deps, vgpu.RELEASE if point == "release" else vgpu.ATTACH, row)
    if point == "granted":
        op.grant(att.iommu_group, ROOT_0600)
    elif point == "created":
        e.host.set_node_owner(att.iommu_group, ROOT_0600)
    m = e.reopen()
    report = m.startup()
    assert current(e, att.pci_address) == "0" and m.registry.list_vgpus() == []
    assert m.registry.open_intents() == [] and m.registry.all_attachments() == []
    assert any(f"vGPU {U1}: an interrupted" in f for f in report.findings), report.findings
    m.attach_vgpu(HM, "vm1", Q4)


def test_vgpu_vendor_vf_is_never_passed_through_whole(env: MakeEnv) -> None:
    e = env("l40s-vgpu")
    m = e.manager
    listed = {d.pci_address: d for d in m.list_available()}
    vf = listed["0000:a2:00.4"]
    assert not vf.passthrough_ready and any("vendor-VFIO" in b for b in vf.blockers)
    m.register(HM, "0000:a2:00.4", "vf0")
    mark = len(e.writes)
    with pytest.raises(InvalidArgument, match="vendor-VFIO VF"):
        m.bind(ADMIN, "vf0")
    with pytest.raises(InvalidArgument, match="vendor-VFIO VF"):
        m.attach(HM, "vm1", ["vf0"])
    with pytest.raises(InvalidArgument, match="vendor-VFIO VF"):
        m.unbind(ADMIN, "vf0")
    assert rebinds(e, mark) == [] and current(e, "0000:a2:00.4") == "0"


def test_vgpu_recover_of_a_parent_clears_its_quarantine(env: MakeEnv) -> None:
    m = env("l40s-vgpu").manager
    vf = "0000:a2:00.4"
    for _ in range(2):
        m.registry.record_parent_failure(vf, "create failed: EIO")
    assert m.recover(ADMIN, vf, dry_run=True).counters["cleared"] == 1 and vgpu_quarantined(m)
    report = m.recover(ADMIN, vf)
    assert report.counters["cleared"] == 1 and not vgpu_quarantined(m)
    assert m.recover(ADMIN, vf).findings == [f"{vf}: not quarantined"]


def vgpu_quarantined(m: Manager) -> list[str]:
    return cast(list[str], m.host_status()["quarantined"])


def test_vgpu_recover_of_a_gpu_cycles_sriov_unless_in_use(env: MakeEnv) -> None:
    e = env("l40s-vgpu")
    m = e.manager
    sriov = e.sim.gpu_sriov
    att, _ = m.attach_vgpu(HM, "vm1", Q4, parent=PF_A)
    m.registry.record_parent_failure("0000:a2:01.0", "verify failed")
    m.registry.record_parent_failure("0000:a2:01.0", "verify failed")
    with pytest.raises(InUse, match="vm1"):
        m.recover(ADMIN, PF_A)
    m.detach(HM, "vm1", keep_bound=True)  # kept: the cycle destroys it
    e.host.set_vgpu_type(PciAddress.parse("0000:a2:02.0"), 1155)  # made behind vfiod's back
    with pytest.raises(InUse, match=r"did not create: type 1155 on 0000:a2:02\.0"):
        m.recover(ADMIN, PF_A)
    e.host.set_vgpu_type(PciAddress.parse("0000:a2:02.0"), 0)
    pid = processes.add_process(
        e.root, exe="/usr/bin/qemu-system-x86_64", uid=HM.uid, fds=["/dev/vfio/devices/vfio3"]
    )
    with pytest.raises(DeviceBusy, match="qemu-system-x86_64"):
        m.recover(ADMIN, PF_A)
    processes.remove_process(e.root, pid)
    assert sriov.calls == []
    report = m.recover(ADMIN, PF_A)
    assert sriov.calls == [("-d", PF_A), ("-e", PF_A)]
    assert (
        report.counters["recovered"],
        report.counters["vgpus_destroyed"],
        report.counters["vfs_cycled"],
    ) == (1, 1, 32)
    # nvidia-persistenced (an NVML client) would hold the unbind lock: stopped around the cycle
    assert [c for c in e.sim.units.calls if c[1] == "nvidia-persistenced.service"] == [
        ("stop", "nvidia-persistenced.service"),
        ("start", "nvidia-persistenced.service"),
    ]
    assert current(e, att.pci_address) == "0" and m.registry.list_vgpus() == [] and not vgpu_quarantined(m)
    assert m.registry.open_intents() == [] and e.host.attr(PciAddress.parse(PF_A), "sriov_numvfs") == "32"
    assert {p.name: p.available for p in m.list_profiles()}[Q4] == 24
    m.attach_vgpu(HM, "vm2", Q4, parent=PF_A)


def test_vgpu_recover_cycle_interrupted_is_finished_at_start_up(env: MakeEnv) -> None:
    e = env("l40s-vgpu")
    m = e.manager
    op = Operation(m.registry, m.deps.boot_id, gpu_recover.CYCLE)
    op.attribute(PF_A, gpu_recover.CYCLE, "32")
    e.sim.units.stop("nvidia-persistenced.service")
    e.sim.gpu_sriov.disable(PciAddress.parse(PF_A))  # killed after the first half
    assert e.host.attr(PciAddress.parse(PF_A), "sriov_numvfs") == "0"
    m = e.reopen()
    report = m.startup()
    assert e.host.attr(PciAddress.parse(PF_A), "sriov_numvfs") == "32" and m.registry.open_intents() == []
    assert f"{PF_A}: an interrupted SR-IOV cycle was finished (its VFs enabled again)" in report.findings


def test_vgpu_vendor_orphan_reaped_unless_its_cdev_is_held(env: MakeEnv) -> None:
    e = env("l40s-vgpu")
    m = e.manager
    m.reconfigure(dataclasses.replace(m.config, vgpu_orphan_grace=0.0))
    att, _ = m.attach_vgpu(HM, "gone", Q4)
    (cdev,) = e.host.list_dir(e.host.device_dir(PciAddress.parse(att.pci_address)) / "vfio-dev")
    pid = processes.add_process(
        e.root, exe="/usr/bin/qemu-system-x86_64", uid=HM.uid, fds=[f"/dev/vfio/devices/{cdev}"]
    )
    report = m.reconcile(HM, ["alive"])
    assert report.counters["held"] == 1 and current(e, att.pci_address) == "1155"
    processes.remove_process(e.root, pid)
    report = m.reconcile(HM, ["alive"])
    assert report.counters["released"] == 1 and current(e, att.pci_address) == "0" and m.list_vgpus() == []


def test_vgpu_vendor_clean_vfs_before_one_that_failed(env: MakeEnv) -> None:
    """A VF whose last create failed (not yet quarantined) may need a reset: the clean VFs go first."""
    m = env("l40s-vgpu").manager
    first = "0000:a2:00.4"
    m.registry.record_parent_failure(first, "verify failed")
    att, _ = m.attach_vgpu(HM, "vm1", Q4, parent=PF_A)
    assert att.pci_address == "0000:a2:00.5"
