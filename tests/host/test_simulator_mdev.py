"""The simulated kernel's mediated devices (drivers/vfio/mdev and samples/vfio-mdev, Linux 6.1) on
`mdev-samples`: the parents and types, available_instances shrinking and growing from a shared budget,
create's and remove's errnos, each mdev in a group of its own with its node, remove waiting while a VFIO
device file or its cdev is open, its VFIO device (and cdev on `mdev-samples-iommufd`), and a reboot
taking every mdev away; and NVIDIA's vGPU on the VFs of
`a40-mdev`."""

from __future__ import annotations

import errno
import os
import threading

import pytest

from tests.conftest import SimFactory, SimHost
from vfiod.host.pciaddr import DriverName, PciAddress
from vfiod_sim import processes

U1 = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"
U2 = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1002"


def type_dir(sh: SimHost, parent: str, type_id: str) -> str:
    return f"/sys/class/mdev_bus/{parent}/mdev_supported_types/{type_id}"


def attr(sh: SimHost, path: str) -> str:
    return sh.host.from_logical(path).read_text().strip()


def available(sh: SimHost, parent: str, type_id: str) -> int:
    return int(attr(sh, f"{type_dir(sh, parent, type_id)}/available_instances"))


def create(sh: SimHost, parent: str, type_id: str, uuid: str) -> None:
    path = sh.host.from_logical(f"{type_dir(sh, parent, type_id)}/create")
    sh.kernel.write_attribute(path, uuid.encode() + b"\n")


def remove(sh: SimHost, uuid: str) -> None:
    sh.kernel.write_attribute(sh.host.from_logical(f"/sys/bus/mdev/devices/{uuid}/remove"), b"1\n")


def errno_of(fn: object, *args: object) -> str:
    with pytest.raises(OSError) as e:
        fn(*args)  # type: ignore[operator]
    assert e.value.errno is not None
    return errno.errorcode[e.value.errno]


def group_of(sh: SimHost, uuid: str) -> int:
    return int(
        os.path.basename(os.readlink(sh.host.from_logical(f"/sys/bus/mdev/devices/{uuid}/iommu_group")))
    )


def remove_waits_for(sh: SimHost, uuid: str, pid: int) -> None:
    """The mdev's remove blocks while process `pid` lives, and goes through once it has exited."""
    done = threading.Event()

    def removing() -> None:
        remove(sh, uuid)
        done.set()

    threading.Thread(target=removing, daemon=True).start()
    assert sh.kernel.wait_blocked(uuid, 2.0)
    assert not done.is_set() and sh.host.from_logical(f"/sys/bus/mdev/devices/{uuid}").exists()
    processes.remove_process(sh.root, pid)
    assert done.wait(2.0)
    assert not sh.host.from_logical(f"/sys/bus/mdev/devices/{uuid}").exists()


def test_parents_and_types_as_the_samples_show_them(sim: SimFactory) -> None:
    sh = sim("mdev-samples")
    assert sorted(os.listdir(sh.host.from_logical("/sys/class/mdev_bus"))) == ["mbochs", "mtty"]
    assert os.readlink(sh.host.from_logical("/sys/class/mdev_bus/mtty")).endswith("devices/virtual/mtty/mtty")
    mtty2 = type_dir(sh, "mtty", "mtty-2")
    assert (attr(sh, f"{mtty2}/name"), attr(sh, f"{mtty2}/device_api"), available(sh, "mtty", "mtty-2")) == (
        "Dual port serial",
        "vfio-pci",
        12,
    )
    assert not sh.host.from_logical(f"{mtty2}/description").exists()  # mtty has none
    large = type_dir(sh, "mbochs", "mbochs-large")
    assert attr(sh, f"{large}/description") == "virtual display, 64 MB video memory"
    assert available(sh, "mbochs", "mbochs-large") == 4 and available(sh, "mbochs", "mbochs-small") == 64


