"""The persistent registry: devices, attachments, the intent journal and persistence-unit holds, on SQLite.

Owns `<state_dir>/vfiod.db`: its schema and forward migrations, the pragmas every connection runs with, the
typed rows the manager reads and writes, and the rule that a database vfiod cannot fully trust is refused
with a `RegistryError` telling the administrator what is wrong and what to do. Nothing here skips a record
it cannot read, repairs a file or recreates one over a broken one: hypeman skipped JSON records it could not
load and then let the same PCI address be registered a second time.

Every mutation runs in a `BEGIN IMMEDIATE` transaction. `with registry.transaction():` groups several into
one (a state change and the intent that accompanies it), so a crash at any point leaves all of them or none.
A mutator called inside an open transaction joins it through a savepoint: one that fails (a name clash)
undoes only its own writes and leaves the outer transaction for the caller to commit or abandon.

One connection serves every thread. An RLock serialises use of it and is held for the whole of a
transaction, so a transaction belongs to the thread that opened it and blocks every other thread's reads
and writes until it ends: do no kernel I/O, no waiting and no `await` inside one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sqlite3
import stat
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal, cast, get_args

from vfiod.core.errors import AlreadyExists, Failed, InUse, NameExists, NotFound
from vfiod.core.validation import is_device_id
from vfiod.host.pciaddr import InvalidPciAddressText, PciAddress

log = logging.getLogger("vfiod.registry")

DB_NAME: Final = "vfiod.db"
# "vfio" in ASCII, stored in the SQLite header: tells a vfiod registry from any other SQLite file.
APPLICATION_ID: Final = 0x7666696F
DEFAULT_BUSY_TIMEOUT: Final = 10.0
# STRICT tables (3.37) and the JSON functions built in (3.38; Debian 12 ships 3.40).
MIN_SQLITE: Final = (3, 38, 0)

DeviceState = Literal["host", "binding", "vfio", "attached", "releasing", "stuck", "missing"]
DEVICE_STATES: Final[tuple[DeviceState, ...]] = get_args(DeviceState)
# A device that reappears goes back to where it was before it went missing, so `missing` is never a
# previous state.
PreviousState = Literal["", "host", "binding", "vfio", "attached", "releasing", "stuck"]
PREVIOUS_STATES: Final[tuple[PreviousState, ...]] = get_args(PreviousState)
DEVICE_TYPES: Final = ("gpu", "pci")
AttachmentRole = Literal["requested", "companion"]
ATTACHMENT_ROLES: Final[tuple[AttachmentRole, ...]] = get_args(AttachmentRole)

_SQLITE_MAGIC: Final = b"SQLite format 3\x00"
_SQLITE_HEADER_SIZE: Final = 100
_TIMESTAMP_FORMAT: Final = "%Y-%m-%dT%H:%M:%SZ"


class RegistryError(Failed):
    """The registry database cannot be used; the message names the file, the problem and the remedy.

    A `Failed` like any other: a manager call that meets it mid-way rolls the kernel back as it does for a
    kernel refusal, and the caller gets this message (which file, what to free or fix)."""


def _unusable(path: Path, what: str) -> RegistryError:
    return RegistryError(
        f"the vfiod registry {path} {what}. Move it aside (with any {path.name}-wal and {path.name}-shm next "
        "to it) and restart vfiod to start with an empty registry, or restore a backup; vfiod will re-read "
        "every device from the kernel, but the registrations, names, tags and attachments kept in the file "
        "will have to be made again"
    )


def _access_denied(path: Path, detail: str) -> RegistryError:
    return RegistryError(
        f"the vfiod registry {path} cannot be opened: {detail}. vfiod must be able to read and write it and "
        f"to create files next to it in {path.parent}: check the owner and mode of both (root, 0600 for the "
        "file, 0700 for the directory) and that the file system is mounted read-write, then restart vfiod"
    )


# --- timestamps -----------------------------------------------------------------------------------------


def utc_now() -> datetime:
    """Now in UTC, to the second: the precision the registry stores."""
    return datetime.now(UTC).replace(microsecond=0)


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with a `Z`, to the second (`2026-11-26T07:15:21Z`): how every timestamp is stored."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        # hypeman stored local time; a naive datetime would silently be read back as UTC.
        raise ValueError(f"timestamp {moment!r} has no time zone; the registry stores aware UTC times only")
    return moment.astimezone(UTC).strftime(_TIMESTAMP_FORMAT)


def parse_timestamp(text: str) -> datetime:
    return datetime.strptime(text, _TIMESTAMP_FORMAT).replace(tzinfo=UTC)


# --- rows -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceRow:
    """A registered device. The identity fields (vendor, device, subsystem ids, class) are what the live
    device is compared with before any unbind."""

    id: str
    name: str
    pci_address: PciAddress
    vendor_id: str
    device_id: str
    class_code: str
    type: str  # gpu | pci
    subsystem_vendor_id: str = ""
    subsystem_device_id: str = ""
    iommu_group: int = -1
    native_driver: str = ""
    native_module: str = ""
    state: DeviceState = "host"
    previous_state: PreviousState = ""
    # vfiod moved the device to vfio-pci and must put it back; false for devices pre-bound at boot.
    bound_by_vfiod: bool = False
    created_at: datetime = field(default_factory=utc_now)
    tags: dict[str, str] = field(default_factory=dict)
    vendor_name: str = ""
    device_name: str = ""
    # The device's generation in the intent journal: every intent with an id up to this one is resolved
    # (the device was settled after it was written), so start-up recovery never replays it.
    settled_through: int = 0


@dataclass(frozen=True)
class AttachmentRow:
    """A device given to an instance. One from an earlier boot is a reservation, not a live binding."""

    device_id: str
    instance_id: str
    owner_uid: int
    iommu_group: int
    boot_id: str
    role: AttachmentRole = "requested"
    attached_at: datetime = field(default_factory=utc_now)
    # The group node's owner and mode before vfiod granted it; all None when vfiod did not change it.
    node_prev_uid: int | None = None
    node_prev_gid: int | None = None
    node_prev_mode: int | None = None
    # cloud-hypervisor's x_nv_gpudirect_clique for this function (GPUDirect P2P), None when not asked.
    gpudirect_clique: int | None = None
    id: int = 0  # assigned by add_attachment; never reused


@dataclass(frozen=True)
class IntentRow:
    """A journaled kernel step that had not been cleared: it may or may not have happened."""

    id: int
    action: str
    boot_id: str
    device_id: str
    pci_address: str
    iommu_group: int
    from_driver: str
    to_driver: str
    step: str
    operation: str
    created_at: datetime


@dataclass(frozen=True)
class HoldRow:
    """The daemon-wide hold on a persistence unit: stopped while `holders` > 0, started again at 0 if it
    `was_active`."""

    unit: str
    was_active: bool
    holders: int
    boot_id: str


_DEVICE_COLUMNS: Final = tuple(f.name for f in fields(DeviceRow))
_DEVICE_UPDATABLE: Final = frozenset(_DEVICE_COLUMNS) - {"id"}
_ATTACHMENT_COLUMNS: Final = tuple(f.name for f in fields(AttachmentRow))
_ATTACHMENT_UPDATABLE: Final = frozenset(_ATTACHMENT_COLUMNS) - {"id", "device_id"}
_INTENT_COLUMNS: Final = tuple(f.name for f in fields(IntentRow))
_HOLD_COLUMNS: Final = tuple(f.name for f in fields(HoldRow))
_NODE_PREV: Final = ("node_prev_uid", "node_prev_gid", "node_prev_mode")


def _text(column: str, value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{column} must be a string, not {type(value).__name__} ({value!r})")
    return value


def _integer(column: str, value: object, minimum: int | None = None) -> int:
    # bool is an int subclass; True as a group number is a bug, not 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{column} must be an integer, not {type(value).__name__} ({value!r})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{column} must be at least {minimum}, not {value}")
    return value


def _choice(column: str, value: object, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{column} must be one of {', '.join(repr(a) for a in allowed)}, not {value!r}")
    return cast(str, value)


def _flag(column: str, value: object) -> int:
    if not isinstance(value, bool):
        raise ValueError(f"{column} must be a bool, not {type(value).__name__} ({value!r})")
    return int(value)


def _timestamp(column: str, value: object) -> str:
    if not isinstance(value, datetime):
        raise ValueError(f"{column} must be a datetime, not {type(value).__name__} ({value!r})")
    return format_timestamp(value)


def _pci(column: str, value: object) -> str:
    try:
        return str(PciAddress.parse(_text(column, value)))
    except InvalidPciAddressText as e:
        raise ValueError(str(e)) from None


def _tags_json(value: object) -> str:
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError(f"tags must be a mapping of strings to strings, not {value!r}")
    # Sorted and compact, so equal tag sets are byte-equal in the file.
    return json.dumps(dict(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _encode_device(column: str, value: object) -> str | int:
    if column == "id":
        if not is_device_id(value):
            raise ValueError(f"device id {value!r} is not 24 characters of the cuid2 format")
        return value
    if column == "name":
        name = _text(column, value)
        # Names are looked up only when the string is not id-shaped (find), so an id-shaped name would be
        # unreachable.
        if not name or is_device_id(name):
            raise ValueError(f"device name {name!r} is empty or has the form of a device id")
        return name
    if column == "pci_address":
        return _pci(column, value)
    if column == "type":
        return _choice(column, value, DEVICE_TYPES)
    if column == "state":
        return _choice(column, value, DEVICE_STATES)
    if column == "previous_state":
        return _choice(column, value, PREVIOUS_STATES)
    if column == "iommu_group":
        return _integer(column, value, minimum=-1)
    if column == "settled_through":
        return _integer(column, value, minimum=0)
    if column == "bound_by_vfiod":
        return _flag(column, value)
    if column == "created_at":
        return _timestamp(column, value)
    if column == "tags":
        return _tags_json(value)
    return _text(column, value)


def _device_from_sql(values: Sequence[Any]) -> DeviceRow:
    row = dict(zip(_DEVICE_COLUMNS, values, strict=True))
    row["pci_address"] = PciAddress.parse(row["pci_address"])
    row["bound_by_vfiod"] = bool(row["bound_by_vfiod"])
    row["created_at"] = parse_timestamp(row["created_at"])
    row["tags"] = json.loads(row["tags"])
    return DeviceRow(**row)


def _encode_attachment(column: str, value: object) -> str | int | None:
    if column == "device_id":
        if not is_device_id(value):
            raise ValueError(f"device id {value!r} is not 24 characters of the cuid2 format")
        return value
    if column == "instance_id":
        instance = _text(column, value)
        if not instance:
            raise ValueError("instance_id must not be empty")
        return instance
    if column == "owner_uid":
        return _integer(column, value, minimum=0)
    if column == "iommu_group":
        return _integer(column, value, minimum=-1)
    if column == "role":
        return _choice(column, value, ATTACHMENT_ROLES)
    if column == "attached_at":
        return _timestamp(column, value)
    if column in _NODE_PREV:
        return None if value is None else _integer(column, value, minimum=0)
    if column == "gpudirect_clique":
        return None if value is None else _integer(column, value, minimum=0)
    return _text(column, value)


def _check_node_prev(values: Mapping[str, object]) -> None:
    if len({values[c] is None for c in _NODE_PREV}) != 1:
        raise ValueError(
            "node_prev_uid, node_prev_gid and node_prev_mode are recorded together: all set when vfiod "
            "changed the group node, all None when it did not"
        )


def _attachment_from_sql(values: Sequence[Any]) -> AttachmentRow:
    row = dict(zip(_ATTACHMENT_COLUMNS, values, strict=True))
    row["attached_at"] = parse_timestamp(row["attached_at"])
    return AttachmentRow(**row)


def _intent_from_sql(values: Sequence[Any]) -> IntentRow:
    row = dict(zip(_INTENT_COLUMNS, values, strict=True))
    row["created_at"] = parse_timestamp(row["created_at"])
    return IntentRow(**row)


def _hold_from_sql(values: Sequence[Any]) -> HoldRow:
    row = dict(zip(_HOLD_COLUMNS, values, strict=True))
    row["was_active"] = bool(row["was_active"])
    return HoldRow(**row)


# --- schema ---------------------------------------------------------------------------------------------

MigrationStep = str | Callable[[sqlite3.Connection], object]


@dataclass(frozen=True)
class Migration:
    """One forward step of the schema, applied in one transaction that also sets `user_version`.

    Steps are single SQL statements (never scripts: `executescript` commits the open transaction) or
    functions given the connection for data changes. Foreign keys are off while migrations run, so a table
    can be rebuilt the way SQLite's ALTER TABLE documentation describes; `foreign_key_check` must come out
    empty before the step commits. A shipped migration is never edited: append a new one.
    """

    version: int
    summary: str
    steps: tuple[MigrationStep, ...]


_PCI_GLOB: Final = "'[0-9a-f][0-9a-f][0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]:[0-9a-f][0-9a-f].[0-7]'"
_TIMESTAMP_GLOB: Final = "'[0-9][0-9][0-9][0-9]-[0-1][0-9]-[0-3][0-9]T[0-2][0-9]:[0-5][0-9]:[0-6][0-9]Z'"

_V1: Final[tuple[MigrationStep, ...]] = (
    f"""CREATE TABLE devices (
        id TEXT PRIMARY KEY NOT NULL
            CHECK (length(id) = 24 AND id GLOB '[a-z]*' AND id NOT GLOB '*[^a-z0-9]*'),
        name TEXT NOT NULL UNIQUE CHECK (name <> ''),
        pci_address TEXT NOT NULL UNIQUE
            CHECK (pci_address GLOB {_PCI_GLOB}),
        vendor_id TEXT NOT NULL,
        device_id TEXT NOT NULL,
        class_code TEXT NOT NULL,
        type TEXT NOT NULL CHECK (type IN ('gpu', 'pci')),
        subsystem_vendor_id TEXT NOT NULL,
        subsystem_device_id TEXT NOT NULL,
        iommu_group INTEGER NOT NULL CHECK (iommu_group >= -1),
        native_driver TEXT NOT NULL,
        native_module TEXT NOT NULL,
        state TEXT NOT NULL
            CHECK (state IN ('host', 'binding', 'vfio', 'attached', 'releasing', 'stuck', 'missing')),
        previous_state TEXT NOT NULL
            CHECK (previous_state IN ('', 'host', 'binding', 'vfio', 'attached', 'releasing', 'stuck')),
        bound_by_vfiod INTEGER NOT NULL CHECK (bound_by_vfiod IN (0, 1)),
        created_at TEXT NOT NULL CHECK (created_at GLOB {_TIMESTAMP_GLOB}),
        tags TEXT NOT NULL CHECK (json_valid(tags) AND json_type(tags) = 'object'),
        vendor_name TEXT NOT NULL,
        device_name TEXT NOT NULL
    ) STRICT""",
    # AUTOINCREMENT: an attachment id handed to a client must never come back naming another attachment.
    f"""CREATE TABLE attachments (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        device_id TEXT NOT NULL UNIQUE REFERENCES devices (id) ON DELETE RESTRICT,
        instance_id TEXT NOT NULL CHECK (instance_id <> ''),
        owner_uid INTEGER NOT NULL CHECK (owner_uid >= 0),
        iommu_group INTEGER NOT NULL CHECK (iommu_group >= -1),
        boot_id TEXT NOT NULL,
        role TEXT NOT NULL CHECK (role IN ('requested', 'companion')),
        attached_at TEXT NOT NULL CHECK (attached_at GLOB {_TIMESTAMP_GLOB}),
        node_prev_uid INTEGER CHECK (node_prev_uid >= 0),
        node_prev_gid INTEGER CHECK (node_prev_gid >= 0),
        node_prev_mode INTEGER CHECK (node_prev_mode >= 0),
        gpudirect_clique INTEGER CHECK (gpudirect_clique BETWEEN 0 AND 255),
        CHECK ((node_prev_uid IS NULL) = (node_prev_gid IS NULL)
               AND (node_prev_gid IS NULL) = (node_prev_mode IS NULL))
    ) STRICT""",
    "CREATE INDEX attachments_by_instance ON attachments (instance_id)",
    "CREATE INDEX attachments_by_group ON attachments (iommu_group)",
    # No foreign key to devices: the journal must outlive anything it describes. AUTOINCREMENT: a late
    # clear_intent of a finished step must not clear a newer intent that reused its id.
    f"""CREATE TABLE intents (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        action TEXT NOT NULL CHECK (action <> ''),
        boot_id TEXT NOT NULL,
        device_id TEXT NOT NULL,
        pci_address TEXT NOT NULL,
        iommu_group INTEGER NOT NULL,
        from_driver TEXT NOT NULL,
        to_driver TEXT NOT NULL,
        step TEXT NOT NULL,
        operation TEXT NOT NULL,
        created_at TEXT NOT NULL CHECK (created_at GLOB {_TIMESTAMP_GLOB})
    ) STRICT""",
    "CREATE INDEX intents_by_boot ON intents (boot_id)",
    """CREATE TABLE holds (
        unit TEXT PRIMARY KEY NOT NULL CHECK (unit <> ''),
        was_active INTEGER NOT NULL CHECK (was_active IN (0, 1)),
        holders INTEGER NOT NULL CHECK (holders >= 0),
        boot_id TEXT NOT NULL
    ) STRICT""",
    "CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL) STRICT",
)

_V2: Final[tuple[MigrationStep, ...]] = (
    "ALTER TABLE devices ADD COLUMN settled_through INTEGER NOT NULL DEFAULT 0 CHECK (settled_through >= 0)",
    "CREATE INDEX intents_by_device ON intents (device_id)",
    "CREATE INDEX intents_by_pci_address ON intents (pci_address)",
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "devices, attachments, intents, holds and meta", _V1),
    Migration(2, "devices.settled_through: the intent journal generation each device was settled at", _V2),
)
"""Every schema version in order: version N is MIGRATIONS[N - 1]. Read at open time (tests extend it)."""


def _checked_migrations() -> tuple[Migration, ...]:
    migrations = tuple(MIGRATIONS)
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(migrations) + 1)):
        raise RuntimeError(f"registry migrations must be numbered 1, 2, 3, ... in order, not {versions}")
    return migrations


def _problems(conn: sqlite3.Connection) -> list[str]:
    # integrity_check, not quick_check: only the full check sees an index that disagrees with its table.
    problems = [str(r[0]) for r in conn.execute("PRAGMA integrity_check").fetchall() if r[0] != "ok"]
    for table, rowid, parent, _ in conn.execute("PRAGMA foreign_key_check").fetchall():
        problems.append(f"{table} row {rowid} refers to a {parent} row that does not exist")
    return problems


def _fsync_path(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _new_private_file(path: Path) -> None:
    """An empty 0600 file at `path`, replacing a leftover. SQLite gives its -wal and -shm the same mode."""
    for leftover in (path, *(path.with_name(path.name + s) for s in ("-journal", "-wal", "-shm"))):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))


def _migrate(conn: sqlite3.Connection, path: Path, migrations: Sequence[Migration]) -> None:
    # foreign_keys cannot change inside a transaction, and a table rebuild needs it off.
    conn.execute("PRAGMA foreign_keys = OFF")
    for migration in migrations:
        try:
            conn.execute("BEGIN IMMEDIATE")
            # Read again under the write lock: another process may have migrated meanwhile.
            found = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if found >= migration.version:
                conn.execute("ROLLBACK")
                continue
            for step in migration.steps:
                if isinstance(step, str):
                    conn.execute(step)
                else:
                    step(conn)
            dangling = conn.execute("PRAGMA foreign_key_check").fetchall()
            if dangling:
                raise sqlite3.IntegrityError(f"{len(dangling)} rows would break a foreign key")
            conn.execute(f"PRAGMA user_version = {int(migration.version)}")
            conn.execute("COMMIT")
        except BaseException as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(e, sqlite3.Error):
                raise RegistryError(
                    f"upgrading the vfiod registry {path} to schema version {migration.version} "
                    f"({migration.summary}) failed: {e}. The file was left at version "
                    f"{migration.version - 1}; restart the vfiod that created it, or restore a backup"
                ) from e
            raise
        log.info("registry %s: schema version %d (%s)", path, migration.version, migration.summary)
    conn.execute("PRAGMA foreign_keys = ON")


def _create(path: Path, migrations: Sequence[Migration]) -> None:
    """Builds a complete database beside `path` and links it into place, so a file at `path` is always a
    finished vfiod registry and an empty or half-built one there is known to be damage."""
    wal = path.with_name(path.name + "-wal")
    with contextlib.suppress(FileNotFoundError):
        if wal.stat().st_size > 0:
            raise RegistryError(
                f"the vfiod registry {path} does not exist but its write-ahead log {wal} does: it belongs to "
                "a database that was moved or deleted without it, and SQLite would replay it into a new one. "
                f"Move {wal} (and {path.name}-shm) to wherever the database went, or delete them to start "
                "with an empty registry, then restart vfiod"
            )
    building = path.with_name(path.name + ".new")
    try:
        _new_private_file(building)
        conn = sqlite3.connect(building, isolation_level=None)
        try:
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            _migrate(conn, path, migrations)
        finally:
            conn.close()
        _fsync_path(building)
        try:
            # link, not rename: never replaces a database another process put there meanwhile.
            os.link(building, path)
        except FileExistsError:
            log.info("registry %s appeared while vfiod was creating it; using that one", path)
        building.unlink()
        _fsync_path(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except PermissionError as e:
        raise _access_denied(path, f"creating it was refused ({e.strerror})") from e
    except OSError as e:
        raise RegistryError(f"cannot create the vfiod registry {path}: {e.strerror or e}") from e
    except sqlite3.Error as e:
        raise RegistryError(f"cannot create the vfiod registry {path}: {e}") from e
    log.info("created an empty registry at %s (schema version %d)", path, migrations[-1].version)


def _examine(path: Path) -> bool:
    """Whether `path` exists; RegistryError when it does but cannot be a usable SQLite database. Looks at
    the bytes itself so a denied or truncated file is named as such rather than as an SQLite error code."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    except PermissionError as e:
        raise _access_denied(path, "permission denied") from e
    except OSError as e:
        raise _unusable(path, f"cannot be examined ({e.strerror or e})") from e
    if not stat.S_ISREG(st.st_mode):
        raise _unusable(path, "is not a regular file")
    try:
        with path.open("r+b") as f:
            header = f.read(_SQLITE_HEADER_SIZE)
    except PermissionError as e:
        raise _access_denied(path, "permission denied") from e
    except OSError as e:
        if e.errno == errno.EROFS:
            raise _access_denied(path, "the file system is read-only") from e
        raise _unusable(path, f"cannot be read ({e.strerror or e})") from e
    if not header:
        raise _unusable(
            path, "is empty (0 bytes): it was truncated, since vfiod only ever puts a complete database there"
        )
    if len(header) < len(_SQLITE_MAGIC):
        if _SQLITE_MAGIC.startswith(header):
            raise _unusable(path, f"is truncated ({st.st_size} bytes, shorter than the SQLite header)")
        raise _unusable(path, "is not an SQLite database (it does not start with the SQLite header)")
    if not header.startswith(_SQLITE_MAGIC):
        raise _unusable(path, "is not an SQLite database (it does not start with the SQLite header)")
    if len(header) < _SQLITE_HEADER_SIZE:
        raise _unusable(path, f"is truncated ({st.st_size} bytes, shorter than the SQLite header)")
    return True


