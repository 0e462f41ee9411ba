"""Core benchmarks on the kernel simulator: discovery, host status and the attach/detach cycle, by host size.

Prints a table (median of several runs, peak Python memory); it asserts nothing, since these machines are
shared and noisy. Run: `.venv/bin/python bench/bench_core.py [--sizes 64,512,2000] [--runs 5]`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

from vfiod.core.context import Caller
from vfiod.core.discovery import discover
from vfiod.core.hoststatus import host_status
from vfiod_sim.simulation import Simulation


def measure(fn: Callable[[], object], runs: int) -> tuple[float, float]:
    """(median seconds, peak MiB of Python allocations during one run)."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return statistics.median(times), peak / (1 << 20)


def bench_size(size: int, runs: int) -> list[tuple[str, int, float, float]]:
    rows: list[tuple[str, int, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "sim"
        sim = Simulation.open(root, f"synthetic:{size}")
        host = sim.host
        rows.append(("discover (candidates)", size, *measure(lambda: discover(host), runs)))
        rows.append(
            ("discover (all functions)", size, *measure(lambda: discover(host, all_devices=True), runs))
        )
        rows.append(("host status", size, *measure(lambda: host_status(host), runs)))
        manager = sim.manager(Path(tmp) / "state")
        caller = Caller(uid=1000)
        manager.register(caller, discover(host)[0].pci_address, "bench-gpu")

        def cycle() -> None:
            manager.attach(caller, "bench-vm", ["bench-gpu"], include_group=True)
            manager.detach(caller, "bench-vm")

        rows.append(("attach+detach (GPU+audio)", size, *measure(cycle, runs)))
        rows.append(("list devices", size, *measure(manager.list_devices, runs)))
        manager.registry.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="64,512,2000")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    rows: list[tuple[str, int, float, float]] = []
    for size in (int(s) for s in args.sizes.split(",")):
        rows.extend(bench_size(size, args.runs))
    print(f"{'operation':<28} {'functions':>9} {'median ms':>10} {'peak MiB':>9}")
    for name, size, seconds, mib in rows:
        print(f"{name:<28} {size:>9} {seconds * 1000:>10.1f} {mib:>9.2f}")


if __name__ == "__main__":
    main()
