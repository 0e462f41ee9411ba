"""The stand-ins for the system on the kernel simulator: loading a module, stopping/starting a unit and
NVIDIA's sriov-manage do to the simulated host what modprobe, systemd and the script do to a real one.

Test and demo equipment, like the simulator it drives: only `vfiod run --simulate`, `vfiod check
--simulate`, the tests and the benchmarks import it.
"""

from __future__ import annotations

from pathlib import Path

from vfiod.core.errors import VFIONotAvailable
from vfiod.host.errors import HostToolError
from vfiod.host.pciaddr import PciAddress
from vfiod_sim import SimulatedKernel, processes


class SimulatedModules:
    """Module loading on the kernel simulator: what `modprobe@<module>.service` does on a real host."""

    def __init__(self, kernel: SimulatedKernel) -> None:
        self._kernel = kernel

    def load(self, module: str) -> None:
        try:
            self._kernel.load_module(module)
        except (KeyError, ValueError, OSError) as e:
            raise VFIONotAvailable(f"kernel module {module} cannot be loaded: {e}") from e


class SimulatedUnits:
    """systemd units on the kernel simulator: stopping a unit ends its fake processes, starting it runs
    the profile's ones again. What the in-process systemd stand-in of `vfiod run --simulate` does."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self.calls: list[tuple[str, str]] = []

    def is_active(self, unit: str) -> bool:
        return processes.unit_active(self._root, unit)

    def stop(self, unit: str) -> None:
        self.calls.append(("stop", unit))
        processes.stop_unit(self._root, unit)

    def start(self, unit: str) -> None:
        self.calls.append(("start", unit))
        processes.start_unit(self._root, unit)


class SimulatedSriovManage:
    """NVIDIA's sriov-manage on the kernel simulator (`SimulatedKernel.sriov_manage`)."""

    def __init__(self, kernel: SimulatedKernel) -> None:
        self._kernel = kernel
        self.calls: list[tuple[str, str]] = []

    def disable(self, pf: PciAddress) -> None:
        self._run("-d", pf)

    def enable(self, pf: PciAddress) -> None:
        self._run("-e", pf)

    def _run(self, flag: str, pf: PciAddress) -> None:
        self.calls.append((flag, str(pf)))
        try:
            self._kernel.sriov_manage(str(pf), enable=flag == "-e")
        except (KeyError, OSError) as e:
            raise HostToolError(f"sriov-manage {flag} {pf} failed: {e}") from e
