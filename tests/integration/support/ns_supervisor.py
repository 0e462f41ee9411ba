"""Runs inside `unshare -m --propagation private` as root: the real daemons of one integration stack.

Started by `realstack.start_stack` (never imported by the tests themselves). In its private mount
namespace it bind-mounts the test's passwd, group and polkit actions/rules over the host's, then starts
a private system bus (`dbus-daemon` with the test's config), the real `polkitd` (as root: it switches to
user polkitd itself) and optionally `vfiod run --simulate ...`, writes a ready file (JSON: the bus
address and pids, or an error) and waits until its stdin closes. Then it stops only the processes it
started, newest first. The bind mounts vanish with the namespace; nothing on the host changes.

    python ns_supervisor.py CONFIG.json
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


class StartError(Exception):
    pass


def _name_has_owner(address: str, name: str) -> bool:
    r = subprocess.run(
        [
            "busctl",
            f"--address={address}",
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "NameHasOwner",
            "s",
            name,
        ],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return r.returncode == 0 and r.stdout.strip() == "b true"


def _wait_for_name(address: str, name: str, proc: subprocess.Popen[bytes], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StartError(f"{what} exited with status {proc.returncode} before owning {name}")
        if _name_has_owner(address, name):
            return
        time.sleep(0.05)
    raise StartError(f"{what} did not own {name} within {timeout:.0f} s")


def _stop(procs: list[tuple[str, subprocess.Popen[bytes]]]) -> None:
    for _name, proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _write_ready(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.rename(path)


def run(cfg: dict[str, Any]) -> int:
    logs = Path(cfg["logs"])
    ready = Path(cfg["ready"])
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    files: list[IO[bytes]] = []

    def log(name: str) -> IO[bytes]:
        f = open(logs / f"{name}.log", "wb")  # noqa: SIM115 -- closed below, after the process is gone
        files.append(f)
        return f

    try:
        for src, dst in cfg["binds"]:
            subprocess.run(["mount", "--bind", src, dst], check=True, capture_output=True)

        dbus = subprocess.Popen(
            [
                "dbus-daemon",
                f"--config-file={cfg['bus_config']}",
                "--nofork",
                "--nopidfile",
                "--nosyslog",
                "--print-address=1",
            ],
            stdout=subprocess.PIPE,
            stderr=log("dbus-daemon"),
            env={"PATH": PATH},
        )
        procs.append(("dbus-daemon", dbus))
        assert dbus.stdout is not None
        address = dbus.stdout.readline().decode().strip()
        if not address:
            raise StartError(f"dbus-daemon printed no address (status {dbus.poll()})")
        env = {"PATH": PATH, "DBUS_SYSTEM_BUS_ADDRESS": address, "LC_ALL": "C.UTF-8"}

        polkitd = subprocess.Popen([cfg["polkitd"]], stdout=log("polkitd"), stderr=subprocess.STDOUT, env=env)
        procs.append(("polkitd", polkitd))
        _wait_for_name(address, "org.freedesktop.PolicyKit1", polkitd, "polkitd", 20)

        pids = {"dbus-daemon": dbus.pid, "polkitd": polkitd.pid}
        vfiod_argv: list[str] | None = cfg.get("vfiod")
        if vfiod_argv:
            argv = [a.replace("@ADDRESS@", address) for a in vfiod_argv]
            vfiod_env = dict(env, **cfg.get("vfiod_env", {}))
            vfiod = subprocess.Popen(argv, stdout=log("vfiod"), stderr=subprocess.STDOUT, env=vfiod_env)
            procs.append(("vfiod", vfiod))
            _wait_for_name(address, "org.hypeman.Devices1", vfiod, "vfiod run", 60)
            pids["vfiod"] = vfiod.pid

        _write_ready(ready, {"address": address, "pids": pids})
        # Wait for the test to finish: it closes our stdin (or dies, which closes it too).
        sys.stdin.buffer.read()
        return 0
    except (StartError, OSError, subprocess.SubprocessError) as e:
        detail = (
            e.stderr.decode(errors="replace").strip() if isinstance(e, subprocess.CalledProcessError) else ""
        )
        _write_ready(ready, {"error": f"{e} {detail}".strip()})
        return 1
    finally:
        _stop(procs)
        for f in files:
            f.close()


def main() -> int:
    os.umask(0o022)
    with open(sys.argv[1], encoding="utf-8") as f:
        cfg: dict[str, Any] = json.load(f)
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
