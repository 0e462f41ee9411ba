"""Faults outside the kernel: the registry failing mid-operation (every write of an Attach and a Detach in
turn), a stale persistence-hold row, and the registry file deleted, replaced or with a damaged schema."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from tests.core.support.crashes import violations
from tests.core.support.worlds import ADMIN, HM, PERSISTENCED, Env, MakeEnv, drivers
from tests.machines import L4, L4_AUDIO
from vfiod.core.errors import Failed
from vfiod.core.manager import Manager
from vfiod.core.registry import HoldRow, Registry, RegistryError
from vfiod.core.registry.files import runtime_failure
from vfiod_sim import faults, processes

FULL = "database or disk is full"


class FullAfter:
    """Makes the registry's writes fail like a full disk after `n` of them succeeded."""

    def __init__(self, registry: Registry, n: int) -> None:
        self.registry, self.n, self.count = registry, n, 0
        self._real = registry._write

    def __enter__(self) -> FullAfter:
        def write(sql: str, params: object = ()) -> sqlite3.Cursor:
            self.count += 1
            if self.count > self.n:
                err = sqlite3.OperationalError(FULL)
                err.sqlite_errorname = "SQLITE_FULL"
                raise runtime_failure(self.registry.path, err)
            return self._real(sql, params)  # type: ignore[arg-type]

        self.registry._write = write  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        self.registry._write = self._real  # type: ignore[method-assign]


def writes_of(e: Env, action: str) -> int:
    with FullAfter(e.manager.registry, 10**9) as counter:
        run(e.manager, action)
    return counter.count


def prepare(e: Env, action: str) -> None:
    e.manager.register(HM, str(L4), "l4-gpu")
    if action == "detach":
        e.manager.attach(HM, "vm1", ["l4-gpu"], include_group=True)


def run(m: Manager, action: str) -> None:
    if action == "attach":
        m.attach(HM, "vm1", ["l4-gpu"], include_group=True)
    else:
        m.detach(HM, "vm1")


@pytest.mark.slow
@pytest.mark.parametrize("action", ["attach", "detach"])
def test_registry_fault_at_every_write_rolls_the_kernel_back(env: MakeEnv, action: str) -> None:
    probe = env()
    prepare(probe, action)
    total = writes_of(probe, action)
    assert total > 3
    found: list[str] = []
    for n in range(total):
        e = env()
        prepare(e, action)
        with FullAfter(e.manager.registry, n), contextlib.suppress(Failed):
            try:
                run(e.manager, action)
            except RegistryError as err:
                assert "is full: free space" in err.message and str(e.state) in err.message
        # right away: nothing driverless, no stray override, the unit running again
        for addr in (L4, L4_AUDIO):
            drv, override = e.host.driver(addr), e.host.driver_override(addr)
            if drv is None or override not in (None, drv):
                found.append(f"write {n + 1}: {addr} is on {drv} with override {override}")
        if not processes.unit_active(e.root, PERSISTENCED):
            found.append(f"write {n + 1}: {PERSISTENCED} was left stopped")
        # and once restarted (space freed), the registry, the kernel and the unit agree
        m = e.reopen()
        m.startup()
        found += [f"write {n + 1}, after the restart: {v}" for v in violations(m, e.root)]
    assert found == []


def test_registry_fault_the_caller_gets_the_registry_sentence(env: MakeEnv) -> None:
    e = env()
    prepare(e, "attach")
    with FullAfter(e.manager.registry, 0), pytest.raises(RegistryError) as err:
        e.manager.attach(HM, "vm1", ["l4-gpu"], include_group=True)
    assert err.value.name == "Failed"
    assert "failed: database or disk is full; the file system holding" in err.value.message
    assert drivers(e, L4, L4_AUDIO) == ["nvidia", "snd_hda_intel"]


# ----- 2. holds follow the unit's real state ----------------------------------------------------------


def test_hold_a_stale_row_does_not_keep_the_unit_running_through_a_bind(env: MakeEnv) -> None:
    e = env()
    m = e.manager
    m.register(HM, str(L4), "l4-gpu")
    # a row a failed call or a crash left behind, while the unit runs
    m.registry.put_hold(HoldRow(PERSISTENCED, True, 1, m.boot_id))
    assert processes.unit_active(e.root, PERSISTENCED)
    e.units.calls.clear()
    m.attach(HM, "vm1", ["l4-gpu"], include_group=True)
    assert ("stop", PERSISTENCED) in e.units.calls  # judged from the unit, not from the row
    assert processes.unit_active(e.root, PERSISTENCED)
    assert m.registry.all_holds() == []


def test_hold_rows_are_reconciled_after_a_failure(env: MakeEnv) -> None:
    e = env()
    m = e.manager
    m.register(HM, str(L4), "l4-gpu")
    processes.stop_unit(e.root, PERSISTENCED)
    m.registry.put_hold(HoldRow(PERSISTENCED, True, 3, m.boot_id))  # left by an earlier failure
    faults.inject(
        e.root, "busy", kind="errno", path="/sys/bus/pci/drivers/snd_hda_intel/unbind", errno="EBUSY"
    )
    with pytest.raises(Failed):
        m.attach(HM, "vm1", ["l4-gpu"], include_group=True)
    assert processes.unit_active(e.root, PERSISTENCED)
    assert m.registry.all_holds() == []


# ----- 4. the registry file under a running vfiod -----------------------------------------------------


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_registry_file_deleted_or_replaced_refuses_changes(env: MakeEnv, how: str) -> None:
    e = env()
    m = e.manager
    m.register(HM, str(L4), "l4-gpu")
    path = m.registry.path
    if how == "deleted":
        path.unlink()
    else:
        copy = path.with_name("copy.db")
        shutil.copy(path, copy)
        os.replace(copy, path)
    writes = len(e.writes)
    with pytest.raises(RegistryError, match=f"{how if how == 'replaced' else 'was deleted'}.*restart vfiod"):
        m.attach(HM, "vm1", ["l4-gpu"], include_group=True)
    with pytest.raises(RegistryError, match="refuses every change"):
        m.bind(ADMIN, "l4-gpu", include_group=True)
    assert len(e.writes) == writes  # the kernel was not touched
    assert [d.name for d in m.list_devices()] == ["l4-gpu"]  # reads go on
    assert drivers(e, L4) == ["nvidia"]


def test_registry_file_with_a_dropped_index_is_refused_untouched(tmp_path: Path) -> None:
    state = tmp_path / "state"
    Registry.open(state).close()
    path = state / "vfiod.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("DROP INDEX attachments_by_group")
        conn.commit()
    before = path.read_bytes()
    with pytest.raises(RegistryError, match="index attachments_by_group is missing"):
        Registry.open(state)
    assert path.read_bytes() == before
