"""Who may open a group node: handing `/dev/vfio/<group>` to the attachment's owner and giving it back.

The grant happens only after the group is verified viable, and only after it is journaled: the manager
records the previous owner and mode (`previous_owner`) in the journal first, then `grant` changes the node,
so a crash in between can always be undone. When the group's last attachment goes, the previous owner comes
back before any unbind. A node owned by a uid that no attachment names is a leak, never a "previous owner":
it is taken back to the kernel's own default (`KERNEL_DEFAULT`: root, 0600).
"""

from __future__ import annotations

import logging

from vfiod import phases
from vfiod.core.errors import Failed
from vfiod.core.registry import Registry
from vfiod.host.backend import NodeOwner
from vfiod.host.host import Host
from vfiod.logevents import Action

log = logging.getLogger("vfiod.access")

GRANTED_MODE = 0o600
KERNEL_DEFAULT = NodeOwner(uid=0, gid=0, mode=0o600)  # how the vfio driver creates /dev/vfio/<group>


def current_owner(host: Host, group: int) -> NodeOwner:
    try:
        return host.node_owner(group)
    except OSError as e:
        raise Failed(
            f"/dev/vfio/{group} is missing or unreadable ({e.strerror or e}); the group is not on vfio"
        ) from e


def previous_owner(host: Host, group: int, named_uids: set[int]) -> NodeOwner:
    """What the node should go back to after a grant: its owner now, unless that is a uid none of the
    group's attachments (`named_uids`) names, in which case the kernel's default."""
    before = current_owner(host, group)
    if before.uid != 0 and before.uid not in named_uids:
        log.warning(
            "/dev/vfio/%d is owned by uid %d, which no attachment names; it will go back to root 0600",
            group,
            before.uid,
            extra={"ACTION": Action.GRANT, "IOMMU_GROUP": group},
        )
        return KERNEL_DEFAULT
    return before


@phases.timed_call("grant")
def grant(host: Host, group: int, uid: int) -> None:
    """Give the node to `uid` (mode 0600, group kept). Journal `previous_owner` first."""
    before = current_owner(host, group)
    target = NodeOwner(uid=uid, gid=before.gid, mode=GRANTED_MODE)
    if before != target:
        try:
            host.set_node_owner(group, target)
        except OSError as e:
            raise Failed(f"cannot hand /dev/vfio/{group} to uid {uid}: {e.strerror or e}") from e


@phases.timed_call("grant")
def revoke(host: Host, group: int, previous: NodeOwner) -> None:
    """Give the node back to whoever had it before the grant. A node already gone needs nothing."""
    try:
        now = host.node_owner(group)
    except FileNotFoundError:
        return
    except OSError as e:
        raise Failed(f"cannot read /dev/vfio/{group}: {e.strerror or e}") from e
    if now == previous:
        return
    try:
        host.set_node_owner(group, previous)
    except OSError as e:
        raise Failed(f"cannot give /dev/vfio/{group} back to uid {previous.uid}: {e.strerror or e}") from e


def node_uids(registry: Registry, group: int, boot_id: str) -> set[int]:
    """Whom `/dev/vfio/<group>` belongs to while this boot's attachments in the group last: each one's
    owner in node mode; root in fd mode, where the owner gets descriptors (OpenDevices) and the node stays
    as the kernel made it."""
    return {
        0 if a.handoff == "fd" else a.owner_uid
        for a in registry.attachments_in_group(group)
        if a.boot_id == boot_id
    }


def previous_grant(registry: Registry, group: int, instance: str) -> NodeOwner | None:
    """Who owned `/dev/vfio/<group>` before `instance`'s attachment took it (journaled with it)."""
    for a in registry.attachments_in_group(group):
        if a.instance_id == instance and a.node_prev is not None:
            return a.node_prev
    return None
