"""Test scaffolding for the bus layer: a private dbus-daemon, event loops in threads, D-Bus clients that
connect as other users, the dbusmock polkitd, and an in-process vfiod.

Clients as other users: the tests run as root, and polkit is never asked about uid 0. A `LoopThread` can
switch its own thread's credentials with the raw setresuid/setresgid system calls (the libc wrappers
would change every thread of the process); a socket it connects is then that user's as far as
SO_PEERCRED, dbus-daemon and vfiod can tell, while the daemon under test keeps running as root in other
threads. dbus-daemon refuses uids without a passwd entry, so the users are real system accounts.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import pwd
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from dbus_fast import Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus

from vfiod.bus.names import BUS_NAME, DBUS_IFACE, DBUS_NAME, DBUS_PATH, MANAGER_IFACE, MANAGER_PATH

T = TypeVar("T")

_SYSCALLS = {"x86_64": (117, 119, 116), "aarch64": (147, 149, 159)}  # setresuid, setresgid, setgroups

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <deny own="*"/>
  </policy>
  <policy user="root">
    <allow own="*"/>
  </policy>
</busconfig>
"""


def _die_with_parent() -> None:
    """In a child before exec: SIGTERM when the test process dies, so a killed pytest leaves no bus behind."""
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def other_users() -> tuple[int, int]:
    """Two unprivileged uids that exist in the passwd database (nobody and a system account)."""
    first = pwd.getpwnam("nobody").pw_uid
    for name in ("daemon", "bin", "www-data", "sys"):
        with contextlib.suppress(KeyError):
            return first, pwd.getpwnam(name).pw_uid
    raise RuntimeError("no second unprivileged account in /etc/passwd")


def can_switch_thread_user() -> bool:
    return os.geteuid() == 0 and os.uname().machine in _SYSCALLS


def _switch_thread_user(uid: int) -> None:
    setresuid, setresgid, setgroups = _SYSCALLS[os.uname().machine]
    libc = ctypes.CDLL(None, use_errno=True)
    gid = pwd.getpwuid(uid).pw_gid
    for number, args in ((setgroups, (0, None)), (setresgid, (gid, gid, 0)), (setresuid, (uid, uid, 0))):
        if libc.syscall(number, *args) != 0:
            raise OSError(ctypes.get_errno(), f"syscall {number} failed")


class LoopThread:
    """An asyncio loop running in its own thread (as `uid`, if given)."""

    def __init__(self, name: str, uid: int | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.uid = uid
        ready = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            try:
                if uid is not None:
                    _switch_thread_user(uid)
            except BaseException as e:
                failure.append(e)
                ready.set()
                return
            asyncio.set_event_loop(self.loop)
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=main, name=name, daemon=True)
        self.thread.start()
        ready.wait()
        if failure:
            raise failure[0]

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class PrivateBus:
    """A dbus-daemon of our own: anyone may connect, only root may own names."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="vfiod-bus-"))
        os.chmod(self.dir, 0o755)  # noqa: S103 (clients running as other users must reach the socket)
        socket = self.dir / "bus"
        conf = self.dir / "bus.conf"
        conf.write_text(BUS_CONFIG.format(socket=socket), encoding="utf-8")
        self.address = f"unix:path={socket}"
        self.proc = subprocess.Popen(
            ["dbus-daemon", f"--config-file={conf}", "--nofork", "--nopidfile"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 (it only calls prctl)
        )
        deadline = time.monotonic() + 10
        while not socket.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("dbus-daemon did not start")
            time.sleep(0.01)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)
        for p in self.dir.iterdir():
            p.unlink()
        self.dir.rmdir()


@dataclass
class Reply:
    ok: bool
    body: list[Any]
    error: str = ""
    text: str = ""
    signature: str = ""
    unix_fds: list[int] = field(default_factory=list)  # received (a `descriptors` client's), the test's

    @property
    def short(self) -> str:
        """The contract's error name (NotFound), or the full name of any other error."""
        return self.error.removeprefix("org.hypeman.Devices1.Error.")

    def value(self) -> Any:
        assert self.ok, f"{self.error}: {self.text}"
        return self.body[0] if len(self.body) == 1 else self.body


@dataclass
class Signal:
    path: str
    interface: str
    member: str
    body: list[Any]


