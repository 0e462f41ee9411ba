"""`vfioctl open-devices INSTANCE [DEV...] -- COMMAND [ARG...]`: start a VMM with the descriptors of an
fd-mode attachment (OpenDevices), the way a launcher such as hypeman does.

OpenDevices' reply carries a fresh `/dev/iommu` and each device's VFIO cdev; vfioctl receives them, writes
their numbers into COMMAND's arguments where they name them and replaces itself with COMMAND (`exec`), so
the VMM inherits exactly those descriptors and nobody else ever holds them. The placeholders:

    {iommufd}          the /dev/iommu descriptor
    {fd}               the cdev of the only device (an error when there are several)
    {fd:KEY}           the cdev of the device whose id, PCI address or mdev uuid is KEY
    {sysfs} {sysfs:KEY}   that device's sysfs path, without the trailing slash (QEMU's sysfsdev=, which an
                          mdev needs beside fd=)

Any other brace is left as it is (QEMU's JSON options, a script's own).

    vfioctl open-devices vm1 -- qemu-system-x86_64 ... -object iommufd,id=i0,fd={iommufd} \\
        -device vfio-pci,fd={fd},iommufd=i0

OpenDevices' warnings go to stderr before the exec. Nothing is printed on success: the process is the VMM.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass

from vfiod.bus.methods import BY_NAME as METHODS_BY_NAME
from vfiod.cli.vfioctl_bus import EXIT_FAILED, EXIT_USAGE, CallError, options, unwrap
from vfiod.cli.vfioctl_commands import Context

_PLACEHOLDER = re.compile(r"\{(iommufd|fd|sysfs)(?::([^{}\s]+))?\}")


@dataclass(frozen=True)
class Received:
    """What OpenDevices passed: the iommufd and, per device, (id, sysfs path, descriptor)."""

    iommufd: int
    devices: tuple[tuple[str, str, int], ...]

    @property
    def fds(self) -> list[int]:
        return [self.iommufd, *(fd for _, _, fd in self.devices)]

    def device(self, key: str | None) -> tuple[str, str, int]:
        if key is None:
            if len(self.devices) != 1:
                raise CallError(
                    "InvalidArgument",
                    f"{{fd}} and {{sysfs}} name the only device, but OpenDevices passed {len(self.devices)}: "
                    "name one, e.g. {fd:0000:01:00.0}",
                    EXIT_USAGE,
                )
            return self.devices[0]
        for dev in self.devices:
            if key in (dev[0], os.path.basename(dev[1].rstrip("/"))):
                return dev
        known = ", ".join(os.path.basename(p.rstrip("/")) for _, p, _ in self.devices)
        raise CallError("InvalidArgument", f"no device {key!r} among those passed ({known})", EXIT_USAGE)


def check_placeholders(argv: Sequence[str]) -> None:
    """Refuse a placeholder that cannot mean anything before anything is opened."""
    for arg in argv:
        for m in _PLACEHOLDER.finditer(arg):
            if m.group(1) == "iommufd" and m.group(2) is not None:
                raise CallError("InvalidArgument", f"{m.group(0)}: {{iommufd}} takes no key", EXIT_USAGE)


def substitute(argv: Sequence[str], opened: Received) -> list[str]:
    def one(m: re.Match[str]) -> str:
        if m.group(1) == "iommufd":
            return str(opened.iommufd)
        _, path, fd = opened.device(m.group(2))
        return str(fd) if m.group(1) == "fd" else path.rstrip("/")

    return [_PLACEHOLDER.sub(one, arg) for arg in argv]


async def cmd_open_devices(ctx: Context) -> int:
    a = ctx.args
    command = list(a.vmm_command)
    if not command:
        raise CallError("InvalidArgument", "name the VMM to start after --", EXIT_USAGE)
    check_placeholders(command)
    program = shutil.which(command[0])
    if program is None:
        raise CallError("InvalidArgument", f"{command[0]}: no such program", EXIT_USAGE)
    opts = options(allow_mdev=("b", True) if a.allow_mdev else None)
    method = METHODS_BY_NAME["OpenDevices"]
    reply = await ctx.client.reply_to("OpenDevices", method.in_signature, [a.instance, list(a.devices), opts])
    iommufd_index, devices, warnings = (unwrap(v) for v in reply.body)
    fds = reply.unix_fds
    opened = Received(fds[iommufd_index], tuple((i, p, fds[n]) for i, p, n in devices))
    try:
        argv = substitute(command, opened)
        for warning in warnings:
            ctx.err.write(f"vfioctl: warning: {warning}\n")
        ctx.err.flush()
        ctx.out.flush()
        for fd in opened.fds:
            os.set_inheritable(fd, True)  # the VMM's now; vfioctl's own sockets stay close-on-exec
        os.execv(program, argv)  # noqa: S606 -- the caller's own VMM, as the caller: no shell wanted
    except OSError as e:
        raise CallError("Failed", f"cannot start {command[0]}: {e.strerror or e}", EXIT_FAILED) from e
    finally:  # reached only when the exec did not happen
        for fd in opened.fds:
            os.close(fd)
