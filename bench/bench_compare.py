"""vfiod's figures beside a reference measured in the same run, on the same machine, with their ratio.

Rows (medians; every reference is measured here, now, not quoted):
- ListAvailable {all: true} round trip on `--simulate synthetic:N`, cold (the shared snapshot invalidated
  before each sample, as lspci re-reads sysfs every time) and warm, beside `lspci -A linux-sysfs -O
  sysfs.path=<the same tree> -D -nn -k`;
- `vfiod check --sysfs-root <the same tree> --all --json`, the whole process, beside the same lspci;
- GetDevice p50, one client calling back to back, beside a bare dbus-fast service answering a same-sized
  record for the same call on the same bus;
- start to bus name owned (workstation-l4, its tree built beforehand) and idle RSS after start
  (workstation-l4 and synthetic:N), against the issue's targets (no reference process exists);
- persistence stop/start cycles of 8 parallel single-GPU Attaches on dgx-h100 (target 1).
It asserts nothing: these machines are shared and noisy. A private bus (dbus-daemon --session) and
simulated hosts; no privileges needed.

    .venv/bin/python bench/bench_compare.py [--functions 4096] [--runs 7] [--json] [--only GROUP ...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

REPO = Path(__file__).resolve().parents[1]
VFIOD = [sys.executable, "-m", "vfiod.cli.daemon"]
NAME = "org.hypeman.Devices1"
PATH = "/org/hypeman/Devices1"
IFACE = "org.hypeman.Devices1.Manager"
ECHO_NAME = "org.example.Echo1"
LSPCI = shutil.which("lspci")


@dataclass
class Row:
    figure: str
    ours: float
    unit: str
    reference: float | None  # measured beside it (None: only a target)
    reference_what: str
    target: str


@contextlib.contextmanager
def private_bus(work: Path) -> Iterator[str]:
    proc = subprocess.Popen(
        ["dbus-daemon", "--session", "--nofork", "--print-address=1", f"--address=unix:dir={work}"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    address = proc.stdout.readline().strip()
    try:
        yield address
    finally:
        proc.terminate()
        proc.wait(10)


async def _has_owner(address: str, name: str) -> bool:
    bus = await MessageBus(bus_address=address).connect()
    try:
        reply = await bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="NameHasOwner",
                signature="s",
                body=[name],
            )
        )
        return bool(reply and reply.message_type is MessageType.METHOD_RETURN and reply.body[0])
    finally:
        bus.disconnect()


@contextlib.contextmanager
def daemon(
    address: str, profile: str, sim_root: Path, log: Path
) -> Iterator[tuple[subprocess.Popen[bytes], float]]:
    """vfiod on the bus; yields it and how long it took from spawn to owning the name."""
    started = time.monotonic()
    proc = subprocess.Popen(
        [*VFIOD, "run", "--bus", address, "--simulate", profile, "--sim-root", str(sim_root)],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    try:
        while not asyncio.run(_has_owner(address, NAME)):
            if proc.poll() is not None:
                raise RuntimeError(f"vfiod exited: {log.read_text()[-2000:]}")
            time.sleep(0.005)
        yield proc, time.monotonic() - started
    finally:
        proc.terminate()
        proc.wait(30)


def rss_mib(pid: int) -> float:
    m = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(m.group(1)) / 1024 if m else float("nan")


@dataclass(frozen=True)
class Target:
    """Whom a call goes to."""

    dest: str = NAME
    path: str = PATH
    iface: str = IFACE


ECHO = Target(ECHO_NAME, "/org/example/Echo1", ECHO_NAME)
Before = Callable[[MessageBus], Awaitable[object]]


async def _call(bus: MessageBus, member: str, sig: str, body: list[Any], to: Target = Target()) -> Message:
    msg = Message(
        destination=to.dest, path=to.path, interface=to.iface, member=member, signature=sig, body=body
    )
    reply = await bus.call(msg)
    assert reply is not None
    return reply


async def _calls(
    address: str,
    member: str,
    sig: str,
    body: list[Any],
    runs: int,
    to: Target = Target(),
    before: Before | None = None,
) -> list[float]:
    """Latencies of `runs` calls made back to back (each after `before`, which is not timed)."""
    bus = await MessageBus(bus_address=address).connect()
    out = []
    try:
        for _ in range(runs):
            if before is not None:
                await before(bus)
            started = time.perf_counter()
            reply = await _call(bus, member, sig, body, to)
            out.append(time.perf_counter() - started)
            assert reply.message_type is MessageType.METHOD_RETURN, reply.body
    finally:
        bus.disconnect()
    return out


async def _invalidate(bus: MessageBus) -> object:
    """A mutating call (Bind of a name nobody registered: NotFound) makes vfiod drop its shared snapshot."""
    return await _call(bus, "Bind", "sa{sv}", ["bench-no-such-device", {}])


def timed(argv: list[str], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, cwd=REPO)
        out.append(time.perf_counter() - started)
    return out


ECHO_SERVICE = """
import asyncio, sys
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface, method
from dbus_fast import Variant

