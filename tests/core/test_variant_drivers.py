"""vfio variant drivers on the simulator (qemu-q35-iommufd: the suite's guest on a 6.12 with four variant
drivers as modules and a modern virtio-net at 00:0a.0, which `virtio_vfio_pci`'s override-only table names).

Attach and Bind pick the variant the kernel's `vfio_pci:` aliases name, load its module and bind it through
driver_override (it binds no other way); Detach returns the device to its own driver; ListAvailable
reports the pick as `variant_driver`. Unbind of a device found on a variant unbinds it and lets the kernel
probe its own driver (before, it answered success and wrote nothing). A variant whose module cannot be
loaded refuses the call before any write."""

from __future__ import annotations

import pytest

from tests.core.support.worlds import ADMIN, HM, MakeEnv
from vfiod.core.errors import VFIONotAvailable
from vfiod.host.pciaddr import DriverName, PciAddress
from vfiod_sim.machines.qemu_q35_iommufd import VARIANT_NIC
from vfiod_sim.system import SimulatedModules

NIC = PciAddress.parse(VARIANT_NIC)
VARIANT = DriverName.parse("virtio_vfio_pci")
VIRTIO = DriverName.parse("virtio-pci")


def test_variant_listed_for_its_device_only(env: MakeEnv) -> None:
    e = env("qemu-q35-iommufd")
    recs = {d.pci_address: d.to_record() for d in e.manager.list_available(all_devices=True)}
    assert recs[str(NIC)]["variant_driver"] == "virtio_vfio_pci"
    others = {a: r["variant_driver"] for a, r in recs.items() if a != str(NIC)}
    assert set(others.values()) == {""}  # the GPU, the legacy virtio-net, the NVMe: plain vfio-pci
    plain = env("qemu-q35")  # Debian's 6.1: only vfio_pci's own alias
    assert {d.to_record()["variant_driver"] for d in plain.manager.list_available(all_devices=True)} == {""}


def test_variant_attach_loads_binds_and_detach_returns(env: MakeEnv) -> None:
    e = env("qemu-q35-iommufd")
    m = e.manager
    assert not e.host.module_loaded("virtio_vfio_pci")
    m.register(ADMIN, str(NIC), "nic")
    mark = len(e.writes)
    atts, _warnings = m.attach(HM, "vm1", ["nic"])
    assert [a.pci_address for a in atts] == [str(NIC)]
    assert e.host.module_loaded("virtio_vfio_pci")
    assert e.host.driver(NIC) == VARIANT and e.host.has_vfio_dev(NIC)
    assert e.host.vfio_group_node(atts[0].iommu_group).exists()
    assert [(w.path.rsplit("/", 2)[-2:], w.value) for w in e.writes[mark:]] == [
        (["0000:00:0a.0", "driver_override"], "virtio_vfio_pci"),
        (["virtio-pci", "unbind"], str(NIC)),
        (["pci", "drivers_probe"], str(NIC)),
    ]
    dev = m.get_device("nic")
    assert dev.to_record()["driver"] == "virtio_vfio_pci" and dev.to_record()["native_driver"] == "virtio-pci"
    m.detach(HM, "vm1")
    assert e.host.driver(NIC) == VIRTIO and e.host.driver_override(NIC) is None


def test_variant_bind_and_unbind(env: MakeEnv) -> None:
    e = env("qemu-q35-iommufd")
    m = e.manager
    m.register(ADMIN, str(NIC), "nic")
    m.bind(ADMIN, "nic")
    assert e.host.driver(NIC) == VARIANT
    m.unbind(ADMIN, "nic")
    assert e.host.driver(NIC) == VIRTIO and e.host.driver_override(NIC) is None


def test_variant_found_bound_is_unbound_for_its_own_driver(env: MakeEnv) -> None:
    """A device an admin bound to its variant before vfiod saw it (driverctl, a script): registered with
    the variant as its driver; Unbind releases it and the kernel's probe picks virtio-pci."""
    e = env("qemu-q35-iommufd")
    m = e.manager
    e.kernel.load_module("virtio_vfio_pci")
    e.host.set_driver_override(NIC, VARIANT)
    e.host.unbind(NIC, VIRTIO)
    e.host.probe(NIC, VARIANT)
    m.register(ADMIN, str(NIC), "nic")
    row = m.registry.by_pci_address(str(NIC))
    assert row is not None and row.native_driver == "virtio_vfio_pci" and row.state == "vfio"
    mark = len(e.writes)
    m.unbind(ADMIN, "nic")
    assert [w.path.rsplit("/", 2)[-2:] for w in e.writes[mark:]] == [
        ["0000:00:0a.0", "driver_override"],
        ["virtio_vfio_pci", "unbind"],
        ["pci", "drivers_probe"],
    ]
    assert e.host.driver(NIC) == VIRTIO and e.host.driver_override(NIC) is None
    row = m.registry.by_pci_address(str(NIC))
    assert row is not None and row.state == "host" and row.native_driver == "virtio-pci"


class _NoVariantModules(SimulatedModules):
    """A host whose modules.alias names the variant but whose module cannot be loaded."""

    def load(self, module: str) -> None:
        if module == "virtio_vfio_pci":
            raise VFIONotAvailable(
                "kernel module virtio_vfio_pci could not be loaded; run: modprobe virtio_vfio_pci"
            )
        super().load(module)


def test_variant_module_that_cannot_load_refuses_before_any_write(env: MakeEnv) -> None:
    e = env("qemu-q35-iommufd")
    m = e.sim.manager(e.state, modules=_NoVariantModules(e.kernel), verify_timeout=1.0)
    m.startup()
    m.register(ADMIN, str(NIC), "nic")
    mark = len(e.writes)
    with pytest.raises(VFIONotAvailable, match="virtio_vfio_pci"):
        m.attach(HM, "vm1", ["nic"])
    assert e.writes[mark:] == []
    assert e.host.driver(NIC) == VIRTIO and m.registry.attachment_of_device(m.get_device("nic").id) is None
    m.registry.close()
