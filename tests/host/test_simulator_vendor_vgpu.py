"""The simulated kernel's NVIDIA vendor-specific VFIO framework on `l40s-vgpu` (vGPU 17+, Linux 6.8+): VFs
bound to `nvidia` that are VFIO devices themselves (vfio-dev, group node, cdev), `creatable_vgpu_types` in
NVIDIA's format shrinking to one size per GPU (homogeneous mode) and to the header alone when the GPU is
full, `current_vgpu_type`'s writes and errnos, vfio-pci refusing such a VF, and an unbind from `nvidia`
breaking the VF until an SR-IOV cycle."""

from __future__ import annotations

import errno
import os

import pytest

from tests.conftest import SimFactory, SimHost
from vfiod.host.pciaddr import PciAddress
from vfiod_sim import processes
from vfiod_sim.machines.l40s_vgpu import l40s_vgpu

PF_A, PF_B = "0000:a2:00.0", "0000:b3:00.0"
VF_A = [f"0000:a2:0{(4 + n) >> 3}.{(4 + n) & 7}" for n in range(32)]
VF_B0 = "0000:b3:00.4"
Q1, Q4, Q8, Q48, C4 = 1152, 1155, 1157, 1161, 1170


def nv(sh: SimHost, vf: str, name: str) -> str:
    return sh.host.from_logical(f"/sys/bus/pci/devices/{vf}/nvidia/{name}").read_text()


def creatable(sh: SimHost, vf: str) -> dict[int, str]:
    lines = nv(sh, vf, "creatable_vgpu_types").splitlines()
    assert lines[0] == "ID    : vGPU Name"
    out = {}
    for line in lines[1:]:
        left, _, name = line.partition(" : ")
        assert len(left) == 5  # "%-5d"
        out[int(left)] = name
    return out


def set_type(sh: SimHost, vf: str, value: str) -> None:
    path = sh.host.from_logical(f"/sys/bus/pci/devices/{vf}/nvidia/current_vgpu_type")
    sh.kernel.write_attribute(path, value.encode() + b"\n")


def errno_of(sh: SimHost, vf: str, value: str) -> str:
    with pytest.raises(OSError) as e:
        set_type(sh, vf, value)
    assert e.value.errno is not None
    return errno.errorcode[e.value.errno]


def test_vfs_stay_on_nvidia_as_vfio_devices_with_no_mdev(sim: SimFactory) -> None:
    sh = sim("l40s-vgpu")
    vf = PciAddress.parse(VF_A[0])
    assert sh.host.driver(vf) == "nvidia" and sh.host.attr(PciAddress.parse(PF_A), "sriov_numvfs") == "32"
    assert os.listdir(sh.host.from_logical("/sys/class/mdev_bus")) == []
    vfio_dev = os.listdir(sh.host.device_dir(vf) / "vfio-dev")
    assert len(vfio_dev) == 1 and sh.host.from_logical(f"/dev/vfio/devices/{vfio_dev[0]}").exists()
    group = int(os.path.basename(os.readlink(sh.host.device_dir(vf) / "iommu_group")))
    assert sh.host.vfio_group_node(group).exists()
    assert sh.host.group_status(group) == 1  # viable: nvidia.ko is the VF's VFIO driver
    assert not (sh.host.device_dir(PciAddress.parse(PF_A)) / "nvidia").exists()  # only VFs have it
    assert sorted(os.listdir(sh.host.device_dir(vf) / "nvidia")) == [
        "creatable_vgpu_types",
        "current_vgpu_type",
        "vgpu_params",
        "warm_update",
    ]
    assert nv(sh, VF_A[0], "current_vgpu_type") == "0\n"
    types = creatable(sh, VF_A[0])
    assert types[Q4] == "NVIDIA L40S-4Q" and types[Q48] == "NVIDIA L40S-48Q" and len(types) == 17


def test_create_is_synchronous_and_lists_shrink_to_one_size(sim: SimFactory) -> None:
    sh = sim("l40s-vgpu")
    set_type(sh, VF_A[0], str(Q4))
    assert nv(sh, VF_A[0], "current_vgpu_type") == f"{Q4}\n"
    assert creatable(sh, VF_A[0]) == {}  # a VF holding a vGPU lists nothing
    assert set(creatable(sh, VF_A[1])) == {Q4, C4}  # homogeneous: 4 GiB types only, any series
    assert Q8 in creatable(sh, VF_B0)  # the other GPU is untouched
    assert errno_of(sh, VF_A[1], str(Q8)) == "EIO"  # a different size: RM refuses
    assert errno_of(sh, VF_A[0], str(Q4)) == "EPERM"  # one vGPU per VF
    set_type(sh, VF_A[1], str(C4))  # same size, other series: accepted
    set_type(sh, VF_A[0], "0")
    set_type(sh, VF_A[1], "0")
    assert len(creatable(sh, VF_A[1])) == 17


