"""The registry on a full disk, for real: the state directory on a small tmpfs (mounted in a private mount
namespace), filled until only a few kilobytes are left, then an Attach and a Detach. The kernel must be
rolled back (nothing driverless, the unit running) and, once space is freed and vfiod restarted, the
registry, the kernel and the unit agree. Needs root (mount); CI runs it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.integration.support.realstack import PATH, unavailable

REPO = Path(__file__).resolve().parents[2]
LEVELS = (0, 4096, 65536, 262144, 1048576)  # bytes left free on the registry's file system


def test_registry_fault_disk_full_on_a_real_tmpfs() -> None:
    import os

    if os.geteuid() != 0:
        unavailable("the disk-full test needs root (a private mount namespace and a tmpfs)")
    if shutil.which("unshare", path=PATH) is None:
        unavailable("unshare is missing (util-linux)")
    r = subprocess.run(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            sys.executable,
            "-m",
            "tests.integration.support.disk_full_child",
            ",".join(map(str, LEVELS)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    results = json.loads(r.stdout)
    assert len(results) == 2 * len(LEVELS)
    print(json.dumps({k: v["outcome"][:80] for k, v in results.items()}, indent=1))
    problems = {k: v["problems"] for k, v in results.items() if v["problems"]}
    assert problems == {}
    # the fullest disk refused the calls, in the registry's words; with room enough they worked
    assert all("is full: free space" in results[f"{a}@0"]["outcome"] for a in ("attach", "detach")), results
    assert all(results[f"{a}@{LEVELS[-1]}"]["outcome"] == "ok" for a in ("attach", "detach")), results
