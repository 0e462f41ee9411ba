"""What every core operation works with, shared by the manager and the operations it delegates to: the
host, the registry, the persistence hold, this boot's id, the group locks, the PCI name database, a way to
make a binder for an operation, the change notifier, and how long to wait for the kernel to show a write.
Frozen: an operation never swaps a dependency under another one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from vfiod.core.binder import Binder
from vfiod.core.journal import Operation
from vfiod.core.locks import GroupLocks
from vfiod.core.pciids import PciIds
from vfiod.core.persistence import PersistenceHold
from vfiod.core.registry import Registry
from vfiod.core.system import GpuSriov
from vfiod.host.host import Host


@dataclass(frozen=True)
class CoreDeps:
    host: Host
    registry: Registry
    hold: PersistenceHold
    boot_id: str
    locks: GroupLocks
    pci_ids: PciIds
    binder_factory: Callable[[Operation | None], Binder]
    changed: Callable[[Iterable[str]], None]  # device ids whose client-visible state changed ("" = the set)
    verify_timeout: float  # how long the kernel may take to show the result of a write
    gpu_sriov: GpuSriov  # cycles a GPU's SR-IOV VFs the vendor's way (Recover of a vGPU host GPU)

    def binder(self, op: Operation | None = None) -> Binder:
        return self.binder_factory(op)
