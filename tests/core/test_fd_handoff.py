"""Attach with `handoff` fd (core/handoff.py) and OpenDevices (core/ops/handover.py) on the simulated
QEMU q35 with VFIO cdevs and iommufd: the device is bound and verified as usual, no node changes owner,
the record names the function's cdev and no group node; the mode is kept with the attachment (a repeat
asking for the other mode is refused) and one IOMMU group is handed over one way. A host without cdevs
refuses fd mode before any write; a holder of the cdev keeps Detach from unbinding; a node widened behind
vfiod's back is put back to root 0600. OpenDevices opens the cdevs and a fresh /dev/iommu for the owner
(or the admin) of an fd-mode attachment, every call anew, close-on-exec, and leaves nothing open when it
refuses or an open fails."""

from __future__ import annotations

import errno
import os

import pytest

from tests.core.support.worlds import ADMIN, HM, OTHER, Env, MakeEnv
from tests.machines import L4
from vfiod.core.errors import (
    DeviceBusy,
    Failed,
    HandoffUnsupported,
    InUse,
    InvalidArgument,
    NotFound,
    NotOwner,
)
from vfiod.core.ops import handover
from vfiod.core.settings import ManagerConfig
from vfiod.host import opener
from vfiod.host.backend import NodeOwner
from vfiod.host.host import Host
from vfiod.host.pciaddr import PciAddress
from vfiod_sim import processes

EDU = PciAddress.parse("0000:00:07.0")  # an endpoint alone in its IOMMU group, on no driver
ROOT_0600 = NodeOwner(uid=0, gid=0, mode=0o600)


def registered(env: MakeEnv) -> Env:
    e = env("qemu-q35-iommufd")
    e.manager.register(ADMIN, str(EDU), "edu")
    return e


def test_fd_mode_binds_and_changes_no_node(env: MakeEnv) -> None:
    e = registered(env)
    (att,), _ = e.manager.attach(HM, "vm1", ["edu"], handoff_mode="fd")
    rec = att.to_record()
    assert e.host.driver(EDU) == "vfio-pci"
    assert (rec["handoff"], rec["vfio_group_path"]) == ("fd", "")
    cdev = str(rec["vfio_cdev_path"])
    name = cdev.removeprefix("/dev/vfio/devices/")
    assert cdev.startswith("/dev/vfio/devices/vfio") and e.host.from_logical(cdev).exists()
    assert (e.host.device_dir(EDU) / "vfio-dev" / name / "dev").is_file()  # the function's own cdev
    assert e.host.node_owner(att.iommu_group) == ROOT_0600
    assert e.manager.registry.attachment_of_device(att.id).handoff == "fd"  # type: ignore[union-attr]
    # the idempotent repeat keeps the mode; the other mode is refused, not switched under the VMM
    (again,), _ = e.manager.attach(HM, "vm1", ["edu"], handoff_mode="fd")
    assert again.changed is False and again.vfio_cdev_path == cdev
    mark = len(e.writes)
    with pytest.raises(InUse, match="handoff fd, not node"):
        e.manager.attach(HM, "vm1", ["edu"], handoff_mode="node")
    assert e.writes[mark:] == [] and e.host.node_owner(att.iommu_group) == ROOT_0600
    e.manager.detach(HM, "vm1")
    assert e.host.driver(EDU) is None and e.manager.registry.attachment_of_device(att.id) is None


def test_node_mode_is_the_default_and_says_so(env: MakeEnv) -> None:
    e = registered(env)
    (att,), _ = e.manager.attach(HM, "vm1", ["edu"])
    rec = att.to_record()
    assert (rec["handoff"], rec["vfio_cdev_path"]) == ("node", "")
    assert rec["vfio_group_path"] == f"/dev/vfio/{att.iommu_group}"
    assert e.host.node_owner(att.iommu_group).uid == HM.uid


def test_the_configured_default_applies_when_the_caller_does_not_say(env: MakeEnv) -> None:
    e = registered(env)
    e.manager.reconfigure(ManagerConfig(handoff="fd"))
    (att,), _ = e.manager.attach(HM, "vm1", ["edu"])
    assert att.handoff == "fd" and e.host.node_owner(att.iommu_group) == ROOT_0600


def test_fd_mode_on_a_kernel_without_cdevs_is_refused_before_any_write(env: MakeEnv) -> None:
    e = env()  # workstation-l4: Debian's 6.1, no CONFIG_VFIO_DEVICE_CDEV, no iommufd
    e.manager.register(HM, str(L4), "l4")
    with pytest.raises(HandoffUnsupported, match="no iommufd"):
        e.manager.attach(HM, "vm1", ["l4"], include_group=True, handoff_mode="fd")
    assert e.writes == [] and e.host.driver(L4) == "nvidia"
    assert e.manager.registry.attachment_of_device(e.manager.resolve("l4").id) is None


def test_an_unknown_mode_is_invalid(env: MakeEnv) -> None:
    e = registered(env)
    with pytest.raises(InvalidArgument, match="handoff must be one of node, fd"):
        e.manager.attach(HM, "vm1", ["edu"], handoff_mode="socket")
    assert e.writes == []


def test_a_holder_of_the_cdev_keeps_detach_from_unbinding(env: MakeEnv) -> None:
    """Opening a cdev never answers EBUSY, so the /proc scan is the truth: a VMM with a passed descriptor
    (or one that opened the cdev itself) is named, and Detach goes through once it has exited."""
    e = registered(env)
    (att,), _ = e.manager.attach(HM, "vm1", ["edu"], handoff_mode="fd")
    pid = processes.add_process(
        e.root, exe="/usr/bin/qemu-system-x86_64", uid=HM.uid, fds=[att.vfio_cdev_path]
    )
    mark = len(e.writes)
    with pytest.raises(DeviceBusy, match="qemu-system-x86_64") as err:
        e.manager.detach(HM, "vm1")
    assert (pid, "/usr/bin/qemu-system-x86_64") in err.value.holders and e.writes[mark:] == []
    processes.remove_process(e.root, pid)
    e.manager.detach(HM, "vm1")
    assert e.host.driver(EDU) is None


