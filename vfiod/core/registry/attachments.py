"""The attachments table: which device is given to which instance and owner, in which boot, and what the
group node was before vfiod handed it over."""

from __future__ import annotations

from vfiod.core.errors import InUse, NotFound
from vfiod.core.registry import codec
from vfiod.core.registry.codec import ATTACHMENT_COLUMNS
from vfiod.core.registry.rows import AttachmentRow
from vfiod.core.registry.store import Store

_SELECT = f"SELECT {codec.select(ATTACHMENT_COLUMNS)} FROM attachments"  # noqa: S608


class AttachmentTable(Store):
    def _attachments_where(self, condition: str, *params: object) -> list[AttachmentRow]:
        rows = self._query(f"{_SELECT} WHERE {condition} ORDER BY id", params)
        return [codec.attachment_from_sql(r) for r in rows]

    def add_attachment(self, row: AttachmentRow) -> AttachmentRow:
        """Records that a device (or vGPU) is given to an instance; `row.id` is ignored and the stored row,
        with its new id, is returned. NotFound for an unknown device, InUse when it is attached already (to
        anyone: an idempotent repeat is for the caller to recognise)."""
        values = codec.attachment_values(row)
        with self.transaction():
            device = self._query("SELECT name, pci_address FROM devices WHERE id = ?", (row.device_id,))
            if not device:
                raise NotFound(f"no device with id {row.device_id!r} is registered")
            held = self.attachment_of_device(row.device_id)
            if held is not None:
                raise InUse(
                    f"device {device[0][0]!r} ({device[0][1] or 'an mdev'}) is already attached to instance "
                    f"{held.instance_id!r} (uid {held.owner_uid})"
                )
            new_id = self._insert("attachments", values)
            stored = self._attachments_where("id = ?", new_id)
        return stored[0]

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
