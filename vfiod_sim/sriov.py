"""SR-IOV as drivers/pci/iov.c does it: a physical function's sriov_numvfs and sriov_drivers_autoprobe
attributes, its VFs appearing and going away, and the rules that tie them to drivers.

A VF is a device of the profile that is on the bus only while its PF's `numvfs` covers it. Enabling and
disabling are the driver core's (`Core.sriov_enable`, `Core.sriov_disable`): a PF driver's remove disables
SR-IOV too.
"""

from __future__ import annotations

import errno

from vfiod_sim.driver_core import Core
from vfiod_sim.parsing import kstrtoul
from vfiod_sim.tree import oserror


def store_numvfs(c: Core, pf: str, data: bytes) -> None:
    """drivers/pci/iov.c sriov_numvfs_store."""
    ds = c.st.devices[pf]
    value = kstrtoul(data)
    if value is None or value > 0xFFFF:  # kstrtou16
        raise oserror(errno.EINVAL)
    if value > c.topo.devices[pf].sriov_totalvfs:
        raise oserror(errno.ERANGE)
    if value == ds.numvfs:
        return
    if ds.driver is None:
        raise oserror(errno.ENOENT, "no driver bound to device; cannot configure SR-IOV")
    if not c.topo.drivers[ds.driver].sriov_configure:
        raise oserror(errno.ENOENT, "driver does not support SR-IOV configuration via sysfs")
    if value == 0:
        c.sriov_disable(pf)
        return
    if ds.numvfs:
        raise oserror(errno.EBUSY, f"{ds.numvfs} VFs already enabled. Disable before enabling {value} VFs")
    c.sriov_enable(pf, value)


def store_autoprobe(c: Core, pf: str, data: bytes) -> None:
    """drivers/pci/iov.c sriov_drivers_autoprobe_store: kstrtobool."""
    text = data.strip().lower()
    if text[:1] in (b"1", b"y") or text in (b"on",):
        c.st.devices[pf].vf_autoprobe = True
    elif text[:1] in (b"0", b"n") or text in (b"off",):
        c.st.devices[pf].vf_autoprobe = False
    else:
        raise oserror(errno.EINVAL)
