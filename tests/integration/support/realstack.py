"""The real daemons behind the integration tests: a private system bus, polkitd and (optionally) vfiod.

`start_stack()` prepares, in a fresh world-readable temporary directory:
- passwd/group: copies of the host's with the test users `hmtest` (uid 4242, member of group `hypeman`)
  and `stranger` (uid 4244); `nobody` (65534) comes from the host's copy;
- polkit actions: our shipped `polkit/org.hypeman.devices.policy`; rules: our shipped
  `polkit/50-org.hypeman.devices.rules` over /usr/share/polkit-1/rules.d and an empty /etc/polkit-1/rules.d
  (so neither the host's stock rules nor an admin's can change a decision);
- a system-bus config: Debian's /usr/share/dbus-1/system.conf policy (default deny own/method calls,
  everything else as shipped) listening on a socket of its own and including only a directory holding
  polkit's bus policy and our shipped `dbus/org.hypeman.Devices1.conf`;
then runs `ns_supervisor.py` in `unshare -m --propagation private`, which bind-mounts those and starts the
daemons. Unprivileged callers are `setpriv` + `gdbus`/`busctl`/`pkcheck` (the venv is root's).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
SUPERVISOR = Path(__file__).resolve().parent / "ns_supervisor.py"
POLKITD = "/usr/lib/polkit-1/polkitd"
DEBIAN_SYSTEM_CONF = Path("/usr/share/dbus-1/system.conf")
POLKIT_BUS_CONF = Path("/usr/share/dbus-1/system.d/org.freedesktop.PolicyKit1.conf")
BUS_NAME = "org.hypeman.Devices1"
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
REQUIRE_ENV = "VFIOD_REQUIRE_REAL_DAEMONS"
TOOLS = ("unshare", "setpriv", "mount", "dbus-daemon", "busctl", "gdbus", "pkcheck")


def unavailable(reason: str) -> None:
    """Skip, or fail when VFIOD_REQUIRE_REAL_DAEMONS=1 (CI), where a skipped real-daemon test is a failure."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} (and {REQUIRE_ENV}=1: the real-daemon tests must run here)")
    pytest.skip(reason)


def require_root_and_tools() -> None:
    if os.geteuid() != 0:
        unavailable("the real-daemon tests need root (private mount namespace, polkitd, setpriv)")
    missing = [t for t in TOOLS if shutil.which(t, path=PATH) is None]
    if not Path(POLKITD).is_file():
        missing.append(POLKITD)
    if missing:
        unavailable(f"missing {', '.join(missing)} (make deps installs them)")


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...] = ()


ROOT = User("root", 0, 0)
HYPEMAN_GID = 4243
HMTEST = User("hmtest", 4242, 4242, (HYPEMAN_GID,))
STRANGER = User("stranger", 4244, 4244)
NOBODY = User("nobody", 65534, 65534)
UNPRIVILEGED = (HMTEST, STRANGER, NOBODY)


def as_user(user: User, argv: Sequence[str]) -> list[str]:
    if user.uid == 0:
        return list(argv)
    groups = [f"--groups={','.join(map(str, user.groups))}"] if user.groups else ["--clear-groups"]
    return ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", *groups, "--", *argv]


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def error(self) -> str:
        """The D-Bus error name gdbus reported ("" on success or when it printed none)."""
        m = re.search(r"GDBus\.Error:([A-Za-z_][A-Za-z0-9_.]*)", self.stderr)
        return m.group(1) if m else ""

    def describe(self) -> str:
        return f"rc={self.returncode} stdout={self.stdout.strip()!r} stderr={self.stderr.strip()!r}"


def ok(r: Result, what: str) -> Result:
    """The call succeeded (else fail the test saying what was called and what gdbus said)."""
    assert r.ok, f"{what}: {r.describe()}"
    return r


def refused(r: Result, error: str, what: str) -> None:
    """The call failed with exactly the D-Bus error `error`."""
    assert not r.ok and r.error == error, f"{what}: expected {error}, got {r.describe()}"


def gv_str(s: str) -> str:
    """A GVariant text string literal."""
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def gv_strv(items: Sequence[str]) -> str:
    return "@as [" + ", ".join(gv_str(i) for i in items) + "]"


