"""Authorization: who the caller is, which polkit action a method needs, and asking polkit.

Owns the contract's single method -> action table (ACTIONS; the standard interfaces included). A member
that is not in it is denied, so a method added to an interface without an entry here can never run
unchecked. Also owns:

- caller identity from the bus (`GetConnectionCredentials` of the sender's unique name), cached per unique
  name and dropped when the name leaves the bus (NameOwnerChanged; unique names are never reused);
- polkit `CheckAuthorization` with the `system-bus-name` subject, the contract's details, and the
  interactive flag only when the caller's message allowed interactive authorization;
- caching of `inspect` results until polkit's `Changed` signal (or polkitd restarting);
- uid 0 always allowed; with no polkitd on the bus, the daemon's own uid allowed and everyone else denied.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

from dbus_fast import Message, MessageType, Variant

from vfiod.bus.calls import BusCallError, Caller
from vfiod.bus.methods import MANAGER_ACTIONS
from vfiod.bus.names import (
    ACTION_ADMIN,
    ACTION_ATTACH,
    ACTION_INSPECT,
    ACTION_REGISTER,
    DBUS_IFACE,
    DBUS_NAME,
    INTROSPECTABLE_IFACE,
    OBJECT_MANAGER_IFACE,
    PEER_IFACE,
    POLKIT_IFACE,
    POLKIT_NAME,
    POLKIT_PATH,
    PROPERTIES_IFACE,
)
from vfiod.core.errors import Failed

log = logging.getLogger("vfiod.authz")

DENY: Final = ""  # an explicit entry meaning "always refused"

# (interface, member) -> polkit action. Anything missing is denied.
ACTIONS: Final[dict[tuple[str, str], str]] = {
    **MANAGER_ACTIONS,  # each Manager method's action, from its entry in methods.METHODS
    (INTROSPECTABLE_IFACE, "Introspect"): ACTION_INSPECT,
    (PEER_IFACE, "Ping"): ACTION_INSPECT,
    (PEER_IFACE, "GetMachineId"): ACTION_INSPECT,
    (PROPERTIES_IFACE, "Get"): ACTION_INSPECT,
    (PROPERTIES_IFACE, "GetAll"): ACTION_INSPECT,
    # Every property is read-only: Set answers PropertyReadOnly to whoever may read it.
    (PROPERTIES_IFACE, "Set"): ACTION_INSPECT,
    (OBJECT_MANAGER_IFACE, "GetManagedObjects"): ACTION_INSPECT,
}

# Actions whose calls change something: logged with the caller's identity and the polkit result.
MUTATING: Final = frozenset({ACTION_REGISTER, ACTION_ATTACH, ACTION_ADMIN})

POLKIT_TIMEOUT = 25.0
POLKIT_INTERACTIVE_TIMEOUT = 300.0  # a person typing a password
CHECK_ALLOW_USER_INTERACTION = 0x1


def action_for(interface: str | None, member: str | None) -> str | None:
    """The polkit action for a method; None if it is not in the table (denied)."""
    if interface is None or member is None:
        return None
    return ACTIONS.get((interface, member))


@dataclass(frozen=True)
class CallerId:
    """A caller as the bus knows it."""

    sender: str
    uid: int
    pid: int | None


@dataclass(frozen=True)
class Decision:
    allowed: bool
    # How it was decided, for the log and for the error message: uid0, own-uid, polkit, cached, no-polkit,
    # polkit-error.
    how: str
    challenge: bool = False

    @property
    def result(self) -> str:
        """POLKIT_RESULT in the log."""
        if self.allowed:
            return "yes" if self.how in ("polkit", "cached") else f"yes ({self.how})"
        if self.challenge:
            return "auth-required"
        return "no" if self.how in ("polkit", "cached") else f"no ({self.how})"


Mode = Literal["polkit", "own-uid"]


class Authorizer:
    """Caller identities and polkit decisions for one bus connection. Lives on the event loop."""

    def __init__(self, caller: Caller, *, own_uid: int) -> None:
        self._calls = caller
        self.own_uid = own_uid
        self.mode: Mode = "own-uid"
        self._ids: dict[str, CallerId] = {}
        self._inspect: dict[str, Decision] = {}
        self._polkit_owner: str | None = None

    async def start(self) -> Mode:
        """Find out whether polkitd is on the bus (running or activatable) and subscribe to what
        invalidates the caches. Returns the mode, for the daemon's first log line."""
        calls = self._calls
        calls.bus.add_message_handler(self._on_message)
        await calls.add_match(
            f"type='signal',sender='{DBUS_NAME}',interface='{DBUS_IFACE}',member='NameOwnerChanged'"
        )
        await calls.add_match(f"type='signal',interface='{POLKIT_IFACE}',member='Changed'")
        if await calls.name_has_owner(POLKIT_NAME) or await calls.activatable(POLKIT_NAME):
            self.mode = "polkit"
            self._polkit_owner = await calls.name_owner(POLKIT_NAME)
        return self.mode

    def _on_message(self, msg: Message) -> None:
        if msg.message_type is not MessageType.SIGNAL:
            return
        if msg.member == "NameOwnerChanged" and msg.sender == DBUS_NAME and msg.interface == DBUS_IFACE:
            name, _old, new = msg.body
            if not new:
                self._ids.pop(name, None)
                self._inspect.pop(name, None)
            if name == POLKIT_NAME:
                # a new polkitd may have other rules: forget what the old one said
                self._polkit_owner = new or None
                self._inspect.clear()
        elif msg.member == "Changed" and msg.interface == POLKIT_IFACE and msg.sender == self._polkit_owner:
            self._inspect.clear()

    # ----- identity -----------------------------------------------------------------------------------

    async def identify(self, sender: str) -> CallerId:
        cached = self._ids.get(sender)
        if cached is not None:
            return cached
        try:
            (creds,) = await self._calls.bus_method("GetConnectionCredentials", "s", [sender])
        except BusCallError as e:
            raise Failed(f"the bus could not say who the caller {sender} is ({e.name})") from e
        uid_v = creds.get("UnixUserID")
        pid_v = creds.get("ProcessID")
        if not isinstance(uid_v, Variant):
            raise Failed(f"the bus gave no uid for the caller {sender}")
        ident = CallerId(sender, int(uid_v.value), int(pid_v.value) if isinstance(pid_v, Variant) else None)
        self._ids[sender] = ident
        return ident

    # ----- decisions ----------------------------------------------------------------------------------

    async def check(
        self,
        who: CallerId,
        action: str,
        details: Mapping[str, str] | None = None,
        *,
        interactive: bool = False,
    ) -> Decision:
        if action == DENY:
            return Decision(False, "never allowed")
        if who.uid == 0:
            return Decision(True, "uid0")
        if self.mode == "own-uid":
            if who.uid == self.own_uid:
                return Decision(True, "own-uid")
            return Decision(False, "no-polkit")
        if action == ACTION_INSPECT:
            cached = self._inspect.get(who.sender)
            if cached is not None:
                return Decision(cached.allowed, "cached", cached.challenge)
        decision = await self._ask_polkit(who, action, details or {}, interactive)
        if action == ACTION_INSPECT and decision.how == "polkit" and not decision.challenge:
            self._inspect[who.sender] = decision
        return decision

    async def _ask_polkit(
        self, who: CallerId, action: str, details: Mapping[str, str], interactive: bool
    ) -> Decision:
        subject = ("system-bus-name", {"name": Variant("s", who.sender)})
        flags = CHECK_ALLOW_USER_INTERACTION if interactive else 0
        try:
            (result,) = await self._calls.call(
                POLKIT_NAME,
                POLKIT_PATH,
                POLKIT_IFACE,
                "CheckAuthorization",
                "(sa{sv})sa{ss}us",
                [subject, action, {k: v for k, v in details.items() if v}, flags, ""],
                timeout=POLKIT_INTERACTIVE_TIMEOUT if interactive else POLKIT_TIMEOUT,
                interactive=interactive,
            )
        except BusCallError as e:
            log.error(
                "polkit could not decide %s for uid %d: %s",
                action,
                who.uid,
                e,
                extra={"POLKIT_ACTION": action, "CALLER_UID": who.uid, "POLKIT_RESULT": "error"},
            )
            return Decision(False, f"polkit-error: {e.name}")
        authorized, challenge = bool(result[0]), bool(result[1])
        return Decision(authorized, "polkit", challenge and not authorized)


def denial_message(who: CallerId, action: str, decision: Decision, interactive: bool) -> str:
    if decision.how == "never allowed":
        return "this is not allowed (every property of vfiod's objects is read-only)"
    if decision.how == "no-polkit":
        return (
            f"uid {who.uid} is not authorized for {action}: no polkitd is running, so vfiod allows only "
            "uid 0 and its own uid"
        )
    if decision.how.startswith("polkit-error"):
        return (
            f"uid {who.uid} is not authorized for {action}: polkit could not be asked ({decision.how[14:]})"
        )
    if decision.challenge and not interactive:
        return (
            f"uid {who.uid} is not authorized for {action} without authenticating; call again allowing "
            "interactive authorization (busctl --allow-interactive-authorization=yes, or vfioctl on a "
            "terminal)"
        )
    return f"uid {who.uid} is not authorized for {action}"
