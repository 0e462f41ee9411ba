"""A minimal VMM's use of a VFIO group, as an unprivileged VM manager would do it (ctypes ioctls only).

    python3 -m tests.e2e.vmm GROUP_NODE PCI_ADDRESS [--dma-mib N] [--hold-device [--only-device]]

Opens /dev/vfio/vfio and the group node, checks the API version, type1v2 support and the group's viability,
attaches the group to a container, sets the type1v2 IOMMU, gets the device fd, reads the vendor and device
ids from the config region and maps then unmaps N MiB of DMA (default 1). With --hold-device it prints
`holding` and keeps every fd open until its standard input closes; with --only-device too it first closes
the group and container fds and keeps only the device fd (/proc then shows just
`anon_inode:[vfio-device]`). Prints one JSON object (what worked, and the errno name of what did not);
exit status 0 when every step worked.

Standard library only: run in the guest with Debian's /usr/bin/python3 as the unprivileged user.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import json
import mmap
import os
import sys
from collections.abc import Sequence
from typing import Any

VFIO_TYPE = ord(";")
VFIO_BASE = 100


def _io(nr: int) -> int:
    return (VFIO_TYPE << 8) | (VFIO_BASE + nr)


VFIO_GET_API_VERSION = _io(0)
VFIO_CHECK_EXTENSION = _io(1)
VFIO_SET_IOMMU = _io(2)
VFIO_GROUP_GET_STATUS = _io(3)
VFIO_GROUP_SET_CONTAINER = _io(4)
VFIO_GROUP_GET_DEVICE_FD = _io(6)
VFIO_DEVICE_GET_REGION_INFO = _io(8)
VFIO_IOMMU_MAP_DMA = _io(13)
VFIO_IOMMU_UNMAP_DMA = _io(14)

VFIO_API_VERSION = 0
VFIO_TYPE1v2_IOMMU = 3
VFIO_GROUP_FLAGS_VIABLE = 1
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_DMA_MAP_FLAG_READ = 1
VFIO_DMA_MAP_FLAG_WRITE = 2


class GroupStatus(ctypes.Structure):
    _fields_ = (("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32))


class RegionInfo(ctypes.Structure):
    _fields_ = (
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("cap_offset", ctypes.c_uint32),
        ("size", ctypes.c_uint64),
        ("offset", ctypes.c_uint64),
    )


class DmaMap(ctypes.Structure):
    _fields_ = (
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("vaddr", ctypes.c_uint64),
        ("iova", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
    )


class DmaUnmap(ctypes.Structure):
    _fields_ = (
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("iova", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
    )


class StepFailed(Exception):
    def __init__(self, step: str, err: int) -> None:
        super().__init__(f"{step}: {errno.errorcode.get(err, str(err))}")
        self.step = step
        self.errno = err


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def ioctl(fd: int, request: int, arg: Any, step: str) -> int:
    """ioctl(2) through ctypes: fcntl.ioctl returns the buffer, not the fd GET_DEVICE_FD gives back."""
    rc = int(_libc.ioctl(ctypes.c_int(fd), ctypes.c_ulong(request), arg))
    if rc < 0:
        raise StepFailed(step, ctypes.get_errno())
    return rc


def config_ids(device: int) -> tuple[str, str]:
    """The vendor and device ids a VFIO device's config region shows (4 hex digits each)."""
    region = RegionInfo(argsz=ctypes.sizeof(RegionInfo), index=VFIO_PCI_CONFIG_REGION_INDEX)
    ioctl(device, VFIO_DEVICE_GET_REGION_INFO, ctypes.byref(region), "GET_REGION_INFO(config)")
    config = os.pread(device, 4, region.offset)
    return f"{int.from_bytes(config[0:2], 'little'):04x}", f"{int.from_bytes(config[2:4], 'little'):04x}"


