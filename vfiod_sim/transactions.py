"""Transactions on the simulated kernel's state: `sim/state.json`, the locks, and the commit protocol.

Every piece of state is on disk under `<root>/sim/`, so any process that opens the same root sees the same
kernel: a daemon can run in a child process, be killed, and restart against it. Mutations take an flock on
`sim/lock`; a write to a device's attributes, or a bind/unbind/drivers_probe naming it, first takes that
device's flock `sim/locks/<addr>` for its whole duration, as the kernel's device_lock is held across probe
and remove: a hung unbind blocks later writes to the same device and nothing else.

A commit computes which keys of the tree changed, writes the pending keys and the previous state to
state.json first, then renders those keys before and after and applies the difference. A process killed
mid-way leaves a tree that the next locker repairs (`load`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from vfiod_sim import nodes
from vfiod_sim.driver_core import Blocked, Core, Op
from vfiod_sim.render import Renderer
from vfiod_sim.state import KState, Topology, dirty_keys
from vfiod_sim.tree import Tree, apply_tree, flock, oserror

POLL_INTERVAL = 0.02


class Transactions:
    """The state file of the kernel living in `root`, and the one way to change it."""

    def __init__(self, root: Path, topology: Callable[[], Topology]) -> None:
        self.root = root
        self.sim = root / "sim"
        self._topology = topology  # read lazily: the profile exists once `build` has written it

    def global_lock(self) -> contextlib.AbstractContextManager[None]:
        return flock(self.sim / "lock")

    def device_locks(self, addrs: Iterable[str]) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        for a in sorted(set(addrs)):
            stack.enter_context(flock(self.sim / "locks" / a))
        return stack

    def _read_state_file(self) -> dict[str, Any]:
        data = json.loads((self.sim / "state.json").read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("sim/state.json is not an object")
        return data

    def save(self, st: KState, pending: dict[str, Any] | None = None) -> None:
        tmp = self.sim / f".state.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"state": st.to_dict(), "pending": pending}), encoding="utf-8")
        os.replace(tmp, self.sim / "state.json")

    def load(self) -> KState:
        """The current state (caller holds the global lock), finishing an update a killed process left."""
        data = self._read_state_file()
        st = KState.from_dict(data["state"])
        pending = data.get("pending")
        if pending:
            prev = KState.from_dict(pending["prev"])
            keys = [str(k) for k in pending["keys"]]
            old_tree = self.render(prev, keys) if not pending.get("fresh") else {}
            self.apply(old_tree, self.render(st, keys), verify=True)
            self.save(st)
        return st

    def render(self, st: KState, keys: Iterable[str]) -> Tree:
        return Renderer(self._topology(), st).render(keys)

    def apply(self, old: Tree, new: Tree, *, verify: bool = False) -> None:
        removed = apply_tree(self.root, old, new, verify=verify)
        gone = [p for p in removed if p.startswith("dev/")]
        if gone:
            nodes.forget_owners(self.sim, gone)

    def replace(self, prev: KState | None, st: KState, keys: list[str]) -> None:
        """Make `st` the state, re-rendering `keys` (all of them at boot) with the pending record first."""
        if prev is None:
            self.save(st, pending={"keys": keys, "prev": st.to_dict(), "fresh": True})
            self.apply({}, self.render(st, keys))
        else:
            self.save(st, pending={"keys": keys, "prev": prev.to_dict()})
            self.apply(self.render(prev, keys), self.render(st, keys))
        self.save(st)

    def _commit(self, core: Core) -> None:
        old, new = core.old, core.st
        for ev in core.uevents:
            new.seq += 1
            ev["seq"] = new.seq
        keys = sorted(dirty_keys(self._topology(), old, new))
        if keys:
            self.replace(old, new, keys)
        else:
            self.save(new)
        if core.uevents:
            now = time.time()
            with open(self.sim / "uevents.jsonl", "a", encoding="utf-8") as f:
                f.write("".join(json.dumps({**ev, "ts": now}) + "\n" for ev in core.uevents))

    def run(
        self, op: Op, *, paths: tuple[str, ...] = (), boot_id: str | None = None, label: str = ""
    ) -> None:
        """Run `op` on the state under the global lock and commit it; retry while it is blocked (a device
        still in use), without holding the global lock in between."""
        marker: Path | None = None
        try:
            while True:
                with self.global_lock():
                    st = self.load()
                    if boot_id is not None and st.boot_id != boot_id:
                        # the kernel the write was issued to is gone (reboot): its file is a dead kernfs node
                        raise oserror(errno.ENODEV, "the simulated kernel rebooted during the write")
                    core = Core(self.root, self._topology(), st, paths)
                    try:
                        op(core)
                    except Blocked as b:
                        if marker is None:
                            marker = self.sim / "blocked" / b.addr
                            marker.parent.mkdir(exist_ok=True)
                            marker.write_text(
                                json.dumps({"operation": label, "holders": b.holders, "pid": os.getpid()})
                                + "\n",
                                encoding="utf-8",
                            )
                    else:
                        self._commit(core)
                        return
                time.sleep(POLL_INTERVAL)
        finally:
            if marker is not None:
                with contextlib.suppress(FileNotFoundError):
                    marker.unlink()
