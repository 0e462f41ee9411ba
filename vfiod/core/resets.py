"""Whether a function can be reset between VMs: the kernel's `reset_method` (5.15+: the methods it will
use, in order; the attribute is hidden when there is none) or, on older kernels, the `reset` attribute
(present only when the function has a reset). A function with no reset, or whose only reset is a bus or
slot reset that would also reset devices on its bus that are not passed through with it, may come back
from a VM in the state the guest left it ("the GPU does not come back"): vfiod says so, as an Attach
warning and a ListAvailable blocker, and never refuses for it (QEMU itself goes on without a reset).
"""

from __future__ import annotations

from collections.abc import Collection

from vfiod.host.pciaddr import PciAddress
from vfiod.host.pcifunction import PciSnapshot

BUS_ONLY = frozenset({"bus", "slot", "cxl_bus"})


def problem(snap: PciSnapshot, addr: PciAddress, going: Collection[PciAddress] = ()) -> str:
    """Why `addr` has no usable reset ("" when it has one); `going`: the functions passed through with
    it (a bus reset that resets only them is fine)."""
    fn = snap.function(addr)
    methods = set(fn.reset_methods)
    if not methods and not fn.has_reset:
        return (
            f"{addr} has no reset method (no reset_method or reset attribute): a VM may leave it in a state "
            "the next user or the host driver cannot recover from"
        )
    if not methods or not methods <= BUS_ONLY:
        return ""
    bus = str(addr)[:-5]  # dddd:bb
    others = [
        a
        for a in snap.addresses()
        if str(a)[:-5] == bus and a != addr and a not in going and not snap.function(a).is_vfio_bound
    ]
    if not others:
        return ""
    return (
        f"{addr} can only be reset by a {'/'.join(sorted(methods))} reset, which also resets "
        f"{', '.join(str(a) for a in others)} on its bus (not passed through with it): its reset will be "
        "skipped or will disturb them"
    )
