"""Reconcile: hypeman says which instances are alive; attachments of any other instance are released
(never while a process holds the group node), and every disagreement between the registry and the kernel
in the caller's scope is reported (a card gone, a different card at the address, a device attached but not
on vfio, who holds each group node).

vGPUs: a vGPU vfiod created for an instance that is not live is an orphan, destroyed with the instance's
other devices once it is older than the grace period (`vgpu_orphan_grace`: hypeman creates the vGPU before
it starts the VM, so a young one is kept and reported); vGPUs vfiod did not create are reported, never
touched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from vfiod.core import guard
from vfiod.core.context import Report
from vfiod.core.deps import CoreDeps
from vfiod.core.devstate import identity_of
from vfiod.core.errors import VfiodError
from vfiod.core.registry import AttachmentRow, DeviceRow, utc_now
from vfiod.host import vgpus as host_vgpus
from vfiod.host.pciaddr import PciAddress
from vfiod.host.pcifunction import read_function

COUNTERS = (
    "attachments",
    "released",
    "kept",
    "held",
    "grace",
    "missing",
    "replaced",
    "mismatches",
    "unmanaged_vgpus",
    "errors",
)


def reconcile(
    deps: CoreDeps,
    caller_uid: int,
    live: set[str],
    *,
    dry_run: bool,
    all_users: bool,
    vgpu_grace: float,
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
        young = [v for _, v in vgpus if (utc_now() - v.created_at).total_seconds() < vgpu_grace]
        if young:
            report.count("grace", len(atts))
            report.findings.append(
                f"instance {instance!r} is not live but its vGPU "
                + ", ".join(v.uuid for v in young)
                + f" was created less than {vgpu_grace:g} s ago (vgpu_orphan_grace): kept for now"
            )
            continue
        holders = guard.vfio_holders(deps.host, usable)
        holders += [
            h
            for a, v in vgpus
            for h in guard.vgpu_holders(deps.host, v.framework, v.parent, v.uuid, a.iommu_group)
        ]
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
    _unmanaged(deps, report)
    return report


def _unmanaged(deps: CoreDeps, report: Report) -> None:
    """Every vGPU on the host that vfiod did not create: reported, never destroyed."""
    rows = deps.registry.list_vgpus()
    for live in host_vgpus.read_vgpus(deps.host):
        if any(host_vgpus.same(r.framework, r.uuid, r.parent, r.type_id, live) for r in rows):
            continue
        report.count("unmanaged_vgpus")
        what = f"mdev {live.uuid}" if live.uuid else f"a vGPU of type {live.type_id}"
        report.findings.append(f"{what} on {live.parent} was not created by vfiod: left alone")


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
