"""GetMetrics over the bus (anyone allowed to inspect may read it) counts the calls as they are answered, and
the node_exporter textfile: off while its directory does not exist, written atomically (mode 0644, no
temporary file left) once it does, and a last time when vfiod stops."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.bus.conftest import Clients, StartVfiod
from tests.bus.support.harness import PolkitMock
from tests.bus.support.helpers import GPU, attach, b, ok, register
from tests.core.test_metrics import samples
from vfiod.bus.names import ACTION_INSPECT
from vfiod.config import Config, MetricsConfig


def test_get_metrics_counts_calls_and_reads_the_registry(
    start_vfiod: StartVfiod, clients: Clients, polkit: PolkitMock
) -> None:
    start_vfiod()
    register(clients.root, GPU, "gpu")
    ok(attach(clients.root, "vm1", "gpu", include_group=b(True)))
    assert attach(clients.root, "vm2", "gpu", include_group=b(True)).short == "InUse"
    polkit.allow(ACTION_INSPECT)
    text = ok(clients.alice.m("GetMetrics", "a{sv}", {}))
    got = samples(text)
    assert got['vfiod_calls_total{method="Attach",result="ok"}'] == 1
    assert got['vfiod_calls_total{method="Attach",result="InUse"}'] == 1
    assert got['vfiod_calls_total{method="RegisterDevice",result="ok"}'] == 1
    assert got['vfiod_devices{state="attached"}'] == 2 and got["vfiod_attachments"] == 2
    assert got['vfiod_sysfs_writes_total{attribute="driver_override",result="ok"}'] >= 2
    assert sum(v for k, v in got.items() if k.startswith("vfiod_sysfs_write_duration_seconds_count")) >= 4
    polkit.allow()
    assert clients.bob.m("GetMetrics", "a{sv}", {}).short == "NotAuthorized"


def wait_for(path: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} was not written"
        time.sleep(0.05)


def test_the_textfile_is_off_until_its_directory_exists(start_vfiod: StartVfiod, clients: Clients) -> None:
    vfiod = start_vfiod(config=Config(metrics=MetricsConfig(interval=1)))
    directory = vfiod.root / "var/lib/prometheus/node-exporter"  # the default, under the simulated root
    path = directory / "vfiod.prom"
    time.sleep(1.5)
    assert not directory.exists()
    directory.mkdir(parents=True)
    wait_for(path)
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert samples(path.read_text())['vfiod_info{version="' + vfiod.service.metrics.version + '"}'] == 1
    assert sorted(p.name for p in directory.iterdir()) == ["vfiod.prom"]  # no temporary file left
    register(clients.root, GPU, "gpu")
    path.unlink()
    vfiod.stop()  # the last write, on the way out
    assert samples(path.read_text())['vfiod_calls_total{method="RegisterDevice",result="ok"}'] == 1


def test_an_empty_textfile_setting_writes_nothing(start_vfiod: StartVfiod) -> None:
    vfiod = start_vfiod(config=Config(metrics=MetricsConfig(textfile="", interval=1)))
    directory = vfiod.root / "var/lib/prometheus/node-exporter"
    directory.mkdir(parents=True)
    time.sleep(1.5)
    assert list(directory.iterdir()) == []
