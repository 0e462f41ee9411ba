"""Kernel uevents for PCI devices, so a bind or unbind made by another tool reaches the bus as
`PropertiesChanged`, and for VFIO group nodes, so a grant udev's rules changed is put back.

On a real host `NetlinkUevents` reads the kernel's `NETLINK_KOBJECT_UEVENT` multicast group (only datagrams
from the kernel itself, port id 0, are believed). On the simulator `SimulatedUevents` tails
`<root>/sim/uevents.jsonl`, where the simulated kernel appends one JSON line per uevent (see
vfiod_sim/builder.py). Both deliver `Uevent`s for the `pci` and `vfio` subsystems to one callback on the
event loop; a `lost` Uevent means "events were lost, re-read everything".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

log = logging.getLogger("vfiod.uevents")

NETLINK_KOBJECT_UEVENT: Final = 15  # linux/netlink.h (not in typeshed's socket module)
RELEVANT: Final = frozenset({"add", "remove", "bind", "unbind", "change", "move"})
KERNEL_GROUP: Final = 1  # the kernel's multicast group (udevd re-broadcasts on group 2)
RCVBUF: Final = 4 * 1024 * 1024
POLL_INTERVAL: Final = 0.1


@dataclass(frozen=True)
class Uevent:
    action: str
    pci_address: str  # "" = events were lost: re-read every device (unless vfio_group is set)
    driver: str = ""
    devpath: str = ""
    vfio_group: int | None = None  # a `vfio` group node's uevent (udev applies its rules to the node now)

    @property
    def lost(self) -> bool:
        return not self.pci_address and self.vfio_group is None


def vfio_group_event(action: str, subsystem: str, devpath: str) -> Uevent | None:
    """`add` or `change` of /devices/virtual/vfio/<n>: the node udev is about to apply its rules to."""
    if subsystem != "vfio" or action not in ("add", "change"):
        return None
    name = devpath.rstrip("/").rsplit("/", 1)[-1]
    return (
        Uevent(action=action, pci_address="", devpath=devpath, vfio_group=int(name))
        if name.isdigit()
        else None
    )


UeventCallback = Callable[[Uevent], None]


class UeventSource(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


def parse_netlink(data: bytes) -> Uevent | None:
    """A kernel uevent datagram (`ACTION@DEVPATH\\0KEY=VALUE\\0...`) as an Uevent, if it is a PCI one."""
    if data.startswith(b"libudev\0"):
        return None  # udevd's re-broadcast format: not from the kernel
    parts = data.split(b"\0")
    if not parts or b"@" not in parts[0]:
        return None
    env: dict[str, str] = {}
    for part in parts[1:]:
        key, sep, value = part.partition(b"=")
        if sep:
            env[key.decode("ascii", "replace")] = value.decode("utf-8", "replace")
    action = env.get("ACTION", "")
    devpath = env.get("DEVPATH", "")
    if env.get("SUBSYSTEM") == "vfio":
        return vfio_group_event(action, "vfio", devpath)
    if env.get("SUBSYSTEM") != "pci" or action not in RELEVANT:
        return None
    addr = env.get("PCI_SLOT_NAME") or devpath.rsplit("/", 1)[-1]
    if not addr:
        return None
    return Uevent(action=action, pci_address=addr.lower(), driver=env.get("DRIVER", ""), devpath=devpath)


def parse_simulated(line: str) -> Uevent | None:
    """One line of the simulator's uevents.jsonl as an Uevent, if it is a PCI one."""
    try:
        ev = json.loads(line)
    except ValueError:
        return None
    if not isinstance(ev, dict):
        return None
    if ev.get("subsystem") == "vfio":
        return vfio_group_event(str(ev.get("action", "")), "vfio", str(ev.get("devpath", "")))
    if ev.get("subsystem") != "pci" or ev.get("action") not in RELEVANT:
        return None
    addr = ev.get("pci_address")
    if not isinstance(addr, str) or not addr:
        return None
    driver = ev.get("driver")
    return Uevent(
        action=str(ev["action"]),
        pci_address=addr,
        driver=driver if isinstance(driver, str) else "",
        devpath=str(ev.get("devpath", "")),
    )


class NetlinkUevents:
    """The kernel's uevents from NETLINK_KOBJECT_UEVENT, read on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: UeventCallback) -> None:
        self._loop = loop
        self._callback = callback
        self._sock: socket.socket | None = None

    def start(self) -> None:
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_KOBJECT_UEVENT)
        except OSError as e:
            log.warning("cannot open a uevent socket (%s): changes made by other tools show up late", e)
            return
        try:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            sock.bind((0, KERNEL_GROUP))
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            log.warning("cannot listen to kernel uevents (%s): changes made by other tools show up late", e)
            return
        self._sock = sock
        self._loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        while True:
            try:
                data, addr = sock.recvfrom(65536)
            except BlockingIOError:
                return
            except OSError as e:
                # ENOBUFS: the kernel dropped events; everything must be read again.
                log.warning("uevents were lost (%s): re-reading every device", e)
                self._callback(Uevent("lost", ""))
                return
            if not isinstance(addr, tuple) or not addr or addr[0] != 0:
                continue  # not from the kernel (port id 0)
            ev = parse_netlink(data)
            if ev is not None:
                self._callback(ev)

    def stop(self) -> None:
        if self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None


class SimulatedUevents:
    """Tails the simulator's `sim/uevents.jsonl` from its end at start."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        callback: UeventCallback,
        root: Path,
        interval: float = POLL_INTERVAL,
    ) -> None:
        self._loop = loop
        self._callback = callback
        self._path = Path(root) / "sim" / "uevents.jsonl"
        self._interval = interval
        self._offset = 0
        self._partial = b""
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        try:
            self._offset = os.stat(self._path).st_size
        except FileNotFoundError:
            self._offset = 0
        self._handle = self._loop.call_later(self._interval, self._poll)

    def _poll(self) -> None:
        try:
            self._read()
        except Exception:
            log.exception("reading %s failed", self._path)
        finally:
            if self._handle is not None:
                self._handle = self._loop.call_later(self._interval, self._poll)

    def _read(self) -> None:
        try:
            size = os.stat(self._path).st_size
        except FileNotFoundError:
            return
        if size < self._offset:  # the file was replaced: events may be lost
            self._offset, self._partial = 0, b""
            self._callback(Uevent("lost", ""))
        if size == self._offset:
            return
        with open(self._path, "rb") as f:
            f.seek(self._offset)
            data = f.read(size - self._offset)
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()  # an incomplete last line waits for the rest
        for line in lines:
            ev = parse_simulated(line.decode("utf-8", "replace"))
            if ev is not None:
                self._callback(ev)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
