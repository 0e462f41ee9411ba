"""What a sysfs write is, apart from doing it: the deadline it gets (by driver), the record every write
leaves (for the journal, the trace and late-completion listeners), a write still inside the kernel past its
deadline, and the bookkeeping of one write in flight. `Host` does the writing.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

# Drivers whose probe or remove routinely takes seconds (GPU firmware load, memory training).
SLOW_DRIVERS: dict[str, float] = {
    "nvidia": 60.0,
    "nouveau": 60.0,
    "amdgpu": 60.0,
    "radeon": 30.0,
    "i915": 30.0,
    "xe": 30.0,
    "mlx5_core": 30.0,
}


@dataclass(frozen=True)
class DeadlinePolicy:
    """How long one sysfs write may take, by the driver it involves."""

    default: float = 10.0
    per_driver: dict[str, float] = field(default_factory=lambda: dict(SLOW_DRIVERS))

    def for_driver(self, driver: str | None) -> float:
        if driver is None:
            return self.default
        return max(self.default, self.per_driver.get(driver, self.default))


@dataclass(frozen=True)
class PendingWrite:
    """A write that missed its deadline and has not returned from the kernel yet."""

    path: str
    value: str
    pci_address: str | None
    since: float  # wall-clock time the write started

    def describe(self) -> str:
        started = time.strftime("%H:%M:%S", time.localtime(self.since))
        return (
            f"{self.path} <- {self.value!r} (pending since {started}, {time.time() - self.since:.0f} s ago)"
        )


@dataclass(frozen=True)
class WriteRecord:
    """One sysfs write as it happened: what the log, the trace and late-completion listeners see."""

    path: str  # logical path, e.g. /sys/bus/pci/drivers/vfio-pci/unbind
    value: str
    result: str  # "ok", an errno name, or "timeout"
    duration: float
    pci_address: str | None
    late: bool = False


WriteListener = Callable[[WriteRecord], None]


MAX_HUNG_WRITES: Final = 64  # writes left inside the kernel past their deadline, one thread each


@dataclass
class WriteState:
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: threading.Event = field(default_factory=threading.Event)
    err: OSError | None = None
    duration: float = 0.0
    finished: bool = False
    abandoned: bool = False


def result_name(err: OSError | None) -> str:
    if err is None:
        return "ok"
    return errno.errorcode.get(err.errno or errno.EIO, str(err.errno))
