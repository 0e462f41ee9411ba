"""Kernels: before Linux 6.1 a VFIO device has no `vfio-dev/` (the simulator learns it from the profile's
kernel release), so binding is judged by the driver link and the group node; below 5.10, the oldest kernel
vfiod supports, Bind and Attach are refused with VFIONotAvailable before anything is written and
GetHostStatus says why."""

from __future__ import annotations

import dataclasses
from typing import cast

import pytest

from tests.core.support.worlds import ADMIN, HM, MakeEnv
from tests.machines import L4, L4_AUDIO
from vfiod.core.errors import VFIONotAvailable
from vfiod_sim.machines.workstation_l4 import workstation_l4


def test_a_5_10_kernel_binds_without_vfio_dev(env: MakeEnv) -> None:
    e = env(dataclasses.replace(workstation_l4(), kernel_release="5.10.0-32-amd64"))
    m = e.manager
    assert e.host.kernel_release() == "5.10.0-32-amd64" and m.host_status()["problems"] == []
    e.units.stop("nvidia-persistenced.service")
    m.register(HM, str(L4), "l4")
    atts, _ = m.attach(HM, "vm1", ["l4"], include_group=True)
    assert {a.pci_address for a in atts} == {str(L4), str(L4_AUDIO)}
    assert not (e.host.device_dir(L4) / "vfio-dev").exists() and e.host.driver(L4) == "vfio-pci"
    assert not (e.host.roots.sys / "class/vfio-dev").exists()
    dev = m.get_device("l4")
    assert (dev.bound_to_vfio, dev.driver, dev.vfio_group_path) == (
        True,
        "vfio-pci",
        f"/dev/vfio/{atts[0].iommu_group}",
    )
    m.detach(HM, "vm1")
    assert e.host.driver(L4) == "nvidia"


def test_below_5_10_bind_and_attach_are_refused(env: MakeEnv) -> None:
    e = env(dataclasses.replace(workstation_l4(), kernel_release="4.19.0-27-amd64"))
    m = e.manager
    problems = cast(list[str], m.host_status()["problems"])
    (problem,) = [p for p in problems if "4.19.0-27-amd64" in p]
    assert "older than 5.10" in str(problem)
    m.register(HM, str(L4), "l4")
    with pytest.raises(VFIONotAvailable, match=r"older than 5\.10"):
        m.attach(HM, "vm1", ["l4"], include_group=True)
    with pytest.raises(VFIONotAvailable, match=r"older than 5\.10"):
        m.bind(ADMIN, "l4", include_group=True)
    assert e.writes == [] and e.host.driver(L4) == "nvidia"


def test_the_default_kernel_has_vfio_dev(env: MakeEnv) -> None:
    e = env("workstation-l4")
    m = e.manager
    e.units.stop("nvidia-persistenced.service")
    m.register(HM, str(L4), "l4")
    m.attach(HM, "vm1", ["l4"], include_group=True)
    assert (e.host.device_dir(L4) / "vfio-dev").is_dir() and e.host.kernel_release().startswith("6.1.")
