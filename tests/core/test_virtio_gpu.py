"""A GPU whose native driver is virtio-pci (virtio-gpu; its DRM device is the PCI function's, as Linux
6.12 shows it) and DRM card numbers that change while a GPU is away (qemu-q35-iommufd, 00:0b.0).

A process holding the virtio-gpu's card node makes Attach answer DeviceBusy naming it, nothing written;
after it lets go, Attach and Detach return the GPU to virtio-pci. A DRM device that registered while the
GPU was in a VM takes its old number, so it comes back as another card; the holder check reads the numbers
again and finds a holder of the new one."""

from __future__ import annotations

import pytest

from tests.core.support.worlds import ADMIN, HM, Env, MakeEnv
from vfiod.core.errors import DeviceBusy
from vfiod.core.guard import native_use_paths
from vfiod.host.pciaddr import PciAddress
from vfiod_sim import processes
from vfiod_sim.machines.qemu_q35_iommufd import VIRTIO_GPU

GPU = PciAddress.parse(VIRTIO_GPU)
EDU = "0000:00:07.0"


def cards(e: Env) -> set[str]:
    return {p for p in native_use_paths(e.host, GPU) if "/card" in p}


def test_virtio_gpu_holder_is_found(env: MakeEnv) -> None:
    e = env("qemu-q35-iommufd")
    m = e.manager
    rec = {d.pci_address: d for d in m.list_available()}[str(GPU)]
    assert (rec.type, rec.current_driver, rec.passthrough_ready) == ("gpu", "virtio-pci", True)
    (card,) = cards(e)
    assert (e.host.device_dir(GPU) / "drm" / card.removeprefix("/dev/dri/")).is_dir()
    pid = processes.add_process(e.root, exe="/usr/bin/weston", uid=1000, fds=[card])
    m.register(HM, str(GPU), "vgpu0")
    mark = len(e.writes)
    with pytest.raises(DeviceBusy, match="weston") as err:
        m.attach(HM, "vm1", ["vgpu0"])
    assert (pid, "/usr/bin/weston") in err.value.holders and e.writes[mark:] == []
    processes.remove_process(e.root, pid)
    m.attach(HM, "vm1", ["vgpu0"])
    assert e.host.driver(GPU) == "vfio-pci" and cards(e) == set()
    m.detach(HM, "vm1")
    assert e.host.driver(GPU) == "virtio-pci" and cards(e) == {card}


def test_a_gpu_back_from_a_vm_may_be_another_card(env: MakeEnv) -> None:
    e = env("qemu-q35-iommufd")
    m = e.manager
    (before,) = cards(e)
    m.register(ADMIN, str(GPU), "vgpu0")
    m.attach(HM, "vm1", ["vgpu0"])
    # Meanwhile a display card is plugged in where the edu was: it takes the free number.
    e.kernel.replace_card(EDU, "1234", "1111", class_code="038000")
    assert e.host.driver(PciAddress.parse(EDU)) == "bochs-drm"
    m.detach(HM, "vm1")
    (after,) = cards(e)
    assert after != before, (before, after)
    pid = processes.add_process(e.root, exe="/usr/bin/weston", uid=1000, fds=[after])
    with pytest.raises(DeviceBusy, match="weston"):
        m.attach(HM, "vm2", ["vgpu0"])
    processes.remove_process(e.root, pid)