def test_full_gpu_lists_only_the_header(sim: SimFactory) -> None:
    sh = sim("l40s-vgpu")
    for n in range(12):  # 12 x 4 GiB = 48 GiB
        set_type(sh, VF_A[n], str(Q4))
    assert creatable(sh, VF_A[12]) == {} and nv(sh, VF_A[12], "creatable_vgpu_types") == "ID    : vGPU Name\n"
    assert errno_of(sh, VF_A[12], str(Q4)) == "EIO"
    set_type(sh, VF_A[3], "0")
    assert set(creatable(sh, VF_A[12])) == {Q4, C4}


def test_write_errnos(sim: SimFactory) -> None:
    sh = sim("l40s-vgpu")
    assert errno_of(sh, VF_A[0], "0") == "EPERM"  # no vGPU to destroy
    assert errno_of(sh, VF_A[0], "nvidia-1155") == "EINVAL"  # kstrtol base 10
    assert errno_of(sh, VF_A[0], "0x483") == "EINVAL"
    assert errno_of(sh, VF_A[0], "-1") == "EINVAL"
    assert errno_of(sh, VF_A[0], "99999") == "EIO"  # not a type of this GPU


def test_destroy_refused_while_the_vfio_device_is_open(sim: SimFactory) -> None:
    sh = sim("l40s-vgpu")
    set_type(sh, VF_A[0], str(Q1))
    group = int(os.path.basename(os.readlink(sh.host.device_dir(PciAddress.parse(VF_A[0])) / "iommu_group")))
    pid = processes.add_process(
        sh.root, exe="/usr/bin/qemu-system-x86_64", uid=1000, fds=[f"/dev/vfio/{group}"]
    )
    processes.open_vfio_device(sh.root, pid, VF_A[0])
    assert errno_of(sh, VF_A[0], "0") == "EBUSY"
    processes.remove_process(sh.root, pid)
    set_type(sh, VF_A[0], "0")


def test_heterogeneous_mode_mixes_sizes_within_the_framebuffer(sim: SimFactory) -> None:
    sh = sim(l40s_vgpu(heterogeneous=True))
    set_type(sh, VF_A[0], str(Q4))
    set_type(sh, VF_A[1], str(Q8))
    assert Q48 not in creatable(sh, VF_A[2]) and Q1 in creatable(sh, VF_A[2])


def test_vfio_pci_refuses_the_vf_and_an_unbind_breaks_it_until_an_sriov_cycle(sim: SimFactory) -> None:
    sh = sim("l40s-vgpu")
    vf = PciAddress.parse(VF_A[5])
    sh.kernel.load_module("vfio_pci")
    set_type(sh, VF_A[5], str(Q1))
    sh.kernel.write_attribute(sh.host.from_logical("/sys/bus/pci/drivers/nvidia/unbind"), VF_A[5].encode())
    assert not (sh.host.device_dir(vf) / "nvidia").exists()
    sh.kernel.write_attribute(sh.host.device_dir(vf) / "driver_override", b"vfio-pci")
    with pytest.raises(OSError) as e:
        sh.kernel.write_attribute(
            sh.host.from_logical("/sys/bus/pci/drivers/vfio-pci/bind"), VF_A[5].encode()
        )
    assert e.value.errno == errno.EINVAL
    sh.kernel.write_attribute(sh.host.device_dir(vf) / "driver_override", b"\n")
    sh.kernel.write_attribute(sh.host.from_logical("/sys/bus/pci/drivers/nvidia/bind"), VF_A[5].encode())
    assert sh.host.driver(vf) == "nvidia" and not (sh.host.device_dir(vf) / "nvidia").exists()
    assert not (sh.host.device_dir(vf) / "vfio-dev").exists()
    sh.kernel.reboot()  # VFs are enabled afresh (sriov-manage at boot): registered again, no vGPU
    assert nv(sh, VF_A[5], "current_vgpu_type") == "0\n"
