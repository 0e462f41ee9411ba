"""Importing hypeman's own device registry (`<data_dir>/devices/<id>/metadata.json`, written by its Go
`lib/devices`) so instances that reference those ids and names keep working.

Ids and names are kept. A device hypeman had attached becomes a reservation for the importing caller's
uid (the hypeman user), so nobody else can take it before hypeman attaches it again. Every record that
cannot be imported is reported with the reason — never skipped silently, unlike the Go code's loader.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path

from vfiod.core import discovery, registration, validation
from vfiod.core.context import Caller, Report
from vfiod.core.deps import CoreDeps
from vfiod.core.errors import DeviceNotFound, InvalidArgument, VfiodError
from vfiod.core.registry import AttachmentRow, DeviceRow
from vfiod.logevents import Action

log = logging.getLogger("vfiod.import")

IMPORT_BOOT = "imported-from-hypeman"


def _created_at(value: object) -> datetime:
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            if parsed.tzinfo is not None:
                return parsed.astimezone(UTC).replace(microsecond=0)
        except ValueError:
            pass
    return datetime.now(UTC).replace(microsecond=0)


def import_devices(deps: CoreDeps, caller: Caller, data_dir: object) -> Report:
    if not isinstance(data_dir, str) or not data_dir.startswith("/") or "\x00" in data_dir:
        raise InvalidArgument("data_dir must be an absolute path (hypeman's data directory)")
    devices_dir = Path(data_dir) / "devices"
    if not devices_dir.is_dir():
        raise InvalidArgument(f"{devices_dir} does not exist or is not a directory")
    report = Report(counters={"imported": 0, "skipped": 0, "reservations": 0})
    for entry in sorted(devices_dir.iterdir()):
        meta = entry / "metadata.json"
        try:
            record = json.loads(meta.read_text(encoding="utf-8"))
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            report.count("skipped")
            report.findings.append(f"{meta}: unreadable ({e}); not imported")
            continue
        try:
            _import_one(deps, caller, record, report)
        except (VfiodError, ValueError) as e:
            report.count("skipped")
            msg = e.message if isinstance(e, VfiodError) else str(e)
            report.findings.append(f"{meta}: {msg}; not imported")
    return report


def _import_one(deps: CoreDeps, caller: Caller, record: dict[str, object], report: Report) -> None:
    device_id = record.get("id")
    if not validation.is_device_id(device_id):
        raise ValueError(f"id {device_id!r} is not a 24-character cuid2 id")
    addr = validation.pci_address(record.get("pci_address"))
    name = record.get("name") or addr.default_device_name()
    name = validation.device_name(name)
    raw_tags = record.get("tags") or {}
    tags = validation.tags(raw_tags)
    if deps.registry.get_device(device_id) is not None:
        raise ValueError(f"id {device_id} is already registered")
    try:
        info = discovery.describe(deps.host, addr, deps.pci_ids)
    except DeviceNotFound as e:
        raise ValueError(f"{addr} is not on this host") from e
    vendor = record.get("vendor_id")
    if vendor and str(vendor).lower() != info.vendor_id:
        raise ValueError(f"{addr} is now {info.vendor_id}:{info.device_id}, hypeman recorded {vendor}")
    base = registration.new_row(deps, addr, name, tags, info)
    row = DeviceRow(**{**base.__dict__, "id": device_id, "created_at": _created_at(record.get("created_at"))})
    with deps.registry.transaction():
        deps.registry.add_device(row)
        attached = record.get("attached_to")
        if isinstance(attached, str) and attached:
            instance = validation.instance_id(attached)
            deps.registry.add_attachment(
                AttachmentRow(
                    device_id=device_id,
                    instance_id=instance,
                    owner_uid=caller.uid,
                    iommu_group=info.iommu_group,
                    boot_id=IMPORT_BOOT,
                )
            )
            report.count("reservations")
    report.count("imported")
    report.findings.append(f"imported {name} ({addr}) as {device_id}")
    log.info(
        "imported hypeman device %s (%s)",
        name,
        addr,
        extra={"ACTION": Action.IMPORT_HYPEMAN, "DEVICE_ID": device_id},
    )
