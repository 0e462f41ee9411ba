"""Python values to SQLite values and back: one encoder per column, chosen from a table per table.

Every value is checked before it reaches SQL, so a constraint the schema still enforces firing means a bug
here. Timestamps are RFC 3339 in UTC with a `Z`, to the second; tags are compact sorted JSON, so equal tag
sets are byte-equal in the file.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final

from vfiod.core.registry.rows import (
    ATTACHMENT_ROLES,
    DEVICE_STATES,
    HANDOFF_MODES,
    INTENT_KINDS,
    VGPU_FRAMEWORKS,
    AttachmentRow,
    DeviceRow,
    HoldRow,
    IntentRow,
    ParentHealthRow,
    VgpuRow,
)
from vfiod.core.validation import is_device_id
from vfiod.host.backend import NodeOwner
from vfiod.host.mdev import UUID_RE
from vfiod.host.pciaddr import InvalidPciAddressText, PciAddress

_TIMESTAMP_FORMAT: Final = "%Y-%m-%dT%H:%M:%SZ"

Encoder = Callable[[str, object], object]


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with a `Z`, to the second (`2026-11-26T07:15:21Z`): how every timestamp is stored."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        # hypeman stored local time; a naive datetime would silently be read back as UTC.
        raise ValueError(f"timestamp {moment!r} has no time zone; the registry stores aware UTC times only")
    return moment.astimezone(UTC).strftime(_TIMESTAMP_FORMAT)


def parse_timestamp(text: str) -> datetime:
    return datetime.strptime(text, _TIMESTAMP_FORMAT).replace(tzinfo=UTC)


# --- one value ------------------------------------------------------------------------------------------


def text(column: str, value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{column} must be a string, not {type(value).__name__} ({value!r})")
    return value


def nonempty(column: str, value: object) -> str:
    if not text(column, value):
        raise ValueError(f"{column} must not be empty")
    return str(value)


def integer(column: str, value: object, minimum: int | None = None) -> int:
    # bool is an int subclass; True as a group number is a bug, not 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{column} must be an integer, not {type(value).__name__} ({value!r})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{column} must be at least {minimum}, not {value}")
    return value


def _at_least(minimum: int) -> Encoder:
    return lambda column, value: integer(column, value, minimum)


def _optional(encode: Encoder) -> Encoder:
    return lambda column, value: None if value is None else encode(column, value)


def _choice(allowed: Sequence[str]) -> Encoder:
    def encode(column: str, value: object) -> str:
        if value not in allowed:
            raise ValueError(f"{column} must be one of {', '.join(repr(a) for a in allowed)}, not {value!r}")
        return str(value)

    return encode


def flag(column: str, value: object) -> int:
    if not isinstance(value, bool):
        raise ValueError(f"{column} must be a bool, not {type(value).__name__} ({value!r})")
    return int(value)


def timestamp(column: str, value: object) -> str:
    if not isinstance(value, datetime):
        raise ValueError(f"{column} must be a datetime, not {type(value).__name__} ({value!r})")
    return format_timestamp(value)


def pci(column: str, value: object) -> str:
    try:
        return str(PciAddress.parse(text(column, value)))
    except InvalidPciAddressText as e:
        raise ValueError(str(e)) from None


def pci_or_empty(column: str, value: object) -> str:
    return "" if value in ("", None) else pci(column, value)


def device_id(column: str, value: object) -> str:
    if not is_device_id(value):
        raise ValueError(f"{column} {value!r} is not 24 characters of the cuid2 format")
    return str(value)


def device_name(column: str, value: object) -> str:
    name = text(column, value)
    # Names are looked up only when the string is not id-shaped (find), so an id-shaped name would be
    # unreachable.
    if not name or is_device_id(name):
        raise ValueError(f"device name {name!r} is empty or has the form of a device id")
    return name


def uuid(column: str, value: object) -> str:
    if not isinstance(value, str) or not UUID_RE.fullmatch(value):
        raise ValueError(f"{column} must be a lower-case UUID, not {value!r}")
    return value


def tags_json(column: str, value: object) -> str:
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError(f"{column} must be a mapping of strings to strings, not {value!r}")
    return json.dumps(dict(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# --- the tables' columns --------------------------------------------------------------------------------

DEVICE_COLUMNS: Final[dict[str, Encoder]] = {
    "id": device_id,
    "name": device_name,
    "pci_address": pci_or_empty,
    "vendor_id": text,
    "device_id": text,
    "class_code": text,
    "subsystem_vendor_id": text,
    "subsystem_device_id": text,
    "iommu_group": _at_least(-1),
    "native_driver": text,
    "native_module": text,
    "state": _choice(DEVICE_STATES),
    "bound_by_vfiod": flag,
    "created_at": timestamp,
    "tags": tags_json,
    "vendor_name": text,
    "device_name": text,
    "settled_through": _at_least(0),
}
VGPU_COLUMNS: Final[dict[str, Encoder]] = {
    "device_id": device_id,
    "uuid": uuid,
    "framework": _choice(VGPU_FRAMEWORKS),
    "type_id": nonempty,
    "profile": nonempty,
    "parent": nonempty,
    "physical_gpu": pci_or_empty,
    "managed": flag,
}
ATTACHMENT_COLUMNS: Final[dict[str, Encoder]] = {
    "id": _at_least(0),
    "device_id": device_id,
    "instance_id": nonempty,
    "owner_uid": _at_least(0),
    "iommu_group": _at_least(-1),
    "boot_id": text,
    "role": _choice(ATTACHMENT_ROLES),
    "attached_at": timestamp,
    "node_prev_uid": _optional(_at_least(0)),
    "node_prev_gid": _optional(_at_least(0)),
    "node_prev_mode": _optional(_at_least(0)),
    "gpudirect_clique": _optional(_at_least(0)),
    "handoff": _choice(HANDOFF_MODES),
}
INTENT_COLUMNS: Final[dict[str, Encoder]] = {
    "id": _at_least(0),
    "kind": _choice(INTENT_KINDS),
    "action": nonempty,
    "boot_id": text,
    "operation": text,
    "created_at": timestamp,
    "device_id": text,
    "pci_address": pci_or_empty,
    "iommu_group": _at_least(-1),
    "from_driver": text,
    "to_driver": text,
    "value": text,
    "native_module": text,
    "node_uid": _optional(_at_least(0)),
    "node_gid": _optional(_at_least(0)),
    "node_mode": _optional(_at_least(0)),
    "vgpu_parent": text,
    "vgpu_uuid": text,
    "vgpu_type": text,
}
HOLD_COLUMNS: Final[dict[str, Encoder]] = {
    "unit": nonempty,
    "was_active": flag,
    "holders": _at_least(0),
    "boot_id": text,
}
PARENT_COLUMNS: Final[dict[str, Encoder]] = {
    "parent": nonempty,
    "failures": _at_least(0),
    "last_failure": text,
    "since": timestamp,
}
NODE_PREV: Final = ("node_prev_uid", "node_prev_gid", "node_prev_mode")


def encode(table: Mapping[str, Encoder], values: Mapping[str, object]) -> dict[str, object]:
    """`values` checked and converted column by column; ValueError names the first bad one."""
    return {column: table[column](column, value) for column, value in values.items()}


def select(table: Mapping[str, Encoder], prefix: str = "") -> str:
    """The column list of a SELECT in the table's order (`prefix` qualifies them)."""
    return ", ".join(f"{prefix}{c}" for c in table)


