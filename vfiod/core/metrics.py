"""The daemon's Prometheus metrics, in the text exposition format (version 0.0.4) that node_exporter's
textfile collector and Prometheus read.

Owns the counters and histograms fed as things happen (calls by method and result, sysfs writes by
attribute and result, with their durations) and the gauges read from the manager at render time (devices by
state, attachments, stuck devices, GPU and vGPU slots, quarantined vGPU parents, persistence holds, writes
still inside the kernel). No client library: the format is a few lines of text, and the daemon keeps its
dependencies few. Label values are escaped as the format says; label sets are bounded (methods, results and
sysfs attributes are finite lists).
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from vfiod.core import reads
from vfiod.core.deps import CoreDeps
from vfiod.host.writes import WriteRecord

# Seconds: a read answers in milliseconds, an NVIDIA rebind can take a minute.
CALL_BUCKETS: Final = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
WRITE_BUCKETS: Final = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0)
DEVICE_STATES: Final = ("host", "binding", "vfio", "attached", "releasing", "stuck", "missing", "creating")

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels, extra: Sequence[tuple[str, str]] = ()) -> str:
    pairs = [*labels, *extra]
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return repr(float(value)) if isinstance(value, float) and not value.is_integer() else str(int(value))


@dataclass
class _Histogram:
    buckets: Sequence[float]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        if not self.counts:
            self.counts = [0] * len(self.buckets)
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str, labels: Labels) -> list[str]:
        out, running = [], 0
        counts = self.counts or [0] * len(self.buckets)
        for bound, n in zip(self.buckets, counts, strict=True):
            running += n
            out.append(f"{name}_bucket{_labels(labels, [('le', _number(bound))])} {running}")
        out.append(f"{name}_bucket{_labels(labels, [('le', '+Inf')])} {self.count}")
        out.append(f"{name}_sum{_labels(labels)} {_number(self.total)}")
        out.append(f"{name}_count{_labels(labels)} {self.count}")
        return out


@dataclass(frozen=True)
class Gauges:
    """What the manager's state says now (read at render time)."""

    devices_by_state: Mapping[str, int]
    devices_by_type: Mapping[str, int]
    attachments: int
    instances: int
    gpu_slots_total: int
    gpu_slots_used: int
    vgpu_slots_total: int
    vgpu_slots_used: int
    vgpu_slots_allocatable: int
    quarantined_parents: int
    persistence_holds: int
    pending_writes: int


