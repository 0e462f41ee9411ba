"""One Manager method call as the service handles it: who made it (bus name, uid, pid, executable), its
polkit checks (the method's action, and the admin action the manager may ask for from a worker thread),
and the audit log line of each decision that matters.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Final

from dbus_fast import Message, MessageFlag

from vfiod.bus.authz import MUTATING, Authorizer, CallerId, Decision, action_for, denial_message
from vfiod.bus.names import ACTION_ADMIN, MANAGER_IFACE
from vfiod.core.context import Caller
from vfiod.core.errors import NotAuthorized

log = logging.getLogger("vfiod.bus")
audit = logging.getLogger("vfiod.audit")

ADMIN_WAIT: Final = 330.0  # an interactive polkit check, plus slack
# polkit details -> the journal fields the core logs the same things under
AUDIT_FIELDS: Final = {
    "pci_address": "PCI_ADDRESS",
    "instance": "INSTANCE_ID",
    "device": "DEVICE",
}


class Call:
    """One method call: who made it, its authorization decisions, and the core's `Caller` for it."""

    def __init__(
        self,
        authz: Authorizer,
        loop: asyncio.AbstractEventLoop,
        exe_of: Callable[[int | None], str],
        msg: Message,
        method: str,
    ) -> None:
        self.authz = authz
        self.loop = loop
        self._exe_of = exe_of
        self.msg = msg
        self.method = method
        self.action = action_for(MANAGER_IFACE, method) or ""
        self.interactive = bool(msg.flags & MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION)
        self.who: CallerId = CallerId(msg.sender or "", -1, None)
        self.admin_granted = False
        self._exe: str | None = None

    @property
    def exe(self) -> str:
        if self._exe is None:
            self._exe = self._exe_of(self.who.pid)
        return self._exe

    async def identify(self) -> None:
        self.who = await self.authz.identify(self.msg.sender or "")

    async def authorize(self, details: Mapping[str, str] | None = None, action: str | None = None) -> None:
        """The method's action (or `action`); NotAuthorized when polkit says no. Logged for mutating calls."""
        act = action or self.action
        decision = await self.authz.check(self.who, act, details, interactive=self.interactive)
        if act in MUTATING or not decision.allowed:
            self.audit(act, decision, details)
        if not decision.allowed:
            raise NotAuthorized(denial_message(self.who, act, decision, self.interactive))
        if act == ACTION_ADMIN:
            self.admin_granted = True

    async def admin(self, details: Mapping[str, str]) -> bool:
        if self.admin_granted:
            return True
        decision = await self.authz.check(self.who, ACTION_ADMIN, details, interactive=self.interactive)
        self.audit(ACTION_ADMIN, decision, details)
        if decision.allowed:
            self.admin_granted = True
        return decision.allowed

    def check_admin(self, details: Mapping[str, str]) -> bool:
        """For the manager, from a worker thread: the second (admin) check, run on the event loop."""
        if self.admin_granted:
            return True
        fut = asyncio.run_coroutine_threadsafe(self.admin(dict(details)), self.loop)
        try:
            return fut.result(timeout=ADMIN_WAIT)
        except Exception:
            fut.cancel()
            log.exception("the admin check for %s did not complete", self.method)
            return False

    def core_caller(self) -> Caller:
        return Caller(uid=self.who.uid, pid=self.who.pid, check_admin=self.check_admin)

    def audit(self, action: str, decision: Decision, details: Mapping[str, str] | None) -> None:
        level = logging.INFO if decision.allowed else logging.WARNING
        detail_text = ", ".join(f"{k}={v}" for k, v in sorted((details or {}).items()) if v)
        audit.log(
            level,
            "%s by uid %d (pid %s, %s): %s %s%s",
            self.method,
            self.who.uid,
            self.who.pid if self.who.pid is not None else "?",
            self.exe or "unknown executable",
            action,
            "allowed" if decision.allowed else "denied",
            f" [{detail_text}]" if detail_text else "",
            extra={
                **self._fields(),
                "CALLER_BUS_NAME": self.who.sender,
                "POLKIT_ACTION": action,
                "POLKIT_RESULT": decision.result,
                **{AUDIT_FIELDS[k]: v for k, v in (details or {}).items() if k in AUDIT_FIELDS and v},
            },
        )

    def outcome(self, result: str, started: float, text: str = "") -> None:
        """The audit line of a mutating call's result ("ok" or the error's name) and duration."""
        audit.info(
            "%s by uid %d: %s (%.3f s)%s",
            self.method,
            self.who.uid,
            result,
            time.monotonic() - started,
            f": {text}" if text else "",
            extra={**self._fields(), "RESULT": result},
        )

    def _fields(self) -> dict[str, object]:
        return {
            "ACTION": self.method,
            "CALLER_UID": self.who.uid,
            "CALLER_PID": self.who.pid if self.who.pid is not None else "",
            "CALLER_EXE": self.exe,
        }
