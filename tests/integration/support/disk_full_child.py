"""The disk-full scenario, run as root inside `unshare -m --propagation private` by test_disk_full.py.

For each free-space level and action: a fresh simulated host, the registry on a tmpfs of its own (mounted
in this private mount namespace only), the device registered (and attached, for Detach), the tmpfs filled
until `free` bytes are left, then the action. Right after it: nothing driverless, no stray override, the
persistence unit running. Then the space is freed, the manager restarted, and the registry, the kernel and
the unit must agree. Prints one JSON object: {"<action>@<free>": {"outcome": ..., "problems": [...]}}.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.core.support.crashes import open_manager, violations
from tests.machines import L4, L4_AUDIO
from vfiod.core.context import Caller
from vfiod.core.errors import VfiodError
from vfiod_sim import build, processes

HM = Caller(uid=1000)
UNIT = "nvidia-persistenced.service"


def fill(directory: Path, leave: int) -> Path:
    """Fill the file system holding `directory` to ENOSPC, then give `leave` bytes back."""
    filler = directory / "filler"
    with open(filler, "wb") as f:
        chunk = b"\0" * 65536
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
        with contextlib.suppress(OSError):
            f.flush()
    size = filler.stat().st_size
    os.truncate(filler, max(0, size - leave))
    return filler


def scenario(work: Path, action: str, free: int) -> dict[str, object]:
    sim_root = work / "sim"
    state = work / "state"
    state.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(state)], check=True)
    try:
        build(sim_root, "workstation-l4")
        m = open_manager(sim_root, state)
        m.startup()
        m.register(HM, str(L4), "l4-gpu")
        if action == "detach":
            m.attach(HM, "vm1", ["l4-gpu"], include_group=True)
        filler = fill(state, free)
        try:
            if action == "attach":
                m.attach(HM, "vm1", ["l4-gpu"], include_group=True)
            else:
                m.detach(HM, "vm1")
            outcome = "ok"
        except VfiodError as e:
            outcome = f"{e.name}: {e.message}"
        problems: list[str] = []
        for addr in (L4, L4_AUDIO):
            drv, override = m.host.driver(addr), m.host.driver_override(addr)
            if drv is None or override not in (None, drv):
                problems.append(f"{addr} is on {drv} with override {override}")
        if not processes.unit_active(sim_root, UNIT):
            problems.append(f"{UNIT} was left stopped")
        with contextlib.suppress(Exception):
            m.registry.close()
        filler.unlink()
        m = open_manager(sim_root, state)
        m.startup()
        problems += [f"after the restart: {v}" for v in violations(m, sim_root)]
        m.registry.close()
        return {"outcome": outcome, "problems": problems}
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


def main() -> int:
    levels = [int(x) for x in sys.argv[1].split(",")]
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for action in ("attach", "detach"):
            for free in levels:
                work = Path(tmp) / f"{action}-{free}"
                results[f"{action}@{free}"] = scenario(work, action, free)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
