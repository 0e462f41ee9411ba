"""The host report, rendered once for `vfiod check`, `vfioctl check` and `vfioctl status`: the host's
checks with their problems, notes and other tools' claims, then the PCI functions with each unready one's
blockers, and what is ready.

Pure functions from the contract's records (GetHostStatus's and ListAvailable's keys, as plain dicts) to
text: `vfiod check` builds the records from the host itself, vfioctl gets them from the daemon. Keys the
contract may add later are never dropped: unknown host keys are listed after the known ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any


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


def field(rec: Mapping[str, Any], key: str, default: str = "") -> str:
    value = rec.get(key, default)
    return value if isinstance(value, str) else str(value)


def int_field(rec: Mapping[str, Any], key: str, default: int = -1) -> int:
    value = rec.get(key, default)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def group_text(rec: Mapping[str, Any]) -> str:
    group = int_field(rec, "iommu_group")
    return str(group) if group >= 0 else "-"


def extra_lines(rec: Mapping[str, Any], known: Iterable[str], indent: str = "  ") -> list[str]:
    """`key: value` lines for keys the service sent that this view does not know (added later)."""
    seen = set(known)
    return [f"{indent}{k}: {scalar(rec[k])}" for k in sorted(rec) if k not in seen]


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
    "vgpu_parents",
    "vgpu_slots_total",
    "vgpu_slots_used",
    "vgpu_slots_allocatable",
    "quarantined",
    "problems",
    "notes",
    "claims",
)


PASS, WARN, FAIL, ABSENT = "pass", "warn", "fail", "absent"


def status_checks(status: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The host's checks as (level, text), in the manner of virt-host-validate: FAIL where passthrough
    cannot work, WARN where it works with a caveat or vfiod fixes it itself, ABSENT for an optional
    feature this host does not have (not a failure)."""
    out: list[tuple[str, str]] = []
    iommu = bool(status.get("iommu_enabled"))
    out.append(
        (PASS if iommu else FAIL, f"IOMMU enabled ({int_field(status, 'iommu_groups', 0)} IOMMU groups)")
    )
    out.append((PASS if status.get("interrupt_remapping") else WARN, "interrupt remapping"))
    loaded = bool(status.get("vfio_pci_loaded"))
    out.append(
        (PASS if loaded else WARN, "vfio-pci loaded" + ("" if loaded else " (vfiod loads it on first use)"))
    )
    cdev = bool(status.get("vfio_cdev"))
    if "vfio_container" in status:
        usable = status.get("vfio_container") or cdev or not loaded
        out.append(
            (
                PASS if status.get("vfio_container") else FAIL if not usable else ABSENT,
                "VFIO container (/dev/vfio/vfio)",
            )
        )
    out.append((PASS if cdev else ABSENT, "VFIO device cdev (/dev/vfio/devices)"))
    out.append((PASS if status.get("iommufd") else ABSENT, "iommufd (/dev/iommu)"))
    out.append(_handoff_modes(cdev, bool(status.get("iommufd")), loaded))
    hugepages = int_field(status, "hugepages_2m", 0)
    out.append((PASS if hugepages > 0 else ABSENT, f"2 MiB huge pages reserved: {hugepages}"))
    mode = field(status, "gpu_mode", "none")
    slots = (
        f"{int_field(status, 'gpu_slots_total', 0)} slot(s), {int_field(status, 'gpu_slots_used', 0)} used"
    )
    if mode == "vgpu":
        parents, total = int_field(status, "vgpu_parents", 0), int_field(status, "vgpu_slots_total", 0)
        used, free = int_field(status, "vgpu_slots_used", 0), int_field(status, "vgpu_slots_allocatable", 0)
        out.append(
            (
                PASS if free > 0 else WARN,
                f"vGPU: {parents} parent(s), {total} slot(s), {used} used, {free} can be created now",
            )
        )
        out += [(WARN, f"quarantined: {q}") for q in status.get("quarantined") or []]
    else:
        usable_slot = mode == "passthrough" and int_field(status, "gpu_slots_total", 0) > 0
        out.append(
            (
                PASS if usable_slot else WARN,
                f"GPU passthrough: {slots}" if usable_slot else "GPU passthrough: no usable slot",
            )
        )
    return out


