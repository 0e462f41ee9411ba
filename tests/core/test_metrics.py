"""The metrics: the exposition is well formed (HELP and TYPE once per family, cumulative buckets ending in
+Inf equal to _count, escaped labels), the gauges say what the registry and the host say, and calls and
sysfs writes are counted with their durations."""

from __future__ import annotations

import re

import pytest

from tests.core.support.worlds import HM, MakeEnv
from tests.machines import L4
from vfiod.core import metrics
from vfiod.core.metrics import Gauges, Metrics
from vfiod.host.writes import WriteRecord
from vfiod_sim import faults

SAMPLE_RE = re.compile(r'^([a-z_:][a-z0-9_:]*)(\{(?:[a-z_]+="(?:[^"\\]|\\.)*",?)*\})? (\S+)$')


def samples(text: str) -> dict[str, float]:
    """Every sample line (`name{labels}` -> value); asserts each line is a comment or a valid sample and
    that each family's HELP and TYPE come once, before its samples."""
    out: dict[str, float] = {}
    typed: set[str] = set()
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name = line.split()[2]
            assert name not in typed, f"TYPE of {name} twice"
            typed.add(name)
            continue
        if line.startswith("# HELP "):
            continue
        m = SAMPLE_RE.match(line)
        assert m, f"not a sample: {line!r}"
        family = re.sub(r"_(bucket|sum|count)$", "", m.group(1))
        assert family in typed or m.group(1) in typed, f"{line!r} before its TYPE"
        out[m.group(1) + (m.group(2) or "")] = float(m.group(3).replace("+Inf", "inf"))
    return out


def gauges(**over: object) -> Gauges:
    base: dict[str, object] = {
        "devices_by_state": {},
        "devices_by_type": {},
        "attachments": 0,
        "instances": 0,
        "gpu_slots_total": 0,
        "gpu_slots_used": 0,
        "vgpu_slots_total": 0,
        "vgpu_slots_used": 0,
        "vgpu_slots_allocatable": 0,
        "quarantined_parents": 0,
        "persistence_holds": 0,
        "pending_writes": 0,
    }
    return Gauges(**{**base, **over})  # type: ignore[arg-type]


def test_histograms_are_cumulative_and_labels_escaped() -> None:
    m = Metrics('1.0 "quoted"\\', started=1700000000.5)
    for seconds in (0.0004, 0.003, 0.003, 2.0, 500.0):
        m.observe_call("Attach", "ok", seconds)
    m.observe_call("Attach", "InUse", 0.002)
    m.observe_write(
        WriteRecord("/sys/bus/pci/drivers/vfio-pci/bind", "0000:a2:00.0", "ok", 0.02, "0000:a2:00.0")
    )
    m.observe_write(WriteRecord("/sys/bus/pci/drivers_probe", "x", "EIO", 0.5, None))
    m.observe_write(WriteRecord("/sys/bus/pci/drivers_probe", "x", "ok", 61.0, None, late=True))
    m.observe_busy()
    got = samples(m.render(gauges()))
    assert got['vfiod_info{version="1.0 \\"quoted\\"\\\\"}'] == 1
    assert got["vfiod_start_time_seconds"] == 1700000000.5
    assert got['vfiod_calls_total{method="Attach",result="ok"}'] == 5
    assert got['vfiod_calls_total{method="Attach",result="InUse"}'] == 1
    buckets = [
        (k, v) for k, v in got.items() if k.startswith('vfiod_call_duration_seconds_bucket{method="Attach"')
    ]
    values = [v for _, v in buckets]
    assert values == sorted(values) and buckets[-1][0].endswith('le="+Inf"}') and values[-1] == 6
    assert got['vfiod_call_duration_seconds_bucket{method="Attach",le="0.001"}'] == 1
    assert got['vfiod_call_duration_seconds_bucket{method="Attach",le="0.005"}'] == 4  # 0.002 is InUse's
    assert got['vfiod_call_duration_seconds_count{method="Attach"}'] == 6
    assert got['vfiod_call_duration_seconds_sum{method="Attach"}'] == pytest.approx(502.0084)
    assert got['vfiod_sysfs_writes_total{attribute="bind",result="ok"}'] == 1
    assert got['vfiod_sysfs_writes_total{attribute="drivers_probe",result="EIO"}'] == 1
    assert got['vfiod_sysfs_writes_total{attribute="drivers_probe",result="late-ok"}'] == 1
    assert got['vfiod_sysfs_write_duration_seconds_count{attribute="drivers_probe"}'] == 1  # not the late one
    assert got["vfiod_calls_refused_busy_total"] == 1


def test_gauges_say_what_the_registry_and_host_say(env: MakeEnv) -> None:
    e = env(deadline=0.5)
    m = e.manager
    m.register(HM, str(L4), "l4-gpu")
    m.attach(HM, "vm1", ["l4-gpu"], include_group=True)
    got = samples(Metrics("t").render(metrics.gauges(m.deps)))
    assert got['vfiod_devices{state="attached"}'] == 2  # the GPU and its audio (registered as companion)
    assert got['vfiod_devices{state="stuck"}'] == 0 and got["vfiod_devices_stuck"] == 0
    assert got['vfiod_devices_by_type{type="gpu"}'] == 1 and got['vfiod_devices_by_type{type="pci"}'] == 1
    assert got["vfiod_attachments"] == 2 and got["vfiod_attached_instances"] == 1
    assert got["vfiod_gpu_slots"] == 1 and got["vfiod_gpu_slots_used"] == 1
    assert got["vfiod_sysfs_writes_pending"] == 0 and got["vfiod_persistence_holds"] == 0
    # a Detach whose driver_override write hangs: the devices are stuck and the write pending
    faults.inject(
        e.root, "hang", kind="hang", path=f"/sys/bus/pci/devices/{L4}/driver_override", value="nvidia"
    )
    with pytest.raises(Exception, match="driver_override"):
        m.detach(HM, "vm1")
    got = samples(Metrics("t").render(metrics.gauges(m.deps)))
    assert got["vfiod_devices_stuck"] >= 1 and got["vfiod_sysfs_writes_pending"] == 1
    faults.release(e.root, "hang")
