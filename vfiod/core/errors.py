"""The error taxonomy: every failure a caller can see, one class per contract error name.

The D-Bus layer maps each class to `org.hypeman.Devices1.Error.<name>` once, by the class's `name`; nothing
else ever reaches a caller. Messages are whole sentences meant for a person reading `busctl` output.
"""

from __future__ import annotations

from typing import ClassVar


class VfiodError(Exception):
    """Base class. `name` is the contract's error name (the last part of the D-Bus error)."""

    name: ClassVar[str] = "Failed"

    def __init__(self, message: str, *, stuck: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        # PCI addresses the kernel left in an unknown state: the manager marks them `stuck`.
        self.stuck = stuck


class NotFound(VfiodError):
    name = "NotFound"


class DeviceNotFound(VfiodError):
    name = "DeviceNotFound"


class InvalidPCIAddress(VfiodError):
    name = "InvalidPCIAddress"


class InvalidName(VfiodError):
    name = "InvalidName"


class InvalidArgument(VfiodError):
    name = "InvalidArgument"


class NameExists(VfiodError):
    name = "NameExists"


class AlreadyExists(VfiodError):
    name = "AlreadyExists"


class InUse(VfiodError):
    name = "InUse"


class NotOwner(VfiodError):
    name = "NotOwner"


class AlreadyBound(VfiodError):
    name = "AlreadyBound"


class NotBound(VfiodError):
    name = "NotBound"


class IOMMUGroupConflict(VfiodError):
    name = "IOMMUGroupConflict"


class HostCritical(VfiodError):
    name = "HostCritical"


class SriovEnabled(VfiodError):
    """The device is an SR-IOV physical function with virtual functions enabled: unbinding its driver
    would remove them (and eject them from whatever uses them), and vfio-pci refuses such a PF."""

    name = "SriovEnabled"


class ProfileNotFound(VfiodError):
    """No parent on this host offers a vGPU profile by that name or type id."""

    name = "ProfileNotFound"


class NoCapacity(VfiodError):
    """No usable parent can create that profile now; the message says what is used and what is
    quarantined."""

    name = "NoCapacity"


class DeviceBusy(VfiodError):
    """Processes hold the device; `holders` names them (pid, executable) so the caller can act."""

    name = "DeviceBusy"

    def __init__(self, message: str, holders: list[tuple[int, str]] | None = None) -> None:
        super().__init__(message)
        self.holders = holders or []


class VFIONotAvailable(VfiodError):
    name = "VFIONotAvailable"


class NativeDriverNotRestored(VfiodError):
    name = "NativeDriverNotRestored"


class NativeIsVfio(VfiodError):
    """Unbind of a device whose own driver is vfio-pci (bound to it at boot): there is nothing to return it
    to; the message says what binds it and how to change that."""

    name = "NativeIsVfio"


class HandoffUnsupported(VfiodError):
    """A descriptor hand-over (`handoff` fd, OpenDevices) this host, device or attachment cannot do: the
    kernel has no VFIO device cdevs or no iommufd, the device has no cdev, or the attachment is in node
    mode. The message says which."""

    name = "HandoffUnsupported"


class Timeout(VfiodError):
    name = "Timeout"


class NotAuthorized(VfiodError):
    name = "NotAuthorized"


class Busy(VfiodError):
    """This caller already has as many calls in flight (or replies waiting) as one caller may have."""

    name = "Busy"


class Recovering(VfiodError):
    """The device's operation, interrupted before vfiod restarted, is still being finished: retry soon."""

    name = "Recovering"


class Failed(VfiodError):
    name = "Failed"


ALL_ERRORS: tuple[type[VfiodError], ...] = (
    NotFound,
    DeviceNotFound,
    InvalidPCIAddress,
    InvalidName,
    InvalidArgument,
    NameExists,
    AlreadyExists,
    InUse,
    NotOwner,
    AlreadyBound,
    NotBound,
    IOMMUGroupConflict,
    HostCritical,
    SriovEnabled,
    ProfileNotFound,
    NoCapacity,
    DeviceBusy,
    VFIONotAvailable,
    NativeDriverNotRestored,
    NativeIsVfio,
    HandoffUnsupported,
    Timeout,
    NotAuthorized,
    Busy,
    Recovering,
    Failed,
)
