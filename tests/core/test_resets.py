"""Attach warns about a function with no usable reset: none at all (no reset_method, no reset attribute),
or only a bus reset while another device on its bus is not passed through with it; a function with FLR,
or a bus reset that resets only what goes with it, gets no such warning."""

from __future__ import annotations

import dataclasses

from tests.core.support.worlds import ADMIN, HM, MakeEnv
from tests.machines import L4, L4_AUDIO
from vfiod.core import resets
from vfiod.host.pciaddr import PciAddress
from vfiod.host.pcifunction import PciSnapshot
from vfiod_sim.machines.workstation_l4 import workstation_l4

EDU = PciAddress.parse("0000:00:07.0")  # qemu-q35's edu: no reset method


def reset_warnings(warnings: list[str]) -> list[str]:
    return [w for w in warnings if "reset" in w]


def test_no_reset_at_all_is_warned(env: MakeEnv) -> None:
    e = env("qemu-q35")
    m = e.manager
    m.register(ADMIN, str(EDU), "edu")
    _, warnings = m.attach(HM, "vm1", ["edu"], include_group=True)
    (warning,) = reset_warnings(warnings)
    assert warning.startswith(f"{EDU} has no reset method")


def test_flr_is_enough(env: MakeEnv) -> None:
    e = env("workstation-l4")
    e.units.stop("nvidia-persistenced.service")
    e.manager.register(HM, str(L4), "l4")
    _, warnings = e.manager.attach(HM, "vm1", ["l4"], include_group=True)
    assert reset_warnings(warnings) == []


def test_a_bus_reset_that_would_reset_a_device_left_behind(env: MakeEnv) -> None:
    """The L4 with only a bus reset, its audio function in a group of its own (as behind an ACS-capable
    port) and left on the host: the bus reset would reset the audio too."""
    prof = workstation_l4()
    devices = tuple(
        dataclasses.replace(d, reset_method="bus")
        if d.address == str(L4)
        else dataclasses.replace(d, iommu_group=99)
        if d.address == str(L4_AUDIO)
        else d
        for d in prof.devices
    )
    e = env(dataclasses.replace(prof, devices=devices))
    e.units.stop("nvidia-persistenced.service")
    snap = PciSnapshot(e.host)
    assert resets.problem(snap, L4, [L4, L4_AUDIO]) == ""  # both go: the bus reset touches only them
    e.manager.register(HM, str(L4), "l4")
    _, warnings = e.manager.attach(HM, "vm1", ["l4"])
    (warning,) = reset_warnings(warnings)
    assert f"{L4} can only be reset by a bus reset, which also resets {L4_AUDIO}" in warning
