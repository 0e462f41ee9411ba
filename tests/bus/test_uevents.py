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
from tests.bus.support.helpers import AUDIO, GPU, plain, register
from vfiod.bus.names import DEVICE_IFACE
from vfiod.bus.uevents import NetlinkUevents, Uevent, parse_netlink, parse_simulated


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
