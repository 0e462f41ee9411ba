"""The metrics as a node_exporter textfile: written every `interval` seconds and when vfiod stops, atomically
(a hidden temporary file in the same directory, then rename), mode 0644 so node_exporter's own user can
read it; off while its directory does not exist (said once in the log, and again when it appears).

Debian's prometheus-node-exporter reads /var/lib/prometheus/node-exporter/*.prom (its textfile
collector's directory), which is the default; the unit has a matching ReadWritePaths=. A scrape then shows
vfiod's metrics with node_textfile_mtime_seconds{file="<the file's path>"} telling how fresh they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from vfiod.logevents import Action

log = logging.getLogger("vfiod.metrics")


def textfile_path(configured: str, sim_root: Path | None) -> Path | None:
    """Where to write ([metrics] textfile; None when empty): a simulated host's copy lives under its root."""
    if not configured:
        return None
    return sim_root / configured.lstrip("/") if sim_root is not None else Path(configured)


class TextfileWriter:
    def __init__(self, render: Callable[[], Awaitable[str]], path: Path | None, interval: float) -> None:
        self._render = render
        self.path = path
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._off_said = False
        self._wake = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    def reconfigure(self, path: Path | None, interval: float) -> None:
        """A reload: the new place and pace apply from the next write, which comes now."""
        self.path, self.interval, self._off_said = path, interval, False
        self._wake.set()

    async def stop(self) -> None:
        """Cancel the loop and write the final state once."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.write_once()

    async def _run(self) -> None:
        while True:
            await self.write_once()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)

    async def write_once(self) -> bool:
        """Write the file now; False when off (no path, no directory) or when writing failed (logged)."""
        path = self.path
        if path is None:
            return False
        if not path.parent.is_dir():
            if not self._off_said:
                self._off_said = True
                log.info(
                    "metrics: %s does not exist (prometheus-node-exporter is not installed?): no textfile "
                    "is written until it does",
                    path.parent,
                    extra={"ACTION": Action.METRICS},
                )
            return False
        try:
            text = await self._render()
            await asyncio.get_running_loop().run_in_executor(None, _write_atomically, path, text)
        except Exception as e:
            log.warning("metrics: writing %s failed: %s", path, e, extra={"ACTION": Action.METRICS})
            return False
        if self._off_said:
            self._off_said = False
            log.info("metrics: writing %s", path, extra={"ACTION": Action.METRICS})
        return True


def _write_atomically(path: Path, text: str) -> None:
    # node_exporter reads only *.prom: the temporary name never is one, and rename replaces at once.
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.fchmod(fd, 0o644)  # the unit's UMask=0077 would make it root's alone
        data = memoryview(text.encode())
        while data:
            data = data[os.write(fd, data) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
