"""`vfiod run` as a process: start-up errors and their exit statuses, readiness and the watchdog through
sd_notify, SIGHUP reloading the configuration, a second instance, and SIGTERM letting a call in flight
finish before exit 0."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.bus.conftest import Clients, StartVfiod
from tests.bus.support.harness import Client, LoopThread, PolkitMock, PrivateBus, Reply
from tests.bus.support.helpers import GPU, b, ok, register
from vfiod.bus.names import ACTION_INSPECT, ACTION_REGISTER, BUS_NAME
from vfiod_sim import faults


def vfiod(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "vfiod.cli.daemon", "run", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def daemon_with_log(log: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A long-running vfiod whose log goes to a file (a pipe nobody reads would fill up and block it)."""
    with open(log, "wb") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "vfiod.cli.daemon", "run", *args],
            stdout=subprocess.DEVNULL,
            stderr=f,
            env=env,
        )


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def wait_for_name(c: Client, present: bool = True, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while c.bus_call("NameHasOwner", "s", BUS_NAME).value() != present:
        assert time.monotonic() < deadline, f"{BUS_NAME} {'never appeared' if present else 'stayed'}"
        time.sleep(0.05)


@pytest.fixture
def root_client(bus: PrivateBus, threads: dict[str, LoopThread]) -> Iterator[Client]:
    c = Client(threads["root"], bus.address)
    yield c
    c.close()


def test_bad_configuration_is_one_line_and_status_2(tmp_path: Path, bus: PrivateBus) -> None:
    conf = tmp_path / "vfiod.toml"
    conf.write_text("[deadlines]\ndefault = -1\n", encoding="utf-8")
    proc = vfiod("--bus", bus.address, "--simulate", "workstation-l4", "--config", str(conf))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert f"{conf}: deadlines.default" in lines[0] and "greater than 0" in lines[0]
    assert "Traceback" not in err


def test_unknown_profile_and_missing_config(tmp_path: Path, bus: PrivateBus) -> None:
    proc = vfiod("--bus", bus.address, "--simulate", "no-such-profile")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "no-such-profile" in err and "Traceback" not in err
    proc = vfiod(
        "--bus", bus.address, "--simulate", "workstation-l4", "--config", str(tmp_path / "missing.toml")
    )
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "no such file" in err


def test_unusable_registry_is_status_1(tmp_path: Path, bus: PrivateBus) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "vfiod.db").write_bytes(
        b"this is not a database at all, but it is long enough to be examined" * 3
    )
    proc = vfiod("--bus", bus.address, "--simulate", "workstation-l4", "--state-dir", str(state))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, err
    assert "vfiod.db" in err and "Traceback" not in err


def test_no_bus_is_status_1(tmp_path: Path) -> None:
    proc = vfiod("--bus", f"unix:path={tmp_path}/nothing", "--simulate", "workstation-l4")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "cannot connect" in err


