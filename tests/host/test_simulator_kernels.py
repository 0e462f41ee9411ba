"""What the simulator does differently per kernel release (each difference measured by the real-kernel
suite's fidelity traces on 5.10, 6.1 and 6.12): bind of a bound device, the bochs module's name, the
built-in pcieport's module link."""

from __future__ import annotations

from pathlib import Path

import pytest

from vfiod.host.errors import SysfsWriteError
from vfiod.host.pciaddr import DriverName, PciAddress
from vfiod_sim.machines.qemu_q35 import qemu_q35
from vfiod_sim.simulation import Simulation

EDU = PciAddress.parse("0000:00:07.0")
VGA = PciAddress.parse("0000:00:02.0")
ROOT_PORT = PciAddress.parse("0000:00:06.0")
VFIO = DriverName.parse("vfio-pci")


@pytest.mark.parametrize(("release", "errname"), [("5.10.0-46-amd64", "ENODEV"), ("6.1.0-57-amd64", "EBUSY")])
def test_bind_of_a_bound_device(tmp_path: Path, release: str, errname: str) -> None:
    """Before 5.13 bind_store answered ENODEV for a device that has a driver; since, the EBUSY of
    device_driver_attach comes through."""
    sim = Simulation.open(tmp_path, qemu_q35(kernel_release=release))
    sim.kernel.load_module("vfio_pci")
    sim.host.set_driver_override(EDU, VFIO)
    sim.host.probe(EDU)
    assert sim.host.driver(EDU) == VFIO
    with pytest.raises(SysfsWriteError) as e:
        sim.host.bind(EDU, VFIO)
    assert e.value.errname == errname


@pytest.mark.parametrize(
    ("release", "bochs", "pcieport"),
    [
        ("5.10.0-46-amd64", "bochs_drm", None),
        ("6.1.0-57-amd64", "bochs", None),
        ("6.12.118", "bochs", "pcieportdrv"),
    ],
)
def test_module_names(tmp_path: Path, release: str, bochs: str, pcieport: str | None) -> None:
    host = Simulation.open(tmp_path, qemu_q35(kernel_release=release)).host
    assert host.driver(VGA) == "bochs-drm" and host.driver_module(VGA) == bochs
    assert host.driver(ROOT_PORT) == "pcieport" and host.driver_module(ROOT_PORT) == pcieport
