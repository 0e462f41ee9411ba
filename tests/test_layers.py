"""The production daemon never loads the kernel simulator (test and demo equipment) unless asked to."""

from __future__ import annotations

import subprocess
import sys

CHECK = (
    "import vfiod.cli.daemon, vfiod.cli.check, vfiod.bus.daemon, vfiod.core.manager, sys; "
    "print(sorted(m for m in sys.modules if 'sim' in m))"
)


def test_the_daemon_does_not_import_the_simulator() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


def test_simulate_does_import_it() -> None:
    check = "import vfiod_sim.system, sys; print('vfiod_sim' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "True"