def _schema(conn: sqlite3.Connection) -> dict[tuple[str, str], str]:
    rows = conn.execute("SELECT type, name, sql FROM sqlite_schema WHERE name NOT LIKE 'sqlite_%'").fetchall()
    return {(str(t), str(n)): " ".join(str(q or "").split()) for t, n, q in rows}


def _schema_differences(conn: sqlite3.Connection, applied: Sequence[Migration]) -> list[str]:
    """How the file's tables and indexes differ from what `applied` creates (an integrity check does not
    notice a dropped index or an altered table: both are a valid database, just not vfiod's)."""
    reference = sqlite3.connect(":memory:", isolation_level=None)
    try:
        for migration in applied:
            for step in migration.steps:
                if isinstance(step, str):
                    reference.execute(step)
                else:
                    step(reference)
        expected = _schema(reference)
    finally:
        reference.close()
    found = _schema(conn)
    out = [f"{t} {n} is missing" for t, n in sorted(expected.keys() - found.keys())]
    out += [f"{t} {n} is not vfiod's" for t, n in sorted(found.keys() - expected.keys())]
    out += [
        f"{t} {n} was changed"
        for (t, n), q in sorted(expected.items())
        if (t, n) in found and found[(t, n)] != q
    ]
    return out


def _open_failure(path: Path, e: sqlite3.Error) -> RegistryError:
    code = str(getattr(e, "sqlite_errorname", ""))
    if code == "SQLITE_NOTADB":
        return _unusable(path, f"is not an SQLite database ({e})")
    if code.startswith("SQLITE_CORRUPT"):
        return _unusable(path, f"is corrupt ({e}); it may have been truncated or overwritten")
    if code.startswith(("SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_READONLY", "SQLITE_AUTH")):
        return _access_denied(path, str(e))
    if code.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return RegistryError(
            f"the vfiod registry {path} stayed locked by another process ({e}); is another vfiod running? "
            "Stop it and restart this one"
        )
    if code.startswith("SQLITE_IOERR"):
        return _unusable(path, f"cannot be read ({e}); if the disk is healthy, the file is damaged")
    return _unusable(path, f"cannot be used ({e})")


