"""How a host operation fails, below the D-Bus taxonomy: a sysfs write refused, timed out or refused
before it started, and a /proc entry that cannot be read. `vfiod.core` maps each to a named error."""

from __future__ import annotations

import errno
import os


class HostError(Exception):
    """Base of the host layer's errors; the core maps them to the contract's names."""


class SysfsWriteError(HostError):
    """The kernel refused a write (the errno says why)."""

    def __init__(self, path: str, value: str, err: OSError) -> None:
        self.path = path
        self.value = value
        self.errno = err.errno or errno.EIO
        self.errname = errno.errorcode.get(self.errno, str(self.errno))
        super().__init__(f"writing {value!r} to {path} failed: {self.errname} ({os.strerror(self.errno)})")


class SysfsTimeout(HostError):
    """A write did not return within its deadline; it may still complete later."""

    def __init__(self, path: str, value: str, deadline: float) -> None:
        self.path = path
        self.value = value
        self.deadline = deadline
        super().__init__(f"writing {value!r} to {path} did not complete within {deadline:g} s")


class SysfsBusy(HostError):
    """A write refused before it started, because the kernel still has an earlier one: on this device
    (whose lock it holds, so this one would hang behind it), or too many writes past their deadline."""

    def __init__(self, path: str, value: str, reason: str) -> None:
        self.path = path
        self.value = value
        super().__init__(f"writing {value!r} to {path} was not tried: {reason}")


class ProcUnreadable(HostError):
    """A process's /proc entry could not be read; a busy check must not treat that as 'free'."""

    def __init__(self, pid: int, what: str, err: OSError) -> None:
        self.pid = pid
        self.what = what
        self.errno = err.errno or errno.EIO
        super().__init__(f"cannot read /proc/{pid}/{what}: {os.strerror(self.errno)}")


class HostToolError(HostError):
    """A host tool vfiod runs (NVIDIA's sriov-manage) is missing, failed or timed out; the message has
    what it printed."""
