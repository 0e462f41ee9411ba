"""vfioctl's output: the human tables and reports, the `--json` documents, and the cloud-hypervisor
`--device` arguments built from Attach's device configs.

Pure functions from the contract's records (plain dicts, as `vfioctl_bus.unwrap` leaves them) to text, so
they are tested without a bus. Keys the contract may add later are never dropped: the JSON carries every
key the service sent, and the human views list unknown keys after the known ones.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from vfiod.cli.report import device_label, field, group_text, scalar, table
from vfiod.core.records import NO_OWNER


def to_json(doc: object) -> str:
    """The one JSON style of vfioctl: sorted keys, 2-space indent, trailing newline."""
    return json.dumps(doc, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def to_json_line(doc: object) -> str:
    """One compact JSON object per line (`monitor --json`)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"


# ----- Device ---------------------------------------------------------------------------------------------


def render_devices(devices: Sequence[Mapping[str, Any]]) -> str:
    if not devices:
        return "no registered devices\n"
    header = ("ID", "NAME", "ADDRESS", "DEVICE", "DRIVER", "STATE", "ATTACHED TO", "TAGS")
    rows = []
    for d in devices:
        attached = field(d, "attached_to")
        if attached and d.get("owner_uid", NO_OWNER) != NO_OWNER:
            attached += f" (uid {d['owner_uid']})"
        tags = d.get("tags") or {}
        rows.append(
            (
                field(d, "id"),
                field(d, "name"),
                field(d, "pci_address"),
                device_label(d),
                field(d, "driver") or "-",
                field(d, "state") or "-",
                attached or "-",
                scalar(tags) if isinstance(tags, Mapping) else "-",
            )
        )
    return "\n".join(table(header, rows)) + "\n"


# ----- profiles and vGPUs ---------------------------------------------------------------------------------


def render_profiles(profiles: Sequence[Mapping[str, Any]]) -> str:
    if not profiles:
        return (
            "no vGPU profiles: no mediated-device parent is registered (see /sys/class/mdev_bus) and no "
            "NVIDIA vendor-VFIO VF offers types\n"
        )
    header = ("TYPE", "NAME", "FRAMEWORK", "FRAMEBUFFER", "AVAILABLE", "PARENTS")
    rows = [
        (
            field(p, "type_id"),
            field(p, "name"),
            field(p, "framework"),
            f"{p['framebuffer_mb']} MB" if p.get("framebuffer_mb") else "-",
            field(p, "available"),
            _parents(p.get("parents") or []),
        )
        for p in profiles
    ]
    return "\n".join(table(header, rows)) + "\n"


def _parents(names: Sequence[str]) -> str:
    """A few parents by name; many (a GPU's 32 VFs) as a count and the first and last (--json has all)."""
    if len(names) <= 4:
        return ", ".join(names) or "-"
    return f"{len(names)}: {names[0]} ... {names[-1]}"


def render_vgpus(vgpus: Sequence[Mapping[str, Any]]) -> str:
    if not vgpus:
        return "no vGPUs\n"
    header = ("UUID", "PROFILE", "PARENT", "INSTANCE", "OWNER", "STATE", "MANAGED")
    rows = [
        (
            field(v, "uuid"),
            field(v, "profile"),
            field(v, "parent"),
            field(v, "instance_id") or "-",
            "-" if v.get("owner_uid", NO_OWNER) == NO_OWNER else str(v["owner_uid"]),
            field(v, "state"),
            "yes" if v.get("managed") else "no (not created by vfiod: never touched)",
        )
        for v in vgpus
    ]
    return "\n".join(table(header, rows)) + "\n"


_DEVICE_KEYS = (
    "name",
    "id",
    "type",
    "pci_address",
    "vendor_id",
    "device_id",
    "subsystem_vendor_id",
    "subsystem_device_id",
    "vendor_name",
    "device_name",
    "iommu_group",
    "driver",
    "native_driver",
    "bound_to_vfio",
    "state",
    "attached_to",
    "owner_uid",
    "created_at",
    "sysfs_path",
    "vfio_group_path",
    "object_path",
    "tags",
)


def render_device(d: Mapping[str, Any]) -> str:
    present = [k for k in _DEVICE_KEYS if k in d]
    width = max((len(k) for k in [*present, *d]), default=0)
    lines = [f"{k.ljust(width)}  {scalar(d[k])}" for k in present]
    lines += [f"{k.ljust(width)}  {scalar(d[k])}" for k in sorted(d) if k not in _DEVICE_KEYS]
    return "\n".join(lines) + "\n"


# ----- Attach ---------------------------------------------------------------------------------------------