@dataclass
class Client:
    """A D-Bus connection on a LoopThread (so as that thread's user). `descriptors`: it negotiates unix fd
    passing, as busctl, gdbus and godbus do, so replies may carry descriptors (and calls send some)."""

    lt: LoopThread
    address: str
    descriptors: bool = False
    bus: MessageBus = field(init=False)
    signals: queue.Queue[Signal] = field(init=False, default_factory=queue.Queue)

    def __post_init__(self) -> None:
        async def connect() -> MessageBus:
            return await MessageBus(bus_address=self.address, negotiate_unix_fd=self.descriptors).connect()

        self.bus = self.lt.run(connect())

    @property
    def unique_name(self) -> str:
        assert self.bus.unique_name is not None
        return self.bus.unique_name

    @property
    def uid(self) -> int:
        return self.lt.uid if self.lt.uid is not None else os.getuid()

    def call(
        self,
        member: str,
        signature: str = "",
        body: list[Any] | None = None,
        *,
        path: str = MANAGER_PATH,
        interface: str | None = MANAGER_IFACE,
        destination: str = BUS_NAME,
        flags: MessageFlag = MessageFlag.NONE,
        timeout: float = 30.0,
        unix_fds: list[int] | None = None,
    ) -> Reply:
        msg = Message(
            destination=destination,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=list(body or []),
            flags=flags,
            unix_fds=unix_fds or [],
        )

        async def go() -> Message:
            return await self.bus.call(msg)

        reply = self.lt.run(go(), timeout)
        if reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
            return Reply(False, list(reply.body), reply.error_name or "", text, unix_fds=list(reply.unix_fds))
        return Reply(True, list(reply.body), signature=reply.signature, unix_fds=list(reply.unix_fds))

    def m(self, member: str, signature: str, *args: Any, flags: MessageFlag = MessageFlag.NONE) -> Reply:
        """A Manager method."""
        return self.call(member, signature, list(args), flags=flags)

    def bus_call(self, member: str, signature: str = "", *args: Any) -> Reply:
        return self.call(
            member, signature, list(args), path=DBUS_PATH, interface=DBUS_IFACE, destination=DBUS_NAME
        )

    def watch(self, rule: str) -> None:
        """Collect signals matching `rule` into `self.signals`."""

        def handler(msg: Message) -> None:
            if msg.message_type is MessageType.SIGNAL:
                self.signals.put(
                    Signal(msg.path or "", msg.interface or "", msg.member or "", list(msg.body))
                )

        async def go() -> None:
            self.bus.add_message_handler(handler)
            await self.bus.call(
                Message(
                    destination=DBUS_NAME,
                    path=DBUS_PATH,
                    interface=DBUS_IFACE,
                    member="AddMatch",
                    signature="s",
                    body=[rule],
                )
            )

        self.lt.run(go())

    def wait_signal(self, predicate: Any, timeout: float = 5.0) -> Signal:
        deadline = time.monotonic() + timeout
        seen: list[Signal] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching signal within {timeout} s; saw {seen}")
            try:
                sig = self.signals.get(timeout=left)
            except queue.Empty:
                continue
            if predicate(sig):
                return sig
            seen.append(sig)

    def drain_signals(self) -> list[Signal]:
        out = []
        while True:
            try:
                out.append(self.signals.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        if self.bus.connected:
            self.bus.disconnect()


class PolkitMock:
    """python-dbusmock's polkitd template on the private bus, and its test controls."""

    NAME = "org.freedesktop.PolicyKit1"
    PATH = "/org/freedesktop/PolicyKit1/Authority"
    MOCK = "org.freedesktop.DBus.Mock"

    def __init__(self, address: str, control: Client) -> None:
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dbusmock", "--template", "polkitd"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 (it only calls prctl)
        )
        self.control = control
        deadline = time.monotonic() + 20
        while not control.bus_call("NameHasOwner", "s", self.NAME).value():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("the dbusmock polkitd did not start")
            time.sleep(0.05)

    def _mock(self, member: str, signature: str = "", *args: Any) -> Reply:
        reply = self.control.call(
            member, signature, list(args), path=self.PATH, interface=self.MOCK, destination=self.NAME
        )
        assert reply.ok, reply
        return reply

    def allow(self, *actions: str) -> None:
        """Exactly these actions are allowed (an empty call denies everything), and polkit says Changed."""
        self._mock("SetAllowed", "as", list(actions))
        self.changed()

    def changed(self) -> None:
        self._mock("EmitSignal", "sssav", "org.freedesktop.PolicyKit1.Authority", "Changed", "", [])

    def checks(self) -> list[tuple[str, dict[str, str], int, str]]:
        """Every CheckAuthorization since the last clear(): (action, details, flags, subject name)."""
        out = []
        for _ts, method, args in self._mock("GetCalls").value():
            if method != "CheckAuthorization":
                continue
            subject, action, details, flags, _cancel = (
                a.value if isinstance(a, Variant) else a for a in args
            )
            kind, subject_details = subject
            name = subject_details.get("name")
            out.append((str(action), dict(details), int(flags), f"{kind}:{name.value if name else ''}"))
        return out

    def clear(self) -> None:
        self._mock("ClearCalls")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)
