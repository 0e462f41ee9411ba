"""The small interfaces through which the core asks the system for something: loading a kernel module,
stopping/starting a unit, and cycling a GPU's SR-IOV VFs with its vendor's tool. The D-Bus layer plugs in
the real systemd client (and `host/sriov_manage.py`); tests and the simulated demo plug in the stand-ins of
`vfiod_sim.system` (never imported by a daemon that does not simulate).
"""

from __future__ import annotations

from typing import Protocol

from vfiod.core.errors import VFIONotAvailable
from vfiod.host.host import Host
from vfiod.host.pciaddr import PciAddress


class ModuleLoader(Protocol):
    def load(self, module: str) -> None:
        """Make sure `module` is loaded; raise VFIONotAvailable (with the command to run) if it cannot be."""


class UnitController(Protocol):
    def is_active(self, unit: str) -> bool:
        """Whether the unit is running now (a missing unit is simply not active)."""

    def stop(self, unit: str) -> None:
        """Stop the unit and wait for the job to finish."""

    def start(self, unit: str) -> None:
        """Start the unit and wait for the job to finish."""


class GpuSriov(Protocol):
    def disable(self, pf: PciAddress) -> None:
        """Remove the GPU's VFs (and every vGPU on them) the vendor's way; HostToolError if it cannot."""

    def enable(self, pf: PciAddress) -> None:
        """Create the GPU's VFs again, bound to the vendor's driver; HostToolError if it cannot."""


def modprobe_hint(module: str) -> str:
    return f"modprobe {module}"


class LoadedModulesOnly:
    """A loader for hosts where vfiod cannot load modules (no systemd on the bus): it only checks."""

    def __init__(self, host: Host) -> None:
        self._host = host

    def load(self, module: str) -> None:
        if self._host.module_loaded(module):
            return
        raise VFIONotAvailable(
            f"kernel module {module} is not loaded and vfiod cannot load it here (systemd is not on the "
            f"bus); run: {modprobe_hint(module)}"
        )
