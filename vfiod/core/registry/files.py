"""The registry's file: refusing one vfiod cannot fully trust, creating one atomically, saving a copy
before an upgrade and running the migrations.

A database vfiod cannot fully trust is refused with a `RegistryError` telling the administrator what is
wrong and what to do. Nothing here skips a record it cannot read, repairs a file or recreates one over a
broken one: hypeman skipped JSON records it could not load and then let the same PCI address be registered
a second time.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from vfiod.core.errors import Failed
from vfiod.core.registry import schema
from vfiod.core.registry.schema import Migration

log = logging.getLogger("vfiod.registry")

DB_NAME: Final = "vfiod.db"
# "vfio" in ASCII, stored in the SQLite header: tells a vfiod registry from any other SQLite file.
APPLICATION_ID: Final = 0x7666696F

_SQLITE_MAGIC: Final = b"SQLite format 3\x00"
_SQLITE_HEADER_SIZE: Final = 100


class RegistryError(Failed):
    """The registry database cannot be used; the message names the file, the problem and the remedy.

    A `Failed` like any other: a manager call that meets it mid-way rolls the kernel back as it does for a
    kernel refusal, and the caller gets this message (which file, what to free or fix)."""


def unusable(path: Path, what: str) -> RegistryError:
    return RegistryError(
        f"the vfiod registry {path} {what}. Move it aside (with any {path.name}-wal and {path.name}-shm next "
        "to it) and restart vfiod to start with an empty registry, or restore a backup; vfiod will re-read "
        "every device from the kernel, but the registrations, names, tags and attachments kept in the file "
        "will have to be made again"
    )


def access_denied(path: Path, detail: str) -> RegistryError:
    return RegistryError(
        f"the vfiod registry {path} cannot be opened: {detail}. vfiod must be able to read and write it and "
        f"to create files next to it in {path.parent}: check the owner and mode of both (root, 0600 for the "
        "file, 0700 for the directory) and that the file system is mounted read-write, then restart vfiod"
    )


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
            schema.apply(conn, migration)
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


def create(path: Path, migrations: Sequence[Migration]) -> None:
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
        raise access_denied(path, f"creating it was refused ({e.strerror})") from e
    except OSError as e:
        raise RegistryError(f"cannot create the vfiod registry {path}: {e.strerror or e}") from e
    except sqlite3.Error as e:
        raise RegistryError(f"cannot create the vfiod registry {path}: {e}") from e
    log.info("created an empty registry at %s (schema version %d)", path, migrations[-1].version)


def examine(path: Path) -> bool:
    """Whether `path` exists; RegistryError when it does but cannot be a usable SQLite database. Looks at
    the bytes itself so a denied or truncated file is named as such rather than as an SQLite error code."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    except PermissionError as e:
        raise access_denied(path, "permission denied") from e
    except OSError as e:
        raise unusable(path, f"cannot be examined ({e.strerror or e})") from e
    if not stat.S_ISREG(st.st_mode):
        raise unusable(path, "is not a regular file")
    try:
        with path.open("r+b") as f:
            header = f.read(_SQLITE_HEADER_SIZE)
    except PermissionError as e:
        raise access_denied(path, "permission denied") from e
    except OSError as e:
        if e.errno == errno.EROFS:
            raise access_denied(path, "the file system is read-only") from e
        raise unusable(path, f"cannot be read ({e.strerror or e})") from e
    if not header:
        raise unusable(
            path, "is empty (0 bytes): it was truncated, since vfiod only ever puts a complete database there"
        )
    if len(header) < len(_SQLITE_MAGIC):
        if _SQLITE_MAGIC.startswith(header):
            raise unusable(path, f"is truncated ({st.st_size} bytes, shorter than the SQLite header)")
        raise unusable(path, "is not an SQLite database (it does not start with the SQLite header)")
    if not header.startswith(_SQLITE_MAGIC):
        raise unusable(path, "is not an SQLite database (it does not start with the SQLite header)")
    if len(header) < _SQLITE_HEADER_SIZE:
        raise unusable(path, f"is truncated ({st.st_size} bytes, shorter than the SQLite header)")
    return True


def open_failure(path: Path, e: sqlite3.Error) -> RegistryError:
    code = str(getattr(e, "sqlite_errorname", ""))
    if code == "SQLITE_NOTADB":
        return unusable(path, f"is not an SQLite database ({e})")
    if code.startswith("SQLITE_CORRUPT"):
        return unusable(path, f"is corrupt ({e}); it may have been truncated or overwritten")
    if code.startswith(("SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_READONLY", "SQLITE_AUTH")):
        return access_denied(path, str(e))
    if code.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return RegistryError(
            f"the vfiod registry {path} stayed locked by another process ({e}); is another vfiod running? "
            "Stop it and restart this one"
        )
    if code.startswith("SQLITE_IOERR"):
        return unusable(path, f"cannot be read ({e}); if the disk is healthy, the file is damaged")
    return unusable(path, f"cannot be used ({e})")


def runtime_failure(path: Path, e: sqlite3.Error) -> RegistryError:
    code = str(getattr(e, "sqlite_errorname", ""))
    if code.startswith("SQLITE_FULL"):
        hint = f"; the file system holding {path.parent} is full: free space"
    elif code.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        hint = "; another process keeps the database locked: is another vfiod running?"
    elif code.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return unusable(path, f"became unreadable ({e})")
    elif code.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM")):
        return access_denied(path, str(e))
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


def prepare(conn: sqlite3.Connection, path: Path, migrations: Sequence[Migration]) -> None:
    """Refuses a file that is not a vfiod registry this code can trust, then brings it to the latest
    schema. Reads only, until the file is known to be a healthy vfiod registry."""
    app_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    latest = migrations[-1].version
    if app_id != APPLICATION_ID:
        raise unusable(
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
        raise unusable(path, "has no schema (version 0), so it was not written by vfiod")
    found = schema.problems(conn)
    if found:
        shown = "; ".join(found[:5]) + (f"; and {len(found) - 5} more" if len(found) > 5 else "")
        raise unusable(path, f"failed its integrity check ({shown})")
    differences = schema.differences(conn, migrations[:version])
    if differences:
        raise unusable(path, f"does not have the schema vfiod writes ({'; '.join(differences)})")
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
