"""Who may open a group node: handing `/dev/vfio/<group>` to the attachment's owner and giving it back.

The grant happens only after the group is verified viable; the previous owner and mode are recorded with
the attachment so that, when the group's last attachment goes, they come back before any unbind.
"""

from __future__ import annotations

import logging

from vfiod.core.errors import Failed
from vfiod.host.backend import NodeOwner
from vfiod.host.host import Host

log = logging.getLogger("vfiod.access")

GRANTED_MODE = 0o600


def current_owner(host: Host, group: int) -> NodeOwner:
    try:
        return host.node_owner(group)
    except OSError as e:
        raise Failed(
            f"/dev/vfio/{group} is missing or unreadable ({e.strerror or e}); the group is not on vfio"
        ) from e


def grant(host: Host, group: int, uid: int) -> NodeOwner:
    """Give the node to `uid` (mode 0600, group kept); return what it was before."""
    before = current_owner(host, group)
    target = NodeOwner(uid=uid, gid=before.gid, mode=GRANTED_MODE)
    if before != target:
        try:
            host.set_node_owner(group, target)
        except OSError as e:
            raise Failed(f"cannot hand /dev/vfio/{group} to uid {uid}: {e.strerror or e}") from e
    return before


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