def test_create_gives_an_mdev_its_own_group_and_node_and_remove_takes_them(sim: SimFactory) -> None:
    sh = sim("mdev-samples")
    create(sh, "mtty", "mtty-2", U1.upper())  # uuid_parse takes either case; sysfs shows lowercase
    dev = sh.host.from_logical(f"/sys/bus/mdev/devices/{U1}")
    assert os.readlink(dev / "mdev_type").endswith("mdev_supported_types/mtty-2")
    assert os.readlink(dev / "driver").endswith("bus/mdev/drivers/mtty")
    group = group_of(sh, U1)
    assert group not in sh.kernel.topology.groups  # a new group, not one of the PCI functions'
    assert os.listdir(sh.host.from_logical(f"/sys/kernel/iommu_groups/{group}/devices")) == [U1]
    assert sh.host.vfio_group_node(group).exists()
    assert os.listdir(sh.host.from_logical(f"{type_dir(sh, 'mtty', 'mtty-2')}/devices")) == [U1]
    assert (available(sh, "mtty", "mtty-2"), available(sh, "mtty", "mtty-1")) == (11, 22)  # shared ports
    create(sh, "mtty", "mtty-1", U2)
    assert group_of(sh, U2) == group + 1
    remove(sh, U1)
    assert not dev.exists() and not sh.host.vfio_group_node(group).exists()
    assert (available(sh, "mtty", "mtty-2"), available(sh, "mtty", "mtty-1")) == (11, 23)


def test_create_and_remove_errnos(sim: SimFactory) -> None:
    sh = sim("mdev-samples")
    assert errno_of(create, sh, "mtty", "mtty-1", "not-a-uuid-at-all-but-36-characters!") == "EINVAL"
    assert errno_of(create, sh, "mtty", "mtty-1", U1[:-1]) == "EINVAL"
    create(sh, "mtty", "mtty-1", U1)
    assert errno_of(create, sh, "mbochs", "mbochs-small", U1) == "EEXIST"  # uuids are unique on the bus
    assert errno_of(
        sh.kernel.write_attribute, sh.host.from_logical(f"/sys/bus/mdev/devices/{U1}/remove"), b"x"
    ) == ("EINVAL")


def test_mbochs_budget_runs_out_and_comes_back(sim: SimFactory) -> None:
    sh = sim("mdev-samples")
    uuids = [f"{U1[:-4]}{n:04x}" for n in range(5)]
    for u in uuids[:4]:
        create(sh, "mbochs", "mbochs-large", u)
    assert available(sh, "mbochs", "mbochs-large") == 0 and available(sh, "mbochs", "mbochs-small") == 0
    assert errno_of(create, sh, "mbochs", "mbochs-large", uuids[4]) == "ENOSPC"
    remove(sh, uuids[0])
    assert available(sh, "mbochs", "mbochs-medium") == 4
    create(sh, "mbochs", "mbochs-large", uuids[4])


def test_remove_waits_while_a_device_file_is_open(sim: SimFactory) -> None:
    sh = sim("mdev-samples")
    create(sh, "mtty", "mtty-2", U1)
    create(sh, "mtty", "mtty-1", U2)
    group = group_of(sh, U1)
    # the group node alone does not hold the device: its remove goes ahead (measured on 6.1)
    holder = processes.add_process(
        sh.root, exe="/usr/bin/python3", uid=0, fds=[f"/dev/vfio/{group_of(sh, U2)}"]
    )
    remove(sh, U2)
    processes.remove_process(sh.root, holder)
    pid = processes.add_process(
        sh.root, exe="/usr/bin/qemu-system-x86_64", uid=1000, fds=[f"/dev/vfio/{group}"]
    )
    processes.open_vfio_device(sh.root, pid, U1)
    processes.close_fd(sh.root, pid, f"/dev/vfio/{group}")  # the device file keeps the group open
    with pytest.raises(OSError) as e:
        sh.host.group_status(group)
    assert e.value.errno == errno.EBUSY
    remove_waits_for(sh, U1, pid)


def test_an_mdev_has_its_vfio_device_and_cdev(sim: SimFactory) -> None:
    """6.1+: `<uuid>/vfio-dev/vfioN` from the ida every VFIO device uses (a function bound first takes
    vfio0); only with VFIO cdevs its `dev` and /dev/vfio/devices/vfioN; remove takes them away."""
    plain = sim("mdev-samples")
    create(plain, "mtty", "mtty-2", U1)
    assert os.listdir(plain.host.from_logical(f"/sys/bus/mdev/devices/{U1}/vfio-dev")) == ["vfio0"]
    assert not plain.host.from_logical(f"/sys/bus/mdev/devices/{U1}/vfio-dev/vfio0/dev").exists()
    assert not plain.host.from_logical("/dev/vfio/devices").exists()
    sh = sim("mdev-samples-iommufd")
    edu = PciAddress.parse("0000:00:07.0")  # no driver: vfio-pci binds it and its device takes vfio0
    sh.kernel.load_module("vfio_pci")
    sh.host.set_driver_override(edu, DriverName("vfio-pci"))
    sh.host.probe(edu)
    create(sh, "mtty", "mtty-2", U1)
    create(sh, "mtty", "mtty-1", U2)
    names = [os.listdir(sh.host.from_logical(f"/sys/bus/mdev/devices/{u}/vfio-dev")) for u in (U1, U2)]
    assert names == [["vfio1"], ["vfio2"]]
    assert attr(sh, f"/sys/bus/mdev/devices/{U2}/vfio-dev/vfio2/dev").endswith(":2")
    node = sh.host.from_logical("/dev/vfio/devices/vfio2")
    assert node.exists() and node.stat().st_mode & 0o777 == 0o600
    assert os.readlink(sh.host.from_logical("/sys/class/vfio-dev/vfio2")).endswith(f"{U2}/vfio-dev/vfio2")
    remove(sh, U1)
    assert not sh.host.from_logical("/dev/vfio/devices/vfio1").exists()
    create(sh, "mtty", "mtty-1", U1)  # the lowest free index again
    assert os.listdir(sh.host.from_logical(f"/sys/bus/mdev/devices/{U1}/vfio-dev")) == ["vfio1"]