def gv_opts(**opts: bool | int | str) -> str:
    """An a{sv} literal: bools as b, ints as u (every integer option in the contract is u), strs as s."""
    parts = []
    for key, value in opts.items():
        if isinstance(value, bool):
            v = "<true>" if value else "<false>"
        elif isinstance(value, int):
            v = f"<uint32 {value}>"
        else:
            v = f"<{gv_str(value)}>"
        parts.append(f"{gv_str(key)}: {v}")
    return "@a{sv} {" + ", ".join(parts) + "}"


@dataclass
class Stack:
    address: str
    pids: dict[str, int]
    workdir: Path

    def run(self, user: User, argv: Sequence[str], timeout: float = 120) -> Result:
        env = {"PATH": PATH, "LC_ALL": "C.UTF-8", "DBUS_SYSTEM_BUS_ADDRESS": self.address}
        r = subprocess.run(
            as_user(user, argv), capture_output=True, text=True, env=env, timeout=timeout, check=False
        )
        return Result(r.returncode, r.stdout, r.stderr)

    def gdbus(
        self, user: User, dest: str, path: str, method: str, *args: str, timeout: float = 120
    ) -> Result:
        argv = [
            "gdbus",
            "call",
            "--address",
            self.address,
            "--dest",
            dest,
            "--object-path",
            path,
            "--timeout",
            str(int(timeout)),
            "--method",
            method,
            *args,
        ]
        return self.run(user, argv, timeout=timeout + 10)

    def call(self, user: User, method: str, *args: str, path: str = "/org/hypeman/Devices1") -> Result:
        """A method of org.hypeman.Devices1.Manager (or `Iface.Method` for another interface)."""
        full = method if "." in method else f"org.hypeman.Devices1.Manager.{method}"
        return self.gdbus(user, BUS_NAME, path, full, *args)

    def busctl_json(self, *argv: str) -> object:
        """Run `busctl --json=short` as root and decode the reply (for reading data back)."""
        r = self.run(ROOT, ["busctl", f"--address={self.address}", "--json=short", *argv])
        assert r.ok, f"busctl {' '.join(argv)}: {r.describe()}"
        return json.loads(r.stdout)

    def logs(self) -> str:
        out = []
        for f in sorted((self.workdir / "logs").glob("*.log")):
            text = f.read_text(errors="replace")
            out.append(f"----- {f.name} (last 4000 chars)\n{text[-4000:]}")
        return "\n".join(out)


def _filtered(lines: list[str], names: set[str], ids: set[str]) -> list[str]:
    out = []
    for line in lines:
        fields = line.split(":")
        if len(fields) > 2 and (fields[0] in names or fields[2] in ids):
            continue
        out.append(line)
    return out


def _write_users(etc: Path) -> None:
    names = {HMTEST.name, STRANGER.name, "hypeman"}
    ids = {str(HMTEST.uid), str(STRANGER.uid), str(HYPEMAN_GID)}
    passwd = _filtered(Path("/etc/passwd").read_text().splitlines(), names, ids)
    passwd += [
        f"{u.name}:x:{u.uid}:{u.gid}:vfiod test user:/nonexistent:/usr/sbin/nologin"
        for u in (HMTEST, STRANGER)
    ]
    group = _filtered(Path("/etc/group").read_text().splitlines(), names, ids)
    group += [f"{u.name}:x:{u.gid}:" for u in (HMTEST, STRANGER)]
    group += [f"hypeman:x:{HYPEMAN_GID}:{HMTEST.name}"]
    (etc / "passwd").write_text("\n".join(passwd) + "\n")
    (etc / "group").write_text("\n".join(group) + "\n")


def bus_config(socket: Path, includedir: Path) -> str:
    """Debian's system.conf with its own socket and only `includedir` for service policies."""
    tree = ET.parse(DEBIAN_SYSTEM_CONF)  # noqa: S314 -- a Debian-shipped file, not untrusted input
    root = tree.getroot()
    drop = {"user", "fork", "pidfile", "listen", "includedir", "include", "servicehelper", "syslog"}
    drop |= {"standard_system_servicedirs", "servicedir"}
    for child in list(root):
        if child.tag in drop:
            root.remove(child)
    listen = ET.Element("listen")
    listen.text = f"unix:path={socket}"
    root.insert(1, listen)
    inc = ET.SubElement(root, "includedir")
    inc.text = str(includedir)
    body = ET.tostring(root, encoding="unicode")
    return (
        '<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"\n'
        ' "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">\n' + body + "\n"
    )


