"""Where the daemon's log goes: the journal, with structured fields, when it runs under systemd; stderr
otherwise.

The code logs its structured data as `extra={...}` with journal-style upper-case keys (PCI_ADDRESS,
DEVICE_ID, INSTANCE_ID, ACTION, SYSFS_PATH, CALLER_UID, POLKIT_RESULT, ...). `JournalFieldsHandler` sends
exactly those as journal fields (`journalctl -u vfiod ACTION=attach`), plus the usual MESSAGE, PRIORITY
and CODE_* fields; `StderrFormatter` appends them to the line as `[KEY=value ...]`.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any, Final, TextIO

try:
    import systemd.journal as sd_journal
except ImportError:  # systemd-python is only needed when running under systemd
    sd_journal = None

FIELD_RE: Final = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
# Fields the journal sets itself or that the handler sets: a record's extra must not override them.
RESERVED: Final = frozenset(
    {
        "MESSAGE",
        "PRIORITY",
        "CODE_FILE",
        "CODE_LINE",
        "CODE_FUNC",
        "SYSLOG_IDENTIFIER",
        "LOGGER",
        "THREAD_NAME",
    }
)
# logging levels -> syslog priorities
PRIORITIES: Final = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


def under_systemd(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return bool(env.get("JOURNAL_STREAM") or env.get("INVOCATION_ID"))


def record_fields(record: logging.LogRecord) -> dict[str, str]:
    """The structured fields a record carries (its upper-case `extra` keys), as strings."""
    out: dict[str, str] = {}
    for key, value in record.__dict__.items():
        if FIELD_RE.fullmatch(key) and key not in RESERVED and value is not None and value != "":
            out[key] = str(value)
    return out


def _priority(levelno: int) -> int:
    for level in sorted(PRIORITIES, reverse=True):
        if levelno >= level:
            return PRIORITIES[level]
    return 7


Sender = Callable[..., Any]


class JournalFieldsHandler(logging.Handler):
    """Sends each record to the journal with its structured fields."""

    def __init__(self, sender: Sender | None = None, identifier: str = "vfiod") -> None:
        super().__init__()
        if sender is None:
            if sd_journal is None:
                raise ImportError("systemd-python is not installed")
            sender = sd_journal.send
        self._send = sender
        self._identifier = identifier

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            fields = record_fields(record)
            if record.exc_info:
                fields["EXCEPTION_TEXT"] = logging.Formatter().formatException(record.exc_info)
            self._send(
                message,
                PRIORITY=str(_priority(record.levelno)),
                SYSLOG_IDENTIFIER=self._identifier,
                LOGGER=record.name,
                THREAD_NAME=record.threadName or "",
                CODE_FILE=record.pathname,
                CODE_LINE=record.lineno,  # systemd.journal.send formats it with {:d}
                CODE_FUNC=record.funcName,
                **fields,
            )
        except Exception:
            self.handleError(record)


class StderrFormatter(logging.Formatter):
    """`vfiod: LEVEL: message [KEY=value ...]`."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"vfiod: {record.levelname}: {record.getMessage()}"
        fields = record_fields(record)
        if fields:
            line += " [" + " ".join(f"{k}={_quote(v)}" for k, v in sorted(fields.items())) + "]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _quote(value: str) -> str:
    return value if value and not any(c.isspace() or c in "\"'" for c in value) else repr(value)


def setup(
    *, verbose: bool = False, stream: TextIO | None = None, journal: bool | None = None
) -> logging.Handler:
    """Route the root logger to the journal (under systemd) or stderr. Returns the handler installed."""
    use_journal = under_systemd() if journal is None else journal
    handler: logging.Handler
    if use_journal:
        try:
            handler = JournalFieldsHandler()
        except ImportError:
            use_journal = False
    if not use_journal:
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(StderrFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    return handler