class Metrics:
    """Thread-safe: calls are counted on the event loop, writes in the workers that make them."""

    def __init__(self, version: str, started: float | None = None) -> None:
        self.version = version
        self.started = time.time() if started is None else started
        self._lock = threading.Lock()
        self._calls: dict[Labels, int] = {}
        self._call_seconds: dict[Labels, _Histogram] = {}
        self._writes: dict[Labels, int] = {}
        self._write_seconds: dict[Labels, _Histogram] = {}
        self._busy_refusals = 0

    def observe_call(self, method: str, result: str, seconds: float) -> None:
        with self._lock:
            key = (("method", method), ("result", result))
            self._calls[key] = self._calls.get(key, 0) + 1
            hist = self._call_seconds.setdefault((("method", method),), _Histogram(CALL_BUCKETS))
            hist.observe(seconds)

    def observe_busy(self) -> None:
        with self._lock:
            self._busy_refusals += 1

    def observe_write(self, record: WriteRecord) -> None:
        """A sysfs write as the host reports it (a late one is counted again, with result late-<result>)."""
        attribute = record.path.rstrip("/").rsplit("/", 1)[-1]
        result = f"late-{record.result}" if record.late else record.result
        with self._lock:
            key = (("attribute", attribute), ("result", result))
            self._writes[key] = self._writes.get(key, 0) + 1
            if not record.late:
                hist = self._write_seconds.setdefault((("attribute", attribute),), _Histogram(WRITE_BUCKETS))
                hist.observe(record.duration)

    def render(self, gauges: Gauges) -> str:
        """The whole exposition, ending with a newline."""
        out: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: Iterable[str]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(samples)

        g = gauges
        family(
            "vfiod_info",
            "gauge",
            "vfiod's version.",
            [f"vfiod_info{_labels((('version', self.version),))} 1"],
        )
        family(
            "vfiod_start_time_seconds",
            "gauge",
            "When the daemon started, in seconds since the epoch.",
            [f"vfiod_start_time_seconds {_number(round(self.started, 3))}"],
        )
        states = {s: 0 for s in DEVICE_STATES} | dict(g.devices_by_state)
        family(
            "vfiod_devices",
            "gauge",
            "Registered devices (and vGPUs vfiod created) by state.",
            [f"vfiod_devices{_labels((('state', s),))} {n}" for s, n in sorted(states.items())],
        )
        family(
            "vfiod_devices_by_type",
            "gauge",
            "Registered devices by type (gpu, pci, vgpu).",
            [
                f"vfiod_devices_by_type{_labels((('type', t),))} {n}"
                for t, n in sorted(g.devices_by_type.items())
            ],
        )
        simple = [
            (
                "vfiod_devices_stuck",
                "Devices left stuck after a failure; only an admin's Recover clears them.",
                states.get("stuck", 0),
            ),
            ("vfiod_attachments", "Functions and vGPUs handed to instances.", g.attachments),
            ("vfiod_attached_instances", "Instances holding at least one device.", g.instances),
            ("vfiod_gpu_slots", "GPUs that can be passed through whole.", g.gpu_slots_total),
            ("vfiod_gpu_slots_used", "Of those, attached now.", g.gpu_slots_used),
            ("vfiod_vgpu_slots", "vGPUs the parents could hold (used plus creatable).", g.vgpu_slots_total),
            ("vfiod_vgpu_slots_used", "vGPUs on the host now.", g.vgpu_slots_used),
            ("vfiod_vgpu_slots_allocatable", "vGPUs that can be created now.", g.vgpu_slots_allocatable),
            (
                "vfiod_vgpu_parents_quarantined",
                "vGPU parents placement skips after failures.",
                g.quarantined_parents,
            ),
            (
                "vfiod_persistence_holds",
                "Holds on units such as nvidia-persistenced stopped around binds.",
                g.persistence_holds,
            ),
            (
                "vfiod_sysfs_writes_pending",
                "sysfs writes still inside the kernel past their deadline.",
                g.pending_writes,
            ),
        ]
        for name, help_text, value in simple:
            family(name, "gauge", help_text, [f"{name} {value}"])

        def counter(name: str, help_text: str, counts: dict[Labels, int]) -> None:
            family(name, "counter", help_text, [f"{name}{_labels(k)} {n}" for k, n in sorted(counts.items())])

        def histogram(name: str, help_text: str, hists: dict[Labels, _Histogram]) -> None:
            family(
                name,
                "histogram",
                help_text,
                [ln for k, h in sorted(hists.items()) for ln in h.lines(name, k)],
            )

        with self._lock:  # rendered under the lock: a consistent view, and no copies
            counter(
                "vfiod_calls_total",
                "Manager method calls answered, by method and result (ok or the error's name).",
                self._calls,
            )
            histogram(
                "vfiod_call_duration_seconds",
                "How long Manager method calls took, by method.",
                self._call_seconds,
            )
            counter(
                "vfiod_calls_refused_busy_total",
                "Calls answered Busy at once: their connection had too many calls or replies outstanding.",
                {(): self._busy_refusals},
            )
            counter(
                "vfiod_sysfs_writes_total",
                "sysfs writes by attribute and result (an errno name, timeout, or late-<result> when one "
                "returned after its deadline).",
                self._writes,
            )
            histogram(
                "vfiod_sysfs_write_duration_seconds",
                "How long sysfs writes took inside the kernel, by attribute.",
                self._write_seconds,
            )
        return "\n".join(out) + "\n"


def gauges(deps: CoreDeps) -> Gauges:
    """The gauges, from the registry (states as vfiod recorded them, read as one snapshot) and the host's
    readiness (slots, quarantine) as GetHostStatus reports it."""
    with deps.registry.snapshot():
        rows = deps.registry.list_devices()
        vgpus = deps.registry.list_vgpus()
        atts = deps.registry.all_attachments()
    by_state: dict[str, int] = {}
    by_type: dict[str, int] = {}
    for state, kind in [(r.state, r.type) for r in rows] + [(v.state, "vgpu") for v in vgpus]:
        by_state[state] = by_state.get(state, 0) + 1
        by_type[kind] = by_type.get(kind, 0) + 1
    status = reads.host_status_record(deps)

    def count(key: str) -> int:
        value = status.get(key, 0)
        return value if isinstance(value, int) else 0

    quarantined = status.get("quarantined") or []
    return Gauges(
        devices_by_state=by_state,
        devices_by_type=by_type,
        attachments=len(atts),
        instances=len({a.instance_id for a in atts}),
        gpu_slots_total=count("gpu_slots_total"),
        gpu_slots_used=count("gpu_slots_used"),
        vgpu_slots_total=count("vgpu_slots_total"),
        vgpu_slots_used=count("vgpu_slots_used"),
        vgpu_slots_allocatable=count("vgpu_slots_allocatable"),
        quarantined_parents=len(quarantined) if isinstance(quarantined, list) else 0,
        persistence_holds=deps.hold.in_process,
        pending_writes=len(deps.host.pending()),
    )