def _prepare(work: Path) -> dict[str, object]:
    for sub in ("etc", "actions", "rules", "etc-rules", "bus.d", "bus", "logs"):
        (work / sub).mkdir()
    _write_users(work / "etc")
    shutil.copy(REPO / "polkit/org.hypeman.devices.policy", work / "actions")
    shutil.copy(REPO / "polkit/50-org.hypeman.devices.rules", work / "rules")
    shutil.copy(POLKIT_BUS_CONF, work / "bus.d")
    shutil.copy(REPO / "dbus/org.hypeman.Devices1.conf", work / "bus.d")
    (work / "bus.conf").write_text(bus_config(work / "bus/socket", work / "bus.d"))
    # World-readable on purpose: polkitd (as user polkitd) reads the actions and rules, and the
    # unprivileged callers connect to the bus socket in it. Nothing secret is in it.
    for dirpath, dirnames, filenames in os.walk(work):
        for d in dirnames:
            os.chmod(Path(dirpath) / d, 0o755)  # noqa: S103
        for f in filenames:
            os.chmod(Path(dirpath) / f, 0o644)
    os.chmod(work, 0o755)  # noqa: S103
    binds = [
        (work / "etc/passwd", Path("/etc/passwd")),
        (work / "etc/group", Path("/etc/group")),
        (work / "actions", Path("/usr/share/polkit-1/actions")),
        (work / "rules", Path("/usr/share/polkit-1/rules.d")),
    ]
    if Path("/etc/polkit-1/rules.d").is_dir():
        binds.append((work / "etc-rules", Path("/etc/polkit-1/rules.d")))
    return {
        "binds": [[str(s), str(d)] for s, d in binds],
        "bus_config": str(work / "bus.conf"),
        "logs": str(work / "logs"),
        "ready": str(work / "ready.json"),
        "polkitd": POLKITD,
    }


@contextmanager
def start_stack(vfiod_argv: Sequence[str] | None = None, timeout: float = 90) -> Iterator[Stack]:
    """Start the stack; `vfiod_argv` may use @ADDRESS@ for the bus address."""
    work = Path(tempfile.mkdtemp(prefix="vfiod-realbus-"))
    cfg = _prepare(work)
    if vfiod_argv is not None:
        cfg["vfiod"] = list(vfiod_argv)
        cfg["vfiod_env"] = {"PYTHONUNBUFFERED": "1"}
    (work / "config.json").write_text(json.dumps(cfg))
    proc = subprocess.Popen(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            sys.executable,
            str(SUPERVISOR),
            str(work / "config.json"),
        ],
        stdin=subprocess.PIPE,
        stdout=(work / "logs/supervisor.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    stack: Stack | None = None
    try:
        ready = work / "ready.json"
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if proc.poll() is not None and not ready.exists():
                log = (work / "logs/supervisor.log").read_text(errors="replace")
                raise RuntimeError(f"the stack's supervisor exited with {proc.returncode}: {log[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the stack did not start within {timeout:.0f} s")
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        stack = Stack(address=str(info.get("address", "")), pids=dict(info.get("pids", {})), workdir=work)
        if "error" in info:
            raise RuntimeError(f"the stack failed to start: {info['error']}\n{stack.logs()}")
        yield stack
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


def vfiod_argv(profile: str) -> list[str]:
    """`vfiod run --simulate PROFILE` on the stack's bus (`@ADDRESS@` is replaced by start_stack)."""
    script = Path(sys.executable).parent / "vfiod"
    base = [str(script)] if script.exists() else [sys.executable, "-m", "vfiod.cli.daemon"]
    r = subprocess.run([*base, "run", "--help"], capture_output=True, text=True, timeout=60, check=False)
    if r.returncode != 0:
        unavailable("vfiod run not implemented yet")
    return [*base, "run", "--simulate", profile, "--bus", "@ADDRESS@"]
