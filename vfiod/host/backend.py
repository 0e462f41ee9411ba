"""The kernel operations whose effect belongs to the kernel: sysfs attribute writes, the VFIO group status
ioctl and group-node ownership.

`Host` reads sysfs, /dev and /proc as plain files under its roots, for the real kernel and the simulator
alike; only these operations differ. `LinuxKernel` performs them on the real kernel;
`vfiod_sim.SimulatedKernel` imitates them on a directory tree.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

# <linux/vfio.h>: VFIO_TYPE = ';', VFIO_BASE = 100; VFIO_GROUP_GET_STATUS = _IO(';', 100 + 3).
VFIO_TYPE = ord(";")
VFIO_BASE = 100
VFIO_GROUP_GET_STATUS = (VFIO_TYPE << 8) | (VFIO_BASE + 3)
VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1


class _VfioGroupStatus(ctypes.Structure):
    _fields_ = (("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32))


@dataclass(frozen=True)
class NodeOwner:
    """Owner and permission bits of a device node."""

    uid: int
    gid: int
    mode: int  # permission bits only (0o7777 mask)


class KernelBackend(Protocol):
    """What `Host` delegates to the kernel (or to the simulator standing in for it)."""

    def write_attribute(self, path: Path, data: bytes) -> None:
        """Write `data` to an existing attribute in one write(2); raise OSError with the kernel's errno."""

    def vfio_group_status(self, node: Path) -> int:
        """Open the group node, issue VFIO_GROUP_GET_STATUS, close it; return the flags."""

    def set_node_owner(self, node: Path, owner: NodeOwner) -> None:
        """chown + chmod a device node."""

    def node_owner(self, node: Path) -> NodeOwner:
        """Current owner and mode of a device node; OSError(ENOENT) when it does not exist."""


def _libc() -> ctypes.CDLL:
    name = ctypes.util.find_library("c") or "libc.so.6"
    return ctypes.CDLL(name, use_errno=True)


class LinuxKernel:
    """The real kernel."""

    def __init__(self) -> None:
        self._libc: ctypes.CDLL | None = None

    def write_attribute(self, path: Path, data: bytes) -> None:
        # No O_CREAT/O_TRUNC: a missing attribute must fail as it does in sysfs, never create a file.
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(errno.EIO, f"short write to {path}: {written} of {len(data)} bytes")
        finally:
            os.close(fd)

    def vfio_group_status(self, node: Path) -> int:
        if self._libc is None:
            self._libc = _libc()
        fd = os.open(node, os.O_RDWR | os.O_CLOEXEC)
        try:
            status = _VfioGroupStatus(argsz=ctypes.sizeof(_VfioGroupStatus), flags=0)
            # ctypes, not fcntl.ioctl: the structure is filled in place and errno is preserved.
            rc = self._libc.ioctl(fd, ctypes.c_ulong(VFIO_GROUP_GET_STATUS), ctypes.byref(status))
            if rc != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err), str(node))
            return int(status.flags)
        finally:
            os.close(fd)

    def set_node_owner(self, node: Path, owner: NodeOwner) -> None:
        os.chown(node, owner.uid, owner.gid, follow_symlinks=False)
        os.chmod(node, owner.mode)

    def node_owner(self, node: Path) -> NodeOwner:
        st = os.stat(node, follow_symlinks=False)
        return NodeOwner(uid=st.st_uid, gid=st.st_gid, mode=st.st_mode & 0o7777)
