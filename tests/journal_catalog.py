"""The package's journal catalog as the tests read it: each MESSAGE_ID's entry, its subject and the fields
(`@FIELD@`) its text substitutes, so a test can check that every line logged with an id carries them
(journalctl prints a missing field's name instead, which reads as nonsense)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from vfiod.bus.logs import record_fields

CATALOG = Path(__file__).resolve().parent.parent / "systemd" / "vfiod.catalog"
HEADER_RE = re.compile(r"^-- ([0-9a-f]{32})(?: (\S+))?$")
FIELD_RE = re.compile(r"@([A-Z0-9_]+)@")


@dataclass
class Entry:
    message_id: str
    headers: dict[str, str]
    body: str

    @property
    def fields(self) -> set[str]:
        return set(FIELD_RE.findall(self.headers.get("Subject", "") + "\n" + self.body))


@cache
def entries() -> dict[str, Entry]:
    out: dict[str, Entry] = {}
    current: Entry | None = None
    in_body = False
    for line in CATALOG.read_text(encoding="utf-8").splitlines():
        m = HEADER_RE.match(line)
        if m:
            assert m.group(1) not in out, f"{m.group(1)} twice in the catalog"
            current = Entry(m.group(1), {}, "")
            out[m.group(1)] = current
            in_body = False
        elif current is None:
            assert not line or line.startswith("#"), f"text before the first entry: {line!r}"
        elif not in_body and ": " in line:
            key, value = line.split(": ", 1)
            current.headers[key] = value
        elif not in_body and not line:
            in_body = True
        else:
            current.body += line + "\n"
    return out


def missing_fields(record: logging.LogRecord) -> set[str]:
    """The fields the catalog entry of the record's MESSAGE_ID names that the record does not carry."""
    entry = entries()[record.__dict__["MESSAGE_ID"]]
    return entry.fields - set(record_fields(record))


def assert_catalogued(records: list[logging.LogRecord]) -> None:
    """Every record with a MESSAGE_ID: the id is in the catalog and the record carries its fields."""
    for record in records:
        if "MESSAGE_ID" in record.__dict__:
            assert record.__dict__["MESSAGE_ID"] in entries(), record.getMessage()
            assert not missing_fields(record), (record.getMessage(), missing_fields(record))
