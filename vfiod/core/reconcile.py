"""Reconcile: hypeman says which instances are alive; attachments of any other instance are released
(never while a process holds the group node), and every disagreement between the registry and the kernel
in the caller's scope is reported (a card gone, a different card at the address, a device attached but not
on vfio, who holds each group node).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from vfiod.core import guard
from vfiod.core.context import Report
from vfiod.core.deps import CoreDeps
from vfiod.core.devstate import identity_of
from vfiod.core.errors import VfiodError
from vfiod.core.registry import AttachmentRow, DeviceRow
from vfiod.host.pciaddr import PciAddress
from vfiod.host.pcifunction import read_function

COUNTERS = ("attachments", "released", "kept", "held", "missing", "replaced", "mismatches", "errors")


def reconcile(
    deps: CoreDeps,
    caller_uid: int,
    live: set[str],
    *,
    dry_run: bool,
    all_users: bool,
    release: Callable[[int, str], None],
) -> Report:
    """`release(owner_uid, instance)` detaches one instance (the manager's Detach, with its locks)."""
    report = Report()
    for key in COUNTERS:
        report.counters[key] = 0
    by_instance: dict[str, list[AttachmentRow]] = {}
    for att in deps.registry.all_attachments():
        if all_users or att.owner_uid == caller_uid:
            by_instance.setdefault(att.instance_id, []).append(att)
    for instance, atts in sorted(by_instance.items()):
        report.count("attachments", len(atts))
        rows = [r for r in (deps.registry.get_device(a.device_id) for a in atts) if r is not None]
        vgpus = [(a, v) for a in atts if (v := deps.registry.get_vgpu(a.device_id)) is not None]
        usable = _inspect(deps, instance, atts, rows, report)
        if instance in live:
            report.count("kept", len(atts))
            continue
        holders = guard.vfio_holders(deps.host, usable)
        holders += [h for a, v in vgpus for h in guard.group_holders(deps.host, a.iommu_group, v.uuid)]
        if holders:
            report.count("held", len(atts))
            report.findings.append(
                f"instance {instance!r} is not live but its devices are held ("
                + "; ".join(h.describe() for h in holders)
                + "): kept"
            )
            continue
        addresses = ", ".join([str(r.pci_address) for r in rows] + [f"vGPU {v.uuid}" for _, v in vgpus])
        if dry_run:
            report.count("released", len(atts))
            report.findings.append(f"would release {addresses} of instance {instance!r}")
            continue
        try:
            release(atts[0].owner_uid, instance)
            report.count("released", len(atts))
            report.findings.append(f"released {addresses} of instance {instance!r}")
        except VfiodError as e:
            report.count("errors")
            report.findings.append(f"could not release instance {instance!r}: {e.message}")
    return report


def _inspect(
    deps: CoreDeps, instance: str, atts: Sequence[AttachmentRow], rows: Sequence[DeviceRow], report: Report
) -> list[PciAddress]:
    usable: list[PciAddress] = []
    owner = {a.device_id: a.owner_uid for a in atts}
    groups: set[int] = set()
    for row in rows:
        addr = row.pci_address
        fn = read_function(deps.host, addr)
        if not fn.present:
            report.count("missing")
            report.findings.append(f"{row.name} ({addr}) of instance {instance!r} is gone from the bus")
            continue
        live = fn.identity
        if live != identity_of(row):
            report.count("replaced")
            report.findings.append(
                f"{row.name}: the card at {addr} is now {live.describe() if live else 'unreadable'}, not "
                "the registered one; vfiod will not touch it"
            )
            continue
        usable.append(addr)
        if not fn.is_vfio_bound:
            report.count("mismatches")
            report.findings.append(
                f"{row.name} ({addr}) is attached to {instance!r} but bound to "
                f"{fn.driver or 'no driver'}, not vfio"
            )
        group = fn.iommu_group
        if group is not None and group not in groups:
            groups.add(group)
            try:
                holders = guard.vfio_holders(deps.host, [addr])
            except VfiodError as e:
                report.count("errors")
                report.findings.append(e.message)
                continue
            for h in holders:
                note = "" if h.uid == owner.get(row.id) else f" (not the owner uid {owner.get(row.id)})"
                report.findings.append(f"/dev/vfio/{group}: {h.describe()}, uid {h.uid}{note}")
    return usable
