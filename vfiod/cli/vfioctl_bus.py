"""vfioctl's D-Bus side: reaching `org.hypeman.Devices1`, calling it, and turning every failure into an exit
status.

Owns which bus vfioctl talks to (system by default, the session bus, or an explicit address), the call
deadline, the ALLOW_INTERACTIVE_AUTHORIZATION flag (and, on a terminal, a `pkttyagent` so polkit can ask
for a password the way `systemctl` does), unwrapping replies into plain Python values, and the one table
that maps D-Bus error names to vfioctl's exit statuses. Nothing here prints: failures are `CallError`s that
`vfioctl.main` reports as `vfioctl: <ErrorName>: <message>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from dbus_fast import BusType, Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.errors import AuthError, InvalidAddressError

from vfiod.bus.connection import Connection
from vfiod.bus.methods import BY_NAME as METHODS_BY_NAME
from vfiod.bus.names import BUS_NAME, ERROR_PREFIX, MANAGER_IFACE, MANAGER_PATH

# ----- exit statuses (documented in `vfioctl --help`) ----------------------------------------------------
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_NOT_AUTHORIZED = 4
EXIT_CONFLICT = 5
EXIT_VFIO_UNAVAILABLE = 6
EXIT_TIMEOUT = 7
EXIT_UNREACHABLE = 8
# No reply in time (vfioctl's --timeout or the bus's own): unlike Timeout, nothing is known to be stuck,
# and the call goes on in vfiod.
EXIT_NO_REPLY = 9
EXIT_INTERRUPTED = 130

# The contract's error names (the part after org.hypeman.Devices1.Error.) by exit status.
_CONTRACT_EXIT: dict[str, int] = {
    "Failed": EXIT_FAILED,
    "InvalidArgument": EXIT_USAGE,
    "InvalidName": EXIT_USAGE,
    "InvalidPCIAddress": EXIT_USAGE,
    "NotFound": EXIT_NOT_FOUND,
    "DeviceNotFound": EXIT_NOT_FOUND,
    "ProfileNotFound": EXIT_NOT_FOUND,
    "NotAuthorized": EXIT_NOT_AUTHORIZED,
    "NotOwner": EXIT_NOT_AUTHORIZED,
    "InUse": EXIT_CONFLICT,
    "DeviceBusy": EXIT_CONFLICT,
    "IOMMUGroupConflict": EXIT_CONFLICT,
    "HostCritical": EXIT_CONFLICT,
    "SriovEnabled": EXIT_CONFLICT,
    "NoCapacity": EXIT_CONFLICT,
    "NameExists": EXIT_CONFLICT,
    "AlreadyExists": EXIT_CONFLICT,
    "AlreadyBound": EXIT_CONFLICT,
    "NotBound": EXIT_CONFLICT,
    "NativeIsVfio": EXIT_CONFLICT,
    "HandoffUnsupported": EXIT_CONFLICT,
    "Busy": EXIT_CONFLICT,
    "Recovering": EXIT_CONFLICT,
    "VFIONotAvailable": EXIT_VFIO_UNAVAILABLE,
    "Timeout": EXIT_TIMEOUT,
    "NativeDriverNotRestored": EXIT_TIMEOUT,
}

# Errors the bus itself (or a D-Bus library) sends, by exit status.
_BUS_EXIT: dict[str, int] = {
    "org.freedesktop.DBus.Error.ServiceUnknown": EXIT_UNREACHABLE,
    "org.freedesktop.DBus.Error.NameHasNoOwner": EXIT_UNREACHABLE,
    "org.freedesktop.DBus.Error.Disconnected": EXIT_UNREACHABLE,
    "org.freedesktop.DBus.Error.NoServer": EXIT_UNREACHABLE,
    "org.freedesktop.DBus.Error.NoNetwork": EXIT_UNREACHABLE,
    "org.freedesktop.DBus.Error.Spawn.ChildExited": EXIT_UNREACHABLE,
    "org.freedesktop.DBus.Error.NoReply": EXIT_NO_REPLY,
    "org.freedesktop.DBus.Error.Timeout": EXIT_TIMEOUT,
    "org.freedesktop.DBus.Error.TimedOut": EXIT_TIMEOUT,
    "org.freedesktop.DBus.Error.AccessDenied": EXIT_NOT_AUTHORIZED,
    "org.freedesktop.DBus.Error.AuthFailed": EXIT_NOT_AUTHORIZED,
    "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired": EXIT_NOT_AUTHORIZED,
    "org.freedesktop.DBus.Error.InvalidArgs": EXIT_USAGE,
}

# Exit statuses as the help text lists them: (status, what).
EXIT_TABLE: tuple[tuple[int, str], ...] = (
    (EXIT_OK, "success"),
    (EXIT_FAILED, "Failed, or any other error"),
    (EXIT_USAGE, "usage error, InvalidArgument, InvalidName, InvalidPCIAddress"),
    (EXIT_NOT_FOUND, "NotFound, DeviceNotFound, ProfileNotFound"),
    (EXIT_NOT_AUTHORIZED, "NotAuthorized, NotOwner (or the bus policy denied the call)"),
    (
        EXIT_CONFLICT,
        "InUse, DeviceBusy, IOMMUGroupConflict, HostCritical, SriovEnabled, NoCapacity, NameExists, "
        "AlreadyExists, AlreadyBound, NotBound, NativeIsVfio, HandoffUnsupported, Busy, Recovering",
    ),
    (EXIT_VFIO_UNAVAILABLE, "VFIONotAvailable"),
    (EXIT_TIMEOUT, "Timeout, NativeDriverNotRestored: a device was left stuck"),
    (EXIT_UNREACHABLE, "cannot reach the service (no bus, or org.hypeman.Devices1 is not on it)"),
    (EXIT_NO_REPLY, "no reply within --timeout (or the bus's limit): the call may still complete"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C) while waiting for a reply; `monitor` exits 0 on Ctrl-C"),
)


def exit_status_for(error_name: str) -> int:
    """The exit status for a D-Bus error name (full, or the contract's short form)."""
    short = error_name.removeprefix(ERROR_PREFIX)
    if short in _CONTRACT_EXIT:
        return _CONTRACT_EXIT[short]
    return _BUS_EXIT.get(error_name, EXIT_FAILED)


def short_error_name(error_name: str) -> str:
    """`NotFound` for the contract's errors; any other error keeps its full name."""
    return error_name.removeprefix(ERROR_PREFIX)


class CallError(Exception):
    """A failed call or connection: `name` is what is printed before the message, `status` the exit code."""

    def __init__(self, name: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{name}: {message}")
        self.name = short_error_name(name)
        self.message = message
        self.status = exit_status_for(name) if status is None else status


# ----- which bus -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BusTarget:
    kind: Literal["system", "session", "address"] = "system"
    address: str = ""

    def describe(self) -> str:
        if self.kind == "address":
            return f"the bus at {self.address}"
        return f"the {self.kind} bus"


# ----- values --------------------------------------------------------------------------------------------


def unwrap(value: Any) -> Any:
    """A reply value with every Variant replaced by its content, recursively (lists stay lists)."""
    if isinstance(value, Variant):
        return unwrap(value.value)
    if isinstance(value, dict):
        return {k: unwrap(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [unwrap(v) for v in value]
    return value


def variant(signature: str, value: object) -> Variant:
    return Variant(signature, value)


def options(**values: tuple[str, object] | None) -> dict[str, Variant]:
    """An a{sv} options dict holding only what was given: `options(dry_run=("b", True), force=None)`.
    Leaving unset options out lets the service apply its own defaults."""
    return {key: Variant(sig, val) for key, item in values.items() if item is not None for sig, val in [item]}


# ----- the client ----------------------------------------------------------------------------------------


class Client:
    """One connection to the bus; `call` sends a method call to org.hypeman.Devices1 and waits for it."""

    def __init__(self, bus: MessageBus, target: BusTarget, timeout: float, interactive: bool) -> None:
        self.bus = bus
        self.target = target
        self.timeout = timeout
        self.interactive = interactive

    @classmethod
    async def connect(
        cls, target: BusTarget, *, timeout: float, interactive: bool, descriptors: bool = False
    ) -> Client:
        """`descriptors`: negotiate unix fd passing, to receive OpenDevices' descriptors."""
        try:
            if target.kind == "address":
                bus = Connection(bus_address=target.address, negotiate_unix_fd=descriptors)
            else:
                kind = BusType.SYSTEM if target.kind == "system" else BusType.SESSION
                bus = Connection(bus_type=kind, negotiate_unix_fd=descriptors)
        except InvalidAddressError as e:
            if target.kind == "address":
                raise CallError(
                    "InvalidArgument", f"bad bus address {target.address!r}: {e}", EXIT_USAGE
                ) from e
            raise CallError("NoBus", f"cannot find {target.describe()}: {e}", EXIT_UNREACHABLE) from e
        except Exception as e:  # e.g. no HOME or machine-id while looking for the session bus
            raise CallError("NoBus", f"cannot find {target.describe()}: {e}", EXIT_UNREACHABLE) from e
        try:
            await asyncio.wait_for(bus.connect(), timeout=min(timeout, 25.0))
        except (TimeoutError, OSError, AuthError, EOFError) as e:
            detail = str(e) or type(e).__name__
            raise CallError(
                "NoBus", f"cannot connect to {target.describe()}: {detail}", EXIT_UNREACHABLE
            ) from e
        except Exception as e:
            raise CallError("NoBus", f"cannot connect to {target.describe()}: {e}", EXIT_UNREACHABLE) from e
        return cls(bus, target, timeout, interactive)

    def disconnect(self) -> None:
        with contextlib.suppress(Exception):
            self.bus.disconnect()

    async def call(
        self, member: str, signature: str = "", body: Sequence[object] = (), **where: Any
    ) -> list[Any]:
        """Call `member` and return the reply body unwrapped (`where`: reply_to's keywords); a D-Bus error
        becomes a CallError."""
        reply = await self.reply_to(member, signature, body, **where)
        return [unwrap(v) for v in reply.body]

    async def reply_to(
        self,
        member: str,
        signature: str = "",
        body: Sequence[object] = (),
        *,
        interface: str = MANAGER_IFACE,
        path: str = MANAGER_PATH,
        destination: str = BUS_NAME,
        timeout: float | None = None,
    ) -> Message:
        """Call `member` and return the reply message itself (with its `unix_fds`); a D-Bus error becomes
        a CallError."""
        flags = MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION if self.interactive else MessageFlag.NONE
        msg = Message(
            destination=destination,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=list(body),
            flags=flags,
        )
        deadline = self.timeout if timeout is None else timeout
        try:
            reply = await asyncio.wait_for(self.bus.call(msg), timeout=deadline)
        except TimeoutError as e:
            raise CallError(
                "NoReply",
                f"no reply to {member} within {deadline:g} s: the call goes on in vfiod and may still "
                "complete; see its outcome with `vfioctl show DEVICE` or `vfioctl monitor` (every vfiod call "
                "can be retried safely; raise --timeout to wait longer)",
                EXIT_NO_REPLY,
            ) from e
        except (OSError, EOFError) as e:
            raise CallError(
                "Disconnected", f"lost the bus connection during {member}: {e}", EXIT_UNREACHABLE
            ) from e
        if reply is None:
            raise CallError(
                "Disconnected", f"no reply to {member}: the bus connection closed", EXIT_UNREACHABLE
            )
        if reply.message_type == MessageType.ERROR:
            name = reply.error_name or "org.freedesktop.DBus.Error.Failed"
            text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
            raise CallError(name, text or "(no message)")
        return reply

    async def manager(self, member: str, *body: object) -> list[Any]:
        """Call a Manager method; its signature is the contract's (vfiod.bus.methods), never typed here."""
        return await self.call(member, METHODS_BY_NAME[member].in_signature, body)


# ----- polkit agent on a terminal ------------------------------------------------------------------------


@contextlib.contextmanager
def tty_agent(enabled: bool) -> Iterator[None]:
    """Run `pkttyagent --fallback` for the duration, as systemctl does, so polkit can ask on this terminal
    when no other agent serves the session. Does nothing unless `enabled`, stdin is a terminal, we are not
    root and pkttyagent exists; any trouble starting it is ignored (the call then fails NotAuthorized)."""
    agent = shutil.which("pkttyagent")
    if not enabled or agent is None or os.geteuid() == 0 or not sys.stdin.isatty():
        yield
        return
    r, w = os.pipe()
    try:
        proc = subprocess.Popen(
            [agent, "--notify-fd", str(w), "--fallback"],
            pass_fds=(w,),
            stdin=subprocess.DEVNULL,
        )
    except OSError:
        os.close(r)
        os.close(w)
        yield
        return
    os.close(w)
    try:
        # The agent closes the notify fd once it is registered; wait for that (bounded).
        end = time.monotonic() + 5.0
        while time.monotonic() < end:
            ready, _, _ = select.select([r], [], [], max(0.0, end - time.monotonic()))
            if not ready or not os.read(r, 64):
                break
        yield
    finally:
        os.close(r)
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=2)


def dict_of(value: object) -> dict[str, Any]:
    """A reply's a{sv} as a dict (an empty dict if the service sent something else)."""
    return dict(value) if isinstance(value, Mapping) else {}


def list_of_dicts(value: object) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        return []
    return [dict(v) for v in value if isinstance(v, Mapping)]
