"""What Attach warns the caller about (never refuses for): a VMM that will not be able to use what it was
given — a memlock limit too small to pin guest RAM, a VFIO container node it cannot open, no KVM — and a
function with no usable reset (core/resets.py)."""

from __future__ import annotations

from collections.abc import Sequence

from vfiod.core import resets
from vfiod.host import procfs
from vfiod.host.host import Host
from vfiod.host.pciaddr import PciAddress
from vfiod.host.pcifunction import PciSnapshot

MEMLOCK_HINT = (
    "LimitMEMLOCK=infinity on hypeman's unit (or prlimit --memlock=unlimited on the VMM): VFIO pins all "
    "guest RAM (type1 and iommufd alike)"
)


def attach_warnings(
    host: Host, pid: int | None, functions: Sequence[PciAddress] = (), *, container: bool = True
) -> list[str]:
    """Warnings for the process `pid` that asked for the attachment (its VMM inherits its limits), and
    for the attached `functions` that have no usable reset. `container`: the VMM opens /dev/vfio/vfio
    (node mode; with descriptors it gets an iommufd instead)."""
    out: list[str] = []
    snap = PciSnapshot(host)
    out += [w for a in functions if (w := resets.problem(snap, a, functions))]
    if pid is not None:
        limits = procfs.memlock_limit(host, pid)
        if limits is not None and limits[0] is not None:
            out.append(
                f"RLIMIT_MEMLOCK of the caller (pid {pid}) is {limits[0] // 1024} KiB; the VMM inherits "
                f"it and must be able to lock all guest RAM: set {MEMLOCK_HINT}"
            )
    try:
        mode = (host.roots.dev / "vfio/vfio").stat().st_mode & 0o777
        if container and mode & 0o006 != 0o006:
            out.append(f"/dev/vfio/vfio is mode {mode:04o}; the VMM needs to open it (0666 is the default)")
    except OSError:
        if container:
            out.append("/dev/vfio/vfio is missing; the vfio module is not loaded")
    if not (host.roots.dev / "kvm").exists():
        out.append("/dev/kvm is missing: the VMM needs KVM (load kvm_intel or kvm_amd)")
    return out
