"""Injected faults: files under `<root>/sim/faults/` that make simulated kernel writes hang, fail, slow down,
or make a driver's probe bind nothing or fail.

Faults are files, not Python state, so a test can inject one in its own process and the write it targets
can happen in another (a daemon under test in a child process), and a hung write can be released from
either side. Each fault is `<name>.json`; a hang also uses `<name>.hung` (present while a write is blocked
in it, for `wait_hung`) and `<name>.release` (created by `release`; from then on the fault no longer blocks
anything). This module only reads and writes those files; `SimulatedKernel` decides when they apply.

Kinds:
  hang           the write blocks, holding the device lock, until released; then it completes (or fails
                 with `errno` when `then` is "fail")
  errno          the write fails with `errno` and changes nothing
  delay          the write completes after `seconds`
  probe_nothing  a probe of `pci_address` (by `driver`, if given) binds nothing
  probe_fail     `driver`'s probe of `pci_address` fails with `errno` (default EIO)
`path` (a logical path or fnmatch glob, e.g. /sys/bus/pci/drivers/nvidia/unbind) and `value` (compared the
way sysfs_streq compares) narrow which writes a fault applies to; a probe fault with a `path` applies only to
probes caused by a write to that path. `count` is how many more times it applies (None: until cleared).
"""

from __future__ import annotations

import contextlib
import errno as _errno
import fnmatch
import json
import os
import re
import time
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from vfiod_sim.parsing import streq

KINDS = ("hang", "errno", "delay", "probe_nothing", "probe_fail")
WRITE_KINDS = ("hang", "errno", "delay")
PROBE_KINDS = ("probe_nothing", "probe_fail")
POLL_INTERVAL = 0.02

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,127}")  # no dots: <name>.json, .hung, .release


def _errno_name(value: str | None) -> str | None:
    if value is not None and (not value.startswith("E") or not isinstance(getattr(_errno, value, None), int)):
        raise ValueError(f"{value!r} is not an errno name such as EBUSY")
    return value


