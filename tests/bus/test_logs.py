"""Logs: structured fields to the journal under systemd, appended to the line on stderr otherwise."""

from __future__ import annotations

import io
import logging
from typing import Any

from vfiod.bus import logs


def record(**extra: Any) -> logging.LogRecord:
    logger = logging.getLogger("vfiod.test")
    return logger.makeRecord(
        logger.name, logging.WARNING, __file__, 1, "bound %s", ("0000:a2:00.0",), None, extra=extra
    )


def test_journal_gets_the_structured_fields() -> None:
    sent: list[tuple[str, dict[str, str]]] = []
    handler = logs.JournalFieldsHandler(sender=lambda msg, **fields: sent.append((msg, fields)))
    handler.emit(
        record(
            PCI_ADDRESS="0000:a2:00.0",
            DEVICE_ID="abc",
            INSTANCE_ID="vm1",
            ACTION="attach",
            CALLER_UID=1000,
            lower="x",
        )
    )
    (message, fields) = sent[0]
    assert message == "bound 0000:a2:00.0"
    assert fields["PCI_ADDRESS"] == "0000:a2:00.0" and fields["DEVICE_ID"] == "abc"
    assert fields["INSTANCE_ID"] == "vm1" and fields["ACTION"] == "attach" and fields["CALLER_UID"] == "1000"
    assert fields["PRIORITY"] == "4" and fields["SYSLOG_IDENTIFIER"] == "vfiod"
    assert "lower" not in fields and "msg" not in fields and "args" not in fields


def test_stderr_line() -> None:
    line = logs.StderrFormatter().format(
        record(ACTION="attach", SYSFS_PATH="/sys/bus/pci/drivers_probe", NOTE="two words")
    )
    assert line == (
        "vfiod: WARNING: bound 0000:a2:00.0 "
        "[ACTION=attach NOTE='two words' SYSFS_PATH=/sys/bus/pci/drivers_probe]"
    )


def test_where_the_log_goes() -> None:
    assert logs.under_systemd({"INVOCATION_ID": "x"}) and logs.under_systemd({"JOURNAL_STREAM": "8:1"})
    assert not logs.under_systemd({})
    stream = io.StringIO()
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    try:
        handler = logs.setup(stream=stream, journal=False)
        logging.getLogger("vfiod.x").info("hello", extra={"ACTION": "x"})
        assert stream.getvalue() == "vfiod: INFO: hello [ACTION=x]\n"
        assert isinstance(logs.setup(journal=True), logs.JournalFieldsHandler)
        assert handler not in root.handlers
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