def _handoff_modes(cdev: bool, iommufd: bool, vfio_loaded: bool) -> tuple[str, str]:
    """Which ways Attach can hand a device over here (`handoff`), and what fd mode lacks."""
    if cdev and iommufd:
        return PASS, "hand-over modes: node and fd (descriptors from OpenDevices; nodes stay root's)"
    why = []
    if not cdev and not vfio_loaded:
        why.append(
            "whether the kernel gives VFIO devices cdevs shows once vfio is loaded (on the first bind)"
        )
    elif not cdev:
        why.append("this kernel has no VFIO device cdevs (CONFIG_VFIO_DEVICE_CDEV)")
    if not iommufd:
        why.append("this kernel has no iommufd (CONFIG_IOMMUFD)")
    return ABSENT, f"hand-over modes: node only (group nodes given to the owner); fd: {'; '.join(why)}"


def failures(status: Mapping[str, Any]) -> list[str]:
    """The checks that FAIL (vfiod check exits 1 when there is one)."""
    return [text for level, text in status_checks(status) if level == FAIL]


def render_status(
    status: Mapping[str, Any], mark: tuple[str, str], warn: str = "!", absent: str = "-"
) -> str:
    yes, no = mark
    symbol = {PASS: yes, WARN: warn, FAIL: no, ABSENT: absent}
    lines = ["Host"]
    lines += [f"  {symbol[level]} {text}" for level, text in status_checks(status)]
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
            lines.append(
                f"  - {field(c, 'text') or field(c, 'kind')} [{field(c, 'source')}] devices: {devices}"
            )
            if field(c, "note"):
                lines.append(f"      {field(c, 'note')}")
    extra = extra_lines(status, _STATUS_KEYS)
    if extra:
        lines += ["", "Other", *extra]
    return "\n".join(lines) + "\n"


def device_label(rec: Mapping[str, Any]) -> str:
    label = f"{field(rec, 'vendor_name')} {field(rec, 'device_name')}".strip()
    return label or f"{field(rec, 'vendor_id')}:{field(rec, 'device_id')}"


def render_available(
    devices: Sequence[Mapping[str, Any]],
    mark: tuple[str, str],
    all_devices: bool,
    member_drivers: Mapping[str, str] | None = None,
) -> str:
    """The device table with each unready device's blockers (and any `warnings`) under it. A group
    member's driver comes from `member_drivers` (address -> driver) or, without it, from the listed
    devices."""
    _, no = mark
    what = "every PCI function" if all_devices else "display controllers (--all for every PCI function)"
    lines = [f"Devices: {what}"]
    if not devices:
        return "\n".join([*lines, "  none found"]) + "\n"
    by_addr = {field(d, "pci_address"): d for d in devices}

    def member(m: str) -> str:
        if member_drivers is not None:
            return f"{m} ({member_drivers.get(m) or 'no driver'})"
        other = by_addr.get(m)
        return f"{m} ({field(other, 'current_driver') or 'no driver'})" if other else m

    header = ("ADDRESS", "DEVICE", "TYPE", "GROUP", "MEMBERS", "DRIVER", "RESET", "REGISTERED", "READY")
    rows = []
    for d in devices:
        addr = field(d, "pci_address")
        members = [member(str(m)) for m in d.get("iommu_group_members") or [] if m != addr]
        rows.append(
            (
                addr,
                device_label(d),
                field(d, "type") or "-",
                group_text(d),
                ", ".join(members) or "-",
                field(d, "current_driver") or "-",
                ",".join(str(m) for m in d.get("reset_methods") or []) or "-",
                field(d, "registered_as") or "-",
                "yes" if d.get("passthrough_ready") else "no",
            )
        )
    body = table(header, rows, "  ")
    lines.append(body[0])
    for d, line in zip(devices, body[1:], strict=True):
        lines.append(line)
        lines += [f"      {note}" for note in _relations(d)]
        lines += [f"      {no} {b}" for b in d.get("blockers") or []]
        lines += [f"      ! {w}" for w in d.get("warnings") or []]
    return "\n".join(lines) + "\n"


def _relations(d: Mapping[str, Any]) -> list[str]:
    """What hangs off a device or what it hangs off: SR-IOV VFs and PF, mdev types; its vfio variant."""
    out = []
    total = int(d.get("sriov_totalvfs") or 0)
    if total:
        vfs = ", ".join(str(v) for v in d.get("virtfns") or [])
        out.append(
            f"SR-IOV: {int(d.get('sriov_numvfs') or 0)} of {total} VFs enabled" + (f" ({vfs})" if vfs else "")
        )
    if d.get("physfn"):
        out.append(f"SR-IOV virtual function of {d['physfn']}")
    if d.get("mdev_types"):
        out.append(f"mdev parent: {', '.join(str(t) for t in d['mdev_types'])}")
    if d.get("variant_driver"):
        out.append(f"VFIO driver: {d['variant_driver']} (the kernel's vfio variant for it, not vfio-pci)")
    return out