class Fault(BaseModel):
    """One fault file, validated: a bad kind, errno name, `then` or count is refused when injected and a
    file that does not validate is ignored when loaded."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Annotated[str, Field(pattern=_NAME_RE.pattern)]
    kind: Literal["hang", "errno", "delay", "probe_nothing", "probe_fail"]
    path: str | None = None
    value: str | None = None
    errno: Annotated[str | None, AfterValidator(_errno_name)] = None
    seconds: float = 0.0
    driver: str | None = None
    pci_address: str | None = None
    count: Annotated[int | None, Field(ge=0)] = None
    then: Literal["complete", "fail"] = "complete"
    hung: bool = False

    @model_validator(mode="after")
    def _complete(self) -> Self:
        if self.kind in WRITE_KINDS and self.path is None:
            raise ValueError(f"a {self.kind} fault needs a path (a logical sysfs path or glob)")
        if (
            self.kind in PROBE_KINDS
            and self.path is None
            and self.pci_address is None
            and self.driver is None
        ):
            raise ValueError(f"a {self.kind} fault needs a pci_address, a driver or a path")
        return self

    @property
    def active(self) -> bool:
        return self.count is None or self.count > 0

    def error_number(self, default: str = "EIO") -> int:
        name = self.errno or default
        return int(getattr(_errno, name))

    def applies_to_write(self, paths: tuple[str, ...], value: bytes) -> bool:
        if self.kind not in WRITE_KINDS or not self.active:
            return False
        if self.path is not None and not any(fnmatch.fnmatchcase(p, self.path) for p in paths):
            return False
        return self.value is None or streq(self.value.encode(), value)

    def applies_to_probe(self, paths: tuple[str, ...], driver: str, pci_address: str) -> bool:
        if self.kind not in PROBE_KINDS or not self.active:
            return False
        if self.path is not None and not any(fnmatch.fnmatchcase(p, self.path) for p in paths):
            return False
        if self.pci_address is not None and self.pci_address != pci_address:
            return False
        return self.driver is None or self.driver == driver

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def faults_dir(root: Path) -> Path:
    return Path(root) / "sim" / "faults"


def _check_name(name: str) -> str:
    if _NAME_RE.fullmatch(name) is None:
        raise ValueError(f"{name!r} is not a fault name (letters, digits, '_' and '-')")
    return name


def _write_json(path: Path, data: dict[str, Any]) -> None:
    # Write-then-rename so a reader in another process never sees half a fault.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def inject(
    root: Path,
    name: str,
    *,
    kind: str,
    path: str | None = None,
    value: str | None = None,
    errno: str | None = None,
    seconds: float = 0.0,
    driver: str | None = None,
    pci_address: str | None = None,
    count: int | None = None,
    then: str = "complete",
) -> Fault:
    """Create (or replace) fault `name`; it applies to writes that start after this returns. ValueError
    (pydantic's ValidationError) for a fault that cannot apply."""
    _check_name(name)
    fault = Fault.model_validate(
        {
            "name": name,
            "kind": kind,
            "path": path,
            "value": value,
            "errno": "EIO" if kind == "errno" and errno is None else errno,
            "seconds": float(seconds),
            "driver": driver,
            "pci_address": pci_address,
            "count": count,
            "then": then,
        }
    )
    d = faults_dir(root)
    d.mkdir(parents=True, exist_ok=True)
    for suffix in (".release", ".hung"):
        with contextlib.suppress(FileNotFoundError):
            (d / f"{name}{suffix}").unlink()
    _write_json(d / f"{name}.json", fault.to_dict())
    return fault


def release(root: Path, name: str) -> None:
    """Let every write hung in `name` complete; the fault stops blocking from now on."""
    d = faults_dir(root)
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{_check_name(name)}.release").touch()


def clear(root: Path, name: str | None = None) -> None:
    """Remove fault `name` (or every fault). A write hung in a removed fault goes on as if released."""
    d = faults_dir(root)
    if not d.is_dir():
        return
    names = (
        [_check_name(name)]
        if name is not None
        else sorted({p.name.split(".")[0] for p in d.iterdir()} - {""})
    )
    for n in names:
        for suffix in (".json", ".hung", ".release"):
            with contextlib.suppress(FileNotFoundError):
                (d / f"{n}{suffix}").unlink()


def load(root: Path, name: str) -> Fault | None:
    try:
        text = (faults_dir(root) / f"{name}.json").read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        return Fault.model_validate({**json.loads(text), "name": name})
    except (ValueError, TypeError):
        return None


def load_all(root: Path) -> list[Fault]:
    d = faults_dir(root)
    try:
        names = sorted(p.name[: -len(".json")] for p in d.iterdir() if p.name.endswith(".json"))
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        if n.startswith("."):
            continue
        f = load(root, n)
        if f is not None:
            out.append(f)
    return out


def take(root: Path, name: str) -> bool:
    """Use up one application of `name`; False if it is gone or exhausted. The caller holds the kernel's
    lock, so two writers cannot both take the last one."""
    f = load(root, name)
    if f is None or not f.active:
        return False
    if f.count is not None:
        _write_json(faults_dir(root) / f"{name}.json", f.model_copy(update={"count": f.count - 1}).to_dict())
    return True


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def set_hung(root: Path, name: str, hung: bool) -> None:
    """Record that a write is (or no longer is) blocked in `name`: the `.hung` marker (holding the writer's
    pid, so a marker left by a killed process is ignored) and `"hung"` in the fault's JSON."""
    d = faults_dir(root)
    marker = d / f"{name}.hung"
    if hung:
        marker.write_text(f"{os.getpid()}\n", encoding="ascii")
    else:
        with contextlib.suppress(FileNotFoundError):
            marker.unlink()
    f = load(root, name)
    if f is not None:
        _write_json(d / f"{name}.json", f.model_copy(update={"hung": hung}).to_dict())


def released(root: Path, name: str) -> bool:
    d = faults_dir(root)
    return (d / f"{name}.release").exists() or not (d / f"{name}.json").exists()


def is_hung(root: Path, name: str) -> bool:
    """A write is blocked in hang fault `name` now (by a process that is still alive)."""
    try:
        text = (faults_dir(root) / f"{_check_name(name)}.hung").read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return False
    return not text.isdigit() or pid_alive(int(text))


def wait_hung(root: Path, name: str, timeout: float) -> bool:
    """Wait until a write is blocked in hang fault `name`; True if it is, False after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        if is_hung(root, name):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_INTERVAL / 2)