def test_a_node_widened_in_fd_mode_goes_back_to_root(env: MakeEnv) -> None:
    e = registered(env)
    (att,), _ = e.manager.attach(HM, "vm1", ["edu"], handoff_mode="fd")
    e.host.set_node_owner(att.iommu_group, NodeOwner(uid=HM.uid, gid=0, mode=0o666))  # a udev rule
    (found,) = e.manager.refreshes.grants()
    assert f"/dev/vfio/{att.iommu_group}" in found and "given back to uid 0" in found
    assert e.host.node_owner(att.iommu_group) == ROOT_0600


def test_one_group_is_handed_over_one_way(env: MakeEnv) -> None:
    """The e1000 and the edu behind QEMU's PCI bridge share IOMMU group 14: with one attached in fd mode,
    the other cannot join the instance with the group node given to the owner."""
    e = env("qemu-q35-iommufd")
    e.manager.register(ADMIN, "0000:02:01.0", "nic")
    e.manager.register(ADMIN, "0000:02:02.0", "edu2")
    e.manager.attach(HM, "vm1", ["nic"], handoff_mode="fd")  # the edu, on no driver, may stay
    mark = len(e.writes)
    with pytest.raises(InUse, match="IOMMU group 14 is already attached with handoff fd"):
        e.manager.attach(HM, "vm1", ["edu2"], handoff_mode="node")
    assert e.writes[mark:] == [] and e.host.node_owner(14) == ROOT_0600
    atts, _ = e.manager.attach(HM, "vm1", ["edu2"], handoff_mode="fd")
    assert [(a.pci_address, a.handoff, a.changed) for a in atts] == [
        ("0000:02:01.0", "fd", False),  # attached by the call before, and kept as it was
        ("0000:02:02.0", "fd", True),
    ]
    assert all(a.vfio_cdev_path for a in atts) and e.host.node_owner(14) == ROOT_0600


# ----- OpenDevices ------------------------------------------------------------------------------------


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def test_open_devices_gives_the_cdev_and_a_fresh_iommufd(env: MakeEnv) -> None:
    e = registered(env)
    (att,), _ = e.manager.attach(HM, "vm1", ["edu"], handoff_mode="fd")
    before = open_fds()
    first = e.manager.open_devices(HM, "vm1")
    second = e.manager.open_devices(HM, "vm1", ["edu"])
    try:
        ((dev_id, sysfs, fd),) = first.devices
        assert (dev_id, sysfs) == (att.id, f"/sys/bus/pci/devices/{EDU}/")
        assert os.path.samestat(os.fstat(fd), os.stat(e.host.from_logical(att.vfio_cdev_path)))
        assert os.path.samestat(os.fstat(first.iommufd), os.stat(e.host.from_logical("/dev/iommu")))
        assert os.get_inheritable(fd) is False  # O_CLOEXEC: nothing vfiod starts inherits it
        # every call opens anew: the VMM's descriptors are its own
        assert not set(first.fds) & set(second.fds) and len(set(first.fds + second.fds)) == 4
    finally:
        first.close()
        second.close()
        first.close()  # once only: the numbers may be another file's by now
    assert open_fds() == before
    assert e.host.node_owner(att.iommu_group) == ROOT_0600


def test_open_devices_of_a_node_mode_attachment_is_refused(env: MakeEnv) -> None:
    e = registered(env)
    e.manager.attach(HM, "vm1", ["edu"])
    before = open_fds()
    with pytest.raises(HandoffUnsupported, match="handoff node"):
        e.manager.open_devices(HM, "vm1")
    assert open_fds() == before


def test_open_devices_is_for_the_owner_or_the_admin(env: MakeEnv) -> None:
    e = registered(env)
    e.manager.attach(HM, "vm1", ["edu"], handoff_mode="fd")
    with pytest.raises(NotOwner, match="attached for uid 1000, not 1001"):
        e.manager.open_devices(OTHER, "vm1")
    e.manager.open_devices(ADMIN, "vm1").close()
    with pytest.raises(NotFound, match="no devices attached"):
        e.manager.open_devices(HM, "vm2")
    e.manager.register(ADMIN, "0000:02:02.0", "edu2")
    with pytest.raises(NotFound, match="edu2 is not attached to instance 'vm1'"):
        e.manager.open_devices(HM, "vm1", ["edu2"])


def test_a_failed_open_closes_what_the_call_opened(env: MakeEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    e = env("qemu-q35-iommufd")
    e.manager.register(ADMIN, "0000:02:01.0", "nic")
    e.manager.register(ADMIN, "0000:02:02.0", "edu2")
    e.manager.attach(HM, "vm1", ["nic", "edu2"], handoff_mode="fd")
    real = opener.open_node
    calls: list[str] = []

    def third_fails(host: Host, node: str) -> int:
        calls.append(node)
        if len(calls) == 3:
            raise OSError(errno.ENODEV, "No such device")
        return real(host, node)

    monkeypatch.setattr(handover, "open_node", third_fails)
    before = open_fds()
    with pytest.raises(Failed, match=r"the kernel refused to open /dev/vfio/devices/vfio\d+: No such device"):
        e.manager.open_devices(HM, "vm1")
    assert len(calls) == 3 and open_fds() == before
