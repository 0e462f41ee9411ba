"""The one factory for "vfiod on a simulated machine": a simulated kernel built from a profile (or opened
where one already lives), the `Host` on its tree, the stand-ins for systemd and modprobe, and a registry
and manager on them.

`vfiod run --simulate`, `vfiod check --simulate`, the tests and the benchmarks all start here, so a
simulated host is laid out, and a manager wired to it, the same way everywhere:

    sim = Simulation.open(root, "workstation-l4")
    manager = sim.manager(state_dir)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from vfiod.core.manager import Manager
from vfiod.core.registry import Registry
from vfiod.core.settings import ManagerConfig
from vfiod.core.system import ModuleLoader, UnitController
from vfiod.host.host import Host, HostRoots
from vfiod.host.writes import DeadlinePolicy
from vfiod_sim.builder import build
from vfiod_sim.kernel import SimulatedKernel
from vfiod_sim.model import Profile
from vfiod_sim.system import SimulatedModules, SimulatedSriovManage, SimulatedUnits


class SimulationError(Exception):
    """The simulated host cannot be built or opened: an unknown or invalid profile, an unusable root.
    The message says which and why, for a command line or a log."""


@dataclass
class Simulation:
    """A simulated machine at `root` and the `Host` that vfiod reads and writes it through."""

    root: Path
    kernel: SimulatedKernel
    host: Host
    units: SimulatedUnits
    modules: SimulatedModules
    gpu_sriov: SimulatedSriovManage

    @classmethod
    def open(
        cls,
        root: Path,
        profile: str | Profile | None = None,
        *,
        deadlines: DeadlinePolicy | None = None,
        reuse: bool = False,
    ) -> Simulation:
        """Build `profile` at `root` (a new directory). With `profile` None, or `reuse` and a simulated
        host already at `root`, open that one instead: the kernel state is on disk, so a restarted daemon
        or a second process sees the same machine."""
        root = Path(root)
        exists = (root / "sim" / "profile.json").is_file()
        try:
            if profile is None or (reuse and exists):
                kernel = SimulatedKernel(root)
                _ = kernel.profile  # a tree `build` made, or FileNotFoundError
            else:
                kernel = build(root, profile)
        except LookupError as e:
            # the simulator's KeyError already names the profile and lists the known ones
            detail = e.args[0] if e.args and isinstance(e.args[0], str) else ""
            raise SimulationError(detail or f"unknown simulator profile {profile!r}") from None
        except ValueError as e:
            raise SimulationError(f"cannot simulate {_name(profile)}: {e}") from None
        except OSError as e:
            raise SimulationError(f"{root}: {e.strerror or e}") from None
        host = Host(HostRoots.under(root), backend=kernel, deadlines=deadlines)
        return cls(
            root, kernel, host, SimulatedUnits(root), SimulatedModules(kernel), SimulatedSriovManage(kernel)
        )

    @property
    def profile(self) -> Profile:
        return self.kernel.profile

    def manager(
        self,
        registry: Registry | Path,
        *,
        config: ManagerConfig | None = None,
        units: UnitController | None = None,
        modules: ModuleLoader | None = None,
        verify_timeout: float = 5.0,
    ) -> Manager:
        """A manager on this host: on `registry`, or on the registry in the state directory it names.
        `units` and `modules` default to the simulator's stand-ins (the daemon passes wrapped ones)."""
        if not isinstance(registry, Registry):
            registry = Registry.open(registry)
        return Manager(
            self.host,
            registry,
            modules or self.modules,
            units or self.units,
            config=config,
            verify_timeout=verify_timeout,
            gpu_sriov=self.gpu_sriov,
        )

    def caller_host(self) -> Host:
        """A `Host` on this machine's tree whose /proc is the real one: callers of a simulated daemon are
        real processes, and their /proc/<pid>/exe is read there."""
        return Host(dataclasses.replace(HostRoots.under(self.root), proc=Path("/proc")), self.kernel)


def _name(profile: str | Profile | None) -> str:
    return repr(profile.name if isinstance(profile, Profile) else profile)
