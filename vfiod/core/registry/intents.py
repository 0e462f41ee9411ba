"""The intent journal: an act is written here before it happens and cleared after, so start-up can finish
or roll back whatever a crash interrupted.

Four kinds, each with its own columns (see IntentKind): `function` (an operation moves one function from
its native driver and module), `write` (one sysfs write), `grant` (a group node is handed over; its owner
and mode before), `claim` (a vGPU is about to be created: parent, uuid and type, journaled before the first
write). Ids are never reused, and each device's `settled_through` is an id: every intent up to it is known
to be resolved.
"""

from __future__ import annotations

from vfiod.core.registry import codec
from vfiod.core.registry.codec import INTENT_COLUMNS
from vfiod.core.registry.rows import IntentKind, IntentRow, utc_now
from vfiod.core.registry.store import Store
from vfiod.host.backend import NodeOwner

_SELECT = f"SELECT {codec.select(INTENT_COLUMNS)} FROM intents"  # noqa: S608


class IntentJournal(Store):
    def _begin_intent(
        self, kind: IntentKind, action: str, boot_id: str, operation: str, **fields: object
    ) -> int:
        values = codec.encode(
            INTENT_COLUMNS,
            {
                "kind": kind,
                "action": action,
                "boot_id": boot_id,
                "operation": operation,
                "created_at": utc_now(),
                "device_id": "",
                "pci_address": "",
                "iommu_group": -1,
                "from_driver": "",
                "to_driver": "",
                "value": "",
                "native_module": "",
                "node_uid": None,
                "node_gid": None,
                "node_mode": None,
                "vgpu_parent": "",
                "vgpu_uuid": "",
                "vgpu_type": "",
                **fields,
            },
        )
        with self.transaction():
            return self._insert("intents", values)

    def journal_function(
        self,
        *,
        action: str,
        boot_id: str,
        operation: str,
        device_id: str,
        pci_address: str,
        iommu_group: int,
        from_driver: str,
        native_module: str,
        to_driver: str,
    ) -> int:
        """Operation `operation` (an `action` such as attach or detach) is about to move this function
        from its native driver (and the module providing it) to `to_driver`. Call it inside the transaction
        that makes the state change it accompanies; returns the intent's id."""
        return self._begin_intent(
            "function",
            action,
            boot_id,
            operation,
            device_id=device_id,
            pci_address=pci_address,
            iommu_group=iommu_group,
            from_driver=from_driver,
            native_module=native_module,
            to_driver=to_driver,
        )

    def journal_write(
        self,
        *,
        action: str,
        boot_id: str,
        operation: str,
        pci_address: str,
        from_driver: str,
        to_driver: str,
        value: str = "",
    ) -> int:
        """One sysfs write is about to happen: a driver change (`action` override, unbind, probe,
        clear-override: `from_driver`, `to_driver`) or another attribute (`action` its name, `value` what
        is written, e.g. sriov_numvfs and a count)."""
        return self._begin_intent(
            "write",
            action,
            boot_id,
            operation,
            pci_address=pci_address,
            from_driver=from_driver,
            to_driver=to_driver,
            value=value,
        )

    def journal_grant(self, *, boot_id: str, operation: str, iommu_group: int, node_prev: NodeOwner) -> int:
        """/dev/vfio/<iommu_group> is about to change owner; `node_prev` is its owner and mode now."""
        return self._begin_intent(
            "grant",
            "grant",
            boot_id,
            operation,
            iommu_group=iommu_group,
            node_uid=node_prev.uid,
            node_gid=node_prev.gid,
            node_mode=node_prev.mode,
        )

    def journal_claim(
        self,
        *,
        action: str,
        boot_id: str,
        operation: str,
        device_id: str,
        parent: str,
        uuid: str,
        type_id: str,
    ) -> int:
        """A vGPU (`device_id`, the id it will be registered with) of `type_id` is about to be created
        (`action`) on `parent` with `uuid`: written before the first write, so a crash leaves a claim that
        names exactly what may exist."""
        return self._begin_intent(
            "claim",
            action,
            boot_id,
            operation,
            device_id=device_id,
            vgpu_parent=codec.nonempty("vgpu_parent", parent),
            vgpu_uuid=codec.uuid("vgpu_uuid", uuid),
            vgpu_type=codec.nonempty("vgpu_type", type_id),
        )

    def clear_intent(self, intent_id: int) -> bool:
        """Closes an intent; False when it was not open (already cleared or dropped)."""
        with self.transaction():
            return self._write("DELETE FROM intents WHERE id = ?", (intent_id,)).rowcount > 0

    def open_intents(self, boot_id: str | None = None) -> list[IntentRow]:
        """Open intents, oldest first; only those of `boot_id` when given."""
        condition, params = ("boot_id = ?", (boot_id,)) if boot_id is not None else ("1", ())
        rows = self._query(f"{_SELECT} WHERE {condition} ORDER BY id", params)
        return [codec.intent_from_sql(r) for r in rows]

    def intents_of_device(self, device_id: str, pci_address: str) -> list[IntentRow]:
        """Open intents naming the device (by id, or by address for write intents), oldest first."""
        rows = self._query(
            f"{_SELECT} WHERE (device_id = ? AND device_id <> '') OR (pci_address = ? AND pci_address <> '') "
            "ORDER BY id",
            (device_id, pci_address),
        )
        return [codec.intent_from_sql(r) for r in rows]

    def settle_intents(self, device_id: str) -> list[IntentRow]:
        """The device is settled (its stored state is what the kernel shows and nothing is pending): close
        every open intent naming it and move its generation past every intent written so far. Returns the
        intents it closed."""
        with self.transaction():
            found = self._query("SELECT pci_address, settled_through FROM devices WHERE id = ?", (device_id,))
            if not found:
                return []
            pci_address, settled_through = str(found[0][0]), int(found[0][1])
            closed = self.intents_of_device(device_id, pci_address)
            for intent in closed:
                self._write("DELETE FROM intents WHERE id = ?", (intent.id,))
            seq = self._query("SELECT seq FROM sqlite_sequence WHERE name = 'intents'")
            latest = int(seq[0][0]) if seq else 0
            if latest > settled_through:
                self._write("UPDATE devices SET settled_through = ? WHERE id = ?", (latest, device_id))
        return closed

    def drop_intents_of_other_boots(self, boot_id: str) -> list[IntentRow]:
        """Deletes and returns the intents of every other boot: the kernel state they describe is gone, so
        their devices must be read again from the kernel."""
        with self.transaction():
            stale = [i for i in self.open_intents() if i.boot_id != boot_id]
            self._write("DELETE FROM intents WHERE boot_id <> ?", (boot_id,))
        return stale
