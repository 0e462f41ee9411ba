"""The simulated kernel's SR-IOV (drivers/pci/iov.c, drivers/vfio/pci/vfio_pci_core.c): sriov_numvfs and
sriov_drivers_autoprobe with their errnos, VFs joining and leaving the bus with their links,
and a PF driver's unbind taking its VFs away."""

from __future__ import annotations

import errno

import pytest

from tests.conftest import SimFactory, SimHost
from vfiod.host.pciaddr import DriverName, PciAddress
from vfiod.host.pcifunction import read_function

PF = PciAddress.parse("0000:1c:00.0")  # dgx-h100's first ConnectX-7: 4 VFs, 1c:00.1-4
VF1, VF2 = PciAddress.parse("0000:1c:00.1"), PciAddress.parse("0000:1c:00.2")
MLX5 = DriverName.parse("mlx5_core")
VFIO = DriverName.parse("vfio-pci")


def write(sh: SimHost, attr: str, data: bytes, addr: PciAddress = PF) -> None:
    sh.kernel.write_attribute(sh.host.from_logical(f"/sys/bus/pci/devices/{addr}/{attr}"), data)


def errno_of(sh: SimHost, attr: str, data: bytes, addr: PciAddress = PF) -> str:
    with pytest.raises(OSError) as e:
        write(sh, attr, data, addr)
    assert e.value.errno is not None
    return errno.errorcode[e.value.errno]


def test_enabling_vfs_adds_them_with_their_links_and_groups(sim: SimFactory) -> None:
    sh = sim("dgx-h100", idle=True)
    pf = read_function(sh.host, PF)
    assert (pf.sriov_totalvfs, pf.sriov_numvfs, pf.virtfns) == (4, 0, ())
    assert not sh.host.device_exists(VF1)
    write(sh, "sriov_drivers_autoprobe", b"0\n")
    write(sh, "sriov_numvfs", b"2\n")
    pf = read_function(sh.host, PF)
    assert (pf.sriov_numvfs, pf.virtfns) == (2, (VF1, VF2))
    vf = read_function(sh.host, VF1)
    assert (vf.physfn, vf.driver, vf.device) == (PF, None, "101e")  # autoprobe off: no driver
    assert vf.iommu_group is not None and vf.iommu_group != pf.iommu_group
    assert sh.host.attr(PF, "sriov_offset") == "1" and sh.host.attr(PF, "sriov_stride") == "1"
    assert not sh.host.device_exists(PciAddress.parse("0000:1c:00.3"))


def test_numvfs_errnos_follow_sriov_numvfs_store(sim: SimFactory) -> None:
    sh = sim("dgx-h100", idle=True)
    assert errno_of(sh, "sriov_numvfs", b"5") == "ERANGE"  # above sriov_totalvfs
    assert errno_of(sh, "sriov_numvfs", b"two") == "EINVAL"
    write(sh, "sriov_numvfs", b"2")
    assert read_function(sh.host, VF1).driver == "mlx5_core"  # autoprobe on: the VF driver probes it
    assert errno_of(sh, "sriov_numvfs", b"3") == "EBUSY"  # "Disable before enabling"
    write(sh, "sriov_numvfs", b"2")  # the same count: nothing to do
    write(sh, "sriov_numvfs", b"0")
    assert read_function(sh.host, PF).virtfns == () and not sh.host.device_exists(VF1)
    sh.host.unbind(PF, MLX5)
    assert errno_of(sh, "sriov_numvfs", b"1") == "ENOENT"  # no driver bound to device
    assert errno_of(sh, "sriov_drivers_autoprobe", b"maybe") == "EINVAL"


def test_a_pf_unbind_removes_its_vfs_and_a_vf_passes_through(sim: SimFactory) -> None:
    sh = sim("dgx-h100", idle=True)
    write(sh, "sriov_drivers_autoprobe", b"0")
    write(sh, "sriov_numvfs", b"2")
    sh.kernel.load_module("vfio_pci")
    sh.host.set_driver_override(PF, VFIO)
    sh.host.unbind(PF, MLX5)  # mlx5's remove disables SR-IOV: the VFs leave the bus
    assert read_function(sh.host, PF).sriov_numvfs == 0 and not sh.host.device_exists(VF1)
    write(sh, "driver_override", b"\n")
    sh.host.probe(PF)
    write(sh, "sriov_numvfs", b"1")
    sh.host.set_driver_override(VF1, VFIO)
    sh.host.probe(VF1)
    assert read_function(sh.host, VF1).is_vfio_bound  # a VF passes through like any function


def test_nvme_leaves_its_vfs_and_vfio_pci_refuses_such_a_pf(sim: SimFactory) -> None:
    # qemu-q35's SR-IOV NVMe, as Debian's 6.1 kernel shows it: "driver left SR-IOV enabled after remove",
    # then "Cannot bind to PF with SR-IOV enabled" (probe -EBUSY; drivers_probe itself succeeds)
    sh = sim("qemu-q35", idle=True)
    pf, vf = PciAddress.parse("0000:00:09.0"), PciAddress.parse("0000:00:09.1")
    write(sh, "sriov_drivers_autoprobe", b"0", pf)
    write(sh, "sriov_numvfs", b"2", pf)
    sh.host.unbind(pf, DriverName.parse("nvme"))
    assert read_function(sh.host, pf).sriov_numvfs == 2 and sh.host.device_exists(vf)
    sh.kernel.load_module("vfio_pci")
    sh.host.set_driver_override(pf, VFIO)
    sh.host.probe(pf)
    assert sh.host.driver(pf) is None
    assert errno_of(sh, "sriov_numvfs", b"0", pf) == "ENOENT"  # no driver to disable them
