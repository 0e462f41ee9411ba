"""vGPUs and the descriptor hand-over (core/ops/vgpu.py, core/ops/handover.py): an mdev stays in node mode
unless AttachVGPU asks for fd (then no node changes owner and the record names the mdev's own cdev), and
OpenDevices gives an mdev's cdev only with `allow_mdev`, with a warning; a vendor-VFIO vGPU (a PCI function
to the VMM) follows the host's default and is opened like any function. A holder of the vGPU's cdev keeps
Detach from destroying it; a host without cdevs or iommufd refuses fd mode before anything is created. An
fd-mode mdev's node widened behind vfiod's back goes back to root, and one whose AttachVGPU a crash
interrupted is removed at the next start, its node never having changed owner."""

from __future__ import annotations

import dataclasses
import os

import pytest

from tests.core.support.worlds import HM, OTHER, Env, MakeEnv
from vfiod.core.errors import DeviceBusy, HandoffUnsupported, InUse, NotOwner
from vfiod.core.ops import vgpu
from vfiod.core.settings import ManagerConfig
from vfiod.host.backend import NodeOwner
from vfiod.host.pciaddr import PciAddress
from vfiod_sim import processes
from vfiod_sim.machines.l40s_vgpu import l40s_vgpu

ROOT_0600 = NodeOwner(uid=0, gid=0, mode=0o600)


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def creates(e: Env, since: int = 0) -> list[str]:
    return [w.path for w in e.writes[since:] if w.path.endswith(("/create", "current_vgpu_type"))]


def test_an_mdev_stays_in_node_mode_where_fd_is_the_default_and_says_so(env: MakeEnv) -> None:
    e = env("mdev-samples-iommufd")
    _, warnings = e.manager.attach_vgpu(HM, "vm1", "mtty-2")
    assert not any("handoff fd" in w for w in warnings)
    e.manager.reconfigure(ManagerConfig(handoff="fd"))
    att, warnings = e.manager.attach_vgpu(HM, "vm2", "mtty-2")
    (said,) = [w for w in warnings if "handoff fd" in w]
    assert f"by its group node {att.vfio_group_path}" in said and "sysfsdev=" in said
    assert att.handoff == "node" and e.host.node_owner(att.iommu_group).uid == HM.uid


def test_an_mdev_in_fd_mode_when_asked(env: MakeEnv) -> None:
    e = env("mdev-samples-iommufd")
    att, warnings = e.manager.attach_vgpu(HM, "vm1", "mtty-2", handoff_mode="fd")
    rec = att.to_record()
    assert (rec["handoff"], rec["vfio_group_path"]) == ("fd", "")
    (name,) = os.listdir(e.host.from_logical(f"/sys/bus/mdev/devices/{att.mdev_uuid}/vfio-dev"))
    assert rec["vfio_cdev_path"] == f"/dev/vfio/devices/{name}"  # the mdev's own cdev
    assert e.host.node_owner(att.iommu_group) == ROOT_0600
    (said,) = [w for w in warnings if "by descriptor" in w]
    assert f"sysfsdev=/sys/bus/mdev/devices/{att.mdev_uuid} beside fd=" in said and "allow_mdev" in said
    # the repeat keeps the mode; the other one is refused, not switched under the VMM
    again, _ = e.manager.attach_vgpu(HM, "vm1", "mtty-2", handoff_mode="fd")
    assert again == dataclasses.replace(att, changed=False)
    mark = len(e.writes)
    with pytest.raises(InUse, match="handoff fd, not node"):
        e.manager.attach_vgpu(HM, "vm1", "mtty-2", handoff_mode="node")
    assert e.writes[mark:] == [] and e.host.node_owner(att.iommu_group) == ROOT_0600


def test_open_devices_gives_an_mdev_only_with_allow_mdev(env: MakeEnv) -> None:
    e = env("mdev-samples-iommufd")
    att, _ = e.manager.attach_vgpu(HM, "vm1", "mtty-2", handoff_mode="fd")
    before = open_fds()
    with pytest.raises(HandoffUnsupported, match=r"mediated device.*allow_mdev.*sysfsdev="):
        e.manager.open_devices(HM, "vm1")
    assert open_fds() == before
    with pytest.raises(NotOwner):
        e.manager.open_devices(OTHER, "vm1", [att.id], allow_mdev=True)
    for named in ([], [f"vgpu-{att.mdev_uuid}"], [att.id]):
        opened = e.manager.open_devices(HM, "vm1", named, allow_mdev=True)
        try:
            ((dev_id, sysfs, fd),) = opened.devices
            assert (dev_id, sysfs) == (att.id, f"/sys/bus/mdev/devices/{att.mdev_uuid}/")
            assert os.path.samestat(os.fstat(fd), os.stat(e.host.from_logical(att.vfio_cdev_path)))
            (said,) = [w for w in opened.warnings if "allow_mdev" in w]
            assert att.vfio_cdev_path in said and f"sysfsdev=/sys/bus/mdev/devices/{att.mdev_uuid})" in said
        finally:
            opened.close()
    assert open_fds() == before


def test_open_devices_of_a_node_mode_mdev_is_refused(env: MakeEnv) -> None:
    e = env("mdev-samples-iommufd")
    e.manager.attach_vgpu(HM, "vm1", "mtty-2")
    with pytest.raises(HandoffUnsupported, match="handoff node"):
        e.manager.open_devices(HM, "vm1", allow_mdev=True)


