"""A VMM that gets its device as descriptors (OpenDevices: iommufd and a VFIO device cdev), as hypeman
would start one in fd mode (ctypes ioctls; the D-Bus call through the dbus_fast the package installs in
/usr/lib/vfiod).

    python3 -m tests.e2e.fd_vmm INSTANCE DEVICE [--dma-mib N] [--hold] [--qemu ROOT] [--allow-mdev]

Calls OpenDevices(INSTANCE) on the system bus (with `allow_mdev` when asked), whose reply carries the
descriptors, and takes the cdev of DEVICE (a PCI address, or an mdev's uuid): binds it to the iommufd
(VFIO_DEVICE_BIND_IOMMUFD), allocates an IOAS and attaches the device to it, reads the vendor and device
ids from the config region and maps then unmaps N MiB of DMA through the IOAS (default 1). No device
node is opened by this process. Prints one JSON object (what worked, and the errno name of what did not;
`nodes` is what /proc/self/fd shows for the descriptors); with --hold it prints `holding` and keeps them
until its standard input closes. Exit status 0 when every step worked.
With --qemu, the descriptors go to a real QEMU instead (`-object iommufd,fd= -device vfio-pci,fd=`, the
binary unpacked under ROOT), paused, and `query-pci` says what it realized.

Run in the guest as the unprivileged user, with PYTHONPATH naming the sources and /usr/lib/vfiod.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import errno
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from tests.e2e import qemu_vmm, vmm
from tests.e2e.vmm import StepFailed, _io, config_ids, dma_buffer, ioctl

VFIO_DEVICE_BIND_IOMMUFD = _io(18)  # include/uapi/linux/vfio.h (6.6+)
VFIO_DEVICE_ATTACH_IOMMUFD_PT = _io(19)
IOMMUFD_TYPE = ord(";")  # include/uapi/linux/iommufd.h


def _iommufd(nr: int) -> int:
    return (IOMMUFD_TYPE << 8) | nr


IOMMU_IOAS_ALLOC = _iommufd(0x81)
IOMMU_IOAS_MAP = _iommufd(0x85)
IOMMU_IOAS_UNMAP = _iommufd(0x86)
IOMMU_IOAS_MAP_FIXED_IOVA = 1
IOMMU_IOAS_MAP_WRITEABLE = 2
IOMMU_IOAS_MAP_READABLE = 4
IOVA = 0x100000


class BindIommufd(ctypes.Structure):
    _fields_ = (
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("iommufd", ctypes.c_int32),
        ("out_devid", ctypes.c_uint32),
    )


class AttachPt(ctypes.Structure):
    _fields_ = (("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("pt_id", ctypes.c_uint32))


class IoasAlloc(ctypes.Structure):
    _fields_ = (("size", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("out_ioas_id", ctypes.c_uint32))


class IoasMap(ctypes.Structure):
    _fields_ = (
        ("size", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("ioas_id", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
        ("user_va", ctypes.c_uint64),
        ("length", ctypes.c_uint64),
        ("iova", ctypes.c_uint64),
    )


class IoasUnmap(ctypes.Structure):
    _fields_ = (
        ("size", ctypes.c_uint32),
        ("ioas_id", ctypes.c_uint32),
        ("iova", ctypes.c_uint64),
        ("length", ctypes.c_uint64),
    )


async def open_devices(
    instance: str, allow_mdev: bool = False
) -> tuple[int, list[tuple[str, str, int]], list[str]]:
    """OpenDevices on the system bus: (iommufd, [(device id, sysfs path, cdev fd)], warnings)."""
    from dbus_fast import BusType, Message, MessageType, Variant
    from dbus_fast.aio import MessageBus

    bus = await MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True).connect()
    try:
        reply = await bus.call(
            Message(
                destination="org.hypeman.Devices1",
                path="/org/hypeman/Devices1",
                interface="org.hypeman.Devices1.Manager",
                member="OpenDevices",
                signature="sasa{sv}",
                body=[instance, [], {"allow_mdev": Variant("b", True)} if allow_mdev else {}],
            )
        )
    finally:
        bus.disconnect()
    if reply.message_type is MessageType.ERROR:
        raise RuntimeError(f"{reply.error_name}: {reply.body[0] if reply.body else ''}")
    fds = reply.unix_fds
    iommufd_idx, devices, warnings = reply.body
    return fds[iommufd_idx], [(i, p, fds[idx]) for i, p, idx in devices], list(warnings)


def descriptors(
    instance: str, address: str, out: dict[str, Any], allow_mdev: bool = False
) -> tuple[int, int, list[int]]:
    """OpenDevices' iommufd and the cdev of `address` (a PCI address or an mdev's uuid), with every
    descriptor received (the caller's to close); the warnings and what /proc/self/fd shows for them go
    into `out`."""
    try:
        iommufd, devices, out["warnings"] = asyncio.run(open_devices(instance, allow_mdev))
    except Exception as e:
        out["open_devices"] = str(e)
        raise StepFailed("OpenDevices", errno.EACCES) from e
    fds = [iommufd, *(fd for _, _, fd in devices)]
    out["nodes"] = {str(fd): os.readlink(f"/proc/self/fd/{fd}") for fd in fds}
    bus = "mdev" if len(address) == 36 else "pci"  # a uuid, or dddd:bb:ss.f
    wanted = f"/sys/bus/{bus}/devices/{address}/"
    cdev = next((fd for _, path, fd in devices if path == wanted), None)
    if cdev is None:
        for fd in fds:
            os.close(fd)
        raise StepFailed(f"a descriptor for {address}", errno.ENOENT)
    return iommufd, cdev, fds


def run(instance: str, address: str, dma_mib: int, hold: bool, allow_mdev: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"uid": os.getuid(), "instance": instance, "device": address, "steps": []}
    steps: list[str] = out["steps"]
    fds: list[int] = []
    try:
        iommufd, cdev, received = descriptors(instance, address, out, allow_mdev)
        fds += received
        steps.append("open-devices")
        bind = BindIommufd(argsz=ctypes.sizeof(BindIommufd), flags=0, iommufd=iommufd)
        ioctl(cdev, VFIO_DEVICE_BIND_IOMMUFD, ctypes.byref(bind), "VFIO_DEVICE_BIND_IOMMUFD")
        steps.append("bind")
        ioas = IoasAlloc(size=ctypes.sizeof(IoasAlloc), flags=0)
        ioctl(iommufd, IOMMU_IOAS_ALLOC, ctypes.byref(ioas), "IOMMU_IOAS_ALLOC")
        attach = AttachPt(argsz=ctypes.sizeof(AttachPt), flags=0, pt_id=ioas.out_ioas_id)
        ioctl(cdev, VFIO_DEVICE_ATTACH_IOMMUFD_PT, ctypes.byref(attach), "VFIO_DEVICE_ATTACH_IOMMUFD_PT")
        steps.append("attach")
        out["vendor_id"], out["device_id"] = config_ids(cdev)
        steps.append("config")
        size = dma_mib * 1024 * 1024
        _buf, vaddr = dma_buffer(dma_mib)
        flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE
        dma = IoasMap(
            size=ctypes.sizeof(IoasMap),
            flags=flags,
            ioas_id=ioas.out_ioas_id,
            user_va=vaddr,
            length=size,
            iova=IOVA,
        )
        ioctl(iommufd, IOMMU_IOAS_MAP, ctypes.byref(dma), f"IOMMU_IOAS_MAP {dma_mib} MiB")
        steps.append("map")
        unmap = IoasUnmap(size=ctypes.sizeof(IoasUnmap), ioas_id=ioas.out_ioas_id, iova=IOVA, length=size)
        ioctl(iommufd, IOMMU_IOAS_UNMAP, ctypes.byref(unmap), "IOMMU_IOAS_UNMAP")
        steps.append("unmap")
        out["ok"] = True
        if hold:
            vmm.hold(out)
    except StepFailed as e:
        out["ok"] = False
        out["failed_step"] = e.step
        out["errno"] = errno.errorcode.get(e.errno, str(e.errno))
    finally:
        for fd in reversed(fds):
            os.close(fd)
    return out


def run_qemu(
    instance: str, address: str, qemu_root: str, hold: bool, allow_mdev: bool = False
) -> dict[str, Any]:
    """The descriptors handed to a real QEMU (its binary under `qemu_root`, QEMU 8.2 or later): iommufd
    as `-object iommufd,fd=`, the cdev as `-device vfio-pci,fd=`; this process keeps no copy. What
    `query-pci` lists of the device, QEMU's command line and its pid."""
    out: dict[str, Any] = {"uid": os.getuid(), "instance": instance, "device": address}
    try:
        iommufd, cdev, fds = descriptors(instance, address, out, allow_mdev)
    except StepFailed as e:
        return {**out, "ok": False, "failed_step": e.step}
    root = qemu_root.rstrip("/")
    extra = [
        *("-L", f"{root}/usr/share/qemu", "-L", f"{root}/usr/share/seabios"),
        *("-object", f"iommufd,id=iommufd0,fd={iommufd}"),
        *("-device", f"vfio-pci,fd={cdev},iommufd=iommufd0,id=hostdev0"),
    ]
    env = dict(os.environ, QEMU_MODULE_DIR=f"{root}/usr/lib/x86_64-linux-gnu/qemu")
    out["qemu"] = " ".join(extra)
    try:
        with qemu_vmm.running(
            [],
            os.getuid(),
            [],
            binary=f"{root}/usr/bin/qemu-system-x86_64",
            extra=extra,
            pass_fds=fds,
            env=env,
        ) as q:
            for fd in fds:  # QEMU has its own copies now
                os.close(fd)
            fds = []
            out["pid"] = q.pid
            out["passed"] = {k: [f.vendor_id, f.device_id, f.address] for k, f in q.passed().items()}
            out["ok"] = True
            if hold:
                vmm.hold(out)
    except qemu_vmm.QemuFailed as e:
        out.update(ok=False, failed_step="qemu", error=str(e))
    finally:
        for fd in fds:
            os.close(fd)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fd_vmm")
    parser.add_argument("instance")
    parser.add_argument("address")
    parser.add_argument("--dma-mib", type=int, default=1)
    parser.add_argument("--hold", action="store_true")
    parser.add_argument("--qemu", metavar="ROOT", help="hand the descriptors to the QEMU unpacked under ROOT")
    parser.add_argument("--allow-mdev", action="store_true", help="OpenDevices with allow_mdev")
    args = parser.parse_args(argv)
    if args.qemu:
        result = run_qemu(args.instance, args.address, args.qemu, args.hold, args.allow_mdev)
    else:
        result = run(args.instance, args.address, args.dma_mib, args.hold, args.allow_mdev)
    print(json.dumps(result), flush=True)
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
