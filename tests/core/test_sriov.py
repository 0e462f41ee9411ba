"""SetVirtualFunctions on the simulator: the writes in the kernel's order (autoprobe, 0 before a new count),
the VFs it returns, what refuses it (nothing written), and start-up after a crash between its writes."""

from __future__ import annotations

import pytest

from tests.core.support.worlds import ADMIN, HM, Env, MakeEnv
from vfiod.core.errors import (
    DeviceBusy,
    DeviceNotFound,
    Failed,
    InUse,
    InvalidArgument,
    InvalidPCIAddress,
    NotAuthorized,
    NotFound,
)
from vfiod.core.journal import Operation
from vfiod.core.ops import sriov
from vfiod.host.pciaddr import PciAddress
from vfiod_sim import processes

PF = "0000:1c:00.0"  # dgx-h100's first ConnectX-7 (mlx5_core): 4 VFs, 1c:00.1-4, none enabled at boot
VFS = [f"0000:1c:00.{n}" for n in range(1, 5)]
GPU = "0000:1b:00.0"


def sriov_writes(e: Env, since: int = 0) -> list[tuple[str, str]]:
    return [(w.path.rpartition("/")[2], w.value) for w in e.writes[since:] if "sriov" in w.path]


def numvfs(e: Env) -> str | None:
    return e.host.attr(PciAddress.parse(PF), "sriov_numvfs")


def test_enable_change_and_disable(env: MakeEnv) -> None:
    e = env("dgx-h100")
    m = e.manager
    assert m.set_virtual_functions(ADMIN, PF, 2) == VFS[:2]
    assert sriov_writes(e) == [("sriov_drivers_autoprobe", "0"), ("sriov_numvfs", "2")]
    assert [e.host.driver(PciAddress.parse(v)) for v in VFS[:2]] == [None, None]  # driverless: autoprobe off
    listed = {d.pci_address: d for d in m.list_available(all_devices=True)}
    assert listed[PF].virtfns == tuple(VFS[:2]) and listed[VFS[0]].physfn == PF
    mark = len(e.writes)
    assert m.set_virtual_functions(ADMIN, PF, 3) == VFS[:3]  # the kernel wants 0 before a new count
    assert sriov_writes(e, mark) == [("sriov_numvfs", "0"), ("sriov_numvfs", "3")]  # autoprobe is 0 already
    mark = len(e.writes)
    assert m.set_virtual_functions(ADMIN, PF, 3) == VFS[:3]  # already so: nothing written
    assert e.writes[mark:] == []
    assert m.set_virtual_functions(ADMIN, PF, 0) == []
    assert numvfs(e) == "0" and not any(e.host.device_exists(PciAddress.parse(v)) for v in VFS)
    assert m.registry.open_intents() == []


def test_autoprobe_lets_host_drivers_take_the_vfs(env: MakeEnv) -> None:
    e = env("dgx-h100")
    assert e.manager.set_virtual_functions(ADMIN, PF, 1, autoprobe=True) == VFS[:1]
    assert e.host.driver(PciAddress.parse(VFS[0])) == "mlx5_core"


def test_by_registered_name_and_registered_vfs_follow(env: MakeEnv) -> None:
    e = env("dgx-h100")
    m = e.manager
    m.register(ADMIN, PF, "cx7")
    m.set_virtual_functions(ADMIN, "cx7", 1)
    m.register(ADMIN, VFS[0], "vf1")
    assert m.get_device("vf1").state == "host"
    m.set_virtual_functions(ADMIN, "cx7", 0)
    assert m.get_device("vf1").state == "missing"  # gone with the count; back when it is
    m.set_virtual_functions(ADMIN, "cx7", 2)
    assert m.get_device("vf1").state == "host"


