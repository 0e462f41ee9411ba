"""The read-only calls: what is on the bus (ListAvailable), the host's readiness (GetHostStatus), and
registered devices and vGPUs as a client sees them (registry row and attachment read as one snapshot, then the
kernel's side)."""

from __future__ import annotations

from collections.abc import Mapping

from vfiod.core import discovery, profiles, validation
from vfiod.core.deps import CoreDeps
from vfiod.core.errors import InvalidArgument, NotFound
from vfiod.core.hoststatus import host_status
from vfiod.core.records import Device, device_from_row, device_from_vgpu
from vfiod.core.registry import DeviceRow


def list_available(deps: CoreDeps, *, all_devices: bool) -> list[discovery.AvailableDevice]:
    registered = {str(r.pci_address): r.id for r in deps.registry.list_devices()}
    return discovery.discover(deps.host, deps.pci_ids, all_devices=all_devices, registered=registered)


def host_status_record(deps: CoreDeps) -> dict[str, object]:
    attached = [
        str(row.pci_address)
        for row in deps.registry.list_devices()
        if deps.registry.attachment_of_device(row.id) is not None
    ]
    record = host_status(deps.host, deps.pci_ids, attached=attached).to_record()
    vgpus = profiles.vgpu_status(deps.host, profiles.quarantined(deps))
    if vgpus["vgpu_parents"]:
        record["gpu_mode"] = "vgpu"  # vGPU parents exist: hypeman shares GPUs here
    record.update(vgpus)
    return record


def resolve(deps: CoreDeps, id_or_name: object) -> DeviceRow:
    """A registered PCI device; a vGPU named here is refused by name (its own methods move it)."""
    key = validation.id_or_name(id_or_name)
    row = deps.registry.find(key)
    if row is None:
        if deps.registry.find_vgpu(key) is not None:
            raise InvalidArgument(
                f"{key!r} is a vGPU: AttachVGPU creates and hands over vGPUs, and Detach releases them"
            )
        raise NotFound(f"no registered device has the id or name {key!r}")
    return row


def get_device(deps: CoreDeps, id_or_name: object) -> Device:
    """A registered device or vGPU by id or name, as a Device record."""
    key = validation.id_or_name(id_or_name)
    with deps.registry.snapshot():
        vgpu = deps.registry.find_vgpu(key)
        att = deps.registry.attachment_of_device(vgpu.id) if vgpu is not None else None
    if vgpu is not None:
        return device_from_vgpu(deps.host, vgpu, att)
    return device(deps, resolve(deps, key))


def device(deps: CoreDeps, row: DeviceRow) -> Device:
    """The device as a client sees it: its row and attachment read as one snapshot (never `attached_to`
    from after a change with the state from before it), then the kernel's side."""
    with deps.registry.snapshot():
        stored = deps.registry.get_device(row.id)
        if stored is None:
            raise NotFound(f"device {row.name!r} was unregistered meanwhile")
        att = deps.registry.attachment_of_device(row.id)
    return device_from_row(deps.host, stored, att)


def list_devices(deps: CoreDeps, tags: Mapping[str, str] | None) -> list[Device]:
    if tags:
        tags = validation.tags(tags)
    with deps.registry.snapshot():
        rows = deps.registry.list_devices(tags or None)
        pairs = [(r, deps.registry.attachment_of_device(r.id)) for r in rows]
        vgpus = [
            v for v in deps.registry.list_vgpus() if all(v.tags.get(k) == x for k, x in (tags or {}).items())
        ]
        vgpu_pairs = [(v, deps.registry.attachment_of_device(v.id)) for v in vgpus]
    out = [device_from_row(deps.host, row, att) for row, att in pairs]
    return out + [device_from_vgpu(deps.host, v, att) for v, att in vgpu_pairs]
