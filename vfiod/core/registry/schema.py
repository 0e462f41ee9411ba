"""The registry's schema: every version as a forward migration, and the comparison of a file's tables with
what those migrations create.

Version 1 (vfiod 0.1): devices, attachments, the intent journal, persistence holds, meta. Version 2: each
device's generation in the journal (`settled_through`). Version 3: the journal's overloaded `step` column
becomes explicit columns (`kind`, `native_module`, the granted node's previous owner, a vGPU claim's
parent, uuid and type); devices lose what is derivable (`type`, `previous_state`), may have no PCI address
(an mdev vGPU) and may be `creating` or `destroying`; vGPUs and per-parent failure counters get their
tables. Version 4: each attachment's hand-over mode (`handoff`: `node`, the group node given to the owner,
or `fd`, descriptors opened by vfiod and the nodes left as they are).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

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


def _pci_check(column: str) -> str:
    """`column` is a canonical PCI address whose domain has four hex digits, or up to eight above ffff
    (Intel VMD): `:bb:ss.f` is the last eight characters, the domain everything before them."""
    domain = f"substr({column}, 1, length({column}) - 8)"
    return (
        f"({column} GLOB '*:[0-9a-f][0-9a-f]:[0-9a-f][0-9a-f].[0-7]' AND length({domain}) BETWEEN 4 AND 8 "
        f"AND {domain} NOT GLOB '*[^0-9a-f]*' AND (length({domain}) = 4 OR {domain} NOT GLOB '0*'))"
    )


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

# The sysfs writes version 2 journaled as step intents (their `step` repeated their `action`).
_V2_WRITE_ACTIONS: Final = frozenset({"override", "unbind", "probe", "clear-override"})
# The mode a group node has when nothing changed it: what a version 2 grant intent that cannot be read
# falls back to (start-up then gives the node back to root 0600, as it does for any unnamed owner).
_V2_KERNEL_DEFAULT_NODE: Final = (0, 0, 0o600)


def _v3_intents(conn: sqlite3.Connection) -> None:
    """Version 2's intents into version 3's table: `step` held the native module of an operation's
    function, the previous `uid:gid:mode` (octal) of a granted node, or the step's own action."""
    seq = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'intents'").fetchone()
    rows = conn.execute(
        "SELECT id, action, boot_id, operation, created_at, device_id, pci_address, iommu_group, "
        "from_driver, to_driver, step FROM intents ORDER BY id"
    ).fetchall()
    for id_, action, boot, operation, created, device, pci, group, from_, to, step in rows:
        node: tuple[int, int, int] | None = None
        module = ""
        if action == "grant":
            kind = "grant"
            try:
                uid, gid, mode = str(step).split(":")
                node = (int(uid), int(gid), int(mode, 8))
            except ValueError:
                node = _V2_KERNEL_DEFAULT_NODE
        elif action in _V2_WRITE_ACTIONS and step == action:
            kind = "write"
        else:
            kind, module = "function", str(step)
        conn.execute(
            "INSERT INTO intents_v3 (id, kind, action, boot_id, operation, created_at, device_id, "
            "pci_address, iommu_group, from_driver, to_driver, value, native_module, node_uid, node_gid, "
            "node_mode, vgpu_parent, vgpu_uuid, vgpu_type) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, '', ?, ?, ?, ?, '', '', '')",
            (
                id_,
                kind,
                action,
                boot,
                operation,
                created,
                device,
                pci,
                group,
                from_,
                to,
                module,
                *(node or (None, None, None)),
            ),
        )
    conn.execute("DROP TABLE intents")
    conn.execute("ALTER TABLE intents_v3 RENAME TO intents")
    # Device generations (settled_through) are intent ids: the next id must stay above every one handed
    # out, or a new intent would count as settled and never be replayed.
    conn.execute("DELETE FROM sqlite_sequence WHERE name = 'intents'")
    if seq is not None:
        conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('intents', ?)", (int(seq[0]),))


