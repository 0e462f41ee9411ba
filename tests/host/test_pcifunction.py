"""The read model of a PCI function (vfiod.host.pcifunction) on the simulated workstation: what it reads,
that a snapshot reads each attribute once, and the rules judged on it (bridge, DMA-neutral, bound to VFIO)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import SimFactory
from tests.machines import IGPU, L4, L4_AUDIO, NIC, NVIDIA, VFIO
from vfiod.host.host import Host
from vfiod.host.pciaddr import PciAddress
from vfiod.host.pcifunction import PciSnapshot, module_name, parse_hex, read_function

ROOT_PORT = PciAddress.parse("0000:00:01.0")  # pcieport, header type 1
HOST_BRIDGE = PciAddress.parse("0000:00:00.0")  # class 0600, header type 0
ISA_BRIDGE = PciAddress.parse("0000:00:1f.0")  # class 0601, no driver


def test_parsers() -> None:
    assert parse_hex("0x10DE\n") == "10de"
    assert parse_hex("030200") == "030200"
    assert parse_hex(None) == "" and parse_hex("") == ""
    assert module_name(" vfio-pci\n") == "vfio_pci" == module_name("vfio_pci")


def test_what_a_function_says(sim: SimFactory) -> None:
    sh = sim("workstation-l4")
    gpu = read_function(sh.host, L4)
    assert (gpu.vendor, gpu.device, gpu.class_code) == ("10de", "27b8", "030200")
    assert (gpu.driver, gpu.module, gpu.iommu_group) == (NVIDIA, NVIDIA, 7)
    assert gpu.present and gpu.header_type == 0 and gpu.reset_methods == ("flr", "bus")
    assert gpu.driver_override is None and not gpu.has_vfio_dev and not gpu.is_vfio_bound
    assert gpu.identity is not None and gpu.identity.describe().startswith("10de:27b8 (subsystem 10de:")
    # no SR-IOV capability, no mdev parent
    assert (gpu.sriov_totalvfs, gpu.sriov_numvfs, gpu.physfn, gpu.virtfns, gpu.mdev_types) == (
        None,
        None,
        None,
        (),
        (),
    )
    assert read_function(sh.host, IGPU).boot_vga and not gpu.boot_vga
    assert read_function(sh.host, NIC).numa_node == -1
    gone = read_function(sh.host, PciAddress.parse("0000:ff:00.0"))
    assert not gone.present and gone.identity is None and gone.driver is None and not gone.is_vfio_bound


def test_bridge_and_group_rules(sim: SimFactory) -> None:
    sh = sim("workstation-l4")
    snap = PciSnapshot(sh.host)
    port, host_bridge, isa = (snap.function(a) for a in (ROOT_PORT, HOST_BRIDGE, ISA_BRIDGE))
    assert port.is_bridge and port.never_passed_through and port.dma_neutral  # pcieport: driver_managed_dma
    assert not host_bridge.is_bridge and host_bridge.never_passed_through  # the chipset: header type 0
    assert not isa.is_bridge and isa.never_passed_through and isa.dma_neutral  # no driver
    assert not snap.function(L4).dma_neutral  # nvidia claims DMA
    assert snap.members(7) == (L4, L4_AUDIO)


def test_vfio_bound_and_override(sim: SimFactory) -> None:
    sh = sim("workstation-l4")
    sh.host.set_driver_override(L4_AUDIO, VFIO)
    sh.host.unbind(L4_AUDIO, sh.host.driver(L4_AUDIO) or VFIO)
    sh.host.probe(L4_AUDIO)
    audio = read_function(sh.host, L4_AUDIO)
    assert audio.driver == VFIO and audio.driver_override == "vfio-pci"
    assert audio.has_vfio_dev and audio.is_vfio_bound and audio.dma_neutral


def test_a_snapshot_reads_each_attribute_once(sim: SimFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    sh = sim("workstation-l4")
    reads: list[str] = []
    real = Host.read_text

    def counting(path: Path | str) -> str | None:
        reads.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(Host, "read_text", staticmethod(counting))
    snap = PciSnapshot(sh.host)
    for _ in range(3):
        fn = snap.function(L4)
        assert fn.vendor == "10de" and fn.class_code == "030200" and fn.numa_node == 0
    assert sorted(reads) == ["class", "numa_node", "vendor"]
    # a new snapshot reads the kernel again: decisions are never made on an old read
    assert PciSnapshot(sh.host).function(L4).vendor == "10de"
    assert reads.count("vendor") == 2


LISTED = (
    "vendor",
    "device",
    "subsystem_vendor",
    "subsystem_device",
    "class_code",
    "numa_node",
    "boot_vga",
    "reset_methods",
    "sriov_totalvfs",
    "sriov_numvfs",
    "driver",
    "iommu_group",
    "physfn",
    "virtfns",
    "mdev_types",
    "mdev_children",
    "has_vfio_dev",
)


@pytest.mark.parametrize(
    "profile", ["workstation-l4", "dgx-h100", "qemu-q35-iommufd", "mdev-samples", "a40-mdev", "l40s-vgpu"]
)
def test_a_loaded_function_answers_as_one_read_attribute_by_attribute(
    sim: SimFactory, monkeypatch: pytest.MonkeyPatch, profile: str
) -> None:
    """`load` (one pass over the directory) gives every property the value per-attribute reads give, and
    a listing's properties then read nothing more through the per-attribute path."""
    sh = sim(profile)
    one_by_one = {fn.address: {k: getattr(fn, k) for k in LISTED} for fn in PciSnapshot(sh.host).functions()}
    loaded = PciSnapshot(sh.host).load_all()
    reads: list[str] = []
    real = Host.read_text

    def counting(path: Path | str) -> str | None:
        reads.append(os.fspath(path))
        return real(path)

    monkeypatch.setattr(Host, "read_text", staticmethod(counting))
    assert {fn.address: {k: getattr(fn, k) for k in LISTED} for fn in loaded} == one_by_one
    assert [r for r in reads if not r.endswith("/sriov_numvfs")] == []
