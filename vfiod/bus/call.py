"""One Manager method call as the service handles it: who made it (bus name, uid, pid, executable), its
polkit checks (the method's action, and the admin action the manager may ask for from a worker thread),
the audit log line of each decision that matters, and the outcome line of a mutating call.

The outcome line names the call's instance and every PCI address it named or acted on, and its level
says what the admin must do: ERR when a device is left stuck (each also has its DEVICE_STUCK line) or
without its driver, WARNING when refused for a device the host needs (HOST_CRITICAL_REFUSED), by
polkit, or failed in the daemon; INFO for success and for a caller's mistake.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable, Mapping
from typing import Final

from dbus_fast import Message, MessageFlag

from vfiod import phases
from vfiod.bus.authz import MUTATING, Authorizer, CallerId, Decision, action_for, denial_message
from vfiod.bus.names import ACTION_ADMIN, MANAGER_IFACE
from vfiod.core.context import Caller, add_new
from vfiod.core.errors import (
    Failed,
    HostCritical,
    NativeDriverNotRestored,
    NotAuthorized,
    Timeout,
    VfiodError,
    VFIONotAvailable,
)
from vfiod.logevents import Action, MessageId

# The message being dispatched. dbus-fast creates each method's task right after the message handlers ran,
# so the task's copy of the context holds its own message even with many calls in flight.
CURRENT_MESSAGE: contextvars.ContextVar[Message | None] = contextvars.ContextVar(
    "vfiod_message", default=None
)

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
        self.instance = ""
        self.touched: list[str] = []  # PCI addresses: those polkit was asked about, then those acted on
        self.devices: list[str] = []
        self.phases = phases.begin()  # current in this call's context: the core adds its phases too

    @property
    def exe(self) -> str:
        if self._exe is None:
            self._exe = self._exe_of(self.who.pid)
        return self._exe

    async def identify(self) -> None:
        with phases.timed("identify"):
            self.who = await self.authz.identify(self.msg.sender or "")

    async def authorize(self, details: Mapping[str, str] | None = None, action: str | None = None) -> None:
        """The method's action (or `action`); NotAuthorized when polkit says no. Logged for mutating calls."""
        act = action or self.action
        self._note(details)
        with phases.timed("authorize"):
            decision = await self.authz.check(self.who, act, details, interactive=self.interactive)
        if act in MUTATING or not decision.allowed:
            self.audit(act, decision, details)
        if not decision.allowed:
            raise NotAuthorized(denial_message(self.who, act, decision, self.interactive))
        if act == ACTION_ADMIN:
            self.admin_granted = True

    async def admin(self, details: Mapping[str, str]) -> bool:
        self._note(details)
        if self.admin_granted:
            return True
        with phases.timed("authorize"):
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
        return Caller(uid=self.who.uid, pid=self.who.pid, check_admin=self.check_admin, touched=self.touched)

    def _note(self, details: Mapping[str, str] | None) -> None:
        for key, value in (details or {}).items():
            if key == "instance" and value:
                self.instance = value
            elif key == "pci_address" and value:
                add_new(self.touched, [value])
            elif key == "device" and value:
                add_new(self.devices, [value])

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
                **({} if decision.allowed else {"MESSAGE_ID": MessageId.CALL_DENIED}),
                **{AUDIT_FIELDS[k]: v for k, v in (details or {}).items() if k in AUDIT_FIELDS and v},
            },
        )

    def outcome(
        self, result: str, started: float, text: str = "", error: BaseException | None = None
    ) -> None:
        """The audit line of a mutating call's result ("ok" or the error's name) and duration, with the
        instance and the PCI addresses it named or acted on, at the level its result deserves, and where
        the time went (vfiod.phases: PHASE_*_MS fields)."""
        level, fields = _severity(error)
        if isinstance(error, VfiodError):
            add_new(self.touched, error.stuck)
        where = [f"instance {self.instance}"] if self.instance else []
        where += [", ".join(self.touched or self.devices)] if self.touched or self.devices else []
        elapsed = time.monotonic() - started
        # What no phase accounts for: Python, thread hand-offs, the bus; the kernel's own work is in phases.
        self.phases.add("other", max(0.0, elapsed - sum(self.phases.seconds.values())))
        audit.log(
            level,
            "%s by uid %d%s: %s (%.3f s%s)%s",
            self.method,
            self.who.uid,
            f" ({'; '.join(where)})" if where else "",
            result,
            elapsed,
            f": {self.phases.text()}",
            f": {text}" if text else "",
            extra={
                **self._fields(),
                "RESULT": result,
                "INSTANCE_ID": self.instance,
                "PCI_ADDRESS": ",".join(self.touched),
                "DEVICE": ",".join(self.devices),
                "DURATION_MS": f"{elapsed * 1000:.1f}",
                **self.phases.fields(),
                **fields,
            },
        )

    def _fields(self) -> dict[str, object]:
        return {
            "ACTION": Action.for_method(self.method),
            "METHOD": self.method,
            "CALLER_UID": self.who.uid,
            "CALLER_PID": self.who.pid if self.who.pid is not None else "",
            "CALLER_EXE": self.exe,
        }


def _severity(error: BaseException | None) -> tuple[int, dict[str, object]]:
    """The outcome line's level, and the fields that say why."""
    if error is None:
        return logging.INFO, {}
    stuck = error.stuck if isinstance(error, VfiodError) else ()
    if stuck:
        return logging.ERROR, {"STUCK": ",".join(stuck)}  # each has its own DEVICE_STUCK line
    if isinstance(error, NativeDriverNotRestored | Timeout):
        return logging.ERROR, {}
    if isinstance(error, HostCritical):
        return logging.WARNING, {"MESSAGE_ID": MessageId.HOST_CRITICAL_REFUSED}
    if isinstance(error, NotAuthorized | VFIONotAvailable) or not isinstance(error, VfiodError):
        return logging.WARNING, {}
    if type(error) is Failed:
        return logging.WARNING, {}
    return logging.INFO, {}  # the caller's mistake or a refusal it can act on (InUse, DeviceBusy, ...)
