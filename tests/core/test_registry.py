"""Tests for vfiod.core.registry: the typed API, transactions, refusal of untrustworthy files, migrations,
threads, and crash safety under SIGKILL."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import shutil
import signal
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import pytest

from vfiod.core.errors import AlreadyExists, InUse, NameExists, NotFound
from vfiod.core.registry import (
    APPLICATION_ID,
    AttachmentRow,
    DeviceRow,
    HoldRow,
    Migration,
    Registry,
    RegistryError,
    VgpuRow,
    schema,
)
from vfiod.core.validation import new_device_id
from vfiod.host.backend import NodeOwner
from vfiod.host.pciaddr import PciAddress

RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
REMEDY = ("move it aside", "restore a backup", "re-read every device from the kernel")
FORK = multiprocessing.get_context("fork")


def make_device(n: int = 0, **overrides: Any) -> DeviceRow:
    """Device number `n` with a unique name and PCI address."""
    values: dict[str, Any] = {
        "id": new_device_id(),
        "name": f"dev-{n}",
        "pci_address": PciAddress.parse(f"0000:{(n >> 8) & 0xFF:02x}:{(n >> 3) & 0x1F:02x}.{n & 7}"),
        "vendor_id": "10de",
        "device_id": "27b8",
        "class_code": "030200",
        "iommu_group": n,
    }
    values.update(overrides)
    return DeviceRow(**values)


def attach(device: DeviceRow | VgpuRow, instance: str = "vm-1", **overrides: Any) -> AttachmentRow:
    values: dict[str, Any] = {
        "device_id": device.id,
        "instance_id": instance,
        "owner_uid": 1000,
        "iommu_group": device.iommu_group,
        "boot_id": "boot-a",
    }
    values.update(overrides)
    return AttachmentRow(**values)


def function_intent(r: Registry, dev: DeviceRow, action: str = "bind", boot_id: str = "b") -> int:
    """Journals that operation `op-<action>` moves `dev` from nvidia to vfio-pci."""
    return r.journal_function(
        action=action,
        boot_id=boot_id,
        operation=f"op-{action}",
        device_id=dev.id,
        pci_address=str(dev.pci_address),
        iommu_group=dev.iommu_group,
        from_driver="nvidia",
        native_module="nvidia",
        to_driver="vfio-pci",
    )


def problems(r: Registry) -> list[str]:
    """What SQLite's integrity and foreign key checks find in an open registry."""
    with r.snapshot():
        return schema.problems(r._db())


def raw(path: Path) -> sqlite3.Connection:
    """A plain connection that bypasses every check the registry makes."""
    return sqlite3.connect(path, isolation_level=None)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def reg(state: Path) -> Iterator[Registry]:
    r = Registry.open(state)
    yield r
    r.close()


def existing_db(state: Path, devices: int = 1) -> Path:
    """A closed registry holding `devices` devices; returns the database path."""
    with Registry.open(state) as r:
        for n in range(devices):
            r.add_device(make_device(n, tags={"pad": "x" * 200}))
    return state / "vfiod.db"


# --- opening ---------------------------------------------------------------------------------------------


def test_open_creates_a_private_wal_database_with_the_pragmas(reg: Registry, state: Path) -> None:
    path = state / "vfiod.db"
    assert reg.path == path
    assert path.stat().st_mode & 0o777 == 0o600
    assert state.stat().st_mode & 0o777 == 0o700
    assert not (state / "vfiod.db.new").exists()
    conn = reg._conn
    assert conn is not None
    assert conn.isolation_level is None
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 10_000
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(schema.MIGRATIONS)
    assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    assert problems(reg) == []


def test_reopen_keeps_everything(state: Path) -> None:
    with Registry.open(state) as r:
        dev = r.add_device(make_device(tags={"team": "ml"}))
        r.add_attachment(attach(dev))
        intent = function_intent(r, dev)
        r.put_hold(HoldRow("nvidia-persistenced.service", True, 1, "b"))
        r.set_meta("last_boot_id", "b")
    with Registry.open(state) as r:
        assert r.get_device(dev.id) == dev
        assert r.attachment_of_device(dev.id) is not None
        assert [i.id for i in r.open_intents()] == [intent]
        assert r.get_hold("nvidia-persistenced.service") == HoldRow(
            "nvidia-persistenced.service", True, 1, "b"
        )
        assert r.get_meta("last_boot_id") == "b"


def test_leftover_of_an_interrupted_creation_is_discarded(state: Path) -> None:
    state.mkdir()
    (state / "vfiod.db.new").write_bytes(b"half-built")
    with Registry.open(state) as r:
        assert r.list_devices() == []
    assert not (state / "vfiod.db.new").exists()


