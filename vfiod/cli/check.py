"""`vfiod check`: a read-only pre-flight report of the host's VFIO readiness and its passthrough candidates.

Owns the command's arguments, choosing the host to read (the real one, a simulated profile, or a copied
or mounted sysfs tree) and producing the report, as `--json` or as text in the style of
`virt-host-validate` (rendered by `report.py`, the same renderer as `vfioctl check`); each device also
carries `warnings` (no usable reset), which only this local report computes. It only reads; it
never loads a module or writes to sysfs, so it is safe to run anywhere, as any user (an unprivileged user
may see less, e.g. no `config` headers).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import TextIO

from vfiod.cli import report as report_text
from vfiod.core import resets
from vfiod.core.discovery import describe, discover
from vfiod.core.hostcritical import host_critical
from vfiod.core.hoststatus import host_status
from vfiod.core.pciids import PciIds, default_pci_ids
from vfiod.core.profiles import vgpu_status
from vfiod.core.vmm_checks import attach_warnings
from vfiod.host import vgpus
from vfiod.host.host import Host, HostRoots
from vfiod.host.pciaddr import PciAddress
from vfiod.host.pcifunction import PciSnapshot

USAGE_ERROR = 2


class UsageError(Exception):
    """Bad input on the command line: reported as one line on stderr, exit status 2."""


FAILED = 1


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Produce the report; 0 when nothing FAILs (warnings or not), 1 when a check FAILs (passthrough cannot
    work here as it stands), 2 for bad input."""
    out = out if out is not None else sys.stdout
    # An explicit database is the only one used: falling back to the system's would hide a typo.
    names = PciIds(args.pci_ids, search_paths=()) if args.pci_ids is not None else default_pci_ids()
    try:
        if args.simulate is not None:
            with tempfile.TemporaryDirectory(prefix="vfiod-check-") as tmp:
                ok = report(_simulated_host(Path(tmp), args.simulate), names, args.all, args.json, out)
        else:
            # The VMM-side checks read this process's limits: only on the host it runs on.
            pid = os.getpid() if args.sysfs_root is None else None
            ok = report(Host(_roots(args.sysfs_root)), names, args.all, args.json, out, vmm_pid=pid)
    except UsageError as e:
        print(f"vfiod check: {e}", file=sys.stderr)
        return USAGE_ERROR
    return 0 if ok else FAILED


def _simulated_host(root: Path, profile: str) -> Host:
    from vfiod_sim.simulation import Simulation, SimulationError  # noqa: PLC0415 -- only with --simulate

    try:
        return Simulation.open(root / "host", profile).host
    except SimulationError as e:
        raise UsageError(str(e)) from None


def _roots(sysfs_root: Path | None) -> HostRoots:
    if sysfs_root is None:
        return HostRoots()
    if not sysfs_root.is_dir():
        raise UsageError(f"--sysfs-root {sysfs_root}: not a directory")
    if (sysfs_root / "sys").is_dir():
        return HostRoots.under(sysfs_root)
    return HostRoots(sys=sysfs_root)


def _paint(text: str, colour: str, out: TextIO) -> str:
    """ANSI colour only on a terminal, and never with NO_COLOR set (https://no-color.org)."""
    if not getattr(out, "isatty", lambda: False)() or os.environ.get("NO_COLOR"):
        return text
    return f"\x1b[{colour}m{text}\x1b[0m"


def report(
    host: Host,
    names: PciIds,
    all_devices: bool,
    as_json: bool,
    out: TextIO,
    *,
    vmm_pid: int | None = None,
) -> bool:
    """Write the report; False when a check FAILs."""
    critical = host_critical(host)
    # One read of the bus for the whole report: discovery, reset warnings, sharing and the text share it.
    snap = PciSnapshot(host)
    devices = discover(host, names, all_devices=all_devices, critical=critical, snap=snap)
    status = host_status(host, names, devices=devices).to_record()
    vgpus = vgpu_status(host, {})  # the daemon's quarantine is in its registry, not read here
    if vgpus["vgpu_parents"]:
        status["gpu_mode"] = "vgpu"
    status.update(vgpus)
    records = [d.to_record() for d in devices]
    add_reset_warnings(snap, records)
    pfs, offered = sharing(host, names, records, critical, snap)
    # The VMM side, as Attach will warn about it: KVM, the container node, the memlock limit.
    vmm = attach_warnings(host, vmm_pid)
    ok = not report_text.failures(status)
    if as_json:
        doc = {"host": status, "devices": records, "sharing": {"sriov": pfs, "profiles": offered}, "vmm": vmm}
        # Compact: the C encoder (indent= falls back to the pure-Python one, a third of a 4096-function run).
        out.write(json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n")
        return ok
    # A member that is not listed (its audio function, without --all) is shown with its driver too.
    members = {m for d in devices for m in d.iommu_group_members}
    drivers = {m: snap.function(PciAddress.parse(m)).driver or "" for m in sorted(members)}
    yes, no = report_text.marks(getattr(out, "encoding", None))
    marks = (_paint(yes, "32", out), _paint(no, "31", out))
    warn = _paint("!", "33", out)
    out.write(
        report_text.render_check(
            status,
            records,
            marks,
            all_devices=all_devices,
            member_drivers=drivers,
            sharing=report_text.render_sharing(pfs, offered),
            vmm=vmm,
            warn=warn,
        )
    )
    return ok


def add_reset_warnings(snap: PciSnapshot, records: list[dict[str, object]]) -> None:
    """Each record gains `warnings`: that it has no usable reset (none at all, or only a bus/slot reset
    that would also reset devices on its bus that stay on the host: core/resets.py), the same sentence
    Attach warns with. Not a blocker: a VMM goes on without a reset, but the device may not come back."""
    for rec in records:
        addr = PciAddress.parse(str(rec["pci_address"]))
        members = rec.get("iommu_group_members")
        going = [PciAddress.parse(str(m)) for m in members] if isinstance(members, list) else []
        problem = "" if snap.function(addr).never_passed_through else resets.problem(snap, addr, going)
        rec["warnings"] = [problem] if problem else []


def sharing(
    host: Host,
    names: PciIds,
    records: list[dict[str, object]],
    critical: dict[PciAddress, str],
    snap: PciSnapshot,
) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """The SR-IOV physical functions (AvailableDevice records; every function is looked at, listed or
    not) and the vGPU types each parent offers (Profile-shaped records, one per parent)."""
    listed = {str(r["pci_address"]): r for r in records}
    pfs = []
    for addr in host.pci_addresses():
        if snap.function(addr).sriov_totalvfs:
            pfs.append(listed.get(str(addr)) or describe(host, addr, names, critical=critical).to_record())
    offered: list[dict[str, object]] = [
        {
            "type_id": t.id,
            "name": t.name,
            "framework": p.framework,
            "available": t.available,
            "parents": [p.name],
        }
        for p in vgpus.read_parents(host)
        for t in p.types
    ]
    return pfs, offered
