"""Recover for GPU sharing: clearing a vGPU parent's quarantine, and cycling SR-IOV on a physical GPU
whose VFs host vGPUs.

A VF whose vGPU create failed, or whose VMM was killed while the guest driver started, may be wedged:
sysfs stays healthy and only the next guest's driver fails. NVIDIA documents no cure but cycling SR-IOV on
the GPU (`sriov-manage -d`, then `-e`), which destroys every VF and every vGPU on it. So an admin's Recover
of the physical GPU is refused while any vGPU on it is attached, held or not vfiod's; vfiod's kept vGPUs
go with the cycle. NVML clients (nvidia-persistenced among them) make the script fail ("Cannot obtain
unbindLock"), so the GPU vendor's persistence units are stopped around it. The cycle is journaled: a crash
between its halves is finished at start-up (the VFs enabled again).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from vfiod.core import guard, kernel_io
from vfiod.core.context import Report
from vfiod.core.deps import CoreDeps
from vfiod.core.errors import Failed, InUse
from vfiod.core.journal import Operation
from vfiod.core.placement import physical_gpu
from vfiod.core.profiles import quarantined
from vfiod.core.registry import IntentRow
from vfiod.host import vgpus
from vfiod.host.errors import HostToolError
from vfiod.host.mdev import MdevParent
from vfiod.host.pciaddr import PciAddress
from vfiod.logevents import Action

log = logging.getLogger("vfiod.manager")

CYCLE = "sriov-cycle"  # the write intent's action: the PF and its VF count before the cycle


def target(deps: CoreDeps, text: str) -> tuple[str, list[MdevParent]] | None:
    """("parent", [it]) for a vGPU parent's name (or a quarantined parent no longer there), ("gpu", its
    parents) for a physical GPU whose VFs are vGPU parents; None for anything else."""
    parents = vgpus.read_parents(deps.host)
    named = [p for p in parents if p.name == text]
    if named:
        return "parent", named
    on_gpu = [p for p in parents if p.physfn is not None and physical_gpu(p) == text]
    if on_gpu:
        return "gpu", on_gpu
    if text in quarantined(deps):
        return "parent", []
    return None


def clear_quarantine(deps: CoreDeps, name: str, report: Report, dry_run: bool) -> None:
    why = quarantined(deps).get(name)
    if why is None:
        report.findings.append(f"{name}: not quarantined")
        return
    report.count("cleared")
    if dry_run:
        report.findings.append(f"{name}: its quarantine would be cleared ({why})")
        return
    deps.registry.clear_parent_failures(name)
    report.findings.append(f"{name}: quarantine cleared ({why})")
    log.info(
        "cleared the quarantine of vGPU parent %s", name, extra={"ACTION": Action.RECOVER, "PARENT": name}
    )


def cycle_gpu(
    deps: CoreDeps, pf: PciAddress, parents: Sequence[MdevParent], report: Report, dry_run: bool
) -> None:
    """Destroy every vGPU and VF on the GPU and enable its VFs afresh; clear its parents' quarantine."""
    names = {p.name for p in parents}
    rows = [r for r in deps.registry.list_vgpus() if r.parent in names]
    attached = [(r, a) for r in rows if (a := deps.registry.attachment_of_device(r.id)) is not None]
    if attached:
        raise InUse(
            f"cannot cycle SR-IOV on {pf}: it would destroy vGPUs attached to "
            + ", ".join(f"{a.instance_id} ({r.uuid} on {r.parent})" for r, a in attached)
            + "; Detach them first"
        )
    live = [v for v in vgpus.read_vgpus(deps.host) if v.parent in names]
    foreign = [
        v for v in live if not any(vgpus.same(r.framework, r.uuid, r.parent, r.type_id, v) for r in rows)
    ]
    if foreign:
        raise InUse(
            f"cannot cycle SR-IOV on {pf}: it would destroy vGPUs vfiod did not create: "
            + ", ".join(
                f"type {v.type_id} on {v.parent}" + (f" ({v.uuid})" if v.uuid else "") for v in foreign
            )
            + "; remove them first"
        )
    vfs = [p.pci_address for p in parents if p.pci_address is not None]
    guard.require_not_held(deps.host, vfs, f"cycle SR-IOV on {pf}: a process holds")
    before = int(deps.host.attr(pf, "sriov_numvfs") or "0")
    report.count("vgpus_destroyed", len(rows))
    report.count("vfs_cycled", before)
    if dry_run:
        report.findings.append(
            f"{pf}: would disable and enable its {before} VFs (destroying {len(rows)} kept vGPUs)"
        )
        return
    op = Operation(deps.registry, deps.boot_id, CYCLE)
    op.attribute(str(pf), CYCLE, str(before))
    vendor = (deps.host.attr(pf, "vendor") or "").lower().removeprefix("0x")
    try:
        with deps.hold.held([vendor]):
            op.checkpoint("disable")
            deps.gpu_sriov.disable(pf)
            op.checkpoint("enable")
            deps.gpu_sriov.enable(pf)
    except HostToolError as e:
        op.finish()
        raise Failed(f"cycling SR-IOV on {pf} failed: {e}") from e
    op.checkpoint("forget")
    with deps.registry.transaction():
        for row in rows:  # kept vGPUs: the cycle destroyed them
            deps.registry.remove_vgpu(row.id)
        for name in names:
            deps.registry.clear_parent_failures(name)
        op.finish()
    deps.changed([""])
    back = _wait_vfs(deps, pf, before)
    report.count("recovered")
    report.findings.append(
        f"{pf}: SR-IOV cycled ({before} VFs disabled and enabled; {back} vGPU parents back)"
    )
    log.info(
        "cycled SR-IOV on %s: %d VFs, %d kept vGPUs destroyed",
        pf,
        before,
        len(rows),
        extra={"ACTION": Action.RECOVER, "PCI_ADDRESS": str(pf)},
    )


def _wait_vfs(deps: CoreDeps, pf: PciAddress, count: int) -> int:
    """The GPU's VFs are vGPU parents again (NVIDIA publishes their types just after the rebind)."""

    def back() -> int:
        return sum(1 for p in vgpus.read_parents(deps.host) if p.physfn == pf)

    if not kernel_io.wait_until(lambda: back() >= count, deps.verify_timeout):
        raise Failed(
            f"{pf}: {back()} of its {count} VFs are vGPU parents {deps.verify_timeout:g} s after the SR-IOV "
            "cycle (is nvidia-vgpud running?)"
        )
    return back()


# ----- start-up ---------------------------------------------------------------------------------------------


def is_cycle(intents: Sequence[IntentRow]) -> bool:
    return bool(intents) and all(i.kind == "write" and i.action == CYCLE for i in intents)


def finish_interrupted(deps: CoreDeps, intents: Sequence[IntentRow], report: Report) -> None:
    """Start-up: a cycle a crash interrupted after its first half is finished (the VFs enabled again)."""
    pf = PciAddress.parse(intents[0].pci_address)
    report.count("operations_recovered")
    now = int(deps.host.attr(pf, "sriov_numvfs") or "0")
    if now:
        outcome = f"left it with {now} VFs"
    else:
        try:
            deps.gpu_sriov.enable(pf)
            outcome = "was finished (its VFs enabled again)"
        except HostToolError as e:
            outcome = f"could not be finished: {e}"
    for intent in intents:
        deps.registry.clear_intent(intent.id)
    report.findings.append(f"{pf}: an interrupted SR-IOV cycle {outcome}")
