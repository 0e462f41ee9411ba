"""OpenDevices: descriptors of an fd-mode attachment's devices, opened by vfiod as root, for the owner.

Each function (or vGPU) attached to the instance with `handoff` fd gets a new descriptor of its VFIO device
cdev, and the call one new descriptor of `/dev/iommu` (a VMM that has its own may close it). An mdev's cdev
is given only when the caller asks with `allow_mdev`, and with a warning: QEMU recognises an mdev only by
its sysfs path, so the VMM must be given `sysfsdev=` beside `fd=` (QEMU 10 refuses an mdev given by `fd=`
alone: it takes it for a physical device and asks iommufd for its IOMMU's hardware info, which an mdev
has none of; measured in the real-kernel suite). The nodes never change owner. Every check comes before
the first open, and an open that fails closes what this call already opened, so a refusal leaves nothing
open. The caller (the bus) sends the descriptors in its reply and closes vfiod's copies once they are
written to the bus (or the reply is dropped): a descriptor lives only in the process that received it,
and dies with it. A vfiod that dies before replying takes its copies along.

Runs under the instance lock and the groups' locks the manager holds, so no Detach unbinds a function
between its checks and its open.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from vfiod.core import handoff
from vfiod.core.deps import CoreDeps
from vfiod.core.errors import DeviceBusy, Failed, HandoffUnsupported, NotFound
from vfiod.core.ops import vgpu
from vfiod.core.records import mdev_sysfs_path, sysfs_path
from vfiod.core.registry import AttachmentRow, DeviceRow, VgpuRow
from vfiod.host.opener import open_node
from vfiod.host.pcifunction import read_function
from vfiod.host.vgpus import VENDOR
from vfiod.logevents import Action

log = logging.getLogger("vfiod.manager")

IOMMU_NODE = "/dev/iommu"


@dataclass
class OpenedDevices:
    """What OpenDevices hands over: its descriptors are vfiod's until the bus has sent them."""

    iommufd: int
    devices: list[tuple[str, str, int]] = field(default_factory=list)  # (device id, sysfs path, fd)
    warnings: list[str] = field(default_factory=list)
    closed: bool = False

    @property
    def fds(self) -> list[int]:
        return [self.iommufd, *(fd for _, _, fd in self.devices)]

    def close(self) -> None:
        """Close vfiod's copies, once (a number closed twice could by then be another file's)."""
        if not self.closed:
            self.closed = True
            _close_all(self.fds)


Opened = DeviceRow | VgpuRow


def attachments_to_open(
    deps: CoreDeps, instance: str, rows: Sequence[Opened]
) -> list[tuple[AttachmentRow, Opened]]:
    """The instance's attachments of this boot that `rows` name (every one when `rows` is empty), with
    their devices; NotFound for a named device that is not attached to the instance."""
    atts = [a for a in deps.registry.attachments_of_instance(instance) if a.boot_id == deps.boot_id]
    by_device = {a.device_id: a for a in atts}
    if rows:
        missing = [r.name for r in rows if r.id not in by_device]
        if missing:
            raise NotFound(f"{', '.join(missing)} is not attached to instance {instance!r}")
        wanted = [(by_device[r.id], r) for r in rows]
    else:
        wanted = [(a, row) for a in atts if (row := _row(deps, a.device_id)) is not None]
    if not wanted:
        raise NotFound(f"instance {instance!r} has no devices attached")
    return wanted


def _row(deps: CoreDeps, device_id: str) -> Opened | None:
    return deps.registry.get_device(device_id) or deps.registry.get_vgpu(device_id)