def attachment_values(row: AttachmentRow) -> dict[str, object]:
    """A new attachment's columns (its id is assigned by SQLite), checked and converted."""
    prev = row.node_prev
    node = (prev.uid, prev.gid, prev.mode) if prev else (None, None, None)
    values = {c: getattr(row, c) for c in ATTACHMENT_COLUMNS if c not in ("id", *NODE_PREV)}
    return encode(ATTACHMENT_COLUMNS, {**values, **dict(zip(NODE_PREV, node, strict=True))})


def _named(table: Mapping[str, Encoder], values: Sequence[Any]) -> dict[str, Any]:
    return dict(zip(table, values, strict=True))


def device_from_sql(values: Sequence[Any]) -> DeviceRow:
    row = _named(DEVICE_COLUMNS, values)
    row["pci_address"] = PciAddress.parse(row["pci_address"])
    row["bound_by_vfiod"] = bool(row["bound_by_vfiod"])
    row["created_at"] = parse_timestamp(row["created_at"])
    row["tags"] = json.loads(row["tags"])
    return DeviceRow(**row)


def vgpu_from_sql(values: Sequence[Any]) -> VgpuRow:
    """From `SELECT <devices columns>, <vgpus columns>` of one joined row."""
    device = _named(DEVICE_COLUMNS, values[: len(DEVICE_COLUMNS)])
    vgpu = _named(VGPU_COLUMNS, values[len(DEVICE_COLUMNS) :])
    return VgpuRow(
        id=device["id"],
        name=device["name"],
        uuid=vgpu["uuid"],
        framework=vgpu["framework"],
        type_id=vgpu["type_id"],
        profile=vgpu["profile"],
        parent=vgpu["parent"],
        physical_gpu=vgpu["physical_gpu"],
        pci_address=PciAddress.parse(device["pci_address"]) if device["pci_address"] else None,
        vendor_id=device["vendor_id"],
        device_id=device["device_id"],
        iommu_group=device["iommu_group"],
        state=device["state"],
        managed=bool(vgpu["managed"]),
        created_at=parse_timestamp(device["created_at"]),
        tags=json.loads(device["tags"]),
        settled_through=device["settled_through"],
    )


def attachment_from_sql(values: Sequence[Any]) -> AttachmentRow:
    row = _named(ATTACHMENT_COLUMNS, values)
    row["attached_at"] = parse_timestamp(row["attached_at"])
    uid, gid, mode = (row.pop(c) for c in NODE_PREV)
    row["node_prev"] = None if uid is None else NodeOwner(uid, gid, mode)  # the schema sets all or none
    return AttachmentRow(**row)


def intent_from_sql(values: Sequence[Any]) -> IntentRow:
    row = _named(INTENT_COLUMNS, values)
    row["created_at"] = parse_timestamp(row["created_at"])
    uid, gid, mode = row.pop("node_uid"), row.pop("node_gid"), row.pop("node_mode")
    row["node_prev"] = None if uid is None else NodeOwner(uid, gid, mode)
    return IntentRow(**row)


def hold_from_sql(values: Sequence[Any]) -> HoldRow:
    row = _named(HOLD_COLUMNS, values)
    row["was_active"] = bool(row["was_active"])
    return HoldRow(**row)


def parent_from_sql(values: Sequence[Any]) -> ParentHealthRow:
    row = _named(PARENT_COLUMNS, values)
    row["since"] = parse_timestamp(row["since"])
    return ParentHealthRow(**row)
