"""The metrics as Prometheus gets them: vfiod (simulated workstation, on the real stack: private
dbus-daemon + polkitd) writes its textfile, Debian's real prometheus-node-exporter serves it with its
textfile collector over loopback, the scrape carries vfiod's samples (and no textfile error), and
`promtool check metrics` (Debian's prometheus package) finds nothing wrong with the file or the scrape.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.support.realstack import (
    ROOT,
    Stack,
    gv_opts,
    gv_str,
    ok,
    require_root_and_tools,
    start_stack,
    unavailable,
    vfiod_argv,
)

pytestmark = pytest.mark.slow

EXPORTER = "/usr/bin/prometheus-node-exporter"
PROMTOOL = "/usr/bin/promtool"
GPU = "0000:a2:00.0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def node_exporter(textfile_dir: Path) -> Iterator[str]:
    """The exporter with only its textfile collector, on a loopback port; yields the scrape URL."""
    port = free_port()
    proc = subprocess.Popen(
        [
            EXPORTER,
            f"--web.listen-address=127.0.0.1:{port}",
            "--collector.disable-defaults",
            "--collector.textfile",
            f"--collector.textfile.directory={textfile_dir}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5):
                    break
            except OSError:
                assert proc.poll() is None, (
                    f"the exporter exited: {proc.stderr.read() if proc.stderr else ''}"
                )
                assert time.monotonic() < deadline, "the exporter did not answer"
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 (loopback, http only)
        return str(r.read().decode())


def promtool_check(text: str) -> None:
    r = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode == 0, f"promtool check metrics: {r.stdout}{r.stderr}"


def test_node_exporter_serves_vfiods_metrics_and_promtool_accepts_them() -> None:
    if not (Path(EXPORTER).is_file() and Path(PROMTOOL).is_file()):
        unavailable("prometheus-node-exporter and prometheus (promtool) are not installed (make deps)")
    require_root_and_tools()
    work = Path(tempfile.mkdtemp(prefix="vfiod-metrics-"))
    try:
        sim_root = work / "host"  # vfiod builds the simulated host there
        textfiles = sim_root / "var/lib/prometheus/node-exporter"  # the default path, under that root
        config = work / "vfiod.toml"
        config.write_text("[metrics]\ninterval = 1\n")
        argv = [*vfiod_argv("workstation-l4"), "--sim-root", str(sim_root), "--config", str(config)]
        with start_stack(argv) as stack:
            textfiles.mkdir(parents=True)  # the exporter installed after vfiod started: picked up
            scrape_after_a_call(stack, textfiles)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def scrape_after_a_call(stack: Stack, textfiles: Path) -> None:
    with node_exporter(textfiles) as url:
        ok(stack.call(ROOT, "RegisterDevice", gv_str(GPU), gv_str("gpu"), gv_opts()), "RegisterDevice")
        deadline = time.monotonic() + 15
        while 'vfiod_calls_total{method="RegisterDevice",result="ok"} 1' not in scrape(url):
            assert time.monotonic() < deadline, f"the scrape never showed the call:\n{scrape(url)}"
            time.sleep(0.2)
        text = scrape(url)
        shown = [line for line in text.splitlines() if line.startswith(("vfiod_", "node_textfile"))]
        print("\n".join(shown))
        assert 'vfiod_devices{state="host"} 1' in text and 'vfiod_devices_by_type{type="gpu"} 1' in text
        assert "vfiod_gpu_slots 1" in text and "vfiod_devices_stuck 0" in text
        assert "node_textfile_scrape_error 0" in text
        assert f'node_textfile_mtime_seconds{{file="{textfiles / "vfiod.prom"}"}}' in text
        promtool_check((textfiles / "vfiod.prom").read_text())
        promtool_check(text)