def _config_value(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


# device_config keys for QEMU (`-device vfio-pci,sysfsdev=`) and for the record, not for cloud-hypervisor
QEMU_ONLY = frozenset({"sysfsdev", "uuid"})


def device_argument(attachment: Mapping[str, Any]) -> str:
    """cloud-hypervisor's `--device` value for one attachment: `path=...` first, then any other
    DeviceConfig keys (e.g. `x_nv_gpudirect_clique=0`) in key order."""
    config = attachment.get("device_config")
    config = {k: v for k, v in (config.items() if isinstance(config, Mapping) else ()) if k not in QEMU_ONLY}
    path = config.pop("path", None) or attachment.get("sysfs_path") or ""
    parts = [f"path={path}", *(f"{k}={_config_value(v)}" for k, v in sorted(config.items()))]
    return ",".join(parts)


def cloud_hypervisor_args(attachments: Sequence[Mapping[str, Any]]) -> list[str]:
    """argv words for cloud-hypervisor: `--device <config>` per attachment, in the order given."""
    out: list[str] = []
    for a in attachments:
        out += ["--device", device_argument(a)]
    return out


def attach_document(
    instance: str, attachments: Sequence[Mapping[str, Any]], warnings: Sequence[str]
) -> dict[str, Any]:
    return {
        "instance": instance,
        # any record this call made (the daemon's per-record `changed`); False for an idempotent repeat
        "changed": any(bool(a.get("changed", True)) for a in attachments),
        "attachments": [dict(a) for a in attachments],
        "warnings": list(warnings),
        "cloud_hypervisor_args": cloud_hypervisor_args(attachments),
    }


def _cdev_text(attachment: Mapping[str, Any]) -> str:
    cdev = field(attachment, "vfio_cdev_path")
    return f"{cdev} (root's)" if cdev else "-"


def render_attach(instance: str, attachments: Sequence[Mapping[str, Any]], warnings: Sequence[str]) -> str:
    lines = [f"Attached to {instance}:"]
    header = ("ADDRESS", "ROLE", "GROUP", "GROUP NODE", "DEVICE ID")
    rows = [
        (
            field(a, "pci_address"),
            field(a, "role") or "-",
            group_text(a),
            field(a, "vfio_group_path") or _cdev_text(a),
            field(a, "id") or "-",
        )
        for a in attachments
    ]
    lines += table(header, rows, "  ")
    if any(field(a, "handoff") == "fd" for a in attachments):
        lines += [
            "",
            "handoff fd: no node changed owner; the VMM's launcher calls OpenDevices for descriptors of",
            "/dev/iommu and each cdev (QEMU: -object iommufd,id=i0,fd=N -device vfio-pci,fd=M,iommufd=i0)",
        ]
    lines += ["", "cloud-hypervisor:"]
    lines += [f"  --device {device_argument(a)}" for a in attachments]
    if warnings:
        lines += ["", "Warnings (what the VMM still needs):"]
        lines += [f"  ! {w}" for w in warnings]
    return "\n".join(lines) + "\n"


def vgpu_document(instance: str, attachment: Mapping[str, Any], warnings: Sequence[str]) -> dict[str, Any]:
    config = attachment.get("device_config")
    sysfsdev = config.get("sysfsdev", "") if isinstance(config, Mapping) else ""
    return {
        "instance": instance,
        "attachment": dict(attachment),
        "warnings": list(warnings),
        "cloud_hypervisor_args": cloud_hypervisor_args([attachment]),
        "qemu_args": ["-device", f"vfio-pci,sysfsdev={sysfsdev}"],
    }


def render_vgpu_attach(instance: str, attachment: Mapping[str, Any], warnings: Sequence[str]) -> str:
    doc = vgpu_document(instance, attachment, warnings)
    config = attachment.get("device_config")
    uuid = config.get("uuid", "") if isinstance(config, Mapping) else ""
    node = field(attachment, "vfio_group_path")
    lines = [
        f"vGPU {uuid} for {instance}: {f'group node {node}' if node else f'cdev {_cdev_text(attachment)}'}, "
        f"device id {field(attachment, 'id') or '-'}",
        "",
        "cloud-hypervisor:",
        f"  --device {device_argument(attachment)}",
        "QEMU:",
        f"  {' '.join(doc['qemu_args'])}",
    ]
    if warnings:
        lines += ["", "Warnings (what the VMM still needs):"]
        lines += [f"  ! {w}" for w in warnings]
    return "\n".join(lines) + "\n"


# ----- Reconcile / Recover / ImportHypeman reports ----------------------------------------------------------


def render_report(title: str, report: Mapping[str, Any]) -> str:
    lines = [title]
    findings = [str(f) for f in report.get("findings") or []]
    counters = {k: v for k, v in report.items() if k != "findings"}
    if counters:
        width = max(len(k) for k in counters)
        lines += [f"  {k.ljust(width)}  {scalar(v)}" for k, v in sorted(counters.items())]
    if findings:
        lines += ["Findings:"]
        lines += [f"  - {f}" for f in findings]
    elif not counters:
        lines.append("  nothing to report")
    return "\n".join(lines) + "\n"


# ----- monitor --------------------------------------------------------------------------------------------


def prop_value(value: object) -> str:
    """A property value in a monitor line: JSON-ish where a bare word would be ambiguous."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        plain = value != "" and all(c.isalnum() or c in "-_.:/@+" for c in value)
        return value if plain else json.dumps(value, ensure_ascii=False)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


_ADDED_SUMMARY = ("State", "Driver", "BoundToVfio", "AttachedTo")


def monitor_line(event: Mapping[str, Any]) -> str:
    """`<time>  <event>  <name> (<address>)  Key=value ...` for one monitor event."""
    kind = field(event, "event")
    if kind == "service":
        owner = field(event, "owner")
        what = (
            f"{field(event, 'name')} is on the bus ({owner})"
            if owner
            else f"{field(event, 'name')} left the bus"
        )
        return f"{field(event, 'time')}  service  {what}\n"
    who = field(event, "name") or field(event, "id") or field(event, "path")
    addr = field(event, "pci_address")
    subject = f"{who} ({addr})" if addr else who
    if kind == "changed":
        props = dict(event.get("changed") or {})
    else:  # added: the properties that say where the device stands, not all of them
        all_props = event.get("properties") or {}
        props = {k: all_props[k] for k in _ADDED_SUMMARY if k in all_props}
    parts = [f"{k}={prop_value(v)}" for k, v in sorted(props.items())]
    parts += [f"{k}=?" for k in event.get("invalidated") or []]
    tail = ("  " + " ".join(parts)) if parts else ""
    return f"{field(event, 'time')}  {kind:<7}  {subject}{tail}\n"
