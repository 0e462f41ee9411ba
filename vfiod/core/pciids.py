"""The system pci.ids database: vendor and device names for display.

Owns finding the file (an explicit path, then the usual Debian/Fedora locations, plain or gzipped),
reading it once on first lookup, and answering name lookups. Names are decoration only: when the database
is missing or unreadable every lookup returns None and callers show the numeric IDs instead, so nothing
here ever raises for a missing, unreadable or malformed file.
"""

from __future__ import annotations

import functools
import gzip
import logging
import re
import threading
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_SEARCH_PATHS: tuple[Path, ...] = (
    Path("/usr/share/misc/pci.ids"),
    Path("/usr/share/misc/pci.ids.gz"),
    Path("/usr/share/hwdata/pci.ids"),
    Path("/usr/share/hwdata/pci.ids.gz"),
    Path("/usr/share/pci.ids"),
    Path("/usr/share/pci.ids.gz"),
)

# The real file is ~1.3 MB; the cap only stops a misconfigured path (a device node, a huge log) from
# being slurped into a root daemon's memory.
_MAX_BYTES = 64 * 1024 * 1024
_GZIP_MAGIC = b"\x1f\x8b"

_VENDOR_RE = re.compile(r"([0-9a-fA-F]{4})\s+(\S.*)")
_DEVICE_RE = re.compile(r"\t([0-9a-fA-F]{4})\s+(\S.*)")
# Names end up in D-Bus strings and terminal output; D-Bus forbids NUL and control characters would let a
# corrupted file play games with a terminal. Tab and newline are structure, handled by the parser; CRLF
# is normalised before this runs. A plain character class keeps the whole-file scan at a few ms.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_ID4_RE = re.compile(r"(?:0[xX])?([0-9a-fA-F]{4})")


# A top-level line (a vendor, a `C` class, another section's entry), never a comment or an indented line.
_TOP_RE = re.compile(r"^[^\t#\n][^\n]*", re.MULTILINE)


class _Tables:
    """The indexed database: vendor names at once, each vendor's devices when first asked for (a listing
    names a few vendors; parsing all ~40k device lines took most of the load). Keys are lowercase hex.

    Every section but the vendors (`C` classes, `L` languages...) is skipped, and the indented lines of a
    skipped or malformed entry are never filed under the entry before it: a vendor's lines end at the next
    top-level line (comments do not end them)."""

    __slots__ = ("_blocks", "_devices", "_lock", "_text", "vendors")

    def __init__(self, text: str) -> None:
        self._text = text
        self.vendors: dict[str, str] = {}
        self._blocks: dict[str, list[tuple[int, int]]] = {}  # vendor -> its indented lines' spans
        self._devices: dict[str, dict[str, str]] = {}  # vendor -> device id -> name, parsed on demand
        self._lock = threading.Lock()
        tops = list(_TOP_RE.finditer(text))
        for i, top in enumerate(tops):
            line = top[0]
            m = _VENDOR_RE.fullmatch(line) if not (line[0] == "C" and line[1:2] == " ") else None
            if m is None:
                continue
            vendor = m[1].lower()
            self.vendors.setdefault(vendor, m[2].rstrip())
            end = tops[i + 1].start() if i + 1 < len(tops) else len(text)
            self._blocks.setdefault(vendor, []).append((top.end(), end))

    def device(self, vendor: str, device: str) -> str | None:
        found = self._devices.get(vendor)
        if found is None:
            with self._lock:
                found = self._devices.setdefault(vendor, self._parse_devices(vendor))
        return found.get(device)

    def _parse_devices(self, vendor: str) -> dict[str, str]:
        """The device lines of every block of `vendor` (the first name of a repeated id wins); subsystem
        lines (two tabs) are skipped."""
        out: dict[str, str] = {}
        for begin, end in self._blocks.get(vendor, ()):
            # split("\n"), not splitlines(): splitlines also breaks on \x85 and \u2028, which names may hold.
            for line in self._text[begin:end].split("\n"):
                if line[:1] == "\t" and line[1:2] != "\t":
                    m = _DEVICE_RE.fullmatch(line)
                    if m is not None:
                        out.setdefault(m[1].lower(), m[2].rstrip())
        return out


def _parse(text: str) -> _Tables:
    """The file's text, with CRLF and control characters made harmless, indexed."""
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    if _CONTROL_RE.search(text) is not None:
        text = _CONTROL_RE.sub("?", text)
    return _Tables(text)


def _read(path: Path) -> str:
    """The file's text, gunzipped when it is gzip (by content, not name). Raises OSError/ValueError."""
    with path.open("rb") as f:
        head = f.read(2)
        f.seek(0)
        if head == _GZIP_MAGIC:
            with gzip.GzipFile(fileobj=f, mode="rb") as gz:
                data = gz.read(_MAX_BYTES + 1)
        else:
            data = f.read(_MAX_BYTES + 1)
    if len(data) > _MAX_BYTES:
        raise ValueError(f"larger than {_MAX_BYTES} bytes")
    # The file is UTF-8; a stray bad byte must cost one name, not the database.
    return data.decode("utf-8", errors="replace")


def _id4(value: str) -> str | None:
    if not isinstance(value, str):
        return None
    m = _ID4_RE.fullmatch(value)
    return m[1].lower() if m is not None else None


class PciIds:
    """Name lookups in a pci.ids file, read and indexed once, on the first lookup.

    `path` is tried first; when it is None or cannot be read, `search_paths` are tried in order (the
    system locations by default). Lookups take 4-hex-digit IDs such as "10de", any case, with or without
    a leading "0x" (as sysfs writes them), and return None for anything unknown or malformed.
    Thread-safe: concurrent first lookups parse the file once.
    """

    def __init__(
        self, path: Path | None = None, *, search_paths: Sequence[Path] = DEFAULT_SEARCH_PATHS
    ) -> None:
        self._candidates: tuple[Path, ...] = ((path,) if path is not None else ()) + tuple(search_paths)
        self._lock = threading.Lock()
        self._tables: _Tables | None = None
        self._source: Path | None = None
        self._loaded = False

    def _load(self) -> _Tables | None:
        if self._loaded:
            return self._tables
        with self._lock:
            if self._loaded:
                return self._tables
            for candidate in self._candidates:
                try:
                    text = _read(candidate)
                except FileNotFoundError:
                    continue
                except (OSError, ValueError, EOFError) as e:
                    # EOFError: truncated gzip; ValueError: our size cap.
                    log.warning("cannot read PCI ID database %s: %s", candidate, e)
                    continue
                self._tables = _parse(text)
                self._source = candidate
                break
            else:
                log.info("no PCI ID database found (tried %s); showing numeric IDs", self._candidates)
            self._loaded = True
            return self._tables

    @property
    def available(self) -> bool:
        """True when a database was found and read (triggers the one-time load)."""
        return self._load() is not None

    @property
    def source(self) -> Path | None:
        """The file the names come from, or None when no database could be read (triggers the load)."""
        self._load()
        return self._source

    def vendor_name(self, vendor_id: str) -> str | None:
        v = _id4(vendor_id)
        t = self._load()
        if v is None or t is None:
            return None
        return t.vendors.get(v)

    def device_name(self, vendor_id: str, device_id: str) -> str | None:
        v, d = _id4(vendor_id), _id4(device_id)
        t = self._load()
        if v is None or d is None or t is None:
            return None
        return t.device(v, d)


@functools.cache
def default_pci_ids() -> PciIds:
    """The shared instance for the system database, so the file is parsed once per process."""
    return PciIds()