def render_sharing(sriov_pfs: Sequence[Mapping[str, Any]], profiles: Sequence[Mapping[str, Any]]) -> str:
    """SR-IOV physical functions (AvailableDevice records) and vGPU parents, mdev or NVIDIA vendor-VFIO
    (from Profile records): what the host could share, and the command that does it."""
    lines = ["GPU sharing:"]
    if not sriov_pfs and not profiles:
        lines.append("  no SR-IOV physical function and no mediated-device parent on this host")
    for d in sriov_pfs:
        vfs = [str(v) for v in d.get("virtfns") or []]
        listed = ", ".join(vfs) if len(vfs) <= 4 else f"{vfs[0]} ... {vfs[-1]}"
        lines.append(
            f"  SR-IOV {field(d, 'pci_address')} ({device_label(d)}): {d.get('sriov_numvfs', 0)} of "
            f"{d.get('sriov_totalvfs', 0)} VFs enabled{': ' + listed if vfs else ''}"
        )
    if sriov_pfs:
        lines.append("    (vfioctl vfs PF COUNT sets the number of VFs)")
    by_parent: dict[str, list[Mapping[str, Any]]] = {}
    for p in profiles:
        for parent in p.get("parents") or []:
            by_parent.setdefault(str(parent), []).append(p)
    by_offer: dict[str, list[str]] = {}  # parents offering the same types (a GPU's VFs) on one line
    for parent, types in sorted(by_parent.items()):
        offered = ", ".join(
            field(t, "type_id")
            + (f" ({field(t, 'name')})" if field(t, "name") != field(t, "type_id") else "")
            for t in types
        )
        kind = "vendor-VFIO" if types and types[0].get("framework") == "vendor-vfio" else "mdev"
        by_offer.setdefault(f"{kind}\0{offered}", []).append(parent)
    for key, names in by_offer.items():
        kind, offered = key.split("\0", 1)
        who = (
            f"parent {names[0]}" if len(names) == 1 else f"parents {names[0]} ... {names[-1]} ({len(names)})"
        )
        lines.append(f"  {kind} {who}: {offered}")
    if by_parent:
        lines.append("    (vfioctl profiles shows what can be created now)")
    return "\n".join(lines) + "\n"


def render_check(
    status: Mapping[str, Any],
    devices: Sequence[Mapping[str, Any]],
    mark: tuple[str, str],
    *,
    all_devices: bool = True,
    member_drivers: Mapping[str, str] | None = None,
    sharing: str = "",
    vmm: Sequence[str] | None = None,
    warn: str = "!",
) -> str:
    """The whole report: the host, the VMM side (`vmm`: Attach's warnings for who runs the VMs; None
    when not checked), the devices, what could be shared, which GPUs can be passed through as they stand,
    and the result (FAIL when a host check fails: then nothing can be passed through)."""
    ready = [d for d in devices if d.get("passthrough_ready") and field(d, "type") == "gpu"]
    lines = [render_status(status, mark, warn).rstrip("\n"), ""]
    if vmm is not None:
        lines.append("VMM side (for the user who runs the VMs)")
        lines += [f"  {warn} {w}" for w in vmm] or [
            f"  {mark[0]} KVM, the VFIO container node, memlock limit"
        ]
        lines.append("")
    lines += [
        render_available(devices, mark, all_devices, member_drivers).rstrip("\n"),
        "",
    ]
    if sharing:
        lines += [sharing.rstrip("\n"), ""]
    if ready:
        addrs = ", ".join(field(d, "pci_address") for d in ready)
        lines.append(f"Ready: {len(ready)} GPU(s) can be passed through as they stand: {addrs}")
    else:
        lines.append("Ready: no GPU can be passed through as it stands (see the blockers above)")
    if field(status, "gpu_mode", "none") == "vgpu":
        free = int_field(status, "vgpu_slots_allocatable", 0)
        lines.append(
            f"Ready for vGPUs: {free} can be created now (vfioctl profiles shows which)"
            if free
            else "Ready for vGPUs: none can be created now (see the vGPU line above)"
        )
    failed = failures(status)
    lines.append(f"Result: FAIL ({'; '.join(failed)})" if failed else "Result: PASS (warnings above, if any)")
    return "\n".join(lines) + "\n"