def test_remove_waits_while_the_cdev_is_open(sim: SimFactory) -> None:
    sh = sim("mdev-samples-iommufd")
    create(sh, "mtty", "mtty-2", U1)
    (cdev,) = os.listdir(sh.host.from_logical(f"/sys/bus/mdev/devices/{U1}/vfio-dev"))
    pid = processes.add_process(
        sh.root, exe="/usr/bin/qemu-system-x86_64", uid=1000, fds=[f"/dev/vfio/devices/{cdev}"]
    )
    remove_waits_for(sh, U1, pid)
    assert not sh.host.from_logical(f"/dev/vfio/devices/{cdev}").exists()


def test_a_reboot_takes_every_mdev_away(sim: SimFactory) -> None:
    sh = sim("mdev-samples")
    create(sh, "mtty", "mtty-2", U1)
    group = group_of(sh, U1)
    sh.kernel.reboot()
    assert not sh.host.from_logical(f"/sys/bus/mdev/devices/{U1}").exists()
    assert not sh.host.vfio_group_node(group).exists()
    assert available(sh, "mtty", "mtty-2") == 12


# ----- NVIDIA's vGPU on SR-IOV VFs (a40-mdev): one vGPU per VF, the GPU's framebuffer, one size per GPU -----

PF_A, PF_B = "0000:a2:00.0", "0000:b3:00.0"
VF_A = [f"0000:a2:0{(4 + n) >> 3}.{(4 + n) & 7}" for n in range(32)]
Q4, Q8, Q48 = "nvidia-559", "nvidia-560", "nvidia-563"


def test_a40_vfs_are_bound_to_nvidia_and_are_vgpu_parents(sim: SimFactory) -> None:
    sh = sim("a40-mdev")
    assert sh.host.attr(PciAddress.parse(PF_A), "sriov_numvfs") == "32"
    assert sh.host.driver(PciAddress.parse(VF_A[0])) == "nvidia"
    assert len(os.listdir(sh.host.from_logical("/sys/class/mdev_bus"))) == 64  # every VF, never the PF
    q4 = type_dir(sh, VF_A[0], Q4)
    assert attr(sh, f"{q4}/name") == "NVIDIA A40-4Q"
    assert "framebuffer=4096M" in attr(sh, f"{q4}/description") and available(sh, VF_A[0], Q4) == 1


def test_a40_one_vgpu_per_vf_and_one_size_per_gpu(sim: SimFactory) -> None:
    sh = sim("a40-mdev")
    create(sh, VF_A[0], Q4, U1)
    assert available(sh, VF_A[0], Q4) == 0  # the VF is taken
    assert (available(sh, VF_A[1], Q4), available(sh, VF_A[1], Q8)) == (1, 0)  # homogeneous: 4Q only
    assert available(sh, "0000:b3:00.4", Q8) == 1  # the other GPU is untouched
    assert errno_of(create, sh, VF_A[1], Q8, U2) == "EIO"  # NVIDIA's RM refuses: EIO
    assert errno_of(create, sh, VF_A[0], Q4, U2) == "EIO"
    remove(sh, U1)
    assert available(sh, VF_A[1], Q8) == 1


def test_a40_framebuffer_runs_out(sim: SimFactory) -> None:
    sh = sim("a40-mdev")
    for n in range(12):  # 12 x 4 GiB = 48 GiB
        create(sh, VF_A[n], Q4, f"{U1[:-4]}{n:04x}")
    assert available(sh, VF_A[12], Q4) == 0 and available(sh, VF_A[12], Q48) == 0
    assert errno_of(create, sh, VF_A[12], Q4, U2) == "EIO"
