"""Device-node ownership on the simulated host: chown/chmod for real when running as root, otherwise
recorded in `sim/nodes.json` (an unprivileged demo or test cannot chown). A node that disappears loses
its recorded owner, as Linux recreates it root:root 0600.
"""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path
from typing import Any

from vfiod.host.backend import NodeOwner
from vfiod_sim.tree import oserror


def _owners(sim: Path) -> dict[str, Any]:
    try:
        data = json.loads((sim / "nodes.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def vfio_group(logical: str, node: Path) -> int:
    """The group number of the node at `logical` (/dev/vfio/N): ENOENT if it is gone, ENOTTY if it is
    not a group node (the ioctl's answer)."""
    m = re.fullmatch(r"/dev/vfio/(\d+)", logical)
    if not os.path.lexists(node):
        raise oserror(errno.ENOENT, str(node))
    if m is None:
        raise oserror(errno.ENOTTY, f"{logical} is not a VFIO group node")
    return int(m[1])


def set_owner(sim: Path, logical: str, node: Path, owner: NodeOwner) -> None:
    """chown + chmod (caller holds the global lock)."""
    if not os.path.lexists(node):
        raise oserror(errno.ENOENT, str(node))
    if os.geteuid() == 0:
        os.chown(node, owner.uid, owner.gid, follow_symlinks=False)
        os.chmod(node, owner.mode & 0o7777)
        return
    owners = _owners(sim)
    owners[logical] = [owner.uid, owner.gid, owner.mode & 0o7777]
    (sim / "nodes.json").write_text(json.dumps(owners, sort_keys=True), encoding="utf-8")


def owner_of(sim: Path, logical: str, node: Path) -> NodeOwner:
    st = os.stat(node, follow_symlinks=False)  # FileNotFoundError when the node is gone
    if os.geteuid() == 0:
        return NodeOwner(uid=st.st_uid, gid=st.st_gid, mode=st.st_mode & 0o7777)
    rec = _owners(sim).get(logical)
    if rec is None:
        return NodeOwner(uid=0, gid=0, mode=st.st_mode & 0o7777)
    return NodeOwner(uid=int(rec[0]), gid=int(rec[1]), mode=int(rec[2]))


def forget_owners(sim: Path, removed: list[str]) -> None:
    """Drop the recorded owners of the nodes at `removed` (paths relative to the root)."""
    owners = _owners(sim)
    if not owners:
        return
    logical = {"/" + p for p in removed}
    kept = {k: v for k, v in owners.items() if k not in logical}
    if kept != owners:
        (sim / "nodes.json").write_text(json.dumps(kept), encoding="utf-8")


def reset(sim: Path) -> None:
    """A reboot: no node keeps a recorded owner."""
    (sim / "nodes.json").unlink(missing_ok=True)
