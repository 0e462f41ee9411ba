"""Flooding vfiod from unprivileged callers: `tests/flood.py` (stdlib only, run with the system's python3
as another user) started against a real stack, and the per-connection reports it prints."""

from __future__ import annotations

import json
import subprocess
from typing import Any

from tests.integration.support.realstack import PATH, Stack, User, as_user

SYSTEM_PYTHON = "/usr/bin/python3"


def start_flood(
    stack: Stack, user: User, connections: int, in_flight: int, seconds: float, total: int | None = None
) -> subprocess.Popen[str]:
    argv = [
        SYSTEM_PYTHON,
        str(stack.workdir / "flood.py"),
        stack.address,
        str(stack.workdir / "list-all.json"),
        str(connections),
        str(in_flight),
        str(seconds),
        *([str(total)] if total is not None else []),
    ]
    return subprocess.Popen(
        as_user(user, argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"PATH": PATH, "LC_ALL": "C.UTF-8"},
    )


def reports(proc: subprocess.Popen[str], timeout: float = 180) -> list[dict[str, Any]]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"the flooder failed: {err[-3000:]}"
    result = json.loads(out)
    assert isinstance(result, list)
    return result
