"""Calls vfiod makes to other services on its bus connection (the bus itself, polkitd, systemd).

Owns the limit on calls in flight: dbus-daemon lets one connection have at most 128 pending replies
(`max_replies_per_connection`) and drops the rest, so every outgoing call goes through one semaphore kept
well below that. Also owns the per-call deadline and turning an error reply into `BusCallError`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from dbus_fast import Message, MessageFlag, MessageType
from dbus_fast.aio import MessageBus

from vfiod.bus.names import DBUS_IFACE, DBUS_NAME, DBUS_PATH

MAX_IN_FLIGHT = 64
DEFAULT_TIMEOUT = 25.0  # what libdbus uses when a caller gives none


class BusCallError(Exception):
    """The other side replied with an error (or did not reply in time: `name` is then `Timeout`)."""

    def __init__(self, name: str, text: str) -> None:
        super().__init__(f"{name}: {text}")
        self.name = name
        self.text = text


class Caller:
    """Outgoing method calls on one bus connection, at most MAX_IN_FLIGHT at a time."""

    def __init__(self, bus: MessageBus, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self.bus = bus
        self._slots = asyncio.Semaphore(max_in_flight)

    async def call(
        self,
        destination: str,
        path: str,
        interface: str,
        member: str,
        signature: str = "",
        body: list[Any] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        interactive: bool = False,
    ) -> list[Any]:
        msg = Message(
            destination=destination,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=body or [],
            flags=MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION if interactive else MessageFlag.NONE,
        )
        async with self._slots:
            try:
                reply = await asyncio.wait_for(self.bus.call(msg), timeout)
            except TimeoutError:
                raise BusCallError(
                    "Timeout", f"{destination} did not answer {member} within {timeout:g} s"
                ) from None
        if reply is None:
            raise BusCallError("NoReply", f"no reply from {destination} to {member}")
        if reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
            raise BusCallError(reply.error_name or "unknown", text)
        return list(reply.body)

    async def bus_method(self, member: str, signature: str = "", body: list[Any] | None = None) -> list[Any]:
        """A method of the bus itself (org.freedesktop.DBus)."""
        return await self.call(DBUS_NAME, DBUS_PATH, DBUS_IFACE, member, signature, body)

    async def name_has_owner(self, name: str) -> bool:
        (owned,) = await self.bus_method("NameHasOwner", "s", [name])
        return bool(owned)

    async def name_owner(self, name: str) -> str | None:
        try:
            (owner,) = await self.bus_method("GetNameOwner", "s", [name])
        except BusCallError:
            return None
        return str(owner)

    async def activatable(self, name: str) -> bool:
        try:
            (names,) = await self.bus_method("ListActivatableNames")
        except BusCallError:
            return False
        return name in names

    async def add_match(self, rule: str) -> None:
        await self.bus_method("AddMatch", "s", [rule])