def test_a_holder_of_the_mdev_cdev_keeps_detach_from_destroying_it(env: MakeEnv) -> None:
    e = env("mdev-samples-iommufd")
    att, _ = e.manager.attach_vgpu(HM, "vm1", "mtty-2", handoff_mode="fd")
    pid = processes.add_process(
        e.root, exe="/usr/bin/qemu-system-x86_64", uid=HM.uid, fds=[att.vfio_cdev_path]
    )
    mark = len(e.writes)
    with pytest.raises(DeviceBusy, match=rf"qemu-system-x86_64.*{att.vfio_cdev_path}"):
        e.manager.detach(HM, "vm1")
    assert e.writes[mark:] == [] and e.host.from_logical(att.sysfs_path).exists()
    processes.remove_process(e.root, pid)
    e.manager.detach(HM, "vm1")
    assert not e.host.from_logical(att.sysfs_path).exists() and e.manager.list_vgpus() == []


def test_fd_mode_without_cdevs_creates_nothing(env: MakeEnv) -> None:
    e = env("mdev-samples")  # Linux 6.1: no VFIO cdevs, no iommufd
    with pytest.raises(HandoffUnsupported, match="iommufd"):
        e.manager.attach_vgpu(HM, "vm1", "mtty-2", handoff_mode="fd")
    assert creates(e) == [] and e.manager.list_vgpus() == []


def test_a_vendor_vgpu_follows_the_hosts_default(env: MakeEnv) -> None:
    e = env(dataclasses.replace(l40s_vgpu(), iommufd=True))
    e.manager.reconfigure(ManagerConfig(handoff="fd"))
    att, warnings = e.manager.attach_vgpu(HM, "vm1", "1155")
    vf = PciAddress.parse(att.pci_address)
    (name,) = os.listdir(e.host.device_dir(vf) / "vfio-dev")
    assert (att.handoff, att.vfio_group_path, att.vfio_cdev_path) == ("fd", "", f"/dev/vfio/devices/{name}")
    assert e.host.node_owner(att.iommu_group) == ROOT_0600 and not any("handoff" in w for w in warnings)
    opened = e.manager.open_devices(HM, "vm1")  # no allow_mdev needed: the VF is a PCI function
    try:
        ((_, sysfs, fd),) = opened.devices
        assert sysfs == f"/sys/bus/pci/devices/{vf}/"
        assert os.path.samestat(os.fstat(fd), os.stat(e.host.from_logical(att.vfio_cdev_path)))
    finally:
        opened.close()
    node, _ = e.manager.attach_vgpu(HM, "vm2", "1155", handoff_mode="node")
    assert node.handoff == "node" and e.host.node_owner(node.iommu_group).uid == HM.uid


def test_a_vendor_vgpu_in_fd_mode_on_a_host_without_iommufd_creates_nothing(env: MakeEnv) -> None:
    e = env("l40s-vgpu")  # VFIO cdevs, but no /dev/iommu
    e.manager.reconfigure(ManagerConfig(handoff="fd"))
    with pytest.raises(HandoffUnsupported, match="no iommufd"):
        e.manager.attach_vgpu(HM, "vm1", "1155")
    assert creates(e) == [] and e.manager.list_vgpus() == []


def test_an_fd_mode_mdev_node_stays_roots(env: MakeEnv) -> None:
    e = env("mdev-samples-iommufd")
    att, _ = e.manager.attach_vgpu(HM, "vm1", "mtty-2", handoff_mode="fd")
    e.host.set_node_owner(att.iommu_group, NodeOwner(uid=HM.uid, gid=0, mode=0o666))  # a udev rule
    (found,) = e.manager.refreshes.grants()
    assert f"/dev/vfio/{att.iommu_group}" in found and "given back to uid 0" in found
    assert e.host.node_owner(att.iommu_group) == ROOT_0600
    e.host.set_node_owner(att.iommu_group, NodeOwner(uid=HM.uid, gid=0, mode=0o600))
    m = e.reopen()  # a restart keeps the attachment, and its node root's
    m.startup()
    (again,) = [a for a in m.registry.all_attachments() if a.device_id == att.id]
    assert again.handoff == "fd" and e.host.node_owner(att.iommu_group) == ROOT_0600


def test_an_interrupted_fd_mode_attach_vgpu_is_rolled_back_at_start_up(env: MakeEnv) -> None:
    """What a crash after the create and before the record leaves (rebuilt by hand: the claim intent and
    the mdev; fd mode journals no grant): the next start removes the mdev and its node."""
    e = env("mdev-samples-iommufd")
    m = e.manager
    att, _ = m.attach_vgpu(HM, "vm1", "mtty-2", handoff_mode="fd")
    row = m.registry.get_vgpu(att.id)
    assert row is not None
    m.registry.remove_attachment(row.id)  # as before the attachment was recorded
    m.registry.set_vgpu_state(row.id, "creating")
    vgpu.claim(m.deps, vgpu.ATTACH, row)
    m = e.reopen()
    report = m.startup()
    assert not e.host.from_logical(att.sysfs_path).exists() and m.registry.list_vgpus() == []
    assert m.registry.open_intents() == [] and m.registry.all_attachments() == []
    said = f"vGPU {att.mdev_uuid}: an interrupted attach-vgpu was rolled back"
    assert any(said in f for f in report.findings), report.findings
    assert not e.host.vfio_group_node(att.iommu_group).exists()  # gone with the mdev
    m.attach_vgpu(HM, "vm1", "mtty-2", handoff_mode="fd")  # works afterwards
