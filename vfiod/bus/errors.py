"""The one mapping from a failure to the D-Bus error a caller sees.

A `VfiodError` becomes `org.hypeman.Devices1.Error.<its name>` with its message. Anything else (a bug, an
unexpected OSError) becomes `Failed` with a fixed sentence, and its traceback goes to the daemon's log only:
a caller never sees a traceback, a path inside vfiod or a Python type name beyond the exception's class.
"""

from __future__ import annotations

import logging

from dbus_fast import DBusError

from vfiod.bus.names import error_name
from vfiod.core.errors import ALL_ERRORS, VfiodError
from vfiod.logevents import Action

log = logging.getLogger("vfiod.bus")

CONTRACT_ERRORS: frozenset[str] = frozenset(e.name for e in ALL_ERRORS)
# D-Bus caps a message at 128 MiB, but a caller wants a sentence; this keeps a runaway message readable.
MAX_MESSAGE = 4000


def to_dbus_error(exc: BaseException, *, context: str = "") -> DBusError:
    """The DBusError to reply with for `exc` (an unexpected one is logged here, with its traceback)."""
    if isinstance(exc, DBusError) and exc.type.startswith(error_name("")):
        return exc
    if isinstance(exc, VfiodError):
        name = exc.name if exc.name in CONTRACT_ERRORS else "Failed"
        return DBusError(error_name(name), _clip(exc.message or name))
    log.error(
        "unexpected error%s: %s: %s",
        f" in {context}" if context else "",
        type(exc).__name__,
        exc,
        exc_info=exc,
        extra={"ACTION": Action.INTERNAL_ERROR, "METHOD": context, "RESULT": "internal-error"},
    )
    return DBusError(
        error_name("Failed"),
        f"vfiod hit an internal error ({type(exc).__name__}) while handling this call; nothing more is known "
        "here, the details are in the daemon's log",
    )


def failed(message: str) -> DBusError:
    return DBusError(error_name("Failed"), message)


def invalid_argument(message: str) -> DBusError:
    return DBusError(error_name("InvalidArgument"), _clip(message))


def not_authorized(message: str) -> DBusError:
    return DBusError(error_name("NotAuthorized"), message)


def _clip(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 1] + "…"
