"""The core's journal lines about the events an admin looks for, each with its MESSAGE_ID (explained by the
journal catalog), its level and the device fields: devices handed to a VM or taken back, devices left
`stuck`, vGPU parents quarantined, host-critical devices passed through by force. The lines of a call's
acts also tell its outcome line which functions it acted on (`Caller.acted`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from vfiod.core.context import Caller
from vfiod.logevents import Action, MessageId

log = logging.getLogger("vfiod.manager")


def attached(caller: Caller, instance: str, owner: int, addresses: Sequence[object]) -> None:
    tail = f"to {instance} for uid {owner}"
    _handover(
        caller, MessageId.ATTACHED, Action.ATTACH, instance, addresses, "attached", tail, OWNER_UID=owner
    )


def detached(caller: Caller, instance: str, addresses: Sequence[object]) -> None:
    _handover(caller, MessageId.DETACHED, Action.DETACH, instance, addresses, "detached", f"from {instance}")


def _handover(
    caller: Caller,
    message_id: str,
    action: Action,
    instance: str,
    addresses: Sequence[object],
    verb: str,
    tail: str,
    **extra: object,
) -> None:
    """One line of devices handed over or taken back: it also tells the call's outcome line about them."""
    caller.acted(addresses)
    log.info(
        "%s %s %s",
        verb,
        ", ".join(map(str, addresses)),
        tail,
        extra={
            "MESSAGE_ID": message_id,
            "ACTION": action,
            "INSTANCE_ID": instance,
            "PCI_ADDRESS": ",".join(map(str, addresses)),
            "CALLER_UID": caller.uid,
            **extra,
        },
    )


def stuck(operation: str, address: str, device: str, why: str, instance: str = "") -> None:
    """A function the kernel left mid-write (or that could not be put back): no operation starts on it
    until an admin recovers it."""
    log.error(
        "%s (%s) is stuck after %s: %s; `vfioctl recover %s` once the kernel has let go of it",
        address,
        device,
        operation,
        why,
        device,
        extra={
            "MESSAGE_ID": MessageId.DEVICE_STUCK,
            "ACTION": Action.SETTLE,
            "OPERATION": operation,
            "PCI_ADDRESS": address,
            "DEVICE": device,
            "RECOVER_TARGET": device,
            "INSTANCE_ID": instance,
        },
    )


def vgpu_stuck(operation: str, uuid: str, parent: str, why: str) -> None:
    """A vGPU that could not be removed (held, or its parent refused): it stays for an admin."""
    log.error(
        "vGPU %s on %s is stuck after %s: %s; `vfioctl recover %s` once nothing holds it",
        uuid,
        parent,
        operation,
        why,
        parent,
        extra={
            "MESSAGE_ID": MessageId.DEVICE_STUCK,
            "ACTION": Action.SETTLE,
            "OPERATION": operation,
            "MDEV_UUID": uuid,
            "PARENT": parent,
            "DEVICE": f"vGPU {uuid}",
            "RECOVER_TARGET": parent,
        },
    )


def quarantined(parent: str, failures: int, reason: str) -> None:
    log.error(
        "vGPU parent %s is quarantined after %d failures in a row (last: %s); placement skips it until "
        "`vfioctl recover %s`",
        parent,
        failures,
        reason,
        parent,
        extra={"MESSAGE_ID": MessageId.PARENT_QUARANTINED, "ACTION": Action.QUARANTINE, "PARENT": parent},
    )


def host_critical_forced(address: str, reason: str) -> None:
    log.warning(
        "%s %s; passing it through anyway (force)",
        address,
        reason,
        extra={
            "MESSAGE_ID": MessageId.HOST_CRITICAL_FORCED,
            "ACTION": Action.HOST_CRITICAL,
            "PCI_ADDRESS": address,
        },
    )
