"""Opening device nodes to hand their descriptors over: a VFIO device cdev (`/dev/vfio/devices/vfioN`) or
`/dev/iommu`, opened as root, `O_RDWR | O_CLOEXEC | O_NOCTTY` (the descriptor must not leak into anything
vfiod starts; the receiving process gets its own copy through the bus, without the flag). Each open is
logged with the node, the result and its duration."""

from __future__ import annotations

import logging
import os
import time

from vfiod.host.host import Host
from vfiod.logevents import Action

log = logging.getLogger("vfiod.host")

_FLAGS = os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY


def open_node(host: Host, logical: str) -> int:
    """A new descriptor of the node `logical` names (`/dev/...`); OSError as the kernel answered."""
    path = host.from_logical(logical)
    began = time.monotonic()
    try:
        fd = os.open(path, _FLAGS)
    except OSError as e:
        log.warning(
            "opening %s failed: %s",
            logical,
            e.strerror or e,
            extra={"ACTION": Action.OPEN_NODE, "NODE": logical, "RESULT": e.errno or -1},
        )
        raise
    log.info(
        "opened %s (fd %d) in %.1f ms",
        logical,
        fd,
        (time.monotonic() - began) * 1000,
        extra={"ACTION": Action.OPEN_NODE, "NODE": logical, "RESULT": 0},
    )
    return fd
