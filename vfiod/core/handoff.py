"""How an attached device reaches its VMM, and what the descriptor hand-over needs of the host.

Two modes, chosen per Attach (option `handoff`, default from vfiod.toml):

- `node` (the default): vfiod gives `/dev/vfio/<group>` to the attachment's owner, mode 0600
  (vfiod/core/access.py); the VMM opens the group and `/dev/vfio/vfio` itself.
- `fd`: no node ever changes owner (root 0600 stays). The owner calls `OpenDevices` and receives
  descriptors vfiod opened as root: each function's VFIO device cdev (`/dev/vfio/devices/vfioN`) and a
  fresh `/dev/iommu` (QEMU: `-object iommufd,id=i0,fd=N -device vfio-pci,fd=M,iommufd=i0`). Nothing is
  left to leak: a descriptor lives as long as the process holding it.

A vGPU takes the same modes (`vgpu_mode`): a vendor-VFIO vGPU is a PCI function to the VMM and follows the
default; an mdev is in fd mode only when AttachVGPU asks, and its own cdev is under the mdev's directory.

fd mode needs a kernel with `CONFIG_VFIO_DEVICE_CDEV` and `CONFIG_IOMMUFD` (Linux 6.6+; drivers/vfio/
device_cdev.c, drivers/iommu/iommufd/main.c). The cdev support shows as `/dev/vfio/devices/` once any
device is on VFIO (devtmpfs removes the directory with its last node), as a `dev` attribute of a VFIO
device's `vfio-dev/vfioN`, and as the `vfio-dev` character device region in /proc/devices once vfio is
loaded (`vfio_cdev_init`); iommufd as the misc device `/dev/iommu`.
"""

from __future__ import annotations

import os
from typing import Final

from vfiod.core.errors import InvalidArgument
from vfiod.core.registry import HANDOFF_MODES, HandoffMode
from vfiod.host.host import Host
from vfiod.host.pciaddr import PciAddress

CDEV_DIR: Final = "/dev/vfio/devices"


def parse(value: object) -> HandoffMode:
    if value not in HANDOFF_MODES:
        raise InvalidArgument(f"handoff must be one of {', '.join(HANDOFF_MODES)}, not {value!r}")
    return value


def has_cdevs(host: Host) -> bool | None:
    """Whether this kernel gives VFIO devices a cdev; None when that cannot be told yet (vfio is not
    loaded and no sign of a cdev is there: loading vfio-pci, which a bind does, tells)."""
    if host.from_logical(CDEV_DIR).is_dir():
        return True
    if any(host.read_text(f"{d}/dev") for d in _vfio_dev_dirs(host)):
        return True
    devices = host.read_text(host.roots.proc / "devices") or ""
    if any(line.split()[1:] == ["vfio-dev"] for line in devices.partition("Block devices:")[0].splitlines()):
        return True
    return False if host.module_loaded("vfio") else None


def cdev_missing(host: Host) -> str | None:
    """Why this host's VFIO devices have no cdev (or cannot be told to have one yet); None when they have."""
    return _cdev_reason(has_cdevs(host))


def _cdev_reason(has: bool | None) -> str | None:
    if has:
        return None
    if has is None:
        return "vfio is not loaded, so whether this kernel gives VFIO devices a cdev cannot be told yet"
    return (
        "this kernel has no VFIO device cdevs (/dev/vfio/devices; CONFIG_VFIO_DEVICE_CDEV, Linux 6.6 and "
        "later)"
    )


def iommufd_missing(host: Host) -> str | None:
    """Why this host has no iommufd; None when `/dev/iommu` is there."""
    if host.from_logical("/dev/iommu").exists():
        return None
    return "this kernel has no iommufd (/dev/iommu; CONFIG_IOMMUFD, Linux 6.2 and later)"


def fd_mode_refused(host: Host) -> str | None:
    """Why an Attach in fd mode is refused before any write; None when it may go ahead. A kernel whose cdev
    support cannot be told yet (vfio not loaded) is given the benefit of the doubt: the bind loads vfio,
    and a function that then has no cdev is refused and put back (ops/attach.py)."""
    has = has_cdevs(host)
    return iommufd_missing(host) or (_cdev_reason(has) if has is False else None)


def cdev_name(host: Host, device_dir: str | os.PathLike[str]) -> str | None:
    """The VFIO device cdev (`vfioN`) of the device at `device_dir` (a PCI function's or an mdev's
    directory: its `vfio-dev/vfioN` with a device number); None when it is not on VFIO or the kernel gives
    its VFIO devices no cdev."""
    base = f"{device_dir}/vfio-dev"
    for name in host.list_dir(base):
        if name.startswith("vfio") and name[4:].isdigit() and host.read_text(f"{base}/{name}/dev"):
            return name
    return None


def cdev_path(host: Host, addr: PciAddress) -> str:
    """`/dev/vfio/devices/vfioN` of a function on VFIO when the node exists, else ""."""
    return _node(host, cdev_name(host, host.device_dir(addr)))


def mdev_cdev_path(host: Host, uuid: str) -> str:
    """`/dev/vfio/devices/vfioN` of a mediated device (its `vfio-dev/` under the mdev bus) when the node
    exists, else ""."""
    return _node(host, cdev_name(host, host.mdev_devices_dir / uuid))


def vgpu_cdev_path(host: Host, vendor: bool, parent: str, uuid: str) -> str:
    """A vGPU's cdev: a vendor-VFIO vGPU's is its VF's (`parent`), an mdev's its own; "" when none."""
    return cdev_path(host, PciAddress.parse(parent)) if vendor else mdev_cdev_path(host, uuid)


def vgpu_mode(vendor: bool, asked: HandoffMode | None, default: HandoffMode) -> HandoffMode:
    """The hand-over mode of a new vGPU: what the caller asked for; otherwise the host's default for a
    vendor-VFIO vGPU (a PCI function to the VMM) and node for an mdev, which a VMM recognises only by its
    sysfs path (QEMU 10 given an mdev's cdev by `fd=` alone takes it for a physical device and fails)."""
    if asked is not None:
        return asked
    return default if vendor else "node"


def _node(host: Host, name: str | None) -> str:
    if name is None:
        return ""
    path = f"{CDEV_DIR}/{name}"
    return path if host.from_logical(path).exists() else ""


def _vfio_dev_dirs(host: Host) -> list[str]:
    base = host.roots.sys / "class/vfio-dev"
    return [f"{base}/{n}" for n in host.list_dir(base)]
