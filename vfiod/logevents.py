"""The journal's vocabulary: the one spelling of every `ACTION` field, and the MESSAGE_IDs of the events an
admin looks for (`journalctl MESSAGE_ID=...`, or `journalctl -x` for the explanation).

Every layer logs with these, so this module imports nothing of vfiod. Each MESSAGE_ID is explained by an
entry of `systemd/vfiod.catalog` (installed as /usr/lib/systemd/catalog/vfiod.catalog, which systemd's
package trigger compiles); the suite keeps the two in step. A call's own action is its D-Bus method's
name in kebab case (`AttachVGPU` -> `attach-vgpu`), so a core line and the call's outcome line agree.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Final


class Action(StrEnum):
    # the Manager's methods (each the kebab case of the method's name: see for_method)
    LIST_AVAILABLE = "list-available"
    LIST_DEVICES = "list-devices"
    GET_DEVICE = "get-device"
    GET_HOST_STATUS = "get-host-status"
    REGISTER_DEVICE = "register-device"
    UNREGISTER_DEVICE = "unregister-device"
    ATTACH = "attach"
    DETACH = "detach"
    BIND = "bind"
    UNBIND = "unbind"
    RECONCILE = "reconcile"
    RECOVER = "recover"
    LIST_PROFILES = "list-profiles"
    LIST_VGPUS = "list-vgpus"
    ATTACH_VGPU = "attach-vgpu"
    DETACH_VGPU = "detach-vgpu"
    SET_VIRTUAL_FUNCTIONS = "set-virtual-functions"
    IMPORT_HYPEMAN = "import-hypeman"
    GET_METRICS = "get-metrics"
    OPEN_DEVICES = "open-devices"
    # a standard interface's call (Properties, Introspectable, Peer, ObjectManager); METHOD says which
    STANDARD_CALL = "standard-call"
    # steps inside a call, and the daemon's own work
    REGISTER_COMPANION = "register-companion"
    ROLLBACK = "rollback"
    RESTORE = "restore"
    REVOKE = "revoke"
    GRANT = "grant"
    GRANT_CHECK = "grant-check"
    CHOWN_NODE = "chown-node"
    OPEN_NODE = "open-node"
    HAND_OVER = "hand-over"
    SETTLE = "settle"
    SYSFS_WRITE = "sysfs-write"
    SRIOV_MANAGE = "sriov-manage"
    LOAD_MODULE = "load-module"
    HOLD_UNITS = "hold-units"
    RELEASE_UNITS = "release-units"
    STOP_UNIT = "stop-unit"
    START_UNIT = "start-unit"
    SYSTEMD_WATCH = "systemd-watch"
    JOURNAL = "journal"
    JOURNAL_SUPERSEDE = "journal-supersede"
    RECOVER_JOURNAL = "recover-journal"
    QUARANTINE = "quarantine"
    HOST_CRITICAL = "host-critical"
    BUSY = "busy"
    AUTHORIZATION_MODE = "authorization-mode"
    INTERNAL_ERROR = "internal-error"
    METRICS = "metrics"
    # the daemon's life
    START = "start"
    STARTUP = "startup"
    READY = "ready"
    RELOAD = "reload"
    STOP = "stop"

    @classmethod
    def for_method(cls, method: str) -> Action:
        """A Manager method's action (`AttachVGPU` -> attach-vgpu); STANDARD_CALL for any other member."""
        try:
            return cls(_CAMEL_RE.sub("-", method).lower())
        except ValueError:
            return cls.STANDARD_CALL


_CAMEL_RE: Final = re.compile(r"(?<=[a-z])(?=[A-Z])")


class MessageId:
    """The MESSAGE_ID of each key event (128-bit, as `systemd-id128 new` makes them); never reuse one."""

    # A device is left `stuck`: the kernel has not finished (or did not do) a write, and no operation may
    # start on it until an admin recovers it. ERR.
    DEVICE_STUCK: Final = "b8f434d328df421d89f4f4d4b0a9fe16"
    # A sysfs write came back after its deadline (the call had already failed with Timeout). WARNING.
    LATE_WRITE: Final = "f248a6c2be4b4042917b3814c99bf7fa"
    # A sysfs write was not tried: the device (or too many others) still has a write inside the kernel.
    WRITE_REFUSED: Final = "c3551217f35242e0aa7ad68fcc6c0585"
    # A vGPU parent failed often enough in a row that placement skips it. ERR.
    PARENT_QUARANTINED: Final = "d1a7c7936bb942c3818c8a35f567355e"
    # A call was refused because the host needs the device (root disk, default route, console). WARNING.
    HOST_CRITICAL_REFUSED: Final = "8acc8f6efbcb4f4b883cc51b649a197b"
    # An admin's force passed through a device the host needs. WARNING.
    HOST_CRITICAL_FORCED: Final = "782cbedeedf14de099df6058175d1144"
    # Devices were handed to a VM's owner (Attach, AttachVGPU). INFO.
    ATTACHED: Final = "90fd81a0c8e44b51af59f2b676ca1798"
    # Devices were taken back from a VM (Detach, Reconcile, DetachVGPU). INFO.
    DETACHED: Final = "c095afbafe4b4398b70e89f264589011"
    # polkit (or the bus policy's fallback) refused a caller. WARNING.
    CALL_DENIED: Final = "288060f4c4f14918a8f5ec81f62681e2"
    # A handed-over group node was changed behind vfiod's back (a udev rule, udevadm trigger). WARNING.
    GRANT_CHANGED: Final = "0023ba02e69b4937bbe98c24defb54a7"
    # Start-up found and finished work a crash or a hang left behind. WARNING.
    STARTUP_REPAIRED: Final = "a4acbaffaea14a2a882a5f25325c37f0"
    # A unit vfiod stopped around a bind (nvidia-persistenced) could not be started again. ERR.
    UNIT_NOT_RESTARTED: Final = "801d191919d24017b7acc8d94f0b5c4f"


MESSAGE_IDS: Final[dict[str, str]] = {
    name: value for name, value in vars(MessageId).items() if name.isupper() and isinstance(value, str)
}
