"""vGPUs and their parents' health: a vGPU is a devices row (its id, name, state, group and tags) joined
with a vgpus row (uuid, framework, type, profile, parent, physical GPU, managed); parent_health counts each
parent's failures in a row, which placement policy turns into a quarantine."""

from __future__ import annotations

from vfiod.core.errors import AlreadyExists, NotFound
from vfiod.core.registry import codec
from vfiod.core.registry.codec import DEVICE_COLUMNS, PARENT_COLUMNS, VGPU_COLUMNS
from vfiod.core.registry.devices import DeviceTable
from vfiod.core.registry.rows import ParentHealthRow, VgpuRow, utc_now

_SELECT = (
    f"SELECT {codec.select(DEVICE_COLUMNS, 'devices.')}, {codec.select(VGPU_COLUMNS, 'vgpus.')} "  # noqa: S608
    "FROM devices JOIN vgpus ON vgpus.device_id = devices.id"
)
_SELECT_PARENT = f"SELECT {codec.select(PARENT_COLUMNS)} FROM parent_health"  # noqa: S608


class VgpuTable(DeviceTable):
    def add_vgpu(self, row: VgpuRow) -> VgpuRow:
        """Stores a new vGPU (in the state its claim put it, normally `creating`) and returns it as stored.
        NameExists / AlreadyExists as for devices; AlreadyExists also for a uuid already known."""
        device = codec.encode(
            DEVICE_COLUMNS,
            {
                "id": row.id,
                "name": row.name,
                "pci_address": row.pci_address,
                "vendor_id": row.vendor_id,
                "device_id": row.device_id,
                "class_code": "",
                "subsystem_vendor_id": "",
                "subsystem_device_id": "",
                "iommu_group": row.iommu_group,
                "native_driver": "",
                "native_module": "",
                "state": row.state,
                "bound_by_vfiod": False,
                "created_at": row.created_at,
                "tags": row.tags,
                "vendor_name": "",
                "device_name": row.profile,
                "settled_through": row.settled_through,
            },
        )
        vgpu = codec.encode(VGPU_COLUMNS, {c: getattr(row, c) for c in VGPU_COLUMNS if c != "device_id"})
        with self.transaction():
            self._refuse_clash(device_id=row.id, name=row.name, pci_address=device["pci_address"])
            if self._query("SELECT 1 FROM vgpus WHERE uuid = ?", (vgpu["uuid"],)):
                raise AlreadyExists(f"a vGPU with uuid {vgpu['uuid']} is already registered")
            self._insert("devices", device)
            self._insert("vgpus", {"device_id": row.id, **vgpu})
            stored = self.get_vgpu(row.id)
        assert stored is not None
        return stored

    def get_vgpu(self, device_id: str) -> VgpuRow | None:
        rows = self._query(f"{_SELECT} WHERE devices.id = ?", (device_id,))
        return codec.vgpu_from_sql(rows[0]) if rows else None

    def find_vgpu(self, id_or_name: str) -> VgpuRow | None:
        """A vGPU by its device id or its name."""
        rows = self._query(f"{_SELECT} WHERE devices.id = ? OR devices.name = ?", (id_or_name, id_or_name))
        return codec.vgpu_from_sql(rows[0]) if rows else None

    def list_vgpus(self, parent: str | None = None) -> list[VgpuRow]:
        """Every vGPU (only `parent`'s when given), oldest first."""
        condition, params = ("vgpus.parent = ?", (parent,)) if parent is not None else ("1", ())
        rows = self._query(f"{_SELECT} WHERE {condition} ORDER BY devices.created_at, devices.id", params)
        return [codec.vgpu_from_sql(r) for r in rows]

    def set_vgpu_state(
        self,
        device_id: str,
        state: str,
        iommu_group: int | None = None,
        tags: dict[str, str] | None = None,
    ) -> VgpuRow:
        """Moves a vGPU to `state` (and records its group once it has one, and new tags when given).
        NotFound for an unknown one."""
        changes: dict[str, object] = {"state": state}
        if iommu_group is not None:
            changes["iommu_group"] = iommu_group
        if tags is not None:
            changes["tags"] = tags
        values = codec.encode(DEVICE_COLUMNS, changes)
        with self.transaction():
            if self.get_vgpu(device_id) is None:
                raise NotFound(f"no vGPU with id {device_id!r} is registered")
            self._update_device_columns(device_id, values)
            updated = self.get_vgpu(device_id)
        assert updated is not None
        return updated

    def remove_vgpu(self, device_id: str) -> VgpuRow:
        """Forgets a vGPU (its vgpus row goes with it). InUse while it is attached; NotFound."""
        with self.transaction():
            row = self.get_vgpu(device_id)
            if row is None:
                raise NotFound(f"no vGPU with id {device_id!r} is registered")
            self._refuse_attached(device_id, f"vGPU {row.name!r} ({row.uuid})")
            self._write("DELETE FROM devices WHERE id = ?", (device_id,))
        return row

    # --- parent health ----------------------------------------------------------------------------------

    def parent_health(self, parent: str) -> ParentHealthRow | None:
        rows = self._query(f"{_SELECT_PARENT} WHERE parent = ?", (parent,))
        return codec.parent_from_sql(rows[0]) if rows else None

    def all_parent_health(self) -> list[ParentHealthRow]:
        return [codec.parent_from_sql(r) for r in self._query(f"{_SELECT_PARENT} ORDER BY parent")]

    def record_parent_failure(self, parent: str, reason: str) -> ParentHealthRow:
        """One more failure in a row on `parent`; returns the count so far and since when."""
        values = codec.encode(
            PARENT_COLUMNS, {"parent": parent, "failures": 1, "last_failure": reason, "since": utc_now()}
        )
        with self.transaction():
            self._write(
                "INSERT INTO parent_health (parent, failures, last_failure, since) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (parent) DO UPDATE SET failures = failures + 1,"
                " last_failure = excluded.last_failure",
                list(values.values()),
            )
            stored = self.parent_health(parent)
        assert stored is not None
        return stored

    def clear_parent_failures(self, parent: str) -> bool:
        """A success on `parent`, or an admin's Recover of it: the count starts again. False if there
        was none."""
        with self.transaction():
            return self._write("DELETE FROM parent_health WHERE parent = ?", (parent,)).rowcount > 0