def _runtime_failure(path: Path, e: sqlite3.Error) -> RegistryError:
    code = str(getattr(e, "sqlite_errorname", ""))
    if code.startswith("SQLITE_FULL"):
        hint = f"; the file system holding {path.parent} is full: free space"
    elif code.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        hint = "; another process keeps the database locked: is another vfiod running?"
    elif code.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return _unusable(path, f"became unreadable ({e})")
    elif code.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM")):
        return _access_denied(path, str(e))
    else:
        hint = ""
    return RegistryError(f"the vfiod registry {path} failed: {e}{hint}")


def _backup(conn: sqlite3.Connection, path: Path, version: int) -> Path:
    """A copy of the database as it is before an upgrade, for an administrator who has to go back."""
    dest = path.with_name(f"{path.name}.v{version}.bak")
    building = dest.with_name(dest.name + ".new")
    _new_private_file(building)
    copy = sqlite3.connect(building)
    try:
        conn.backup(copy)
    finally:
        copy.close()
    _fsync_path(building)
    building.replace(dest)
    _fsync_path(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    return dest


def _prepare(conn: sqlite3.Connection, path: Path, migrations: Sequence[Migration]) -> None:
    """Refuses a file that is not a vfiod registry this code can trust, then brings it to the latest
    schema. Reads only, until the file is known to be a healthy vfiod registry."""
    app_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    latest = migrations[-1].version
    if app_id != APPLICATION_ID:
        raise _unusable(
            path,
            f"is an SQLite database but not a vfiod registry (application id {app_id:#x}, "
            f"not {APPLICATION_ID:#x})",
        )
    if version > latest:
        saved = path.with_name(f"{path.name}.v{latest}.bak")
        way_back = (
            f"or stop vfiod and restore {saved}, the copy made before the upgrade (losing changes since)"
            if saved.exists()
            else "or move it aside and restart to start with an empty registry"
        )
        raise RegistryError(
            f"the vfiod registry {path} was created by a newer vfiod (schema version {version}; this vfiod "
            f"knows versions up to {latest}). Run that newer vfiod again, {way_back}"
        )
    if version < 1:
        raise _unusable(path, "has no schema (version 0), so it was not written by vfiod")
    problems = _problems(conn)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise _unusable(path, f"failed its integrity check ({shown})")
    differences = _schema_differences(conn, migrations[:version])
    if differences:
        raise _unusable(path, f"does not have the schema vfiod writes ({'; '.join(differences)})")
    mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
    if mode != "wal":
        raise RegistryError(
            f"the vfiod registry {path} cannot use write-ahead logging (journal mode stays {mode!r}); "
            f"keep {path.parent} on a local file system that supports shared memory maps"
        )
    conn.execute("PRAGMA synchronous = FULL")
    if version < latest:
        saved = _backup(conn, path, version)
        log.info("registry %s: saved schema version %d as %s before upgrading", path, version, saved)
        _migrate(conn, path, migrations[version:])
    conn.execute("PRAGMA foreign_keys = ON")
    if conn.execute("PRAGMA foreign_keys").fetchone()[0] != 1:
        raise RegistryError(f"SQLite {sqlite3.sqlite_version} cannot enforce foreign keys for {path}")


# --- the registry ---------------------------------------------------------------------------------------


class Registry:
    """The open registry. Use `Registry.open`; every method may be called from any thread."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn: sqlite3.Connection | None = conn
        self._path = path
        self._lock = threading.RLock()
        self._depth = 0  # transaction nesting of the thread holding _lock
        # The file this registry opened, to notice it being deleted or replaced under a running vfiod
        # (SQLite would go on writing to the unlinked inode, and every change would be lost at restart).
        self._watch = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        st = os.fstat(self._watch)
        self._identity = (st.st_dev, st.st_ino)
        self.file_problem: str | None = None

    def check_file(self) -> None:
        """RegistryError, from now until a restart, once the file was deleted or replaced: nothing written
        from then on would be found again."""
        if self.file_problem is None:
            problem = None
            try:
                st = os.stat(self._path)
                if (st.st_dev, st.st_ino) != self._identity:
                    problem = "was replaced by another file while vfiod was running"
                elif os.fstat(self._watch).st_nlink == 0:
                    problem = "was deleted while vfiod was running"
            except FileNotFoundError:
                deleted = os.fstat(self._watch).st_nlink == 0
                problem = f"was {'deleted' if deleted else 'moved away'} while vfiod was running"
            if problem is None:
                return
            self.file_problem = problem
            log.error("registry %s %s; refusing every change until vfiod is restarted", self._path, problem)
        raise RegistryError(
            f"the vfiod registry {self._path} {self.file_problem}: nothing written now would be kept, so "
            "vfiod refuses every change (reads go on). Put the file back or restart vfiod (systemctl "
            "restart vfiod), which opens whatever is at that path then"
        )

    @classmethod
    def open(cls, state_dir: Path, *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> Registry:
        """Opens `<state_dir>/vfiod.db`, creating it (and state_dir, 0700) on first use and upgrading an
        older schema after saving a copy as `vfiod.db.v<N>.bak`. RegistryError when the file cannot be
        trusted: it is never skipped, repaired or replaced."""
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise RegistryError(
                f"vfiod needs SQLite {'.'.join(map(str, MIN_SQLITE))} or newer; this Python uses "
                f"{sqlite3.sqlite_version}"
            )
        state_dir = Path(state_dir)
        path = state_dir / DB_NAME
        migrations = _checked_migrations()
        try:
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except PermissionError as e:
            raise _access_denied(path, f"its directory cannot be created or reached ({e.strerror})") from e
        except OSError as e:
            raise RegistryError(f"the state directory {state_dir} cannot be used: {e.strerror or e}") from e
        if not _examine(path):
            _create(path, migrations)
        # mode=rw: if the file vanished since it was examined, fail rather than create an empty database.
        uri = f"file:{urllib.parse.quote(os.fspath(path))}?mode=rw"
        try:
            conn = sqlite3.connect(
                uri, uri=True, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as e:
            raise _open_failure(path, e) from e
        try:
            _prepare(conn, path, migrations)
        except sqlite3.Error as e:
            conn.close()
            raise _open_failure(path, e) from e
        except BaseException:
            conn.close()
            raise
        return cls(conn, path)

    @property
    def path(self) -> Path:
        return self._path

    def close(self) -> None:
        with self._lock:
            if self._depth:
                raise RuntimeError("Registry.close() inside an open transaction")
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()
                os.close(self._watch)

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing ---------------------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RegistryError(f"the vfiod registry {self._path} is closed")
        return self._conn

    def _query(self, sql: str, params: Sequence[object] = ()) -> list[Any]:
        with self._lock:
            try:
                return self._db().execute(sql, params).fetchall()
            except sqlite3.Error as e:
                raise _runtime_failure(self._path, e) from e

    def _write(self, sql: str, params: Sequence[object] = ()) -> sqlite3.Cursor:
        assert self._depth > 0, "registry writes happen inside transaction()"
        try:
            return self._db().execute(sql, params)
        except sqlite3.IntegrityError as e:
            # Values are checked before they get here; a constraint that still fires is a caller's bug.
            raise ValueError(f"the registry refused the change: {e}") from e
        except sqlite3.Error as e:
            raise _runtime_failure(self._path, e) from e

    def _control(self, sql: str) -> None:
        try:
            self._db().execute(sql)
        except sqlite3.Error as e:
            raise _runtime_failure(self._path, e) from e

    def _abandon(self, sql: str) -> None:
        # Called while another exception propagates: that one is what the caller must see. SQLite may
        # already have rolled back by itself (disk full, I/O error), so nothing may be left to undo.
        conn = self._conn
        if conn is None or not conn.in_transaction:
            return
        try:
            conn.execute(sql)
        except sqlite3.Error:
            log.exception("registry %s: %s failed", self._path, sql)

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[Registry]:
        """Several reads that see one committed state: no transaction of another thread commits between
        them (every write holds the same lock for its whole transaction)."""
        with self._lock:
            yield self

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Registry]:
        """`with registry.transaction() as tx:` commits on success and rolls back on any exception.
        Nested use (including every mutator called inside) is a savepoint of the outer transaction."""
        with self._lock:
            if self._depth == 0:
                if self._conn is not None:
                    self.check_file()
                self._control("BEGIN IMMEDIATE")
                self._depth = 1
                try:
                    yield self
                except BaseException:
                    self._depth = 0
                    self._abandon("ROLLBACK")
                    raise
                self._depth = 0
                try:
                    self._control("COMMIT")
                except BaseException:
                    self._abandon("ROLLBACK")
                    raise
            else:
                savepoint = f"nested_{self._depth}"
                self._control(f"SAVEPOINT {savepoint}")
                self._depth += 1
                try:
                    yield self
                except BaseException:
                    self._depth -= 1
                    self._abandon(f"ROLLBACK TO {savepoint}")
                    self._abandon(f"RELEASE {savepoint}")
                    raise
                self._depth -= 1
                self._control(f"RELEASE {savepoint}")

    def _insert(self, table: str, values: Mapping[str, object]) -> int:
        columns = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        # Table and column names come from this module's constants, never from a caller.
        cursor = self._write(f"INSERT INTO {table} ({columns}) VALUES ({marks})", list(values.values()))  # noqa: S608
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def integrity_check(self) -> list[str]:
        """Problems SQLite finds in the file and dangling references; empty when all is well."""
        with self._lock:
            try:
                return _problems(self._db())
            except sqlite3.Error as e:
                raise _runtime_failure(self._path, e) from e

    # --- devices ----------------------------------------------------------------------------------------

    def _device_where(self, condition: str, *params: object) -> DeviceRow | None:
        rows = self._query(f"SELECT {', '.join(_DEVICE_COLUMNS)} FROM devices WHERE {condition}", params)  # noqa: S608
        return _device_from_sql(rows[0]) if rows else None

    def _refuse_clash(
        self, *, device_id: object = None, name: object = None, pci_address: object = None, keep: str = ""
    ) -> None:
        if name is not None:
            other = self._device_where("name = ?", name)
            if other is not None and other.id != keep:
                raise NameExists(
                    f"the name {name!r} is already taken by the device registered at {other.pci_address} "
                    f"(id {other.id})"
                )
        if pci_address is not None:
            other = self._device_where("pci_address = ?", pci_address)
            if other is not None and other.id != keep:
                raise AlreadyExists(
                    f"PCI address {pci_address} is already registered as device {other.name!r} "
                    f"(id {other.id})"
                )
        if device_id is not None:
            other = self._device_where("id = ?", device_id)
            if other is not None:
                raise AlreadyExists(
                    f"device id {device_id} is already taken by device {other.name!r} ({other.pci_address})"
                )

    def add_device(self, row: DeviceRow) -> DeviceRow:
        """Stores a new device and returns it as stored. NameExists / AlreadyExists name the device that
        already has the name / PCI address."""
        values = {c: _encode_device(c, getattr(row, c)) for c in _DEVICE_COLUMNS}
        with self.transaction():
            self._refuse_clash(device_id=values["id"], name=values["name"], pci_address=values["pci_address"])
            self._insert("devices", values)
            stored = self.get_device(row.id)
        assert stored is not None
        return stored

    def get_device(self, device_id: str) -> DeviceRow | None:
        return self._device_where("id = ?", device_id)

    def find(self, id_or_name: str) -> DeviceRow | None:
        """By id when the string has the id format, otherwise by name: names are never id-shaped."""
        if is_device_id(id_or_name):
            return self.get_device(id_or_name)
        return self._device_where("name = ?", id_or_name)

    def by_pci_address(self, address: str) -> DeviceRow | None:
        """ValueError (InvalidPciAddressText) when `address` is not a PCI address; case does not matter."""
        return self._device_where("pci_address = ?", str(PciAddress.parse(address)))

    def list_devices(self, tags: Mapping[str, str] | None = None) -> list[DeviceRow]:
        """Every device carrying all of `tags` with exactly those values, oldest first (ties by id)."""
        conditions: list[str] = []
        params: list[object] = []
        if tags:
            _tags_json(tags)
            for key, value in sorted(tags.items()):
                conditions.append(
                    "EXISTS (SELECT 1 FROM json_each(devices.tags) AS t"
                    " WHERE t.key = ? AND t.type = 'text' AND t.value = ?)"
                )
                params += [key, value]
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        rows = self._query(
            f"SELECT {', '.join(_DEVICE_COLUMNS)} FROM devices{where} ORDER BY created_at, id",  # noqa: S608
            params,
        )
        return [_device_from_sql(r) for r in rows]

    def update_device(self, device_id: str, /, **changes: object) -> DeviceRow:
        """Sets the given fields (DeviceRow names; `id` cannot change) and returns the updated row.
        ValueError for an unknown field or a bad value, NotFound, NameExists, AlreadyExists."""
        unknown = sorted(set(changes) - _DEVICE_UPDATABLE)
        if unknown:
            raise ValueError(
                f"update_device cannot set {', '.join(unknown)}; it can set "
                f"{', '.join(sorted(_DEVICE_UPDATABLE))}"
            )
        values = {c: _encode_device(c, v) for c, v in changes.items()}
        with self.transaction():
            if self.get_device(device_id) is None:
                raise NotFound(f"no device with id {device_id!r} is registered")
            if values:
                self._refuse_clash(
                    name=values.get("name"), pci_address=values.get("pci_address"), keep=device_id
                )
                assignments = ", ".join(f"{c} = ?" for c in values)
                self._write(f"UPDATE devices SET {assignments} WHERE id = ?", [*values.values(), device_id])  # noqa: S608
            updated = self.get_device(device_id)
        assert updated is not None
        return updated

    def remove_device(self, device_id: str) -> DeviceRow:
        """Deletes a device and returns what it was. InUse while it has an attachment (a reservation from
        an earlier boot counts), NotFound when there is no such device."""
        with self.transaction():
            row = self.get_device(device_id)
            if row is None:
                raise NotFound(f"no device with id {device_id!r} is registered")
            held = self.attachment_of_device(device_id)
            if held is not None:
                raise InUse(
                    f"device {row.name!r} ({row.pci_address}) is attached to instance {held.instance_id!r} "
                    f"(uid {held.owner_uid}); detach it before unregistering it"
                )
            self._write("DELETE FROM devices WHERE id = ?", (device_id,))
        return row

    # --- attachments ------------------------------------------------------------------------------------

    def _attachments_where(self, condition: str, *params: object) -> list[AttachmentRow]:
        rows = self._query(
            f"SELECT {', '.join(_ATTACHMENT_COLUMNS)} FROM attachments WHERE {condition} ORDER BY id",  # noqa: S608
            params,
        )
        return [_attachment_from_sql(r) for r in rows]

    def add_attachment(self, row: AttachmentRow) -> AttachmentRow:
        """Records that a device is given to an instance; `row.id` is ignored and the stored row, with its
        new id, is returned. NotFound for an unknown device, InUse when it is attached already (to anyone:
        an idempotent repeat is for the caller to recognise)."""
        values = {c: _encode_attachment(c, getattr(row, c)) for c in _ATTACHMENT_COLUMNS if c != "id"}
        _check_node_prev(values)
        with self.transaction():
            device = self.get_device(row.device_id)
            if device is None:
                raise NotFound(f"no device with id {row.device_id!r} is registered")
            held = self.attachment_of_device(row.device_id)
            if held is not None:
                raise InUse(
                    f"device {device.name!r} ({device.pci_address}) is already attached to instance "
                    f"{held.instance_id!r} (uid {held.owner_uid})"
                )
            new_id = self._insert("attachments", values)
            stored = self._attachments_where("id = ?", new_id)
        return stored[0]

    def update_attachment(self, device_id: str, /, **changes: object) -> AttachmentRow:
        """Sets fields of a device's attachment (not `id` or `device_id`), e.g. boot_id and attached_at when
        a reservation is bound again, or node_prev_* after the grant. NotFound when it has none."""
        unknown = sorted(set(changes) - _ATTACHMENT_UPDATABLE)
        if unknown:
            raise ValueError(
                f"update_attachment cannot set {', '.join(unknown)}; it can set "
                f"{', '.join(sorted(_ATTACHMENT_UPDATABLE))}"
            )
        values = {c: _encode_attachment(c, v) for c, v in changes.items()}
        with self.transaction():
            current = self.attachment_of_device(device_id)
            if current is None:
                raise NotFound(f"device {device_id!r} has no attachment")
            _check_node_prev({c: values.get(c, getattr(current, c)) for c in _NODE_PREV})
            if values:
                assignments = ", ".join(f"{c} = ?" for c in values)
                self._write(
                    f"UPDATE attachments SET {assignments} WHERE device_id = ?",  # noqa: S608
                    [*values.values(), device_id],
                )
            updated = self.attachment_of_device(device_id)
        assert updated is not None
        return updated

    def attachments_of_instance(self, instance_id: str) -> list[AttachmentRow]:
        return self._attachments_where("instance_id = ?", instance_id)

    def attachment_of_device(self, device_id: str) -> AttachmentRow | None:
        found = self._attachments_where("device_id = ?", device_id)
        return found[0] if found else None

    def attachments_in_group(self, group: int) -> list[AttachmentRow]:
        return self._attachments_where("iommu_group = ?", group)

    def all_attachments(self) -> list[AttachmentRow]:
        return self._attachments_where("1")

    def remove_attachment(self, device_id: str) -> AttachmentRow | None:
        """Deletes a device's attachment and returns it; None when it had none (Detach is idempotent)."""
        with self.transaction():
            current = self.attachment_of_device(device_id)
            if current is not None:
                self._write("DELETE FROM attachments WHERE device_id = ?", (device_id,))
        return current

    # --- the intent journal -----------------------------------------------------------------------------

    def begin_intent(
        self,
        *,
        action: str,
        boot_id: str,
        device_id: str = "",
        pci_address: str = "",
        iommu_group: int = -1,
        from_driver: str | None = "",
        to_driver: str | None = "",
        step: str = "",
        operation: str = "",
    ) -> int:
        """Journals a kernel step about to happen and returns its id. Call it inside the transaction that
        makes the state change it accompanies; clear it when the step is done (or rolled back)."""
        if not action:
            raise ValueError("an intent needs an action")
        values: dict[str, object] = {
            "action": _text("action", action),
            "boot_id": _text("boot_id", boot_id),
            "device_id": _text("device_id", device_id),
            "pci_address": _pci("pci_address", pci_address) if pci_address else "",
            "iommu_group": _integer("iommu_group", iommu_group, minimum=-1),
            "from_driver": _text("from_driver", from_driver or ""),
            "to_driver": _text("to_driver", to_driver or ""),
            "step": _text("step", step),
            "operation": _text("operation", operation),
            "created_at": format_timestamp(utc_now()),
        }
        with self.transaction():
            return self._insert("intents", values)

    def set_intent_step(self, intent_id: int, step: str) -> None:
        """Records progress through a multi-step action without a new intent. NotFound if cleared."""
        with self.transaction():
            if (
                self._write(
                    "UPDATE intents SET step = ? WHERE id = ?", (_text("step", step), intent_id)
                ).rowcount
                == 0
            ):
                raise NotFound(f"intent {intent_id} is not open")

    def clear_intent(self, intent_id: int) -> bool:
        """Closes an intent; False when it was not open (already cleared or dropped)."""
        with self.transaction():
            return self._write("DELETE FROM intents WHERE id = ?", (intent_id,)).rowcount > 0

    def open_intents(self, boot_id: str | None = None) -> list[IntentRow]:
        """Open intents, oldest first; only those of `boot_id` when given."""
        condition, params = ("boot_id = ?", (boot_id,)) if boot_id is not None else ("1", ())
        rows = self._query(
            f"SELECT {', '.join(_INTENT_COLUMNS)} FROM intents WHERE {condition} ORDER BY id",  # noqa: S608
            params,
        )
        return [_intent_from_sql(r) for r in rows]

    def intents_of_device(self, device_id: str, pci_address: str) -> list[IntentRow]:
        """Open intents naming the device (by id, or by address for step-level intents), oldest first."""
        rows = self._query(
            f"SELECT {', '.join(_INTENT_COLUMNS)} FROM intents "  # noqa: S608
            "WHERE (device_id = ? AND device_id <> '') OR (pci_address = ? AND pci_address <> '') "
            "ORDER BY id",
            (device_id, pci_address),
        )
        return [_intent_from_sql(r) for r in rows]

    def settle_intents(self, device_id: str) -> list[IntentRow]:
        """The device is settled (its stored state is what the kernel shows and nothing is pending): close
        every open intent naming it and move its generation past every intent written so far. Returns the
        intents it closed."""
        with self.transaction():
            row = self.get_device(device_id)
            if row is None:
                return []
            closed = self.intents_of_device(device_id, str(row.pci_address))
            for intent in closed:
                self._write("DELETE FROM intents WHERE id = ?", (intent.id,))
            seq = self._query("SELECT seq FROM sqlite_sequence WHERE name = 'intents'")
            latest = int(seq[0][0]) if seq else 0
            if latest > row.settled_through:
                self._write("UPDATE devices SET settled_through = ? WHERE id = ?", (latest, device_id))
        return closed

    def drop_intents_of_other_boots(self, boot_id: str) -> list[IntentRow]:
        """Deletes and returns the intents of every other boot: the kernel state they describe is gone, so
        their devices must be read again from the kernel."""
        with self.transaction():
            stale = [i for i in self.open_intents() if i.boot_id != boot_id]
            self._write("DELETE FROM intents WHERE boot_id <> ?", (boot_id,))
        return stale

    # --- persistence-unit holds -------------------------------------------------------------------------

    def get_hold(self, unit: str) -> HoldRow | None:
        rows = self._query(f"SELECT {', '.join(_HOLD_COLUMNS)} FROM holds WHERE unit = ?", (unit,))  # noqa: S608
        return _hold_from_sql(rows[0]) if rows else None

    def put_hold(self, row: HoldRow) -> None:
        """Creates or replaces the hold on `row.unit`."""
        values = (
            _text("unit", row.unit),
            _flag("was_active", row.was_active),
            _integer("holders", row.holders, minimum=0),
            _text("boot_id", row.boot_id),
        )
        with self.transaction():
            self._write(
                "INSERT INTO holds (unit, was_active, holders, boot_id) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (unit) DO UPDATE SET was_active = excluded.was_active,"
                " holders = excluded.holders, boot_id = excluded.boot_id",
                values,
            )

    def delete_hold(self, unit: str) -> bool:
        with self.transaction():
            return self._write("DELETE FROM holds WHERE unit = ?", (unit,)).rowcount > 0

    def all_holds(self) -> list[HoldRow]:
        rows = self._query(f"SELECT {', '.join(_HOLD_COLUMNS)} FROM holds ORDER BY unit")  # noqa: S608
        return [_hold_from_sql(r) for r in rows]

    # --- meta -------------------------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction():
            self._write(
                "INSERT INTO meta (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (_text("key", key), _text("value", value)),
            )

    def delete_meta(self, key: str) -> bool:
        with self.transaction():
            return self._write("DELETE FROM meta WHERE key = ?", (key,)).rowcount > 0