def test_refused_while_a_vf_is_attached_or_held(env: MakeEnv) -> None:
    e = env("dgx-h100")
    m = e.manager
    m.set_virtual_functions(ADMIN, PF, 2)
    m.register(ADMIN, VFS[1], "vf2")
    m.attach(ADMIN, "vm1", ["vf2"], owner_uid=HM.uid)
    mark = len(e.writes)
    with pytest.raises(InUse, match=r"0000:1c:00\.2, a virtual function of 0000:1c:00\.0, is attached to"):
        m.set_virtual_functions(ADMIN, PF, 0)
    m.detach(HM, "vm1", keep_bound=True)  # on vfio-pci, attached to no one: a VMM may still hold it
    group = e.host.iommu_group(PciAddress.parse(VFS[1]))
    pid = processes.add_process(
        e.root, exe="/usr/bin/qemu-system-x86_64", uid=HM.uid, fds=[f"/dev/vfio/{group}"]
    )
    mark = len(e.writes)
    with pytest.raises(DeviceBusy, match="qemu-system-x86_64"):
        m.set_virtual_functions(ADMIN, PF, 1)
    assert e.writes[mark:] == [] and numvfs(e) == "2"
    processes.remove_process(e.root, pid)
    assert m.set_virtual_functions(ADMIN, PF, 1) == VFS[:1]


@pytest.mark.parametrize(
    ("pf", "count", "error", "text"),
    [
        (PF, 5, InvalidArgument, "at most 4 virtual functions"),
        (PF, 70000, InvalidArgument, "0-65535"),
        (PF, True, InvalidArgument, "0-65535"),
        (GPU, 1, InvalidArgument, "no SR-IOV capability"),
        ("0000:7f:00.0", 1, DeviceNotFound, "no PCI device"),
        ("0000:1c:00", 1, InvalidPCIAddress, "0000:1c:00"),
        ("no-such-name", 1, NotFound, "no-such-name"),
    ],
)
def test_bad_requests_write_nothing(
    env: MakeEnv, pf: str, count: object, error: type[Exception], text: str
) -> None:
    e = env("dgx-h100")
    mark = len(e.writes)
    with pytest.raises(error, match=text):
        e.manager.set_virtual_functions(ADMIN, pf, count)
    assert e.writes[mark:] == []


def test_a_vf_is_not_a_physical_function_and_only_admins_may(env: MakeEnv) -> None:
    e = env("dgx-h100")
    m = e.manager
    m.set_virtual_functions(ADMIN, PF, 1)
    with pytest.raises(InvalidArgument, match=r"is a virtual function of 0000:1c:00\.0"):
        m.set_virtual_functions(ADMIN, VFS[0], 1)
    with pytest.raises(NotAuthorized, match="admin"):
        m.set_virtual_functions(HM, PF, 0)


def test_a_pf_without_driver_is_refused(env: MakeEnv) -> None:
    e = env("dgx-h100")
    e.kernel.write_attribute(e.host.from_logical("/sys/bus/pci/drivers/mlx5_core/unbind"), PF.encode())
    with pytest.raises(Failed, match="has no driver"):
        e.manager.set_virtual_functions(ADMIN, PF, 1)


@pytest.mark.parametrize(
    ("before", "done", "expected"),
    [(0, [], "3"), (2, [], "2"), (2, ["disable"], "3"), (2, ["disable", "enable"], "3")],
)
def test_start_up_finishes_or_finds_nothing_changed(
    env: MakeEnv, before: int, done: list[str], expected: str
) -> None:
    """What a crash leaves: the intents written, and the writes up to the crash point. Once the old VFs
    are gone the change is finished; while they are there nothing had happened."""
    e = env("dgx-h100")
    pf = PciAddress.parse(PF)
    if before:
        e.manager.set_virtual_functions(ADMIN, PF, before)
    op = Operation(e.manager.registry, e.manager.boot_id, "sriov")
    op.attribute(PF, sriov.AUTOPROBE, "0")
    op.attribute(PF, sriov.NUMVFS, "3")
    for step in done:
        e.host.set_sriov_numvfs(pf, 0 if step == "disable" else 3, None)
    m = e.reopen()
    report = m.startup()
    assert numvfs(e) == expected
    assert len(e.manager.set_virtual_functions(ADMIN, PF, int(expected))) == int(expected)
    assert m.registry.open_intents() == []
    assert any("interrupted change of its virtual functions" in f for f in report.findings)
