"""The devices table as registered PCI functions: add, look up, list by tags, update and remove.

A vGPU is a device too (it shares ids and names, so a name is taken once among both), but it is read
through `vgpus`: every query here leaves vGPU rows out.
"""

from __future__ import annotations

from collections.abc import Mapping

from vfiod.core.errors import AlreadyExists, InUse, NameExists, NotFound
from vfiod.core.registry import codec
from vfiod.core.registry.codec import DEVICE_COLUMNS
from vfiod.core.registry.rows import DeviceRow
from vfiod.core.registry.store import Store
from vfiod.core.validation import is_device_id
from vfiod.host.pciaddr import PciAddress

_SELECT = f"SELECT {codec.select(DEVICE_COLUMNS)} FROM devices"  # noqa: S608
_NOT_VGPU = "NOT EXISTS (SELECT 1 FROM vgpus WHERE vgpus.device_id = devices.id)"
_UPDATABLE = frozenset(DEVICE_COLUMNS) - {"id"}


class DeviceTable(Store):
    def _device_where(self, condition: str, *params: object) -> DeviceRow | None:
        rows = self._query(f"{_SELECT} WHERE {_NOT_VGPU} AND {condition}", params)
        return codec.device_from_sql(rows[0]) if rows else None

    def _refuse_clash(
        self, *, device_id: object = None, name: object = None, pci_address: object = None, keep: str = ""
    ) -> None:
        """NameExists / AlreadyExists naming the device (or vGPU) that has the name, address or id."""
        if name is not None:
            other = self._query("SELECT id, pci_address FROM devices WHERE name = ?", (name,))
            if other and other[0][0] != keep:
                raise NameExists(
                    f"the name {name!r} is already taken by the device registered at "
                    f"{other[0][1] or 'an mdev'} (id {other[0][0]})"
                )
        if pci_address:
            other = self._query("SELECT id, name FROM devices WHERE pci_address = ?", (pci_address,))
            if other and other[0][0] != keep:
                raise AlreadyExists(
                    f"PCI address {pci_address} is already registered as device {other[0][1]!r} "
                    f"(id {other[0][0]})"
                )
        if device_id is not None:
            other = self._query("SELECT name, pci_address FROM devices WHERE id = ?", (device_id,))
            if other:
                raise AlreadyExists(
                    f"device id {device_id} is already taken by device {other[0][0]!r} "
                    f"({other[0][1] or 'an mdev'})"
                )

    def add_device(self, row: DeviceRow) -> DeviceRow:
        """Stores a new device and returns it as stored. NameExists / AlreadyExists name the device that
        already has the name / PCI address."""
        values = codec.encode(DEVICE_COLUMNS, {c: getattr(row, c) for c in DEVICE_COLUMNS})
        if not values["pci_address"]:
            raise ValueError("a registered PCI function needs its PCI address")
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
        conditions = [_NOT_VGPU]
        params: list[object] = []
        if tags:
            codec.tags_json("tags", tags)
            for key, value in sorted(tags.items()):
                conditions.append(
                    "EXISTS (SELECT 1 FROM json_each(devices.tags) AS t"
                    " WHERE t.key = ? AND t.type = 'text' AND t.value = ?)"
                )
                params += [key, value]
        rows = self._query(f"{_SELECT} WHERE {' AND '.join(conditions)} ORDER BY created_at, id", params)
        return [codec.device_from_sql(r) for r in rows]

    def update_device(self, device_id: str, /, **changes: object) -> DeviceRow:
        """Sets the given fields (DeviceRow names; `id` cannot change) and returns the updated row.
        ValueError for an unknown field or a bad value, NotFound, NameExists, AlreadyExists."""
        unknown = sorted(set(changes) - _UPDATABLE)
        if unknown:
            raise ValueError(
                f"update_device cannot set {', '.join(unknown)}; it can set {', '.join(sorted(_UPDATABLE))}"
            )
        values = codec.encode(DEVICE_COLUMNS, changes)
        if "pci_address" in values and not values["pci_address"]:
            raise ValueError("a registered PCI function needs its PCI address")
        with self.transaction():
            if self.get_device(device_id) is None:
                raise NotFound(f"no device with id {device_id!r} is registered")
            self._update_device_columns(device_id, values)
            updated = self.get_device(device_id)
        assert updated is not None
        return updated

    def _update_device_columns(self, device_id: str, values: Mapping[str, object]) -> None:
        if values:
            self._refuse_clash(name=values.get("name"), pci_address=values.get("pci_address"), keep=device_id)
            assignments = ", ".join(f"{c} = ?" for c in values)
            self._write(f"UPDATE devices SET {assignments} WHERE id = ?", [*values.values(), device_id])  # noqa: S608

    def remove_device(self, device_id: str) -> DeviceRow:
        """Deletes a device and returns what it was. InUse while it has an attachment (a reservation from
        an earlier boot counts), NotFound when there is no such device."""
        with self.transaction():
            row = self.get_device(device_id)
            if row is None:
                raise NotFound(f"no device with id {device_id!r} is registered")
            self._refuse_attached(device_id, f"device {row.name!r} ({row.pci_address})")
            self._write("DELETE FROM devices WHERE id = ?", (device_id,))
        return row

    def _refuse_attached(self, device_id: str, what: str) -> None:
        held = self._query("SELECT instance_id, owner_uid FROM attachments WHERE device_id = ?", (device_id,))
        if held:
            raise InUse(
                f"{what} is attached to instance {held[0][0]!r} (uid {held[0][1]}); detach it before "
                "unregistering it"
            )
