"""Privileged calls under an unprivileged read flood, on the real stack (our bus policy on a private system
bus, the real polkitd with our rules, `vfiod run --simulate synthetic:N`).

Prints a table: root's GetDevice latency (p50, p99, max; an in-process dbus-fast client calling back to
back) and hypeman's Attach + Detach (gdbus as the `hypeman` member, wall time per pair), idle and while
`stranger` keeps CONNECTIONS x IN_FLIGHT `ListAvailable {all: true}` calls in flight; and what the flood
itself got (answers, Busy refusals, unanswered). It asserts nothing. Needs root (mount namespace, setpriv).

    .venv/bin/python bench/bench_flood.py [--functions 1024] [--connections 8] [--in-flight 128]
                                          [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import flood
from tests.integration.support.flooding import reports, start_flood
from tests.integration.support.realstack import (
    HMTEST,
    ROOT,
    STRANGER,
    Stack,
    gv_opts,
    gv_str,
    gv_strv,
    start_stack,
)

GPU = "0000:01:00.0"


class RootCaller:
    """Calls GetDevice as root, back to back, on a loop thread of its own, and records each latency."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.latencies: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        bus = await MessageBus(bus_address=self.address).connect()
        while not self._stop.is_set():
            started = time.monotonic()
            reply = await bus.call(
                Message(
                    destination="org.hypeman.Devices1",
                    path="/org/hypeman/Devices1",
                    interface="org.hypeman.Devices1.Manager",
                    member="GetDevice",
                    signature="sa{sv}",
                    body=["bench-gpu", {}],
                )
            )
            self.latencies.append(time.monotonic() - started)
            if reply is None or reply.message_type is not MessageType.METHOD_RETURN:
                self.failures += 1
            await asyncio.sleep(0.01)
        bus.disconnect()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def attach_detach(stack: Stack, seconds: float) -> list[float]:
    pairs = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.monotonic()
        a = stack.call(
            HMTEST, "Attach", gv_str("bench-vm"), gv_strv(["bench-gpu"]), gv_opts(include_group=True)
        )
        d = stack.call(HMTEST, "Detach", gv_str("bench-vm"), gv_strv([]), gv_opts())
        if not (a.ok and d.ok):
            raise SystemExit(f"Attach/Detach failed: {a.describe()} {d.describe()}")
        pairs.append(time.monotonic() - started)
    return pairs


def quantiles(xs: list[float]) -> tuple[float, float, float]:
    xs = sorted(xs)
    p99 = xs[min(len(xs) - 1, int(len(xs) * 0.99))]
    return statistics.median(xs), p99, xs[-1]


def phase(stack: Stack, seconds: float) -> tuple[list[float], list[float]]:
    root = RootCaller(stack.address)
    root.start()
    pairs = attach_detach(stack, seconds)
    root.stop()
    if root.failures:
        raise SystemExit(f"{root.failures} GetDevice calls by root failed")
    return root.latencies, pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--functions", type=int, default=1024)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--in-flight", type=int, default=128)
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_flood needs root (a private mount namespace for polkitd, setpriv)")
    vfiod = str(Path(sys.executable).parent / "vfiod")
    argv = [vfiod, "run", "--simulate", f"synthetic:{args.functions}", "--bus", "@ADDRESS@"]
    with start_stack(argv) as stack:
        shutil.copy(Path(flood.__file__), stack.workdir / "flood.py")
        (stack.workdir / "list-all.json").write_text(flood.templates(), encoding="utf-8")
        for f in ("flood.py", "list-all.json"):
            os.chmod(stack.workdir / f, 0o644)
        r = stack.call(ROOT, "RegisterDevice", gv_str(GPU), gv_str("bench-gpu"), gv_opts())
        if not r.ok:
            raise SystemExit(r.describe())
        idle = phase(stack, min(args.seconds, 5.0))
        proc = start_flood(stack, STRANGER, args.connections, args.in_flight, args.seconds)
        time.sleep(0.5)
        loaded = phase(stack, args.seconds - 1.0)
        got = reports(proc)
    print(
        f"flood: {args.connections} connections x {args.in_flight} ListAvailable(all) in flight for "
        f"{args.seconds:g} s, synthetic:{args.functions} (as uid {STRANGER.uid})"
    )
    print(f"{'measure':<34} {'n':>5} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}")
    for label, (gets, pairs) in (("idle", idle), ("under flood", loaded)):
        for what, xs in ((f"root GetDevice, {label}", gets), (f"hypeman Attach+Detach, {label}", pairs)):
            p50, p99, worst = quantiles(xs)
            print(f"{what:<34} {len(xs):>5} {p50 * 1000:>9.1f} {p99 * 1000:>9.1f} {worst * 1000:>9.1f}")
    ok = sum(g["ok"] for g in got)
    busy = sum(g["busy"] for g in got)
    lost = sum(g["unanswered"] for g in got)
    errors = sum(sum(g["errors"].values()) for g in got)
    print(f"flood answered: {ok} ok, {busy} Busy, {errors} other errors, {lost} unanswered")


if __name__ == "__main__":
    main()
