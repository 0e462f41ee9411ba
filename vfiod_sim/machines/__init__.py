"""The built-in machines, one file each (`mdev-samples-iommufd` shares `mdev-samples`' file):
`workstation-l4`, `dgx-h100`, `no-iommu`, `qemu-q35`, `qemu-q35-iommufd`, `mdev-samples`,
`mdev-samples-iommufd`, `a40-mdev`, `l40s-vgpu` and `synthetic:N`. A machine is a function returning a
`Profile`; `get_profile(name)` builds one by name.
"""

from __future__ import annotations

from collections.abc import Callable

from vfiod_sim.machines.a40_mdev import a40_mdev
from vfiod_sim.machines.dgx_h100 import dgx_h100
from vfiod_sim.machines.l40s_vgpu import l40s_vgpu
from vfiod_sim.machines.mdev_samples import mdev_samples, mdev_samples_iommufd
from vfiod_sim.machines.no_iommu import no_iommu
from vfiod_sim.machines.qemu_q35 import qemu_q35
from vfiod_sim.machines.qemu_q35_iommufd import qemu_q35_iommufd
from vfiod_sim.machines.synthetic import synthetic
from vfiod_sim.machines.workstation_l4 import workstation_l4
from vfiod_sim.model import Profile

PROFILES: dict[str, Callable[[], Profile]] = {
    "workstation-l4": workstation_l4,
    "dgx-h100": dgx_h100,
    "no-iommu": no_iommu,
    "qemu-q35": qemu_q35,
    "qemu-q35-iommufd": qemu_q35_iommufd,
    "mdev-samples": mdev_samples,
    "mdev-samples-iommufd": mdev_samples_iommufd,
    "a40-mdev": a40_mdev,
    "l40s-vgpu": l40s_vgpu,
}


def profile_names() -> list[str]:
    return [*PROFILES, "synthetic:N"]


def get_profile(name: str) -> Profile:
    """A built-in profile by name; KeyError (a LookupError) with the reason if there is none."""
    if name.startswith("synthetic:"):
        count = name.partition(":")[2]
        if not count.isdigit() or int(count) < 1:
            raise KeyError(f"synthetic:N needs a positive count, not {count!r}")
        return synthetic(int(count))
    factory = PROFILES.get(name)
    if factory is None:
        raise KeyError(f"no simulator profile named {name!r} (known: {', '.join(profile_names())})")
    return factory()
