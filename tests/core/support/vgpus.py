"""vGPU test helpers shared by the placement, vendor-VFIO, vGPU and event-log tests."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

from tests.core.support.worlds import HM
from vfiod.core.errors import VfiodError
from vfiod.core.manager import Manager
from vfiod_sim import faults


def attach_vgpus_concurrently(m: Manager, profile: str, count: int) -> Counter[str]:
    """`count` AttachVGPUs of `profile` at once, one instance each (vm0, vm1, ...): how many answered
    "ok" and how many each error name."""
    results: dict[str, str] = {}

    def one(n: int) -> None:
        try:
            m.attach_vgpu(HM, f"vm{n}", profile)
            results[f"vm{n}"] = "ok"
        except VfiodError as err:
            results[f"vm{n}"] = err.name

    threads = [threading.Thread(target=one, args=(n,)) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return Counter(results.values())


def break_mbochs_create(root: Path) -> None:
    """Every mdev create on mbochs fails with EIO (the fault's name: "create")."""
    faults.inject(
        root,
        "create",
        kind="errno",
        errno="EIO",
        path="/sys/class/mdev_bus/mbochs/mdev_supported_types/*/create",
    )
