"""Persistence-unit holds (the daemon-wide count of operations that need a unit such as
nvidia-persistenced stopped) and the small key-value `meta` table."""

from __future__ import annotations

from vfiod.core.registry import codec
from vfiod.core.registry.codec import HOLD_COLUMNS
from vfiod.core.registry.rows import HoldRow
from vfiod.core.registry.store import Store

_SELECT = f"SELECT {codec.select(HOLD_COLUMNS)} FROM holds"  # noqa: S608


class HoldTable(Store):
    def get_hold(self, unit: str) -> HoldRow | None:
        rows = self._query(f"{_SELECT} WHERE unit = ?", (unit,))
        return codec.hold_from_sql(rows[0]) if rows else None

    def put_hold(self, row: HoldRow) -> None:
        """Creates or replaces the hold on `row.unit`."""
        values = codec.encode(HOLD_COLUMNS, {c: getattr(row, c) for c in HOLD_COLUMNS})
        with self.transaction():
            self._write(
                "INSERT INTO holds (unit, was_active, holders, boot_id) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (unit) DO UPDATE SET was_active = excluded.was_active,"
                " holders = excluded.holders, boot_id = excluded.boot_id",
                list(values.values()),
            )

    def delete_hold(self, unit: str) -> bool:
        with self.transaction():
            return self._write("DELETE FROM holds WHERE unit = ?", (unit,)).rowcount > 0

    def all_holds(self) -> list[HoldRow]:
        return [codec.hold_from_sql(r) for r in self._query(f"{_SELECT} ORDER BY unit")]

    def get_meta(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction():
            self._write(
                "INSERT INTO meta (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (codec.text("key", key), codec.text("value", value)),
            )
