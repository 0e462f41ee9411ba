"""The open registry connection: one per daemon, shared by every thread, and its transactions.

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
import logging
import os
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Self

from vfiod import phases
from vfiod.core.registry import files, schema
from vfiod.core.registry.files import DB_NAME, RegistryError

log = logging.getLogger("vfiod.registry")

DEFAULT_BUSY_TIMEOUT: Final = 10.0
# STRICT tables (3.37) and the JSON functions built in (3.38; Debian 12 ships 3.40).
MIN_SQLITE: Final = (3, 38, 0)


class Store:
    """The open registry file. Use `Registry.open`; every method may be called from any thread."""

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
        self._file_problem: str | None = None

    def _check_file(self) -> None:
        """RegistryError, from now until a restart, once the file was deleted or replaced: nothing written
        from then on would be found again."""
        if self._file_problem is None:
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
            self._file_problem = problem
            log.error("registry %s %s; refusing every change until vfiod is restarted", self._path, problem)
        raise RegistryError(
            f"the vfiod registry {self._path} {self._file_problem}: nothing written now would be kept, so "
            "vfiod refuses every change (reads go on). Put the file back or restart vfiod (systemctl "
            "restart vfiod), which opens whatever is at that path then"
        )

    @classmethod
    def open(cls, state_dir: Path, *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> Self:
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
        migrations = schema.checked_migrations()
        try:
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except PermissionError as e:
            raise files.access_denied(
                path, f"its directory cannot be created or reached ({e.strerror})"
            ) from e
        except OSError as e:
            raise RegistryError(f"the state directory {state_dir} cannot be used: {e.strerror or e}") from e
        if not files.examine(path):
            files.create(path, migrations)
        # mode=rw: if the file vanished since it was examined, fail rather than create an empty database.
        uri = f"file:{urllib.parse.quote(os.fspath(path))}?mode=rw"
        try:
            conn = sqlite3.connect(
                uri, uri=True, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as e:
            raise files.open_failure(path, e) from e
        try:
            files.prepare(conn, path, migrations)
        except sqlite3.Error as e:
            conn.close()
            raise files.open_failure(path, e) from e
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

    def __enter__(self) -> Self:
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
                raise files.runtime_failure(self._path, e) from e

    def _write(self, sql: str, params: Sequence[object] = ()) -> sqlite3.Cursor:
        assert self._depth > 0, "registry writes happen inside transaction()"
        try:
            return self._db().execute(sql, params)
        except sqlite3.IntegrityError as e:
            # Values are checked before they get here; a constraint that still fires is a caller's bug.
            raise ValueError(f"the registry refused the change: {e}") from e
        except sqlite3.Error as e:
            raise files.runtime_failure(self._path, e) from e

    def _control(self, sql: str) -> None:
        try:
            self._db().execute(sql)
        except sqlite3.Error as e:
            raise files.runtime_failure(self._path, e) from e

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
    def snapshot(self) -> Iterator[Self]:
        """Several reads that see one committed state: no transaction of another thread commits between
        them (every write holds the same lock for its whole transaction)."""
        with self._lock:
            yield self

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Self]:
        """`with registry.transaction() as tx:` commits on success and rolls back on any exception.
        Nested use (including every mutator called inside) is a savepoint of the outer transaction."""
        with self._lock:
            if self._depth == 0:
                if self._conn is not None:
                    self._check_file()
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
                    with phases.timed("registry commit"):  # SQLite's fsync of the journal
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
