"""Guest-side runner: `python3 -m tests.e2e.guest_runner SUITE --out /out`, run by the guest's init.

Runs one group of scenarios in the booted guest and writes, to the `out` share:
    results.tap          one TAP line per scenario (the host's pytest reports each as its own test)
    trace/<name>.json    the scenario's trace (see trace.py)
    logs/<name>.log      what the scenario printed and what vfiod logged meanwhile
Exit status 0 when every scenario passed, 1 otherwise (carried out through isa-debug-exit).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tests.e2e import handoff, service, tap, trace, variants


def _echo(text: str) -> None:
    print(text, flush=True)


def run_trace_suite(out: Path, only: Sequence[str] = ()) -> int:
    rig = trace.RealRig()
    _echo(f"guest kernel {rig.kernel_release()} ({os.uname().version})")
    for addr, driver in trace.driver_table(rig.host).items():
        _echo(f"  {addr} driver {driver or '-'} group {rig.host.iommu_group(trace.A(addr))}")
    writer = tap.TapWriter(out / "results.tap", len(trace.SCENARIOS))
    failed = 0
    root_logger = logging.getLogger()
    root_logger.setLevel(logging.INFO)
    for name in trace.SCENARIOS:
        log_path = out / "logs" / f"{name}.log"
        handler = logging.FileHandler(log_path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        root_logger.addHandler(handler)
        try:
            result = trace.run_scenario(rig, name, _echo)
        finally:
            root_logger.removeHandler(handler)
            handler.close()
        with open(log_path, "a", encoding="utf-8") as f:
            f.write("\n".join(result.log) + "\n")
        (out / "trace" / f"{name}.json").write_text(
            json.dumps(result.to_json(), indent=1, sort_keys=True) + "\n", encoding="utf-8"
        )
        diagnostics = [f"duration {result.duration:.2f} s"]
        if not result.ok:
            failed += 1
            diagnostics.append(f"FAILED: {result.failure}")
        writer.result(name, result.ok, diagnostics)
    writer.close()
    _echo(
        "final drivers: " + ", ".join(f"{a[5:]}={d or '-'}" for a, d in trace.driver_table(rig.host).items())
    )
    return 1 if failed else 0


def _run_scenarios(
    out: Path,
    scenarios: dict[str, Callable[[service.Guest], None]],
    depends: dict[str, str],
    guest: service.Guest,
    lines: list[str],
) -> int:
    writer = tap.TapWriter(out / "results.tap", len(scenarios))
    failed: set[str] = set()
    try:
        for name, scenario in scenarios.items():
            needs = depends.get(name)
            if needs in failed:
                failed.add(name)
                writer.result(name, False, [f"not run: {needs} failed"])
                continue
            lines.clear()
            pos = guest.log_position()
            started = time.monotonic()
            failure: str | None = None
            try:
                scenario(guest)
            except trace.ScenarioFailed as e:
                failure = str(e)
            except Exception as e:
                failure = f"{type(e).__name__}: {e}"
            seconds = time.monotonic() - started
            daemon_log = guest.log_since(pos)
            (out / "logs" / f"{name}.log").write_text(
                "\n".join(lines) + "\n--- vfiod / daemon log during the scenario ---\n" + daemon_log,
                encoding="utf-8",
            )
            diagnostics = [f"duration {seconds:.2f} s"]
            if failure:
                failed.add(name)
                diagnostics.append(f"FAILED: {failure}")
                _echo(f"[{name}] FAILED: {failure}")
            writer.result(name, failure is None, diagnostics)
    finally:
        writer.close()
    return 1 if failed else 0


def _guest(out: Path, lines: list[str]) -> service.Guest:
    def say(text: str) -> None:
        lines.append(text)
        _echo(text)

    return service.Guest(out=out, say=say)


def run_service_suite(out: Path, only: Sequence[str] = ()) -> int:
    """The installed package under a fast init (system dbus-daemon + polkitd, bus activation); `only`:
    just these scenarios, in the suite's order."""
    _echo(f"guest kernel {os.uname().release} ({os.uname().version})")
    lines: list[str] = []
    guest = _guest(out, lines)
    chosen = {n: sc for n, sc in service.FAST_INIT.items() if not only or n in only}
    try:
        return _run_scenarios(out, chosen, service.DEPENDS, guest, lines)
    finally:
        guest.stop_services()


def run_systemd_suite(out: Path, only: Sequence[str] = ()) -> int:
    """The installed package under systemd as PID 1 (prepared by guest/systemd-prepare.sh)."""
    return _under_systemd(out, service.SYSTEMD, service.SYSTEMD_DEPENDS)


def run_variants_suite(out: Path, only: Sequence[str] = ()) -> int:
    """vfio variant drivers and the descriptor hand-over, under systemd as PID 1 on a kernel that builds
    them and has VFIO cdevs and iommufd (tests/e2e/variants.py, tests/e2e/handoff.py)."""
    return _under_systemd(
        out,
        {**variants.VARIANTS, **handoff.HANDOFF},
        {**variants.VARIANTS_DEPENDS, **handoff.HANDOFF_DEPENDS},
    )


def _under_systemd(
    out: Path, scenarios: dict[str, Callable[[service.Guest], None]], depends: dict[str, str]
) -> int:
    _echo(f"guest kernel {os.uname().release} ({os.uname().version})")
    lines: list[str] = []
    guest = _guest(out, lines)
    guest.bus_log = out / "logs" / "vfiod-journal.log"
    journal = subprocess.Popen(
        [
            "journalctl",
            "-f",
            "-n",
            "0",
            "-u",
            "vfiod.service",
            "-u",
            "fake-persistenced.service",
            "-o",
            "short-monotonic",
        ],
        stdout=open(guest.bus_log, "ab"),  # noqa: SIM115 - handed to journalctl
        stderr=subprocess.DEVNULL,
    )
    try:
        return _run_scenarios(out, scenarios, depends, guest, lines)
    finally:
        journal.terminate()
        with open(out / "journal.log", "wb") as f:
            subprocess.run(["journalctl", "-b", "--no-pager", "-o", "short-monotonic"], stdout=f, check=False)


def report_exit(code: int) -> None:
    """isa-debug-exit: QEMU exits at once with (code << 1) | 1."""
    os.sync()
    fd = os.open("/dev/port", os.O_WRONLY)
    try:
        os.lseek(fd, 0xF4, os.SEEK_SET)
        os.write(fd, bytes([code & 0xFF]))
    finally:
        os.close(fd)


SUITES = {
    "trace": run_trace_suite,
    "service": run_service_suite,
    "systemd": run_systemd_suite,
    "variants": run_variants_suite,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="guest_runner")
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("--out", type=Path, default=Path("/out"))
    parser.add_argument("--report-exit", action="store_true", help="end the guest through isa-debug-exit")
    parser.add_argument("--only", default="", help="comma-separated scenarios (service suite): only these")
    args = parser.parse_args(argv)
    for d in ("logs", "trace"):
        (args.out / d).mkdir(parents=True, exist_ok=True)
    code = 1
    try:
        only = [n for n in args.only.split(",") if n]
        unknown = sorted(set(only) - set(service.FAST_INIT))
        if unknown:
            parser.error(f"unknown scenarios: {', '.join(unknown)}")
        code = SUITES[args.suite](args.out, only)
    finally:
        if args.report_exit:
            report_exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
