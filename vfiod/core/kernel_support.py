"""Which kernels vfiod supports: Linux 5.10 and later (Debian 11's, the oldest its real-kernel suite boots).
vfiod relies on `driver_override` (3.16), `sriov_drivers_autoprobe` (4.12) and VFIO's type1v2 group
interface; `vfio-dev/` (6.1) and `reset_method` (5.15) are used when present, never required. Below 5.10
Bind and Attach are refused with VFIONotAvailable, and GetHostStatus and `vfiod check` say why.
"""

from __future__ import annotations

import re

from vfiod.core.errors import VFIONotAvailable
from vfiod.host import procfs
from vfiod.host.host import Host

MINIMUM = (5, 10)
_RELEASE = re.compile(r"(\d+)\.(\d+)")


def version(release: str) -> tuple[int, int] | None:
    """(major, minor) of a `uname -r` string; None when it does not start with one."""
    found = _RELEASE.match(release)
    return (int(found[1]), int(found[2])) if found else None


def problem(host: Host) -> str:
    """Why this kernel is not supported, or "" (supported, or its release cannot be read)."""
    release = host.kernel_release()
    found = version(release)
    if found is None or found >= MINIMUM:
        return ""
    return (
        f"Linux {release} is older than {MINIMUM[0]}.{MINIMUM[1]}, the oldest kernel vfiod supports: boot a "
        "newer kernel (Debian 11's 5.10, Ubuntu 22.04's 5.15 and RHEL 9's 5.14 are supported)"
    )


def require_supported(host: Host) -> None:
    why = problem(host)
    if why:
        raise VFIONotAvailable(why)


# When the CPU's vendor is not known: both vendors' ways (amd_iommu=on is no kernel option: AMD's IOMMU is on
# by itself once the firmware enables AMD-Vi).
IOMMU_FIX = (
    "on Intel, add intel_iommu=on to the kernel command line and enable VT-d in the firmware setup; on AMD, "
    "enable AMD-Vi in the firmware setup (the kernel then turns the IOMMU on by itself); then reboot"
)


def iommu_fix(host: Host) -> str:
    """How to turn the IOMMU on, for this host's CPU vendor (IOMMU_FIX when /proc/cpuinfo does not say):
    Intel's needs `intel_iommu=on` (and VT-d in the firmware); AMD's is on by itself once AMD-Vi is enabled
    in the firmware (there is no `amd_iommu=on` kernel option)."""
    vendor = procfs.cpu_vendor(host)
    if vendor == "GenuineIntel":
        return "add intel_iommu=on to the kernel command line, enable VT-d in the firmware setup, and reboot"
    if vendor in ("AuthenticAMD", "HygonGenuine"):
        return (
            "enable the IOMMU (AMD-Vi) in the firmware setup and reboot: the kernel turns it on by itself "
            "(amd_iommu=on is not a kernel option; remove amd_iommu=off or iommu=off if present)"
        )
    return IOMMU_FIX