def test_life_of_the_daemon(tmp_path: Path, bus: PrivateBus, root_client: Client) -> None:
    sim = tmp_path / "host"
    conf = tmp_path / "vfiod.toml"
    conf.write_text('register_allow = ["0000:00:14.0"]\n', encoding="utf-8")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(10)
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"), WATCHDOG_USEC="200000")
    log = tmp_path / "vfiod.log"
    args = [
        "--bus",
        bus.address,
        "--simulate",
        "workstation-l4",
        "--sim-root",
        str(sim),
        "--config",
        str(conf),
    ]
    proc = daemon_with_log(log, *args, "--drain-timeout", "20", env=env)
    messages: list[bytes] = []

    def read_notifications() -> None:  # as systemd does: an unread socket would block sd_notify
        with contextlib.suppress(OSError):
            while True:
                messages.append(notify.recv(4096))

    reader = threading.Thread(target=read_notifications, daemon=True)
    reader.start()
    try:
        wait_for_name(root_client)
        wait_until(lambda: any(m.startswith(b"READY=1") for m in messages))
        wait_until(lambda: any(m == b"WATCHDOG=1" for m in messages))
        register(root_client, GPU, "gpu")
        # No OpenSSL in a root daemon that speaks no TLS (vfiod/cli/daemon.py keeps ssl and _hashlib out).
        maps = Path(f"/proc/{proc.pid}/maps").read_text(encoding="utf-8")
        assert "libcrypto" not in maps and "libssl" not in maps

        # a second vfiod on the same bus cannot take the name
        second = vfiod("--bus", bus.address, "--simulate", "workstation-l4")
        _, err = second.communicate(timeout=30)
        assert second.returncode == 1 and "already owned" in err

        # SIGHUP: a bad file is refused and the old configuration kept; a good one is taken
        conf.write_text("register_allow = [42]\n", encoding="utf-8")
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "keeping the old configuration" in log.read_text(encoding="utf-8"))
        conf.write_text('register_allow = ["0000:00:14.0"]\n[deadlines]\ndefault = 5\n', encoding="utf-8")
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "configuration reloaded" in log.read_text(encoding="utf-8"))
        ok(root_client.m("ListDevices", "a{sv}", {}))

        # SIGTERM with a call in flight: the call finishes, then vfiod exits 0
        ok(root_client.m("Bind", "sa{sv}", "gpu", {"include_group": b(True)}))
        faults.inject(sim, "hang", kind="hang", path="/sys/bus/pci/drivers/vfio-pci/unbind")
        replies: list[Reply] = []
        t = threading.Thread(target=lambda: replies.append(root_client.m("Unbind", "sa{sv}", "gpu", {})))
        t.start()
        assert faults.wait_hung(sim, "hang", 10)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        late = root_client.m("ListDevices", "a{sv}", {})
        assert not late.ok  # no new calls while stopping
        faults.release(sim, "hang")
        t.join(30)
        assert replies and replies[0].ok, replies
        assert proc.wait(30) == 0, log.read_text()
        wait_for_name(root_client, present=False)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
    err = log.read_text(encoding="utf-8")
    first = err.splitlines()[0]
    assert "no polkitd" in first or "polkit" in first
    assert "keeping the old configuration" in err and "register_allow.0" in err
    assert any(m.startswith(b"STOPPING=1") for m in messages)
    assert "Traceback" not in err


def test_sighup_reload_takes_effect(
    start_vfiod: StartVfiod, clients: Clients, polkit: PolkitMock, tmp_path: Path
) -> None:
    conf = tmp_path / "vfiod.toml"
    conf.write_text("", encoding="utf-8")
    vfiod = start_vfiod(config_path=conf)
    polkit.allow(ACTION_INSPECT, ACTION_REGISTER)
    usb = "0000:00:14.0"  # not a display controller: admin, unless the allow-list names it
    assert clients.alice.m("RegisterDevice", "ssa{sv}", usb, "usb", {}).short == "NotAuthorized"

    async def reload() -> bool:
        return vfiod.daemon.reload()

    conf.write_text("register_allow = ['nonsense']\n", encoding="utf-8")
    assert not vfiod.lt.run(reload())
    conf.write_text(
        f"register_allow = ['{usb}']\n[deadlines]\ndefault = 7\n[per_caller]\nmax_calls_in_flight = 5\n",
        encoding="utf-8",
    )
    assert vfiod.lt.run(reload())
    assert vfiod.service.max_calls_per_caller == 5
    ok(clients.alice.m("RegisterDevice", "ssa{sv}", usb, "usb", {}))
    assert vfiod.manager.host.deadlines.default == 7


def test_flood_a_lost_bus_connection_exits_non_zero(tmp_path: Path) -> None:
    """However the connection ends (here: dbus-daemon dies under it), vfiod exits 1, so that systemd's
    Restart=on-failure brings it back; it never lingers without its name."""
    own = PrivateBus()
    log = tmp_path / "vfiod.log"
    proc = daemon_with_log(log, "--bus", own.address, "--simulate", "workstation-l4")
    lt = LoopThread("watcher")
    try:
        watcher = Client(lt, own.address)
        wait_for_name(watcher)
        watcher.close()
        own.proc.kill()
        own.proc.wait(5)
        assert proc.wait(30) == 1
        text = log.read_text(encoding="utf-8", errors="replace")
        assert "the bus connection was lost; exiting so the service manager restarts vfiod" in text
        assert "Traceback" not in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        lt.close()
        own.close()