def open_devices(
    deps: CoreDeps,
    instance: str,
    wanted: Sequence[tuple[AttachmentRow, Opened]],
    *,
    allow_mdev: bool = False,
) -> OpenedDevices:
    """Check every attachment, then open the cdevs and a fresh /dev/iommu (see the module docstring)."""
    cdevs: list[tuple[Opened, str, str]] = []  # (row, its sysfs path, its cdev)
    warnings: list[str] = []
    for att, row in wanted:
        if att.handoff != "fd":
            raise HandoffUnsupported(
                f"{row.name} is attached to instance {instance!r} with handoff node: its group node "
                f"/dev/vfio/{att.iommu_group} is the owner's to open; detach and attach with handoff fd to "
                "receive descriptors instead"
            )
        if isinstance(row, VgpuRow):
            cdevs.append(_vgpu_cdev(deps, row, allow_mdev, warnings))
            continue
        if not read_function(deps.host, row.pci_address).is_vfio_bound:
            raise Failed(f"{row.name} is not on VFIO any more (its state is {row.state}); see vfioctl status")
        cdev = handoff.cdev_path(deps.host, row.pci_address)
        if not cdev:
            raise HandoffUnsupported(
                f"{row.name} ({row.pci_address}) has no VFIO device cdev under /dev/vfio/devices"
            )
        cdevs.append((row, sysfs_path(str(row.pci_address)), cdev))
    if why := handoff.iommufd_missing(deps.host):
        raise HandoffUnsupported(why)
    opened: list[int] = []
    try:
        iommufd = _open(deps, IOMMU_NODE, opened)
        out = OpenedDevices(iommufd, warnings=warnings)
        for row, path, cdev in cdevs:
            out.devices.append((row.id, path, _open(deps, cdev, opened)))
    except BaseException:
        _close_all(opened)
        raise
    log.info(
        "opened %s and %s of instance %s for its owner",
        IOMMU_NODE,
        ", ".join(c for _, _, c in cdevs),
        instance,
        extra={
            "ACTION": Action.OPEN_DEVICES,
            "INSTANCE": instance,
            "DEVICE": ",".join(r.name for r, _, _ in cdevs),
        },
    )
    return out


def _vgpu_cdev(
    deps: CoreDeps, row: VgpuRow, allow_mdev: bool, warnings: list[str]
) -> tuple[VgpuRow, str, str]:
    """A vGPU's sysfs path and cdev: a vendor-VFIO VF's like any function's; an mdev's only with
    `allow_mdev` (and a warning)."""
    mediated = row.framework != VENDOR
    if mediated and not allow_mdev:
        raise HandoffUnsupported(
            f"{row.name} is a mediated device, which a VMM recognises only by its sysfs path: QEMU refuses "
            "one given by fd= alone; ask OpenDevices with allow_mdev to receive its cdev, and give QEMU "
            f"sysfsdev={mdev_sysfs_path(row.uuid).rstrip('/')} beside fd="
        )
    if vgpu.live(deps, row) is None:
        raise Failed(
            f"the vGPU {row.uuid} is not there any more (its state is {row.state}); see vfioctl status"
        )
    cdev = vgpu.cdev_path(deps, row)
    if not cdev:
        raise HandoffUnsupported(
            f"the vGPU {row.uuid} on {row.parent} has no VFIO device cdev under /dev/vfio/devices"
        )
    if mediated:
        warnings.append(
            f"{row.name}'s cdev {cdev} is handed over as asked (allow_mdev): it is a mediated device, so "
            f"give the VMM its sysfs path too (QEMU: -device vfio-pci,fd=N,iommufd=ID,"
            f"sysfsdev={mdev_sysfs_path(row.uuid).rstrip('/')}); with fd= alone QEMU takes it for a physical "
            "device and fails"
        )
        return row, mdev_sysfs_path(row.uuid), cdev
    return row, sysfs_path(row.parent), cdev


def _open(deps: CoreDeps, node: str, opened: list[int]) -> int:
    try:
        fd = open_node(deps.host, node)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise DeviceBusy(f"the kernel refused to open {node} again: {e.strerror}") from e
        raise Failed(f"the kernel refused to open {node}: {e.strerror or e}") from e
    opened.append(fd)
    return fd


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError as e:
            log.error("closing descriptor %d failed: %s", fd, e, extra={"ACTION": Action.OPEN_DEVICES})
