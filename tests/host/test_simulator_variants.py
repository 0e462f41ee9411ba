"""The simulator's vfio variant drivers (docs/kernel-rules.md, Modules): modules.alias as depmod writes it,
`vfio_pci:` lines only from 5.18; an override-only id table never binds on its own, not even when its
module loads or the device is probed, and binds once driver_override names the variant, with the VFIO
device and the group node vfio-pci would give."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tests.conftest import SimFactory
from vfiod.host.pciaddr import DriverName, PciAddress
from vfiod.host.vfio_variants import alias_file, read_aliases
from vfiod_sim.machines.qemu_q35_iommufd import VARIANT_NIC, qemu_q35_iommufd
from vfiod_sim.simulation import Simulation

NIC = PciAddress.parse(VARIANT_NIC)
VARIANT = DriverName.parse("virtio_vfio_pci")
VIRTIO = DriverName.parse("virtio-pci")


def test_modules_alias_lists_override_only_entries_from_5_18(sim: SimFactory, tmp_path: Path) -> None:
    sh = sim("qemu-q35-iommufd")
    text = alias_file(sh.host).read_text()
    assert "alias vfio_pci:v00001AF4d00001041sv*sd*bc*sc*i* virtio_vfio_pci\n" in text
    assert "alias vfio_pci:v*d*sv*sd*bc*sc*i* vfio_pci\n" in text
    assert "alias pci:v00001AF4d*sv*sd*bc*sc*i* virtio_pci\n" in text
    assert "alias pci:v*d*sv*sd*bc01sc08i02 nvme\n" in text  # a class entry: every byte under the mask
    old = Simulation.open(
        tmp_path / "old", dataclasses.replace(qemu_q35_iommufd(), kernel_release="5.15.0-1")
    )
    assert str(alias_file(old.host)).endswith("lib/modules/5.15.0-1/modules.alias")
    assert read_aliases(alias_file(old.host)) == () and "virtio_pci" in alias_file(old.host).read_text()


def test_override_only_table_binds_only_through_driver_override(sim: SimFactory) -> None:
    sh = sim("qemu-q35-iommufd")
    sh.host.unbind(NIC, VIRTIO)
    sh.kernel.load_module("virtio_vfio_pci")  # driver_attach: nothing matches without an override
    assert sh.host.driver(NIC) is None
    sh.host.probe(NIC)
    assert sh.host.driver(NIC) == VIRTIO  # the ordinary match wins
    sh.host.set_driver_override(NIC, VARIANT)
    sh.host.unbind(NIC, VIRTIO)
    sh.host.probe(NIC)
    assert sh.host.driver(NIC) == VARIANT and sh.host.driver_module(NIC) == "virtio_vfio_pci"
    group = sh.host.iommu_group(NIC)
    assert group == 9 and sh.host.has_vfio_dev(NIC) and sh.host.vfio_group_node(group).exists()
    assert (sh.root / "dev/vfio/devices").is_dir()  # the 6.12 guest has VFIO cdevs
    # released with the override cleared, the kernel's probe picks virtio-pci again
    sh.host.set_driver_override(NIC, None)
    sh.host.unbind(NIC, VARIANT)
    sh.host.probe(NIC)
    assert sh.host.driver(NIC) == VIRTIO and not sh.host.vfio_group_node(group).exists()
