"""A bind or unbind made by another tool reaches the bus as PropertiesChanged (kernel uevents)."""

from __future__ import annotations

import asyncio
import errno
import json
import subprocess
import sys
import time
from pathlib import Path

from tests.bus.conftest import Clients, StartVfiod
from tests.bus.support.harness import PolkitMock
from tests.bus.support.helpers import AUDIO, GPU, attach, b, ok, plain, register
from vfiod.bus.names import ACTION_ATTACH, ACTION_INSPECT, DEVICE_IFACE
from vfiod.bus.uevents import NetlinkUevents, Uevent, parse_netlink, parse_simulated
from vfiod.host.backend import NodeOwner
from vfiod.host.pciaddr import PciAddress


def simulator(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "vfiod_sim", *args], check=True, timeout=30)


def test_external_unbind_and_bind_emit_properties_changed(start_vfiod: StartVfiod, clients: Clients) -> None:
    vfiod = start_vfiod()
    path = register(clients.root, AUDIO, "audio")["object_path"]
    clients.root.watch(f"type='signal',interface='org.freedesktop.DBus.Properties',path='{path}'")
    root = str(vfiod.root)

    simulator("unbind", root, AUDIO, "snd_hda_intel")
    sig = clients.root.wait_signal(lambda s: s.member == "PropertiesChanged")
    assert sig.body[0] == DEVICE_IFACE
    assert plain(sig.body[1])["Driver"] == ""

    simulator("bind", root, AUDIO, "snd_hda_intel")
    sig = clients.root.wait_signal(lambda s: s.member == "PropertiesChanged")
    assert plain(sig.body[1])["Driver"] == "snd_hda_intel"


def test_unregistered_devices_are_ignored(start_vfiod: StartVfiod, clients: Clients) -> None:
    vfiod = start_vfiod()
    clients.root.watch("type='signal',interface='org.freedesktop.DBus.Properties'")
    simulator("unbind", str(vfiod.root), AUDIO, "snd_hda_intel")
    register(clients.root, GPU, "gpu")  # not the device of the event: nothing to announce
    time.sleep(0.5)  # several polls of the uevent file
    assert [s for s in clients.root.drain_signals() if s.member == "PropertiesChanged"] == []


def test_parse_netlink() -> None:
    msg = (
        b"bind@/devices/pci0000:a0/0000:a0:01.0/0000:a2:00.0\0ACTION=bind\0"
        b"DEVPATH=/devices/pci0000:a0/0000:a0:01.0/0000:a2:00.0\0SUBSYSTEM=pci\0DRIVER=vfio-pci\0"
        b"PCI_SLOT_NAME=0000:a2:00.0\0SEQNUM=4711\0"
    )
    assert parse_netlink(msg) == Uevent(
        "bind", GPU, "vfio-pci", "/devices/pci0000:a0/0000:a0:01.0/0000:a2:00.0"
    )
    assert parse_netlink(b"libudev\0" + msg) is None  # udevd's re-broadcast, not the kernel
    assert parse_netlink(msg.replace(b"SUBSYSTEM=pci", b"SUBSYSTEM=usb")) is None
    assert parse_netlink(b"garbage") is None
    no_slot = (
        b"unbind@/devices/x/0000:a2:00.1\0ACTION=unbind\0DEVPATH=/devices/x/0000:a2:00.1\0SUBSYSTEM=pci\0"
    )
    assert parse_netlink(no_slot) == Uevent("unbind", "0000:a2:00.1", "", "/devices/x/0000:a2:00.1")


def test_parse_simulated(tmp_path: Path) -> None:
    line = json.dumps(
        {"action": "unbind", "devpath": "/devices/x", "subsystem": "pci", "driver": None, "pci_address": GPU}
    )
    assert parse_simulated(line) == Uevent("unbind", GPU, "", "/devices/x")
    assert parse_simulated('{"action": "add", "subsystem": "drm", "pci_address": "x"}') is None
    assert parse_simulated("{not json") is None


class FakeNetlink:
    """recvfrom() answers from a list; then the socket would block."""

    def __init__(self, items: list[tuple[bytes, tuple[int, int]] | OSError]) -> None:
        self.items = items

    def recvfrom(self, _size: int) -> tuple[bytes, tuple[int, int]]:
        if not self.items:
            raise BlockingIOError
        item = self.items.pop(0)
        if isinstance(item, OSError):
            raise item
        return item


def test_netlink_believes_only_the_kernel() -> None:
    msg = b"unbind@/devices/x/0000:a2:00.1\0ACTION=unbind\0DEVPATH=/devices/x/0000:a2:00.1\0SUBSYSTEM=pci\0"
    seen: list[Uevent] = []
    loop = asyncio.new_event_loop()
    try:
        source = NetlinkUevents(loop, seen.append)
        fake = FakeNetlink(
            [(msg, (4242, 1)), (msg, (0, 1)), OSError(errno.ENOBUFS, "No buffer space available")]
        )
        source._sock = fake  # type: ignore[assignment]
        source._readable()
    finally:
        loop.close()
    assert seen == [Uevent("unbind", "0000:a2:00.1", "", "/devices/x/0000:a2:00.1"), Uevent("lost", "")]


def test_parse_vfio_group_events(tmp_path: Path) -> None:
    """The kernel's add/change of a VFIO group's class device: udev applies its rules to the node now."""
    msg = b"change@/devices/virtual/vfio/7\0ACTION=change\0DEVPATH=/devices/virtual/vfio/7\0SUBSYSTEM=vfio\0"
    ev = parse_netlink(msg)
    assert ev == Uevent("change", "", "", "/devices/virtual/vfio/7", vfio_group=7) and not ev.lost
    assert parse_netlink(msg.replace(b"change", b"remove")) is None
    assert parse_netlink(msg.replace(b"/vfio/7", b"/vfio/vfio")) is None  # the container node
    line = json.dumps({"action": "add", "subsystem": "vfio", "devpath": "/devices/virtual/vfio/12"})
    assert parse_simulated(line) == Uevent("add", "", "", "/devices/virtual/vfio/12", vfio_group=12)
    assert Uevent("lost", "").lost


def test_a_grant_udev_changed_is_put_back_after_the_nodes_uevent(
    start_vfiod: StartVfiod, clients: Clients, polkit: PolkitMock
) -> None:
    """Attached for bob, the node is widened behind vfiod's back (udev's GROUP=kvm MODE=0660 after a
    `udevadm trigger`); the group's change uevent (appended to the simulator's uevent file, as the kernel
    announces it) makes vfiod put the owner and mode back within its re-check delays."""
    vfiod = start_vfiod()
    polkit.allow(ACTION_INSPECT, ACTION_ATTACH)
    register(clients.root, GPU, "gpu")
    ok(attach(clients.bob, "vm1", "gpu", include_group=b(True)))
    host = vfiod.manager.host
    group = host.iommu_group(PciAddress.parse(GPU))
    assert group is not None and host.node_owner(group).uid == clients.bob.uid
    host.set_node_owner(group, NodeOwner(uid=0, gid=36, mode=0o660))
    event = {"action": "change", "subsystem": "vfio", "devpath": f"/devices/virtual/vfio/{group}"}
    with open(vfiod.root / "sim" / "uevents.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(event) + "\n")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and host.node_owner(group).uid != clients.bob.uid:
        time.sleep(0.1)
    assert host.node_owner(group) == NodeOwner(uid=clients.bob.uid, gid=36, mode=0o600)
