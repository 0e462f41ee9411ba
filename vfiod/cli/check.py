"""`vfiod check`: a read-only pre-flight report of the host's VFIO readiness and its passthrough candidates.

Owns the command's arguments, choosing the host to read (the real one, a simulated profile, or a copied
or mounted sysfs tree) and both renderings of the report: a human one in the style of
`virt-host-validate` and `--json`. It only reads; it never loads a module or writes to sysfs, so it is
safe to run anywhere, as any user (an unprivileged user may see less, e.g. no `config` headers).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from vfiod.core.discovery import AvailableDevice, discover
from vfiod.core.hostcritical import host_critical
from vfiod.core.hoststatus import HostStatus, host_status
from vfiod.core.pciids import PciIds, default_pci_ids
from vfiod.host.host import Host, HostRoots
from vfiod.host.pciaddr import PciAddress

USAGE_ERROR = 2


class UsageError(Exception):
    """Bad input on the command line: reported as one line on stderr, exit status 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--simulate",
        metavar="PROFILE",
        help="check a simulated host (workstation-l4, dgx-h100, no-iommu, qemu-q35, synthetic:N)",
    )
    where.add_argument(
        "--sysfs-root",
        metavar="DIR",
        type=Path,
        help="read sysfs from DIR; if DIR holds sys/ (a copied or simulated tree) its dev/, proc/ and etc/ "
        "are used too, otherwise DIR is a sysfs mount and /dev, /proc and /etc are the real ones",
    )
    parser.add_argument("--all", action="store_true", help="list every PCI function, not only GPUs")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--pci-ids", metavar="FILE", type=Path, help="pci.ids database to name devices with")


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Produce the report; 0 when it was produced (problems or not), 2 for bad input."""
    out = out if out is not None else sys.stdout
    # An explicit database is the only one used: falling back to the system's would hide a typo.
    names = PciIds(args.pci_ids, search_paths=()) if args.pci_ids is not None else default_pci_ids()
    try:
        if args.simulate is not None:
            with tempfile.TemporaryDirectory(prefix="vfiod-check-") as tmp:
                report(_simulated_host(Path(tmp), args.simulate), names, args.all, args.json, out)
        else:
            report(Host(_roots(args.sysfs_root)), names, args.all, args.json, out)
    except UsageError as e:
        print(f"vfiod check: {e}", file=sys.stderr)
        return USAGE_ERROR
    return 0


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


def report(host: Host, names: PciIds, all_devices: bool, as_json: bool, out: TextIO) -> None:
    critical = host_critical(host)
    devices = discover(host, names, all_devices=all_devices, critical=critical)
    status = host_status(host, names, devices=devices)
    if as_json:
        doc = {"host": status.to_record(), "devices": [d.to_record() for d in devices]}
        out.write(json.dumps(doc, sort_keys=True, indent=2) + "\n")
    else:
        member_drivers: dict[str, str] = {}
        for d in devices:
            for m in d.iommu_group_members:
                if m not in member_drivers:
                    member_drivers[m] = host.driver(PciAddress.parse(m)) or ""
        out.write(render(status, devices, member_drivers, all_devices, _marks(out)))


def _marks(out: TextIO) -> tuple[str, str]:
    """✓/✗ where the terminal can show them, ASCII otherwise (a C locale, a log file in latin-1)."""
    encoding = getattr(out, "encoding", None) or "ascii"
    try:
        "✓✗".encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return "ok", "!!"
    return "✓", "✗"


def render(
    status: HostStatus,
    devices: Sequence[AvailableDevice],
    member_drivers: dict[str, str],
    all_devices: bool,
    marks: tuple[str, str],
) -> str:
    """The human report: host checks, problems with their fixes, notes, then the device table with each
    unready device's blockers under it. `member_drivers` maps group members to their drivers."""
    yes, no = marks
    lines: list[str] = ["Host"]

    def check(ok: bool, text: str) -> None:
        lines.append(f"  {yes if ok else no} {text}")

    check(status.iommu_enabled, f"IOMMU enabled ({status.iommu_groups} IOMMU groups)")
    check(status.interrupt_remapping, "interrupt remapping")
    check(status.vfio_pci_loaded, "vfio-pci loaded")
    check(status.vfio_container, "VFIO container (/dev/vfio/vfio)")
    check(status.vfio_cdev, "VFIO device cdev (/dev/vfio/devices)")
    check(status.iommufd, "iommufd (/dev/iommu)")
    check(status.hugepages_2m > 0, f"2 MiB huge pages reserved: {status.hugepages_2m}")
    check(
        status.gpu_mode == "passthrough",
        f"GPU passthrough: {status.gpu_slots_total} slot(s), {status.gpu_slots_used} used",
    )
    if status.problems:
        lines += ["", "Problems"]
        lines += [f"  {no} {p}" for p in status.problems]
    if status.notes:
        lines += ["", "Notes"]
        lines += [f"  - {n}" for n in status.notes]

    lines.append("")
    what = "every PCI function" if all_devices else "display controllers (--all for every PCI function)"
    lines.append(f"Devices: {what}")
    if not devices:
        lines.append("  none found")
        return "\n".join(lines) + "\n"
    header = ("ADDRESS", "DEVICE", "TYPE", "GROUP", "MEMBERS", "DRIVER", "RESET", "READY")
    rows = []
    for d in devices:
        members = ", ".join(
            f"{m} ({member_drivers.get(m) or 'no driver'})"
            for m in d.iommu_group_members
            if m != d.pci_address
        )
        rows.append(
            (
                d.pci_address,
                f"{d.vendor_name} {d.device_name}",
                d.type,
                str(d.iommu_group) if d.iommu_group >= 0 else "-",
                members or "-",
                d.current_driver or "-",
                ",".join(d.reset_methods) or "-",
                "yes" if d.passthrough_ready else "no",
            )
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines.append("  " + "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
    for d, row in zip(devices, rows, strict=True):
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        for b in d.blockers:
            lines.append(f"      {no} {b}")
    return "\n".join(lines) + "\n"
