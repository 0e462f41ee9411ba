"""Floods by an unprivileged caller against the real stack: our shipped bus policy on a private system bus,
the real polkitd with our rules, and `vfiod run --simulate synthetic:1024` (512 GPU + audio pairs, so
`ListAvailable {all: true}` answers about half a megabyte).

The flooder (`tests/flood.py`, standard library only) runs as the unprivileged user `stranger` with the
system's python3, from a world-readable copy in the stack's directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import flood
from tests.integration.support.flooding import SYSTEM_PYTHON, reports, start_flood
from tests.integration.support.realstack import (
    HMTEST,
    ROOT,
    STRANGER,
    Stack,
    User,
    gv_opts,
    gv_str,
    gv_strv,
    require_root_and_tools,
    start_stack,
    unavailable,
    vfiod_argv,
)

PROFILE = "synthetic:1024"


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    require_root_and_tools()
    if not Path(SYSTEM_PYTHON).is_file():
        unavailable(f"{SYSTEM_PYTHON} is missing (the flooder runs with the system's python3)")
    argv = vfiod_argv(PROFILE)
    with start_stack(argv) as s:
        shutil.copy(Path(flood.__file__), s.workdir / "flood.py")
        (s.workdir / "list-all.json").write_text(flood.templates(), encoding="utf-8")
        for f in ("flood.py", "list-all.json"):
            os.chmod(s.workdir / f, 0o644)
        yield s


def name_owner(stack: Stack) -> str:
    reply = stack.busctl_json(
        "call",
        "org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus",
        "GetNameOwner",
        "s",
        "org.hypeman.Devices1",
    )
    assert isinstance(reply, dict)
    (owner,) = reply["data"]
    return str(owner)


def vfiod_alive(stack: Stack) -> bool:
    try:
        state = Path(f"/proc/{stack.pids['vfiod']}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_flood_a_frozen_bus_daemon_does_not_take_vfiod_off_the_bus(stack: Stack) -> None:
    """The reproduction: 30 large replies written while dbus-daemon reads nothing for 8 s fill vfiod's
    socket. dbus-fast's own writer gave up on EAGAIN and vfiod lost its name; now every reply arrives."""
    owner = name_owner(stack)
    proc = start_flood(stack, STRANGER, connections=1, in_flight=30, seconds=30, total=30)
    time.sleep(1.0)  # the calls reach vfiod; it scans and answers into a socket nobody reads
    os.kill(stack.pids["dbus-daemon"], signal.SIGSTOP)
    try:
        time.sleep(8)
    finally:
        os.kill(stack.pids["dbus-daemon"], signal.SIGCONT)
    (report,) = reports(proc)
    assert report["sent"] == 30 and report["ok"] == 30, (report, stack.logs())
    assert vfiod_alive(stack), stack.logs()
    assert name_owner(stack) == owner
    r = stack.call(ROOT, "GetHostStatus", "@a{sv} {}")
    assert r.ok, r.describe()


GPU = "0000:01:00.0"  # the first of synthetic:1024's GPUs (its HDMI audio is 01:00.1, in its group)


def timed(stack: Stack, user: User, method: str, *args: str) -> float:
    started = time.monotonic()
    r = stack.call(user, method, *args)
    took = time.monotonic() - started
    assert r.ok, f"{method} by {user.name} during the flood: {r.describe()}"
    return took


def test_flood_eight_callers_leave_root_and_hypeman_served(stack: Stack) -> None:
    """8 connections of an unprivileged user keep 128 ListAvailable(all) each in flight for 10 s, with the
    default configuration. They keep getting answers (Busy only beyond the per-connection cap), vfiod keeps
    its name, and root's GetDevice and hypeman's Attach + Detach are answered throughout."""
    owner = name_owner(stack)
    r = stack.call(ROOT, "RegisterDevice", gv_str(GPU), gv_str("flood-gpu"), gv_opts())
    assert r.ok, r.describe()
    try:
        proc = start_flood(stack, STRANGER, connections=8, in_flight=128, seconds=10)
        time.sleep(1.0)
        worst = {"GetDevice": 0.0, "Attach": 0.0, "Detach": 0.0}
        rounds = 0
        while proc.poll() is None and rounds < 40:
            worst["GetDevice"] = max(
                worst["GetDevice"], timed(stack, ROOT, "GetDevice", gv_str("flood-gpu"), gv_opts())
            )
            worst["Attach"] = max(
                worst["Attach"],
                timed(
                    stack,
                    HMTEST,
                    "Attach",
                    gv_str("vm-flood"),
                    gv_strv(["flood-gpu"]),
                    gv_opts(include_group=True),
                ),
            )
            worst["Detach"] = max(
                worst["Detach"], timed(stack, HMTEST, "Detach", gv_str("vm-flood"), gv_strv([]), gv_opts())
            )
            rounds += 1
        flood_reports = reports(proc)
    finally:
        stack.call(ROOT, "Detach", gv_str("vm-flood"), gv_strv([]), gv_opts())
        stack.call(ROOT, "UnregisterDevice", gv_str("flood-gpu"), gv_opts())
    print(f"worst latencies during the flood over {rounds} rounds: {worst}; flood: {flood_reports}")
    assert rounds >= 2, "the privileged calls did not run during the flood"
    assert all(took < 5.0 for took in worst.values()), worst  # liveness, not speed: the bench has figures
    assert len(flood_reports) == 8
    for rep in flood_reports:
        assert rep["errors"] == {} and rep["unanswered"] == 0, rep
        assert rep["ok"] >= 32, rep  # at least its first cap's worth answered, and then more
    assert vfiod_alive(stack)
    assert name_owner(stack) == owner
