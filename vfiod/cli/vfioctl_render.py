"""vfioctl's output: the human tables and reports, the `--json` documents, and the cloud-hypervisor
`--device` arguments built from Attach's device configs.

Pure functions from the contract's records (plain dicts, as `vfioctl_bus.unwrap` leaves them) to text, so
they are tested without a bus. Keys the contract may add later are never dropped: the JSON carries every
key the service sent, and the human views list unknown keys after the known ones.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def to_json(doc: object) -> str:
    """The one JSON style of vfioctl: sorted keys, 2-space indent, trailing newline."""
    return json.dumps(doc, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def to_json_line(doc: object) -> str:
    """One compact JSON object per line (`monitor --json`)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"


def marks(encoding: str | None) -> tuple[str, str]:
    """✓/✗ when the output can show them, ASCII otherwise."""
    try:
        "✓✗".encode(encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return "ok", "!!"
    return "✓", "✗"


def scalar(value: object) -> str:
    """A value in one token-ish piece: booleans as yes/no, lists comma-joined, dicts as k=v pairs."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={scalar(v)}" for k, v in sorted(value.items())) or "-"
    if isinstance(value, list | tuple):
        return ", ".join(scalar(v) for v in value) or "-"
    text = str(value)
    return text if text != "" else "-"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return indent + "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return [line(header), *(line(r) for r in rows)]


def _str(rec: Mapping[str, Any], key: str, default: str = "") -> str:
    value = rec.get(key, default)
    return value if isinstance(value, str) else str(value)


def _int(rec: Mapping[str, Any], key: str, default: int = -1) -> int:
    value = rec.get(key, default)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _group(rec: Mapping[str, Any]) -> str:
    group = _int(rec, "iommu_group")
    return str(group) if group >= 0 else "-"


def _extra(rec: Mapping[str, Any], known: Iterable[str], indent: str = "  ") -> list[str]:
    """`key: value` lines for keys the service sent that this view does not know (added later)."""
    seen = set(known)
    return [f"{indent}{k}: {scalar(rec[k])}" for k in sorted(rec) if k not in seen]


# ----- GetHostStatus ---------------------------------------------------------------------------------------

_STATUS_KEYS = (
    "iommu_enabled",
    "iommu_groups",
    "interrupt_remapping",
    "vfio_pci_loaded",
    "vfio_container",
    "vfio_cdev",
    "iommufd",
    "hugepages_2m",
    "gpu_mode",
    "gpu_slots_total",
    "gpu_slots_used",
    "problems",
    "notes",
    "claims",
)


def render_status(status: Mapping[str, Any], mark: tuple[str, str]) -> str:
    yes, no = mark
    lines = ["Host"]

    def check(ok: bool, text: str) -> None:
        lines.append(f"  {yes if ok else no} {text}")

    check(
        bool(status.get("iommu_enabled")), f"IOMMU enabled ({_int(status, 'iommu_groups', 0)} IOMMU groups)"
    )
    check(bool(status.get("interrupt_remapping")), "interrupt remapping")
    check(bool(status.get("vfio_pci_loaded")), "vfio-pci loaded")
    if "vfio_container" in status:
        check(bool(status.get("vfio_container")), "VFIO container (/dev/vfio/vfio)")
    check(bool(status.get("vfio_cdev")), "VFIO device cdev (/dev/vfio/devices)")
    check(bool(status.get("iommufd")), "iommufd (/dev/iommu)")
    hugepages = _int(status, "hugepages_2m", 0)
    check(hugepages > 0, f"2 MiB huge pages reserved: {hugepages}")
    mode = _str(status, "gpu_mode", "none")
    slots = f"{_int(status, 'gpu_slots_total', 0)} slot(s), {_int(status, 'gpu_slots_used', 0)} used"
    check(mode == "passthrough", f"GPU passthrough: {slots}" if mode == "passthrough" else f"GPU mode {mode}")
    problems = [str(p) for p in status.get("problems") or []]
    if problems:
        lines += ["", "Problems"]
        lines += [f"  {no} {p}" for p in problems]
    notes = [str(n) for n in status.get("notes") or []]
    if notes:
        lines += ["", "Notes"]
        lines += [f"  - {n}" for n in notes]
    claims = [c for c in status.get("claims") or [] if isinstance(c, Mapping)]
    if claims:
        lines += ["", "Other tools' claims"]
        for c in claims:
            devices = ", ".join(str(d) for d in c.get("devices") or []) or "-"
            lines.append(f"  - {_str(c, 'text') or _str(c, 'kind')} [{_str(c, 'source')}] devices: {devices}")
            if _str(c, "note"):
                lines.append(f"      {_str(c, 'note')}")
    extra = _extra(status, _STATUS_KEYS)
    if extra:
        lines += ["", "Other", *extra]
    return "\n".join(lines) + "\n"


# ----- ListAvailable ---------------------------------------------------------------------------------------


def _device_label(rec: Mapping[str, Any]) -> str:
    label = f"{_str(rec, 'vendor_name')} {_str(rec, 'device_name')}".strip()
    return label or f"{_str(rec, 'vendor_id')}:{_str(rec, 'device_id')}"


def render_available(devices: Sequence[Mapping[str, Any]], mark: tuple[str, str], all_devices: bool) -> str:
    _, no = mark
    what = "every PCI function" if all_devices else "display controllers (--all for every PCI function)"
    lines = [f"Devices: {what}"]
    if not devices:
        return "\n".join([*lines, "  none found"]) + "\n"
    by_addr = {_str(d, "pci_address"): d for d in devices}
    header = ("ADDRESS", "DEVICE", "TYPE", "GROUP", "MEMBERS", "DRIVER", "REGISTERED", "READY")
    rows = []
    for d in devices:
        addr = _str(d, "pci_address")
        members = []
        for m in d.get("iommu_group_members") or []:
            if m == addr:
                continue
            other = by_addr.get(str(m))
            members.append(f"{m} ({_str(other, 'current_driver') or 'no driver'})" if other else str(m))
        rows.append(
            (
                addr,
                _device_label(d),
                _str(d, "type") or "-",
                _group(d),
                ", ".join(members) or "-",
                _str(d, "current_driver") or "-",
                _str(d, "registered_as") or "-",
                "yes" if d.get("passthrough_ready") else "no",
            )
        )
    body = table(header, rows, "  ")
    lines.append(body[0])
    for d, line in zip(devices, body[1:], strict=True):
        lines.append(line)
        lines += [f"      {no} {b}" for b in d.get("blockers") or []]
    return "\n".join(lines) + "\n"


def render_check(
    status: Mapping[str, Any], devices: Sequence[Mapping[str, Any]], mark: tuple[str, str]
) -> str:
    ready = [d for d in devices if d.get("passthrough_ready") and _str(d, "type") == "gpu"]
    lines = [render_status(status, mark).rstrip("\n"), "", render_available(devices, mark, True).rstrip("\n")]
    lines.append("")
    if ready:
        addrs = ", ".join(_str(d, "pci_address") for d in ready)
        lines.append(f"Ready: {len(ready)} GPU(s) can be passed through as they stand: {addrs}")
    else:
        lines.append("Ready: no GPU can be passed through as it stands (see the blockers above)")
    return "\n".join(lines) + "\n"


# ----- Device ---------------------------------------------------------------------------------------------


def render_devices(devices: Sequence[Mapping[str, Any]]) -> str:
    if not devices:
        return "no registered devices\n"
    header = ("ID", "NAME", "ADDRESS", "DEVICE", "DRIVER", "STATE", "ATTACHED TO", "TAGS")
    rows = []
    for d in devices:
        attached = _str(d, "attached_to")
        if attached and "owner_uid" in d:
            attached += f" (uid {d['owner_uid']})"
        tags = d.get("tags") or {}
        rows.append(
            (
                _str(d, "id"),
                _str(d, "name"),
                _str(d, "pci_address"),
                _device_label(d),
                _str(d, "driver") or "-",
                _str(d, "state") or "-",
                attached or "-",
                scalar(tags) if isinstance(tags, Mapping) else "-",
            )
        )
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


def device_argument(attachment: Mapping[str, Any]) -> str:
    """cloud-hypervisor's `--device` value for one attachment: `path=...` first, then any other
    DeviceConfig keys (e.g. `x_nv_gpudirect_clique=0`) in key order."""
    config = attachment.get("device_config")
    config = dict(config) if isinstance(config, Mapping) else {}
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
        "attachments": [dict(a) for a in attachments],
        "warnings": list(warnings),
        "cloud_hypervisor_args": cloud_hypervisor_args(attachments),
    }


def render_attach(instance: str, attachments: Sequence[Mapping[str, Any]], warnings: Sequence[str]) -> str:
    lines = [f"Attached to {instance}:"]
    header = ("ADDRESS", "ROLE", "GROUP", "GROUP NODE", "DEVICE ID")
    rows = [
        (
            _str(a, "pci_address"),
            _str(a, "role") or "-",
            _group(a),
            _str(a, "vfio_group_path") or "-",
            _str(a, "id") or "-",
        )
        for a in attachments
    ]
    lines += table(header, rows, "  ")
    lines += ["", "cloud-hypervisor:"]
    lines += [f"  --device {device_argument(a)}" for a in attachments]
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
    kind = _str(event, "event")
    if kind == "service":
        owner = _str(event, "owner")
        what = (
            f"{_str(event, 'name')} is on the bus ({owner})"
            if owner
            else f"{_str(event, 'name')} left the bus"
        )
        return f"{_str(event, 'time')}  service  {what}\n"
    who = _str(event, "name") or _str(event, "id") or _str(event, "path")
    addr = _str(event, "pci_address")
    subject = f"{who} ({addr})" if addr else who
    if kind == "changed":
        props = dict(event.get("changed") or {})
    else:  # added: the properties that say where the device stands, not all of them
        all_props = event.get("properties") or {}
        props = {k: all_props[k] for k in _ADDED_SUMMARY if k in all_props}
    parts = [f"{k}={prop_value(v)}" for k, v in sorted(props.items())]
    parts += [f"{k}=?" for k in event.get("invalidated") or []]
    tail = ("  " + " ".join(parts)) if parts else ""
    return f"{_str(event, 'time')}  {kind:<7}  {subject}{tail}\n"
