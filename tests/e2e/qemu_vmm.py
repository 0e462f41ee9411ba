"""A real VMM in the guest: QEMU started as an unprivileged user (the node's owner) with `-device vfio-pci`
for each device it was handed, paused (`-S`, TCG: no guest code runs), and asked over QMP what it realized.

QEMU opens /dev/vfio/vfio and the group node, gets each device fd, maps the guest's RAM for DMA and builds
the PCI device from the device's config space, so `query-pci` listing a device with its vendor and device
ids proves the hand-over end to end. The QMP socket exists before the devices are realized: the first
reply is what to wait for. Standard library only (the guest's /usr/bin/python3).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

QEMU = "/usr/bin/qemu-system-x86_64"
GUEST_RAM_MIB = 64


class QemuFailed(RuntimeError):
    """QEMU exited, or did not answer QMP in time; the message has its output."""


@dataclass(frozen=True)
class PciFunction:
    qdev_id: str
    vendor_id: str  # 4 hex digits, as sysfs shows them without 0x
    device_id: str
    address: str  # bus:slot.function in the VM


def device_args(devices: Sequence[str]) -> list[str]:
    """`-device vfio-pci,...` per device: a PCI address (host=) or an mdev's sysfs path (sysfsdev=)."""
    out: list[str] = []
    for n, dev in enumerate(devices):
        where = f"sysfsdev={dev}" if dev.startswith("/sys/") else f"host={dev}"
        out += ["-device", f"vfio-pci,{where},id=hostdev{n}"]
    return out


class Qmp:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.settimeout(60)
        self.file = self.sock.makefile("rwb")
        self._read()  # the greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while True:
            line = self.file.readline()
            if not line:
                raise QemuFailed("QEMU closed its QMP socket")
            msg: dict[str, Any] = json.loads(line)
            if "event" not in msg:
                return msg

    def execute(self, command: str) -> Any:
        self.file.write(json.dumps({"execute": command}).encode() + b"\n")
        self.file.flush()
        reply = self._read()
        if "error" in reply:
            raise QemuFailed(f"QMP {command}: {reply['error']}")
        return reply.get("return")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()


def pci_functions(query_pci: Any) -> list[PciFunction]:
    """Every function `query-pci` lists, behind bridges too."""
    out: list[PciFunction] = []

    def walk(bus: dict[str, Any]) -> None:
        for d in bus.get("devices", []):
            ids = d.get("id", {})
            out.append(
                PciFunction(
                    qdev_id=str(d.get("qdev_id", "")),
                    vendor_id=f"{int(ids.get('vendor', 0)):04x}",
                    device_id=f"{int(ids.get('device', 0)):04x}",
                    address=f"{d.get('bus', 0):02x}:{d.get('slot', 0):02x}.{d.get('function', 0)}",
                )
            )
            if "pci_bridge" in d:
                walk(d["pci_bridge"].get("bus", {}))

    for bus in query_pci or []:
        walk(bus)
    return out


@dataclass
class RunningQemu:
    proc: subprocess.Popen[str]
    qmp: Qmp
    functions: list[PciFunction]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def passed(self) -> dict[str, PciFunction]:
        """The vfio-pci functions QEMU realized, by qdev id (hostdev0, hostdev1, ...)."""
        return {f.qdev_id: f for f in self.functions if f.qdev_id.startswith("hostdev")}


def _exited(proc: subprocess.Popen[str]) -> QemuFailed:
    """QEMU closed QMP: the socket is up before the devices are realized, so a device it cannot open makes
    it exit right after the greeting. Its own message (e.g. the group's EACCES) is what the caller needs."""
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        return QemuFailed("QEMU closed its QMP socket and is still running")
    out = proc.stdout.read() if proc.stdout else ""
    return QemuFailed(f"QEMU closed its QMP socket and exited with {proc.returncode}: {out.strip()[-1500:]}")


@contextlib.contextmanager
def running(
    as_user: Sequence[str],
    owner_uid: int,
    devices: Sequence[str],
    timeout: float = 90,
    *,
    binary: str = QEMU,
    extra: Sequence[str] = (),
    pass_fds: Sequence[int] = (),
    env: dict[str, str] | None = None,
) -> Iterator[RunningQemu]:
    """QEMU (prefixed by `as_user`, e.g. setpriv to `owner_uid`, the node's owner, and an unlimited memlock)
    with the devices (and `extra` arguments, `pass_fds` inherited); yields once QMP answered `query-pci`,
    quits it on the way out."""
    workdir = tempfile.mkdtemp(prefix="qemu-vmm-")
    os.chown(workdir, owner_uid, -1)  # the unprivileged QEMU creates its socket here
    sock = os.path.join(workdir, "qmp.sock")
    argv = [
        *as_user,
        binary,
        "-machine",
        "q35",
        "-accel",
        "tcg",
        "-m",
        str(GUEST_RAM_MIB),
        "-nodefaults",
        "-display",
        "none",
        "-S",
        "-qmp",
        f"unix:{sock},server=on,wait=off",
        *device_args(devices),
        *extra,
    ]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, pass_fds=tuple(pass_fds), env=env
    )
    qmp = None
    try:
        deadline = time.monotonic() + timeout
        while qmp is None:
            if proc.poll() is not None:
                out = proc.stdout.read() if proc.stdout else ""
                raise QemuFailed(f"QEMU exited with {proc.returncode}: {out.strip()[-1500:]}")
            if time.monotonic() > deadline:
                raise QemuFailed(f"QEMU did not answer QMP within {timeout:g} s")
            try:
                qmp = Qmp(sock)
            except OSError:
                time.sleep(0.2)
            except QemuFailed:
                raise _exited(proc) from None
        try:
            functions = pci_functions(qmp.execute("query-pci"))
        except QemuFailed:
            raise _exited(proc) from None
        yield RunningQemu(proc, qmp, functions)
    finally:
        if qmp is not None:
            with contextlib.suppress(OSError, QemuFailed):
                qmp.execute("quit")
            qmp.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(OSError):
            os.unlink(sock)
            os.rmdir(workdir)
