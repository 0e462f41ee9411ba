"""The persistent registry: devices, vGPUs, attachments, the intent journal and persistence-unit holds, on
SQLite at `<state_dir>/vfiod.db`.

One concern per module: `rows` (the typed rows), `codec` (values to SQL and back), `schema` (versions and
migrations), `files` (refusing an untrustworthy file, creating, backing up, upgrading), `store` (the
connection and its transactions), and one module per table group (`devices`, `vgpus`, `attachments`,
`intents`, `holds`). Only what the kernel cannot tell is stored.
"""

from __future__ import annotations

from vfiod.core.registry.attachments import AttachmentTable
from vfiod.core.registry.codec import format_timestamp, parse_timestamp
from vfiod.core.registry.files import APPLICATION_ID, DB_NAME, RegistryError
from vfiod.core.registry.holds import HoldTable
from vfiod.core.registry.intents import IntentJournal
from vfiod.core.registry.rows import (
    ATTACHMENT_ROLES,
    DEVICE_STATES,
    HANDOFF_MODES,
    AttachmentRole,
    AttachmentRow,
    DeviceRow,
    DeviceState,
    HandoffMode,
    HoldRow,
    IntentKind,
    IntentRow,
    ParentHealthRow,
    VgpuRow,
    utc_now,
)
from vfiod.core.registry.schema import Migration
from vfiod.core.registry.store import DEFAULT_BUSY_TIMEOUT, MIN_SQLITE
from vfiod.core.registry.vgpus import VgpuTable
from vfiod.host.backend import NodeOwner


class Registry(VgpuTable, AttachmentTable, IntentJournal, HoldTable):
    """The open registry: `Registry.open(state_dir)`; every method may be called from any thread."""


__all__ = [
    "APPLICATION_ID",
    "ATTACHMENT_ROLES",
    "DB_NAME",
    "DEFAULT_BUSY_TIMEOUT",
    "DEVICE_STATES",
    "HANDOFF_MODES",
    "MIN_SQLITE",
    "AttachmentRole",
    "AttachmentRow",
    "DeviceRow",
    "DeviceState",
    "HandoffMode",
    "HoldRow",
    "IntentKind",
    "IntentRow",
    "Migration",
    "NodeOwner",
    "ParentHealthRow",
    "Registry",
    "RegistryError",
    "VgpuRow",
    "format_timestamp",
    "parse_timestamp",
    "utc_now",
]
