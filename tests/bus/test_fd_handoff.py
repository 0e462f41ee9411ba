"""OpenDevices through a real dbus-daemon (`--simulate qemu-q35-iommufd`): the reply carries descriptors
(unix fd passing, which vfiod's connection negotiates), vfiod's own copies are closed once the reply is
written, every call opens anew, and descriptors a caller attaches to any call never reach vfiod's table
(no method takes one: its connection reads without room for them, and the kernel drops them). On
`mdev-samples-iommufd`: AttachVGPU's handoff and OpenDevices' allow_mdev options reach the core."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import pytest
from dbus_fast import Variant

from tests.bus.conftest import Clients, Running, StartVfiod
from tests.bus.support.harness import Client
from tests.bus.support.helpers import register
from vfiod.host.backend import NodeOwner

EDU = "0000:00:07.0"


def holding(*targets: str) -> set[int]:
    """This process's descriptors (the daemon's and the clients': it runs in-process) of `targets`."""
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") in targets:
                out.add(int(name))
        except OSError:
            continue  # closed meanwhile (another thread's)
    return out


def settled(read: Callable[[], set[int]], want: set[int]) -> bool:
    """`read()` is `want` now or within a few seconds (vfiod's loop runs on another thread)."""
    deadline = time.monotonic() + 5
    while read() != want:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def attached(start_vfiod: StartVfiod, clients: Clients) -> Iterator[tuple[Running, Client]]:
    vfiod = start_vfiod("qemu-q35-iommufd")
    register(clients.root, EDU, "edu")
    reply = clients.root.m("Attach", "sasa{sv}", "vm1", ["edu"], {"handoff": Variant("s", "fd")})
    assert reply.ok, reply.text
    (rec,) = reply.body[0]
    assert (rec["handoff"].value, rec["vfio_group_path"].value) == ("fd", "")
    assert rec["vfio_cdev_path"].value.startswith("/dev/vfio/devices/vfio")
    fdc = Client(clients.root.lt, clients.root.address, descriptors=True)
    yield vfiod, fdc
    fdc.close()


def test_open_devices_passes_descriptors_and_keeps_none(attached: tuple[Running, Client]) -> None:
    vfiod, fdc = attached
    root = vfiod.root
    cdev_file = next((root / "dev/vfio/devices").iterdir())
    nodes = (str(cdev_file), str(root / "dev/iommu"))
    assert holding(*nodes) == set()
    reply = fdc.m("OpenDevices", "sasa{sv}", "vm1", [], {})
    assert reply.ok and reply.signature == "ha(ssh)as", reply.text
    iommufd_idx, devices, _warnings = reply.body
    ((dev_id, sysfs, cdev_idx),) = devices
    iommufd, cdev = reply.unix_fds[iommufd_idx], reply.unix_fds[cdev_idx]
    try:
        assert sysfs == f"/sys/bus/pci/devices/{EDU}/" and len(dev_id) == 24
        assert os.path.samestat(os.fstat(cdev), os.stat(cdev_file))
        assert os.path.samestat(os.fstat(iommufd), os.stat(root / "dev/iommu"))
        # the only descriptors of the nodes left are the two received: vfiod kept no copy (it closes its
        # own right after the sendmsg that carried them, on its own thread: the reply may arrive first)
        assert settled(lambda: holding(*nodes), {iommufd, cdev})
        again = fdc.m("OpenDevices", "sasa{sv}", "vm1", ["edu"], {})
        assert again.ok and len(again.unix_fds) == 2
        assert settled(lambda: holding(*nodes), {iommufd, cdev, *again.unix_fds})  # opened anew
        for fd in again.unix_fds:
            os.close(fd)
    finally:
        os.close(iommufd)
        os.close(cdev)
    assert holding(*nodes) == set()
    assert vfiod.manager.host.node_owner(6) == NodeOwner(uid=0, gid=0, mode=0o600)  # no node changed owner


def test_descriptors_a_caller_sends_are_never_kept(attached: tuple[Running, Client]) -> None:
    _, fdc = attached
    r, w = os.pipe()
    pipe = os.readlink(f"/proc/self/fd/{r}")
    try:
        for _ in range(20):
            reply = fdc.call("ListDevices", "a{sv}", [{}], unix_fds=[r, w])
            assert reply.ok, reply.text
        # 40 descriptors of the pipe went to vfiod (in this process): none of them was installed
        assert holding(pipe) == {r, w}
    finally:
        os.close(r)
        os.close(w)


def test_open_devices_of_a_node_mode_attachment(start_vfiod: StartVfiod, clients: Clients) -> None:
    start_vfiod("qemu-q35-iommufd")
    register(clients.root, EDU, "edu")
    assert clients.root.m("Attach", "sasa{sv}", "vm1", ["edu"], {}).ok
    fdc = Client(clients.root.lt, clients.root.address, descriptors=True)
    try:
        reply = fdc.m("OpenDevices", "sasa{sv}", "vm1", [], {})
        assert not reply.ok and reply.error == "org.hypeman.Devices1.Error.HandoffUnsupported"
        assert "handoff node" in reply.body[0] and reply.unix_fds == []
    finally:
        fdc.close()


def test_an_mdev_by_descriptor_through_the_bus(start_vfiod: StartVfiod, clients: Clients) -> None:
    """AttachVGPU's handoff option and OpenDevices' allow_mdev reach the core: an mdev in fd mode keeps its
    node root's, OpenDevices refuses it without allow_mdev (a named error, no descriptor) and passes its
    cdev with it, saying so."""
    vfiod = start_vfiod("mdev-samples-iommufd")
    reply = clients.root.m("AttachVGPU", "ssa{sv}", "vm1", "mtty-2", {"handoff": Variant("s", "fd")})
    assert reply.ok, reply.text
    rec = reply.body[0]
    uuid, cdev_path = rec["device_config"].value["uuid"].value, rec["vfio_cdev_path"].value
    assert (rec["handoff"].value, rec["vfio_group_path"].value) == ("fd", "")
    assert any("allow_mdev" in w for w in reply.body[1])
    fdc = Client(clients.root.lt, clients.root.address, descriptors=True)
    try:
        refused = fdc.m("OpenDevices", "sasa{sv}", "vm1", [], {})
        assert not refused.ok and refused.error == "org.hypeman.Devices1.Error.HandoffUnsupported"
        assert "allow_mdev" in refused.body[0] and refused.unix_fds == []
        allow = {"allow_mdev": Variant("b", True)}
        opened = fdc.m("OpenDevices", "sasa{sv}", "vm1", [f"vgpu-{uuid}"], allow)
        assert opened.ok, opened.text
        _, ((_, sysfs, idx),), warnings = opened.body
        try:
            assert sysfs == f"/sys/bus/mdev/devices/{uuid}/" and any("allow_mdev" in w for w in warnings)
            assert os.path.samestat(os.fstat(opened.unix_fds[idx]), os.stat(vfiod.root / cdev_path[1:]))
        finally:
            for fd in opened.unix_fds:
                os.close(fd)
    finally:
        fdc.close()
