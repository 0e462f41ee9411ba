"""How the core drives the kernel through `Host`: a sysfs write whose host-level failure becomes the
contract's error (one mapping for the binder, SetVirtualFunctions and the vGPU operations), and waiting
until the kernel shows the result of a write.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from vfiod.core.errors import Failed, Timeout, VfiodError
from vfiod.host.errors import SysfsBusy, SysfsTimeout, SysfsWriteError

POLL_INTERVAL = 0.02


def write(
    act: Callable[[], None],
    *,
    still: str,
    failed: Callable[[SysfsWriteError], VfiodError],
    stuck: tuple[str, ...] = (),
) -> None:
    """Run one Host write. Refused behind a write still in the kernel: Timeout, nothing written; past its
    deadline: Timeout with `still` (what the kernel is left doing); refused by the kernel: `failed(e)`.
    `stuck` names the devices the kernel left in an unknown state."""
    try:
        act()
    except SysfsBusy as e:
        raise Timeout(f"{e}; nothing was written", stuck=stuck) from e
    except SysfsTimeout as e:
        raise Timeout(f"{e}; {still}", stuck=stuck) from e
    except SysfsWriteError as e:
        raise failed(e) from e


def refused(what: str) -> Callable[[SysfsWriteError], VfiodError]:
    """The common `failed`: Failed saying what was refused and the kernel's errno."""
    return lambda e: Failed(f"{what}: {e}")


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = POLL_INTERVAL) -> bool:
    """Poll `predicate` until it holds (True) or `timeout` seconds pass (False); it is tried at least once
    and once more at the end."""
    end = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(interval)
