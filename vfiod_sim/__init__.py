"""A kernel simulator: a directory tree that looks like a Linux 6.1 host's /sys, /dev, /proc and /etc to
`Host`, and a `SimulatedKernel` backend that changes it the way the kernel does when sysfs attributes are
written. Used by the tests, the demo (`vfiod check --simulate PROFILE`) and developers without a GPU host.

    kernel = build(tmp_path, "workstation-l4")
    host = Host(HostRoots.under(tmp_path), backend=kernel)

`profiles` holds the machines, `kernel` the rules, `builder` the layout, `faults` injected failures and
`processes` fake processes holding device nodes. docs/kernel-rules.md maps each rule to Linux.
"""

from vfiod_sim import faults, processes
from vfiod_sim.builder import build
from vfiod_sim.kernel import SimulatedKernel
from vfiod_sim.profiles import Profile, get_profile, profile_names

__all__ = ["Profile", "SimulatedKernel", "build", "faults", "get_profile", "processes", "profile_names"]