_V3: Final[tuple[MigrationStep, ...]] = (
    f"""CREATE TABLE devices_v3 (
        id TEXT PRIMARY KEY NOT NULL
            CHECK (length(id) = 24 AND id GLOB '[a-z]*' AND id NOT GLOB '*[^a-z0-9]*'),
        name TEXT NOT NULL UNIQUE CHECK (name <> ''),
        pci_address TEXT NOT NULL CHECK (pci_address = '' OR {_pci_check("pci_address")}),
        vendor_id TEXT NOT NULL,
        device_id TEXT NOT NULL,
        class_code TEXT NOT NULL,
        subsystem_vendor_id TEXT NOT NULL,
        subsystem_device_id TEXT NOT NULL,
        iommu_group INTEGER NOT NULL CHECK (iommu_group >= -1),
        native_driver TEXT NOT NULL,
        native_module TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('host', 'binding', 'vfio', 'attached', 'releasing', 'stuck',
                                             'missing', 'creating', 'destroying')),
        bound_by_vfiod INTEGER NOT NULL CHECK (bound_by_vfiod IN (0, 1)),
        created_at TEXT NOT NULL CHECK (created_at GLOB {_TIMESTAMP_GLOB}),
        tags TEXT NOT NULL CHECK (json_valid(tags) AND json_type(tags) = 'object'),
        vendor_name TEXT NOT NULL,
        device_name TEXT NOT NULL,
        settled_through INTEGER NOT NULL CHECK (settled_through >= 0)
    ) STRICT""",
    "INSERT INTO devices_v3 SELECT id, name, pci_address, vendor_id, device_id, class_code, "
    "subsystem_vendor_id, subsystem_device_id, iommu_group, native_driver, native_module, state, "
    "bound_by_vfiod, created_at, tags, vendor_name, device_name, settled_through FROM devices",
    "DROP TABLE devices",
    "ALTER TABLE devices_v3 RENAME TO devices",
    # Unique among devices that have one: an mdev vGPU has no PCI address.
    "CREATE UNIQUE INDEX devices_by_pci_address ON devices (pci_address) WHERE pci_address <> ''",
    f"""CREATE TABLE vgpus (
        device_id TEXT PRIMARY KEY NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
        uuid TEXT NOT NULL UNIQUE CHECK (length(uuid) = 36 AND uuid NOT GLOB '*[^0-9a-f-]*'),
        framework TEXT NOT NULL CHECK (framework IN ('mdev', 'vendor-vfio')),
        type_id TEXT NOT NULL CHECK (type_id <> ''),
        profile TEXT NOT NULL CHECK (profile <> ''),
        parent TEXT NOT NULL CHECK (parent <> ''),
        physical_gpu TEXT NOT NULL CHECK (physical_gpu = '' OR {_pci_check("physical_gpu")}),
        managed INTEGER NOT NULL CHECK (managed IN (0, 1))
    ) STRICT""",
    "CREATE INDEX vgpus_by_parent ON vgpus (parent)",
    f"""CREATE TABLE parent_health (
        parent TEXT PRIMARY KEY NOT NULL CHECK (parent <> ''),
        failures INTEGER NOT NULL CHECK (failures >= 0),
        last_failure TEXT NOT NULL,
        since TEXT NOT NULL CHECK (since GLOB {_TIMESTAMP_GLOB})
    ) STRICT""",
    f"""CREATE TABLE intents_v3 (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL CHECK (kind IN ('function', 'write', 'grant', 'claim')),
        action TEXT NOT NULL CHECK (action <> ''),
        boot_id TEXT NOT NULL,
        operation TEXT NOT NULL,
        created_at TEXT NOT NULL CHECK (created_at GLOB {_TIMESTAMP_GLOB}),
        device_id TEXT NOT NULL,
        pci_address TEXT NOT NULL,
        iommu_group INTEGER NOT NULL CHECK (iommu_group >= -1),
        from_driver TEXT NOT NULL,
        to_driver TEXT NOT NULL,
        value TEXT NOT NULL,
        native_module TEXT NOT NULL,
        node_uid INTEGER CHECK (node_uid >= 0),
        node_gid INTEGER CHECK (node_gid >= 0),
        node_mode INTEGER CHECK (node_mode >= 0),
        vgpu_parent TEXT NOT NULL,
        vgpu_uuid TEXT NOT NULL,
        vgpu_type TEXT NOT NULL,
        CHECK ((kind = 'grant') = (node_uid IS NOT NULL AND node_gid IS NOT NULL AND node_mode IS NOT NULL)),
        CHECK (kind = 'grant' OR (node_uid IS NULL AND node_gid IS NULL AND node_mode IS NULL)),
        CHECK ((kind = 'claim') = (vgpu_uuid <> ''))
    ) STRICT""",
    _v3_intents,
    "CREATE INDEX intents_by_boot ON intents (boot_id)",
    "CREATE INDEX intents_by_device ON intents (device_id)",
    "CREATE INDEX intents_by_pci_address ON intents (pci_address)",
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "devices, attachments, intents, holds and meta", _V1),
    Migration(2, "devices.settled_through: the intent journal generation each device was settled at", _V2),
    Migration(
        3,
        "explicit intent columns instead of step; vGPUs, their claims and per-parent failure counters; "
        "devices without type and previous_state",
        _V3,
    ),
    Migration(
        4,
        "attachments.handoff: node (the group node given to the owner) or fd (descriptors; nodes untouched)",
        (
            "ALTER TABLE attachments ADD COLUMN handoff TEXT NOT NULL DEFAULT 'node' "
            "CHECK (handoff IN ('node', 'fd'))",
        ),
    ),
)
"""Every schema version in order: version N is MIGRATIONS[N - 1]. Read at open time (tests extend it)."""


def checked_migrations() -> tuple[Migration, ...]:
    migrations = tuple(MIGRATIONS)
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(migrations) + 1)):
        raise RuntimeError(f"registry migrations must be numbered 1, 2, 3, ... in order, not {versions}")
    return migrations


def apply(conn: sqlite3.Connection, migration: Migration) -> None:
    for step in migration.steps:
        if isinstance(step, str):
            conn.execute(step)
        else:
            step(conn)


def problems(conn: sqlite3.Connection) -> list[str]:
    """What SQLite's full integrity check and the foreign key check find; empty when all is well."""
    # integrity_check, not quick_check: only the full check sees an index that disagrees with its table.
    found = [str(r[0]) for r in conn.execute("PRAGMA integrity_check").fetchall() if r[0] != "ok"]
    for table, rowid, parent, _ in conn.execute("PRAGMA foreign_key_check").fetchall():
        found.append(f"{table} row {rowid} refers to a {parent} row that does not exist")
    return found


def _schema(conn: sqlite3.Connection) -> dict[tuple[str, str], str]:
    rows = conn.execute("SELECT type, name, sql FROM sqlite_schema WHERE name NOT LIKE 'sqlite_%'").fetchall()
    return {(str(t), str(n)): " ".join(str(q or "").split()) for t, n, q in rows}


def differences(conn: sqlite3.Connection, applied: Sequence[Migration]) -> list[str]:
    """How the file's tables and indexes differ from what `applied` creates (an integrity check does not
    notice a dropped index or an altered table: both are a valid database, just not vfiod's)."""
    reference = sqlite3.connect(":memory:", isolation_level=None)
    try:
        for migration in applied:
            apply(reference, migration)
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
