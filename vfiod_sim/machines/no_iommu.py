"""`no-iommu`: the workstation with the IOMMU off in firmware (no groups, no VFIO)."""

from __future__ import annotations

from vfiod_sim.machines.workstation_l4 import workstation_l4
from vfiod_sim.model import Profile


def no_iommu() -> Profile:
    return workstation_l4(iommu=False)