def test_newer_schema_is_refused_and_left_alone(state: Path) -> None:
    path = existing_db(state)
    with contextlib.closing(raw(path)) as conn:
        conn.execute("PRAGMA user_version = 99")
    before = path.read_bytes()
    with pytest.raises(RegistryError, match="created by a newer vfiod") as err:
        Registry.open(state)
    assert str(path) in str(err.value)
    assert "schema version 99" in str(err.value)
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    "content",
    [
        b"this is not a database\n" * 200,
        b"SQLite format 3\x00" + b"\xa5" * 8000,  # the right header over garbage
        b"{}",
    ],
    ids=["text", "sqlite-header-over-garbage", "tiny"],
)
def test_garbage_file_is_refused_with_a_remedy(state: Path, content: bytes) -> None:
    state.mkdir()
    path = state / "vfiod.db"
    path.write_bytes(content)
    with pytest.raises(RegistryError) as err:
        Registry.open(state)
    message = str(err.value)
    assert str(path) in message
    assert "SQLite" in message or "corrupt" in message
    for words in REMEDY:
        assert words in message.lower()
    assert path.read_bytes() == content
    assert sorted(p.name for p in state.iterdir()) == ["vfiod.db"]


@pytest.mark.parametrize("keep", ["half", 4096, 50, 10, 0])
def test_truncated_database_is_refused(state: Path, keep: int | str) -> None:
    path = existing_db(state, devices=40)
    size = path.stat().st_size // 2 if keep == "half" else int(keep)
    os.truncate(path, size)
    with pytest.raises(RegistryError) as err:
        Registry.open(state)
    message = str(err.value)
    assert str(path) in message
    assert any(w in message for w in ("truncated", "corrupt", "malformed"))
    for words in REMEDY:
        assert words in message.lower()
    assert path.stat().st_size == size


def test_failed_integrity_check_is_refused(state: Path) -> None:
    path = existing_db(state, devices=30)
    with contextlib.closing(raw(path)) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        (root,) = conn.execute(
            "SELECT rootpage FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'devices'"
            " AND sql IS NULL AND name = 'sqlite_autoindex_devices_2'"
        ).fetchone()
    # Rewrite one name inside the name index only: every page still parses, only a full check notices.
    data = bytearray(path.read_bytes())
    start = (root - 1) * page_size
    at = data.find(b"dev-17", start, start + page_size)
    assert at > 0
    data[at : at + 6] = b"dev-1X"
    path.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="failed its integrity check") as err:
        Registry.open(state)
    assert "sqlite_autoindex_devices_2" in str(err.value)
    assert "move it aside" in str(err.value).lower()


def test_dangling_reference_is_refused(state: Path) -> None:
    path = existing_db(state)
    with contextlib.closing(raw(path)) as conn:  # foreign keys are off on a plain connection
        conn.execute(
            "INSERT INTO attachments (device_id, instance_id, owner_uid, iommu_group, boot_id, role,"
            " attached_at) VALUES ('zzzzzzzzzzzzzzzzzzzzzzzz', 'vm', 0, 1, 'b', 'requested',"
            " '2026-11-26T07:15:21Z')"
        )
    with pytest.raises(RegistryError, match="refers to a devices row that does not exist"):
        Registry.open(state)


def test_foreign_sqlite_database_is_refused(state: Path) -> None:
    state.mkdir()
    with contextlib.closing(raw(state / "vfiod.db")) as conn:
        conn.execute("CREATE TABLE devices (id TEXT)")
    with pytest.raises(RegistryError, match="not a vfiod registry"):
        Registry.open(state)


def test_write_ahead_log_without_its_database_is_refused(state: Path) -> None:
    state.mkdir()
    (state / "vfiod.db-wal").write_bytes(b"\x37\x7f\x06\x82" + b"\x00" * 60)
    with pytest.raises(RegistryError, match="write-ahead log"):
        Registry.open(state)
    assert not (state / "vfiod.db").exists()


def _open_as_nobody(state_dir: str, report: Connection) -> None:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    try:
        Registry.open(Path(state_dir)).close()
        report.send("opened")
    except RegistryError as e:
        report.send(str(e))
    except BaseException as e:
        report.send(f"unexpected {e!r}")


