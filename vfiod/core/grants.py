"""Keeping a group node as vfiod granted it.

udev applies its rules to `/dev/vfio/<n>` whenever the kernel announces the node (`add`) and again on every
`udevadm trigger` (`change`), after vfiod may have handed it over: a common admin rule
(`SUBSYSTEM=="vfio", GROUP="kvm", MODE="0660"`, or `TAG+="uaccess"`, which adds an ACL entry for the seat's
user that shows as group bits in the mode) widens the grant, and a plain rule gives it back to root. vfiod
listens to the `vfio` subsystem's uevents and, once udev has had time to act, re-checks the node of every
attached group: its owner, its mode, and that it is the group's node at all (the device number
`/sys/class/vfio/<n>/dev` names). A changed owner or mode is put back (a chmod to 0600 also masks away any
ACL entry) and logged as a warning; a node with another device number is left alone and logged as an
error (it is not the group's node, and chown-ing it would hand over something else). A group attached with
`handoff` fd is kept root 0600 the same way: its owner holds descriptors, never the node.

A group a call is working on is never waited for: it is looked at again when the call lets go (an Attach
that is still binding when udev handles the node's `add` would otherwise miss the check).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from vfiod.core import access
from vfiod.core.deps import CoreDeps
from vfiod.core.errors import VfiodError
from vfiod.logevents import Action, MessageId

log = logging.getLogger("vfiod.access")


def attached_groups(deps: CoreDeps) -> list[int]:
    """Groups with an attachment of this boot (whose node vfiod handed to the attachment's owner, or keeps
    root's in fd mode)."""
    return sorted({a.iommu_group for a in deps.registry.all_attachments() if a.boot_id == deps.boot_id})


def recheck(deps: CoreDeps, groups: Iterable[int] | None = None) -> tuple[list[str], set[int]]:
    """Re-check (and re-apply) the grants of `groups` (default: every attached group): what was wrong, and
    the groups a call was working on (to look at again once it lets go)."""
    findings: list[str] = []
    busy: set[int] = set()
    for group in attached_groups(deps) if groups is None else sorted(set(groups)):
        with deps.locks.try_hold([group]) as held:
            if not held:
                busy.add(group)
                continue
            found = _recheck_one(deps, group)
            if found:
                findings.append(found)
    return findings, busy


def _recheck_one(deps: CoreDeps, group: int) -> str | None:
    owners = access.node_uids(deps.registry, group, deps.boot_id)
    if len(owners) != 1:
        return None  # not attached (or detached meanwhile): not a grant of vfiod's to keep
    uid = owners.pop()
    node = f"/dev/vfio/{group}"
    fields = {
        "MESSAGE_ID": MessageId.GRANT_CHANGED,
        "ACTION": Action.GRANT_CHECK,
        "IOMMU_GROUP": group,
        "OWNER_UID": uid,
    }
    matches = deps.host.group_node_matches(group)
    if matches is False:
        msg = (
            f"{node} is not IOMMU group {group}'s node (its device number is not the one "
            f"/sys/class/vfio/{group}/dev names): left alone; find what replaced it (a udev rule, mknod)"
        )
        log.error(msg, extra=fields)
        return msg
    try:
        now = deps.host.node_owner(group)
    except OSError:
        return None  # gone: the group left vfio, and the refresh of its devices says so
    if now.uid == uid and now.mode & 0o7777 == access.GRANTED_MODE:
        return None
    try:
        access.grant(deps.host, group, uid)
    except VfiodError as e:
        msg = f"{node} was changed to uid {now.uid} mode {now.mode & 0o7777:04o} and cannot be put back: {e}"
        log.error(msg, extra=fields)
        return msg
    msg = (
        f"{node} had been changed behind vfiod's back (uid {now.uid}, gid {now.gid}, mode "
        f"{now.mode & 0o7777:04o}; a udev rule or udevadm trigger?): given back to uid {uid}, mode "
        f"{access.GRANTED_MODE:04o}"
    )
    log.warning(msg, extra=fields)
    return msg