def dma_buffer(mib: int) -> tuple[mmap.mmap, int]:
    """`mib` MiB of anonymous memory to map for DMA, and its address (valid while the buffer lives)."""
    buf = mmap.mmap(-1, mib * 1024 * 1024, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return buf, ctypes.addressof(ctypes.c_char.from_buffer(buf))


def hold(out: dict[str, Any]) -> None:
    """Say what worked and `holding`, then keep everything open until standard input closes."""
    print(json.dumps(out), flush=True)
    print("holding", flush=True)
    sys.stdin.read()


def run(
    node: str, address: str, dma_mib: int, hold_device: bool, only_device: bool = False
) -> dict[str, Any]:
    out: dict[str, Any] = {"uid": os.getuid(), "node": node, "device": address, "steps": []}
    steps: list[str] = out["steps"]
    fds: list[int] = []
    try:
        try:
            container = os.open("/dev/vfio/vfio", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise StepFailed("open /dev/vfio/vfio", e.errno or errno.EIO) from e
        fds.append(container)
        if ioctl(container, VFIO_GET_API_VERSION, None, "VFIO_GET_API_VERSION") != VFIO_API_VERSION:
            raise StepFailed("VFIO_GET_API_VERSION", errno.EPROTO)
        if not ioctl(container, VFIO_CHECK_EXTENSION, ctypes.c_ulong(VFIO_TYPE1v2_IOMMU), "CHECK_EXTENSION"):
            raise StepFailed("VFIO_CHECK_EXTENSION(TYPE1v2)", errno.ENOTSUP)
        steps.append("container")
        try:
            group = os.open(node, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise StepFailed(f"open {node}", e.errno or errno.EIO) from e
        fds.append(group)
        status = GroupStatus(argsz=ctypes.sizeof(GroupStatus), flags=0)
        ioctl(group, VFIO_GROUP_GET_STATUS, ctypes.byref(status), "VFIO_GROUP_GET_STATUS")
        out["viable"] = bool(status.flags & VFIO_GROUP_FLAGS_VIABLE)
        if not out["viable"]:
            raise StepFailed("group viable", errno.EPERM)
        steps.append("viable")
        ioctl(group, VFIO_GROUP_SET_CONTAINER, ctypes.byref(ctypes.c_int(container)), "GROUP_SET_CONTAINER")
        ioctl(container, VFIO_SET_IOMMU, ctypes.c_ulong(VFIO_TYPE1v2_IOMMU), "VFIO_SET_IOMMU")
        steps.append("iommu")
        device = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, ctypes.c_char_p(address.encode()), "GET_DEVICE_FD")
        fds.append(device)
        steps.append("device-fd")
        out["vendor_id"], out["device_id"] = config_ids(device)
        steps.append("config")
        size = dma_mib * 1024 * 1024
        _buf, vaddr = dma_buffer(dma_mib)
        dma = DmaMap(
            argsz=ctypes.sizeof(DmaMap),
            flags=VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
            vaddr=vaddr,
            iova=0x100000,
            size=size,
        )
        ioctl(container, VFIO_IOMMU_MAP_DMA, ctypes.byref(dma), f"MAP_DMA {dma_mib} MiB")
        steps.append("map")
        unmap = DmaUnmap(argsz=ctypes.sizeof(DmaUnmap), flags=0, iova=0x100000, size=size)
        ioctl(container, VFIO_IOMMU_UNMAP_DMA, ctypes.byref(unmap), "UNMAP_DMA")
        steps.append("unmap")
        out["ok"] = True
        if hold_device and only_device:
            for fd in (group, container):
                os.close(fd)
                fds.remove(fd)
            steps.append("only-device")
        if hold_device:
            hold(out)
    except StepFailed as e:
        out["ok"] = False
        out["failed_step"] = e.step
        out["errno"] = errno.errorcode.get(e.errno, str(e.errno))
    finally:
        for fd in reversed(fds):
            os.close(fd)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmm")
    parser.add_argument("node")
    parser.add_argument("address")
    parser.add_argument("--dma-mib", type=int, default=1)
    parser.add_argument("--hold-device", action="store_true")
    parser.add_argument("--only-device", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.node, args.address, args.dma_mib, args.hold_device, args.only_device)
    print(json.dumps(result), flush=True)
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
