"""A throwaway dbus-daemon for the vfioctl tests (`private_bus`) and reading a child's output until a line
shows up (`read_until`)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:dir={dir}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


@contextlib.contextmanager
def private_bus() -> Iterator[str]:
    """A dbus-daemon of our own (session type, any uid may own any name); yields its address."""
    tmp = tempfile.mkdtemp(prefix="vfioctl-bus-", dir="/tmp")
    config = Path(tmp) / "bus.conf"
    config.write_text(BUS_CONFIG.format(dir=tmp))
    proc = subprocess.Popen(
        ["dbus-daemon", f"--config-file={config}", "--nofork", "--print-address=1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().strip()
        assert address.startswith("unix:"), address
        yield address
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for p in Path(tmp).iterdir():
            p.unlink()
        os.rmdir(tmp)


def read_until(
    proc: subprocess.Popen[str], stream: IO[str] | None, needle: str, timeout: float = 10.0
) -> str:
    """Lines from `stream` until one contains `needle` (the lines read so far are returned). A watchdog
    kills `proc` after `timeout` so a missing line fails the test instead of hanging it."""
    assert stream is not None
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    seen = ""
    try:
        while True:
            line = stream.readline()
            if not line:
                break
            seen += line
            if needle in line:
                return seen
    finally:
        watchdog.cancel()
    raise AssertionError(f"{needle!r} not seen; got {seen!r}")
