"""vfiod's kernel simulator: a directory tree that looks like a Linux 6.1 host's /sys, /dev, /proc and /etc
to `vfiod.host.Host`, and a `SimulatedKernel` backend that changes it the way the kernel does when sysfs
attributes are written. Test and demo equipment: used by the tests, the benchmarks, the demo and
`vfiod run|check --simulate PROFILE`; the production daemon never imports it otherwise.

    sim = Simulation.open(tmp_path, "workstation-l4")   # vfiod_sim.simulation: the one factory
    manager = sim.manager(tmp_path / "state")

The package, by concern:
    model          the pydantic models of a machine (`Profile`, devices, drivers, modules, processes)
    catalogue      the drivers and modules machines are made of
    machines/      the built-in machines, one file each, and `get_profile`
    builder        lays a profile out on disk (`build`)
    kernel         the `SimulatedKernel` facade: the backend calls, boot, modprobe, unplug, inspection
    writes         which operation a write to an attribute performs, and the operations
    driver_core    the rules of drivers/base and drivers/pci on one transaction
    transactions   state.json, the locks and the commit protocol
    state, render, tree   the kernel's state, its rendering into a tree, the tree on disk
    parsing, nodes        kstrtoul and friends; device-node ownership
    faults, processes     injected failures; fake processes holding device nodes
    system         the stand-ins for systemd and modprobe
docs/kernel-rules.md maps each rule to the Linux source it imitates.
"""

from vfiod_sim import faults, processes
from vfiod_sim.builder import build
from vfiod_sim.kernel import SimulatedKernel
from vfiod_sim.machines import get_profile, profile_names
from vfiod_sim.model import Profile

__all__ = ["Profile", "SimulatedKernel", "build", "faults", "get_profile", "processes", "profile_names"]
