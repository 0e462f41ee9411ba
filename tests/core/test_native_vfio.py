"""Unbind of a device whose own driver is vfio-pci (bound to it at boot, here by `vfio-pci.ids=` on the
kernel command line, or by hand before vfiod saw it): NativeIsVfio naming what binds it and how to change
that; nothing is written and the device stays on vfio-pci. Detach leaves such a device on vfio-pci."""

from __future__ import annotations

import dataclasses

import pytest

from tests.core.support.worlds import ADMIN, HM, MakeEnv
from tests.machines import L4
from vfiod.core.errors import NativeIsVfio
from vfiod.host.pciaddr import DriverName
from vfiod_sim.machines.workstation_l4 import workstation_l4


def test_unbind_of_a_device_bound_at_boot_names_the_claim(env: MakeEnv) -> None:
    prof = workstation_l4()
    e = env(dataclasses.replace(prof, cmdline=prof.cmdline + " vfio-pci.ids=10de:27b8"))
    m = e.manager
    e.units.stop("nvidia-persistenced.service")
    vfio = DriverName.parse("vfio-pci")
    e.host.set_driver_override(L4, vfio)  # what vfio-pci.ids= does at boot: vfio-pci has it first
    e.host.unbind(L4, DriverName.parse("nvidia"))
    e.host.probe(L4, vfio)
    assert e.host.driver(L4) == "vfio-pci"
    m.register(HM, str(L4), "l4")
    row = m.registry.by_pci_address(str(L4))
    assert row is not None and row.native_driver == "vfio-pci"
    mark = len(e.writes)
    with pytest.raises(NativeIsVfio, match=r"vfio-pci\.ids=10de:27b8") as err:
        m.unbind(ADMIN, "l4")
    assert "has nothing to return it to" in err.value.message and "reboot" in err.value.message
    assert e.writes[mark:] == [] and e.host.driver(L4) == "vfio-pci"
    m.attach(HM, "vm1", ["l4"], include_group=True)
    m.detach(HM, "vm1")
    assert e.host.driver(L4) == "vfio-pci"  # its own driver: left on it