def test_permission_denied_is_explained(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        state = tmp_path / "state"
        path = existing_db(state)
        path.chmod(0)
        try:
            with pytest.raises(RegistryError) as err:
                Registry.open(state)
        finally:
            path.chmod(0o600)
        message = str(err.value)
    else:
        # Root reads anything, so a child that has dropped to nobody tries instead; the state directory
        # may be entered (0711) but the 0600 file may not be opened.
        base = Path(tempfile.mkdtemp(prefix="vfiod-registry-"))
        try:
            base.chmod(0o711)
            state = base / "state"
            path = existing_db(state)
            state.chmod(0o711)
            ours, theirs = FORK.Pipe()
            child = FORK.Process(target=_open_as_nobody, args=(str(state), theirs))
            child.start()
            assert ours.poll(10)
            message = ours.recv()
            child.join(10)
        finally:
            shutil.rmtree(base)
    assert str(path) in message
    assert "permission denied" in message.lower()
    assert "owner and mode" in message


# --- migrations ------------------------------------------------------------------------------------------


def test_appended_migration_upgrades_and_keeps_a_copy(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = existing_db(state)
    with Registry.open(state) as r:
        (dev,) = r.list_devices()
    shipped = schema.MIGRATIONS
    now = len(shipped)
    notes = Migration(
        now + 1,
        "test: device notes",
        (
            "CREATE TABLE notes (device_id TEXT NOT NULL REFERENCES devices (id), note TEXT NOT NULL) STRICT",
            lambda conn: conn.execute("INSERT INTO notes SELECT id, 'migrated' FROM devices"),
        ),
    )
    monkeypatch.setattr(schema, "MIGRATIONS", (*shipped, notes))
    with Registry.open(state) as r:
        assert r.get_device(dev.id) == dev
        assert problems(r) == []
    with contextlib.closing(raw(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == now + 1
        assert conn.execute("SELECT device_id, note FROM notes").fetchall() == [(dev.id, "migrated")]
    saved = state / f"vfiod.db.v{now}.bak"
    with contextlib.closing(raw(saved)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == now
        assert conn.execute("SELECT id FROM devices").fetchall() == [(dev.id,)]
        assert conn.execute("SELECT name FROM sqlite_schema WHERE name = 'notes'").fetchall() == []

    # The vfiod that only knows the shipped versions now refuses the file and points at the copy.
    monkeypatch.setattr(schema, "MIGRATIONS", shipped)
    with pytest.raises(RegistryError, match="created by a newer vfiod") as err:
        Registry.open(state)
    assert str(saved) in str(err.value)


def test_failed_migration_leaves_the_previous_version(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = existing_db(state)
    now = len(schema.MIGRATIONS)
    broken = Migration(
        now + 1,
        "test: broken",
        ("CREATE TABLE half (a INTEGER) STRICT", "INSERT INTO missing_table VALUES (1)"),
    )
    monkeypatch.setattr(schema, "MIGRATIONS", (*schema.MIGRATIONS, broken))
    with pytest.raises(RegistryError, match=f"schema version {now + 1}") as err:
        Registry.open(state)
    assert f"left at version {now}" in str(err.value)
    with contextlib.closing(raw(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == now
        assert conn.execute("SELECT name FROM sqlite_schema WHERE name = 'half'").fetchall() == []


def test_migrations_must_be_numbered_in_order(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gap = len(schema.MIGRATIONS) + 2
    monkeypatch.setattr(schema, "MIGRATIONS", (*schema.MIGRATIONS, Migration(gap, "gap", ())))
    with pytest.raises(RuntimeError, match="numbered"):
        Registry.open(state)


# --- devices ---------------------------------------------------------------------------------------------


def test_add_get_find_and_by_pci_address(reg: Registry) -> None:
    dev = reg.add_device(make_device(3, vendor_name="NVIDIA Corporation", device_name="AD104GL [L4]"))
    assert reg.get_device(dev.id) == dev
    assert reg.find(dev.id) == dev
    assert reg.find("dev-3") == dev
    assert reg.find(new_device_id()) is None
    assert reg.find("no-such-name") is None
    assert reg.by_pci_address(dev.pci_address.upper()) == dev
    assert reg.by_pci_address("0000:ff:1f.7") is None
    with pytest.raises(ValueError, match="not a PCI address"):
        reg.by_pci_address("a2:00.0")


def test_stored_row_is_normalised(reg: Registry) -> None:
    moment = datetime(2026, 11, 26, 9, 15, 21, 999_999, tzinfo=timezone(timedelta(hours=2)))
    dev = reg.add_device(make_device(pci_address=PciAddress.parse("0000:A2:00.1"), created_at=moment))
    assert dev.pci_address == "0000:a2:00.1"
    assert dev.created_at == datetime(2026, 11, 26, 7, 15, 21, tzinfo=UTC)


def test_timestamps_are_stored_as_utc_with_z(reg: Registry, state: Path) -> None:
    dev = reg.add_device(make_device())
    reg.add_attachment(attach(dev))
    function_intent(reg, dev)
    assert dev.created_at.tzinfo is UTC
    assert abs(datetime.now(UTC) - dev.created_at) < timedelta(minutes=1)
    with contextlib.closing(raw(state / "vfiod.db")) as conn:
        stamps = [
            conn.execute("SELECT created_at FROM devices").fetchone()[0],
            conn.execute("SELECT attached_at FROM attachments").fetchone()[0],
            conn.execute("SELECT created_at FROM intents").fetchone()[0],
        ]
    for stamp in stamps:
        assert RFC3339_UTC.fullmatch(stamp), stamp
    assert stamps[0] == dev.created_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    with pytest.raises(ValueError, match="no time zone"):
        reg.add_device(make_device(1, created_at=datetime(2026, 11, 26, 7, 15, 21)))


def test_name_clash_is_name_exists_naming_the_holder(reg: Registry) -> None:
    first = reg.add_device(make_device(0, name="l4-gpu"))
    with pytest.raises(NameExists) as err:
        reg.add_device(make_device(1, name="l4-gpu"))
    assert first.id in err.value.message
    assert first.pci_address in err.value.message
    assert [d.id for d in reg.list_devices()] == [first.id]


def test_address_clash_is_already_exists_naming_the_holder(reg: Registry) -> None:
    first = reg.add_device(make_device(0, name="l4-gpu"))
    with pytest.raises(AlreadyExists) as err:
        reg.add_device(make_device(1, pci_address=PciAddress.parse(first.pci_address.upper())))
    assert "'l4-gpu'" in err.value.message
    assert first.id in err.value.message


def test_id_clash_is_already_exists(reg: Registry) -> None:
    first = reg.add_device(make_device(0))
    with pytest.raises(AlreadyExists, match=first.id):
        reg.add_device(make_device(1, id=first.id))


def test_id_shaped_names_are_refused(reg: Registry) -> None:
    with pytest.raises(ValueError, match="form of a device id"):
        reg.add_device(make_device(name=new_device_id()))


def test_list_devices_orders_by_creation_then_id(reg: Registry) -> None:
    early = datetime(2026, 1, 1, tzinfo=UTC)
    late = reg.add_device(make_device(0, created_at=early + timedelta(hours=1)))
    a = reg.add_device(make_device(1, id="b" + "0" * 23, created_at=early))
    b = reg.add_device(make_device(2, id="a" + "0" * 23, created_at=early))
    assert [d.id for d in reg.list_devices()] == [b.id, a.id, late.id]


def test_list_devices_filters_on_every_given_tag_exactly(reg: Registry) -> None:
    at = [datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=s) for s in range(4)]
    both = reg.add_device(make_device(0, created_at=at[0], tags={"team": "ml", "env": "prod"}))
    ml = reg.add_device(make_device(1, created_at=at[1], tags={"team": "ml"}))
    web = reg.add_device(
        make_device(2, created_at=at[2], tags={"team": "web", "env": "prod", "a.b/c": "x y"})
    )
    bare = reg.add_device(make_device(3, created_at=at[3]))

    def names(tags: dict[str, str] | None) -> list[str]:
        return [d.name for d in reg.list_devices(tags)]

    assert names({"team": "ml"}) == [both.name, ml.name]
    assert names({"team": "ml", "env": "prod"}) == [both.name]
    assert names({"env": "prod"}) == [both.name, web.name]
    assert names({"a.b/c": "x y"}) == [web.name]
    assert names({"team": "m"}) == []
    assert names({"team": "ml", "env": "dev"}) == []
    assert names({}) == names(None) == [both.name, ml.name, web.name, bare.name]
    assert reg.list_devices({"env": "prod", "team": "ml"}) == [both]
    assert both.tags == {"env": "prod", "team": "ml"}


def test_update_device(reg: Registry) -> None:
    dev = reg.add_device(make_device(0))
    updated = reg.update_device(
        dev.id, state="missing", bound_by_vfiod=True, device_id="1eb8", tags={"k": "v"}
    )
    assert (updated.state, updated.bound_by_vfiod, updated.type) == ("missing", True, "gpu")
    assert updated.device_id == "1eb8"
    assert updated.tags == {"k": "v"}
    assert reg.get_device(dev.id) == updated
    assert reg.update_device(dev.id) == updated


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"colour": "red"}, "cannot set colour"),
        ({"id": "a" * 24}, "cannot set id"),
        ({"state": "bogus"}, "state must be one of"),
        ({"previous_state": "vfio"}, "cannot set previous_state"),
        ({"type": "pci"}, "cannot set type"),
        ({"pci_address": ""}, "needs its PCI address"),
        ({"iommu_group": True}, "must be an integer"),
        ({"bound_by_vfiod": 1}, "must be a bool"),
        ({"tags": {"k": 1}}, "tags must be"),
        ({"pci_address": "a2:00.0"}, "not a PCI address"),
    ],
)
def test_update_device_refuses_bad_fields(reg: Registry, changes: dict[str, object], message: str) -> None:
    dev = reg.add_device(make_device(0))
    with pytest.raises(ValueError, match=message):
        reg.update_device(dev.id, **changes)
    assert reg.get_device(dev.id) == dev


def test_update_device_clashes_and_missing(reg: Registry) -> None:
    a = reg.add_device(make_device(0))
    b = reg.add_device(make_device(1))
    with pytest.raises(NameExists, match=a.id):
        reg.update_device(b.id, name=a.name)
    with pytest.raises(AlreadyExists, match=a.id):
        reg.update_device(b.id, pci_address=a.pci_address)
    assert reg.update_device(a.id, name=a.name, pci_address=a.pci_address) == a
    with pytest.raises(NotFound):
        reg.update_device(new_device_id(), state="host")


def test_remove_device_is_refused_while_attached(reg: Registry) -> None:
    dev = reg.add_device(make_device(0))
    reg.add_attachment(attach(dev, "ml-training"))
    with pytest.raises(InUse, match="ml-training"):
        reg.remove_device(dev.id)
    assert reg.remove_attachment(dev.id) is not None
    assert reg.remove_device(dev.id) == dev
    assert reg.get_device(dev.id) is None
    with pytest.raises(NotFound):
        reg.remove_device(dev.id)


# --- attachments -----------------------------------------------------------------------------------------


def test_attachments(reg: Registry) -> None:
    gpu = reg.add_device(make_device(0, iommu_group=7))
    audio = reg.add_device(make_device(1, iommu_group=7, class_code="040300"))
    assert (gpu.type, audio.type) == ("gpu", "pci")  # from the class code
    other = reg.add_device(make_device(2, iommu_group=9))
    a1 = reg.add_attachment(
        attach(gpu, node_prev=NodeOwner(0, 0, 0o600), id=99)  # the id is assigned
    )
    a2 = reg.add_attachment(attach(audio, role="companion", node_prev=NodeOwner(0, 0, 0o600)))
    a3 = reg.add_attachment(attach(other, "vm-2", owner_uid=1001))
    assert 0 < a1.id < a2.id < a3.id
    assert a1.node_prev == NodeOwner(0, 0, 0o600)
    assert reg.attachments_of_instance("vm-1") == [a1, a2]
    assert reg.attachments_in_group(7) == [a1, a2]
    assert reg.attachment_of_device(other.id) == a3
    assert reg.all_attachments() == [a1, a2, a3]
    assert reg.attachments_of_instance("vm-3") == []

    with pytest.raises(InUse, match="vm-1"):
        reg.add_attachment(attach(gpu, "vm-1"))
    with pytest.raises(NotFound):
        reg.add_attachment(AttachmentRow(new_device_id(), "vm-1", 0, 1, "b"))
    with pytest.raises(ValueError, match="node_prev_mode must be at least 0"):
        reg.add_attachment(attach(reg.add_device(make_device(3)), node_prev=NodeOwner(0, 0, -1)))

    assert reg.remove_attachment(other.id) == a3
    assert reg.remove_attachment(other.id) is None
    again = reg.add_attachment(attach(other))
    assert again.id > a3.id  # ids are never reused


# --- transactions ----------------------------------------------------------------------------------------


def test_transaction_commits_together(reg: Registry) -> None:
    with reg.transaction() as tx:
        dev = tx.add_device(make_device(0))
        tx.update_device(dev.id, state="binding")
        intent = function_intent(tx, dev)
    assert reg.find(dev.id) is not None
    assert [i.id for i in reg.open_intents("b")] == [intent]


def test_transaction_rolls_back_on_error(reg: Registry) -> None:
    with pytest.raises(RuntimeError), reg.transaction() as tx:
        dev = tx.add_device(make_device(0))
        function_intent(tx, dev)
        raise RuntimeError("the kernel said no")
    assert reg.list_devices() == []
    assert reg.open_intents() == []


def test_failed_mutator_inside_a_transaction_undoes_only_itself(reg: Registry) -> None:
    with reg.transaction() as tx:
        a = tx.add_device(make_device(0))
        with pytest.raises(NameExists):
            tx.add_device(make_device(1, name=a.name))
        with contextlib.suppress(LookupError), tx.transaction():
            tx.add_device(make_device(2))
            raise LookupError
        c = tx.add_device(make_device(3))
    assert sorted(d.id for d in reg.list_devices()) == sorted([a.id, c.id])


def test_transaction_excludes_other_threads_until_it_ends(reg: Registry) -> None:
    seen: list[int] = []
    inside = threading.Event()

    def reader() -> None:
        inside.wait(5)
        seen.append(len(reg.list_devices()))

    thread = threading.Thread(target=reader)
    thread.start()
    with reg.transaction() as tx:
        tx.add_device(make_device(0))
        inside.set()
        time.sleep(0.1)
        assert seen == []  # the reader waits for the lock rather than seeing half a transaction
        tx.add_device(make_device(1))
    thread.join(5)
    assert seen == [2]


def test_closed_registry_refuses_use(state: Path) -> None:
    r = Registry.open(state)
    r.close()
    r.close()
    with pytest.raises(RegistryError, match="closed"):
        r.list_devices()
    with pytest.raises(RegistryError, match="closed"), r.transaction():
        pass


# --- intents, holds, meta --------------------------------------------------------------------------------


def test_intent_journal(reg: Registry) -> None:
    dev = reg.add_device(make_device(0))
    old = function_intent(reg, dev, "restore", boot_id="boot-old")
    first = reg.journal_function(
        action="bind",
        boot_id="boot-new",
        operation="op-1",
        device_id=dev.id,
        pci_address=dev.pci_address.upper(),
        iommu_group=dev.iommu_group,
        from_driver="i915",
        native_module="i915",
        to_driver="vfio-pci",
    )
    write = reg.journal_write(
        action="unbind",
        boot_id="boot-new",
        operation="op-1",
        pci_address=str(dev.pci_address),
        from_driver="i915",
        to_driver="",
    )
    grant = reg.journal_grant(
        boot_id="boot-new", operation="op-1", iommu_group=7, node_prev=NodeOwner(0, 0, 0o600)
    )
    assert old < first < write < grant

    rows = {i.id: i for i in reg.open_intents("boot-new")}
    assert sorted(rows) == [first, write, grant]
    fn = rows[first]
    assert (fn.kind, fn.action, fn.from_driver, fn.native_module, fn.to_driver) == (
        "function",
        "bind",
        "i915",
        "i915",
        "vfio-pci",
    )
    assert (fn.pci_address, fn.device_id, fn.operation, fn.node_prev) == (
        dev.pci_address,
        dev.id,
        "op-1",
        None,
    )
    numvfs = reg.journal_write(
        action="sriov_numvfs",
        boot_id="boot-new",
        operation="op-2",
        pci_address=str(dev.pci_address),
        from_driver="",
        to_driver="",
        value="2",
    )
    assert [(i.kind, i.action, i.value) for i in reg.open_intents() if i.id == numvfs] == [
        ("write", "sriov_numvfs", "2")
    ]
    assert reg.clear_intent(numvfs)
    # An unbind write is a write, not an Unbind operation: the kind says so, not the action's name.
    assert (rows[write].kind, rows[write].action, rows[write].native_module) == ("write", "unbind", "")
    assert (rows[grant].kind, rows[grant].iommu_group, rows[grant].node_prev) == (
        "grant",
        7,
        NodeOwner(0, 0, 0o600),
    )
    assert [i.id for i in reg.open_intents()] == [old, first, write, grant]

    assert reg.clear_intent(grant) is True
    assert reg.clear_intent(grant) is False
    assert function_intent(reg, dev, "detach", boot_id="boot-new") > grant  # ids are never reused

    dropped = reg.drop_intents_of_other_boots("boot-new")
    assert [i.id for i in dropped] == [old]
    assert dropped[0].action == "restore"
    assert all(i.boot_id == "boot-new" for i in reg.open_intents())
    assert reg.drop_intents_of_other_boots("boot-new") == []
    with pytest.raises(ValueError, match="action must not be empty"):
        function_intent(reg, dev, "")
    with pytest.raises(ValueError, match="lower-case UUID"):
        reg.journal_claim(
            action="create",
            boot_id="b",
            operation="op",
            device_id=dev.id,
            parent="mtty",
            uuid="X",
            type_id="mtty-1",
        )


def test_vgpus_share_the_devices_names_and_have_their_own_reads(reg: Registry) -> None:
    gpu = reg.add_device(make_device(0))
    vgpu_id = new_device_id()
    uuid = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"
    # Claim first: the parent, uuid and type are journaled before anything is created.
    claim = reg.journal_claim(
        action="create",
        boot_id="b",
        operation="op-c",
        device_id=vgpu_id,
        parent="mtty",
        uuid=uuid,
        type_id="mtty-2",
    )
    (intent,) = reg.open_intents()
    assert (intent.id, intent.kind, intent.vgpu_parent, intent.vgpu_uuid, intent.vgpu_type) == (
        claim,
        "claim",
        "mtty",
        uuid,
        "mtty-2",
    )
    mdev = VgpuRow(
        id=vgpu_id,
        name="vm-1-vgpu",
        uuid=uuid,
        framework="mdev",
        type_id="mtty-2",
        profile="Dual-port serial",
        parent="mtty",
    )
    stored = reg.add_vgpu(mdev)
    assert (stored.type, stored.state, stored.pci_address, stored.managed) == ("vgpu", "creating", None, True)
    assert reg.list_devices() == [gpu]  # vGPUs are read through their own calls
    assert reg.get_device(vgpu_id) is None and reg.find("vm-1-vgpu") is None
    assert reg.list_vgpus() == [stored] and reg.list_vgpus("mtty") == [stored] and reg.list_vgpus("x") == []
    with pytest.raises(NameExists, match="an mdev"):
        reg.add_device(make_device(1, name="vm-1-vgpu"))
    with pytest.raises(AlreadyExists, match=uuid):
        reg.add_vgpu(VgpuRow(new_device_id(), "other", uuid, "mdev", "mtty-2", "p", "mtty"))
    # A vendor-vfio vGPU is its VF: the VF's address is taken.
    vf = reg.add_vgpu(
        VgpuRow(
            new_device_id(),
            "vm-2-vgpu",
            "0b6a2c5e-2f3c-4b1a-9d7e-31a3c1e0f001",
            "vendor-vfio",
            "1155",
            "NVIDIA L40S-4Q",
            "0000:41:00.4",
            physical_gpu="0000:41:00.0",
            pci_address=PciAddress.parse("0000:41:00.4"),
            iommu_group=40,
        )
    )
    with pytest.raises(AlreadyExists, match="vm-2-vgpu"):
        reg.add_device(make_device(2, pci_address=PciAddress.parse("0000:41:00.4")))

    ready = reg.set_vgpu_state(vgpu_id, "vfio", iommu_group=12)
    assert (ready.state, ready.iommu_group) == ("vfio", 12)
    reg.add_attachment(attach(ready))  # attached like any device
    with pytest.raises(InUse, match="vm-1"):
        reg.remove_vgpu(vgpu_id)
    reg.remove_attachment(vgpu_id)
    assert reg.remove_vgpu(vgpu_id) == ready
    assert reg.list_vgpus() == [vf]
    with pytest.raises(NotFound):
        reg.remove_vgpu(vgpu_id)
    assert reg.settle_intents(vf.id) == []  # a vGPU has a generation like any device


def test_parent_failures_count_in_a_row_until_cleared(reg: Registry) -> None:
    assert reg.parent_health("0000:41:00.4") is None
    first = reg.record_parent_failure("0000:41:00.4", "create: -EIO")
    second = reg.record_parent_failure("0000:41:00.4", "verify: no vfio-dev")
    assert (first.failures, second.failures, second.last_failure) == (1, 2, "verify: no vfio-dev")
    assert second.since == first.since  # when the run of failures began
    reg.record_parent_failure("mtty", "create: -ENOSPC")
    assert [p.parent for p in reg.all_parent_health()] == ["0000:41:00.4", "mtty"]
    assert reg.clear_parent_failures("0000:41:00.4") is True
    assert reg.clear_parent_failures("0000:41:00.4") is False
    assert reg.record_parent_failure("0000:41:00.4", "again").failures == 1


def test_holds_and_meta(reg: Registry) -> None:
    unit = "nvidia-persistenced.service"
    assert reg.get_hold(unit) is None
    reg.put_hold(HoldRow(unit, True, 1, "b"))
    reg.put_hold(HoldRow(unit, True, 2, "b"))
    reg.put_hold(HoldRow("other.service", False, 1, "b"))
    assert reg.get_hold(unit) == HoldRow(unit, True, 2, "b")
    assert [h.unit for h in reg.all_holds()] == ["nvidia-persistenced.service", "other.service"]
    with pytest.raises(ValueError, match="at least 0"):
        reg.put_hold(HoldRow(unit, True, -1, "b"))
    assert reg.delete_hold(unit) is True
    assert reg.delete_hold(unit) is False

    assert reg.get_meta("last_boot_id") is None
    reg.set_meta("last_boot_id", "a")
    reg.set_meta("last_boot_id", "b")
    assert reg.get_meta("last_boot_id") == "b"


# --- concurrency -----------------------------------------------------------------------------------------


def _write_a_lot(reg: Registry, worker: int, errors: list[BaseException]) -> None:
    try:
        for i in range(25):
            n = worker * 100 + i
            with reg.transaction() as tx:
                dev = tx.add_device(make_device(n, tags={"worker": str(worker)}))
                intent = function_intent(tx, dev)
                tx.update_device(dev.id, state="vfio")
            reg.list_devices({"worker": str(worker)})
            reg.clear_intent(intent)
    except BaseException as e:
        errors.append(e)


def test_eight_threads_on_one_registry(reg: Registry) -> None:
    errors: list[BaseException] = []
    threads = [threading.Thread(target=_write_a_lot, args=(reg, w, errors)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    devices = reg.list_devices()
    assert len(devices) == 200
    assert {d.state for d in devices} == {"vfio"}
    assert reg.open_intents() == []
    assert problems(reg) == []


def test_eight_threads_with_their_own_connections(state: Path) -> None:
    Registry.open(state).close()
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        try:
            with Registry.open(state) as own:
                _write_a_lot(own, w, errors)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    with Registry.open(state) as r:
        assert len(r.list_devices()) == 200
        assert problems(r) == []


# --- crash safety ----------------------------------------------------------------------------------------


def _add_device_and_intent(state_dir: str, device: DeviceRow, commit: bool, ready: Event) -> None:
    reg = Registry.open(Path(state_dir))
    with reg.transaction() as tx:
        tx.add_device(device)
        function_intent(tx, device)
        if not commit:
            ready.set()
            time.sleep(60)
    ready.set()
    time.sleep(60)


@pytest.mark.parametrize("commit", [False, True], ids=["killed-before-commit", "killed-after-commit"])
def test_sigkill_leaves_old_or_new_state(state: Path, commit: bool) -> None:
    Registry.open(state).close()
    device = make_device(0)
    ready = FORK.Event()
    child = FORK.Process(target=_add_device_and_intent, args=(str(state), device, commit, ready))
    child.start()
    try:
        assert ready.wait(10)
    finally:
        os.kill(child.pid or 0, signal.SIGKILL)
        child.join(10)
    assert child.exitcode == -signal.SIGKILL
    with Registry.open(state) as r:
        if commit:
            assert r.get_device(device.id) == device
            assert [i.device_id for i in r.open_intents()] == [device.id]
        else:
            assert r.list_devices() == []
            assert r.open_intents() == []
        assert problems(r) == []


def _commit_pairs_forever(state_dir: str, going: Event) -> None:
    reg = Registry.open(Path(state_dir))
    n = len(reg.list_devices())
    while True:
        with reg.transaction() as tx:
            dev = tx.add_device(make_device(n))
            function_intent(tx, dev)
        n += 1
        going.set()


def test_sigkill_at_any_moment_keeps_devices_and_intents_paired(state: Path) -> None:
    Registry.open(state).close()
    for delay in (0.0, 0.013, 0.041):
        going = FORK.Event()
        child = FORK.Process(target=_commit_pairs_forever, args=(str(state), going))
        child.start()
        try:
            assert going.wait(10)
            time.sleep(delay)
        finally:
            os.kill(child.pid or 0, signal.SIGKILL)
            child.join(10)
        with Registry.open(state) as r:
            assert problems(r) == []
            devices = {d.id for d in r.list_devices()}
            assert devices
            assert sorted(i.device_id for i in r.open_intents()) == sorted(devices)


def test_a_version_1_registry_gains_device_generations(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shipped = schema.MIGRATIONS
    monkeypatch.setattr(schema, "MIGRATIONS", shipped[:1])
    path = state / "vfiod.db"
    Registry.open(state).close()  # a version 1 file, as vfiod 0.1 left it
    with contextlib.closing(raw(path)) as conn:
        conn.execute(
            "INSERT INTO devices VALUES ('abcdefghijklmnopqrstuvwx', 'gpu', '0000:00:00.1', '10de', "
            "'27b8', '030200', 'gpu', '', '', 1, 'nvidia', 'nvidia', 'host', '', 0, "
            "'2026-01-01T00:00:00Z', '{}', '', '')"
        )
        conn.execute(
            "INSERT INTO intents (action, boot_id, device_id, pci_address, iommu_group, from_driver, "
            "to_driver, step, operation, created_at) VALUES ('detach', 'b', '', '0000:00:00.1', 1, '', '', "
            "'', 'op', '2026-01-01T00:00:00Z')"
        )
        conn.commit()
    monkeypatch.setattr(schema, "MIGRATIONS", shipped)
    with Registry.open(state) as r:
        (dev,) = r.list_devices()
        assert dev.settled_through == 0
        assert [i.pci_address for i in r.intents_of_device(dev.id, str(dev.pci_address))] == ["0000:00:00.1"]
        assert problems(r) == []


def test_settling_a_device_closes_its_intents_and_moves_its_generation(reg: Registry) -> None:
    a = reg.add_device(make_device(1))
    b = reg.add_device(make_device(2))
    by_id = function_intent(reg, a, "detach")
    step = reg.journal_write(
        action="unbind",
        boot_id="b",
        operation="op-detach",
        pci_address=str(a.pci_address),
        from_driver="nvidia",
        to_driver="",
    )
    other = function_intent(reg, b, "attach")
    closed = reg.settle_intents(a.id)
    assert sorted(i.id for i in closed) == [by_id, step]
    assert [i.id for i in reg.open_intents()] == [other]
    fresh = reg.get_device(a.id)
    assert fresh is not None and fresh.settled_through == other  # every intent so far is older
    assert reg.settle_intents("nosuchdeviceidxxxxxxxxxxx") == []