RECORD = {k: Variant("s", "x" * 24) for k in [f"key{i}" for i in range(22)]}

class Echo(ServiceInterface):
    def __init__(self):
        super().__init__("org.example.Echo1")

    @method()
    def GetDevice(self, id_or_name: "s", options: "a{sv}") -> "a{sv}":
        return RECORD

async def main():
    bus = await MessageBus(bus_address=sys.argv[1]).connect()
    bus.export("/org/example/Echo1", Echo())
    await bus.request_name("org.example.Echo1")
    await asyncio.Event().wait()

asyncio.run(main())
"""


def median_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1000


def discovery_rows(address: str, work: Path, functions: int, runs: int) -> list[Row]:
    big, log = work / "big", work / "vfiod.log"
    lspci = [str(LSPCI), "-A", "linux-sysfs", "-O", f"sysfs.path={big}/sys/bus/pci", "-D", "-nn", "-k"]
    what = f"lspci -k on the same {functions} functions"
    with daemon(address, f"synthetic:{functions}", big, log):
        pass  # builds the tree: the idle RSS below is not the simulator's first build of it
    with daemon(address, f"synthetic:{functions}", big, log) as (proc, _):
        time.sleep(0.5)
        rss = rss_mib(proc.pid)  # idle, after start: before any call
        ref = median_ms(timed(lspci, runs)) if LSPCI else None
        body: list[Any] = [{"all": Variant("b", True)}]
        cold = asyncio.run(_calls(address, "ListAvailable", "a{sv}", body, runs, before=_invalidate))
        warm = asyncio.run(_calls(address, "ListAvailable", "a{sv}", body, runs))
        check = [*VFIOD, "check", "--sysfs-root", str(big), "--all", "--json"]
        checked = median_ms(timed(check, runs))
    return [
        Row(f"ListAvailable all, cold, synthetic:{functions}", median_ms(cold), "ms", ref, what, "<= 1.0x"),
        Row(f"ListAvailable all, warm, synthetic:{functions}", median_ms(warm), "ms", ref, what, "(none)"),
        Row(f"vfiod check --all --json, {functions} functions", checked, "ms", ref, what, "<= 1.0x"),
        Row(f"idle RSS after start, synthetic:{functions}", rss, "MiB", None, "", "<= 45 MiB"),
        Row(
            f"  of which the simulator's own model of synthetic:{functions}",
            simulator_rss_mib(big, f"synthetic:{functions}"),
            "MiB",
            None,
            "",
            "(test equipment: a real host has none)",
        ),
    ]


SIMULATOR_RSS = """
import re, sys
from pathlib import Path
import vfiod.bus.daemon
def rss():
    return int(re.search(r"VmRSS:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024
before = rss()
from vfiod_sim.simulation import Simulation
Simulation.open(Path(sys.argv[1]), sys.argv[2], reuse=True)
print(rss() - before)
"""


def simulator_rss_mib(root: Path, profile: str) -> float:
    """What `--simulate` adds to a daemon's RSS: the simulator's modules and its model of the host."""
    out = subprocess.run(
        [sys.executable, "-c", SIMULATOR_RSS, str(root), profile],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    return float(out.stdout.strip())


def start_rows(address: str, work: Path, runs: int) -> list[Row]:
    ws, log = work / "ws", work / "ws.log"
    with daemon(address, "workstation-l4", ws, log):
        pass  # builds the tree: the starts below exclude the simulator's first build
    starts, rss = [], []
    for _ in range(max(3, runs // 2)):
        with daemon(address, "workstation-l4", ws, log) as (proc, took):
            starts.append(took)
            time.sleep(0.3)
            rss.append(rss_mib(proc.pid))
    return [
        Row("start to bus name owned, workstation-l4", median_ms(starts), "ms", None, "", "<= 250 ms"),
        Row("idle RSS after start, workstation-l4", statistics.median(rss), "MiB", None, "", "<= 35 MiB"),
        Row(
            "  of which the simulator's own model of workstation-l4",
            simulator_rss_mib(ws, "workstation-l4"),
            "MiB",
            None,
            "",
            "(test equipment: a real host has none)",
        ),
    ]


def call_rows(address: str, work: Path, runs: int) -> list[Row]:
    echo = subprocess.Popen([sys.executable, "-c", ECHO_SERVICE, address])
    try:
        while not asyncio.run(_has_owner(address, ECHO_NAME)):
            time.sleep(0.01)
        with daemon(address, "workstation-l4", work / "ws", work / "ws.log"):
            asyncio.run(_calls(address, "RegisterDevice", "ssa{sv}", ["0000:a2:00.0", "bench-gpu", {}], 1))
            n = max(200, runs * 30)
            ours = asyncio.run(_calls(address, "GetDevice", "sa{sv}", ["bench-gpu", {}], n))
            theirs = asyncio.run(_calls(address, "GetDevice", "sa{sv}", ["bench-gpu", {}], n, to=ECHO))
    finally:
        echo.terminate()
        echo.wait(10)
    what = "a bare dbus-fast service, same call and bus"
    return [Row("GetDevice p50, sequential", median_ms(ours), "ms", median_ms(theirs), what, "<= 2x")]


GROUPS = ("discovery", "start", "calls", "persistence")


def bench(functions: int, runs: int, groups: tuple[str, ...] = GROUPS) -> list[Row]:
    work = Path(tempfile.mkdtemp(prefix="vfiod-bench-"))
    rows: list[Row] = []
    try:
        with private_bus(work) as address:
            if "discovery" in groups:
                rows += discovery_rows(address, work, functions, runs)
            if "start" in groups:
                rows += start_rows(address, work, runs)
            if "calls" in groups:
                rows += call_rows(address, work, runs)
            if "persistence" in groups:
                cycles = parallel_attach_cycles(address, work)
                rows.append(
                    Row("persistence stop/start cycles, 8 parallel Attaches", cycles, "", None, "", "1")
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def parallel_attach_cycles(address: str, work: Path) -> float:
    """8 single-GPU Attaches at once on dgx-h100: how many times vfiod stopped nvidia-persistenced."""
    root, log = work / "dgx", work / "dgx.log"
    with daemon(address, "dgx-h100", root, log):

        async def go() -> None:
            bus = await MessageBus(bus_address=address).connect()
            listed = await _call(bus, "ListAvailable", "a{sv}", [{}])
            gpus = [d["pci_address"].value for d in listed.body[0] if d["vendor_id"].value == "10de"]
            for i, addr in enumerate(gpus):
                await _call(bus, "RegisterDevice", "ssa{sv}", [addr, f"gpu{i}", {}])
            attaches = [
                _call(bus, "Attach", "sasa{sv}", [f"vm{i}", [f"gpu{i}"], {}]) for i in range(len(gpus))
            ]
            replies = await asyncio.gather(*attaches)
            failed = [r.body for r in replies if r.message_type is not MessageType.METHOD_RETURN]
            assert not failed and len(replies) == 8, failed
            bus.disconnect()

        asyncio.run(go())
    return float(log.read_text().count("stopping nvidia-persistenced.service"))


def ratio(row: Row) -> str:
    return f"{row.ours / row.reference:.2f}x" if row.reference else "-"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--functions", type=int, default=4096)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    parser.add_argument(
        "--only", choices=GROUPS, action="append", help="measure only these rows (repeatable; default all)"
    )
    args = parser.parse_args()
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    rows = bench(args.functions, args.runs, tuple(args.only or GROUPS))
    if args.json:
        out = {
            r.figure: {
                "ours": round(r.ours, 3),
                "unit": r.unit,
                "reference": None if r.reference is None else round(r.reference, 3),
                "reference_is": r.reference_what,
                "ratio": ratio(r),
                "target": r.target,
            }
            for r in rows
        }
        print(json.dumps(out))
        return
    head = f"{'figure':<62} {'vfiod':>10} {'reference':>10} {'ratio':>7}  target"
    print(head)
    print("-" * len(head))
    for r in rows:
        ref = f"{r.reference:.1f} {r.unit}" if r.reference is not None else "-"
        print(f"{r.figure:<62} {r.ours:>7.1f} {r.unit:<3} {ref:>10} {ratio(r):>7}  {r.target}")
    print()
    for r in rows:
        if r.reference_what:
            print(f"reference for {r.figure!r}: {r.reference_what}")
    if LSPCI is None:
        print("lspci is not installed (apt-get install pciutils): no lspci reference")


if __name__ == "__main__":
    main()
