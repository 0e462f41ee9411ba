"""Fake processes under `<root>/proc/<pid>/`: what vfiod's busy checks read about a process.

Each process has `comm` (the executable's base name cut to 15 characters, as the kernel's TASK_COMM_LEN
does), `cmdline` (NUL-separated), `exe` (a symlink whose target is the logical path, e.g.
/usr/bin/qemu-system-x86_64: dangling here, which is fine because `Host` only readlinks it), `status`
(Name, Pid, Uid with real/effective/saved/fs ids), `cgroup` (cgroup v2, `0::/system.slice/<unit>`),
`limits` (the kernel's table, with the `Max locked memory` row VMMs care about) and `fd/<n>`, symlinks to
the logical paths the process holds open (/dev/vfio/12, /dev/nvidia0, /dev/dri/renderD128).

The simulated kernel reads the same fd links to decide whether a group node is already open (EBUSY),
whether an unbind blocks, and whether a module is in use, so adding or removing a process here is how a
test starts or stops "a VMM holding the device". When `fd/` is made unreadable its links move to
`<root>/sim/hidden-fd/<pid>/`: the kernel still knows what the process holds, Host no longer can.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from vfiod_sim.model import ProcessSpec, Profile

TASK_COMM_LEN = 16  # including the NUL: comm shows at most 15 characters
DEFAULT_MEMLOCK: tuple[int | None, int | None] = (8 * 1024 * 1024, 8 * 1024 * 1024)  # systemd's default
FIRST_AUTO_PID = 4000

Memlock = tuple[int | None, int | None] | None

_NVIDIA_NODE_RE = re.compile(r"nvidia(\d+)")
# What /proc/<pid>/fd/<n> shows for a VFIO device file (VFIO_GROUP_GET_DEVICE_FD's anonymous inode): not
# which device, so the simulator keeps that in <root>/sim/vfio-device-files.json.
VFIO_DEVICE_FILE = "anon_inode:[vfio-device]"

# fs/proc/base.c lnames[]: (name, unit, soft, hard) for every row but memlock.
_LIMITS: tuple[tuple[str, str, str, str], ...] = (
    ("Max cpu time", "seconds", "unlimited", "unlimited"),
    ("Max file size", "bytes", "unlimited", "unlimited"),
    ("Max data size", "bytes", "unlimited", "unlimited"),
    ("Max stack size", "bytes", "8388608", "unlimited"),
    ("Max core file size", "bytes", "0", "unlimited"),
    ("Max resident set", "bytes", "unlimited", "unlimited"),
    ("Max processes", "processes", "127573", "127573"),
    ("Max open files", "files", "1024", "524288"),
    ("Max locked memory", "bytes", "", ""),
    ("Max address space", "bytes", "unlimited", "unlimited"),
    ("Max file locks", "locks", "unlimited", "unlimited"),
    ("Max pending signals", "signals", "127573", "127573"),
    ("Max msgqueue size", "bytes", "819200", "819200"),
    ("Max nice priority", "", "0", "0"),
    ("Max realtime priority", "", "0", "0"),
    ("Max realtime timeout", "us", "unlimited", "unlimited"),
)


def proc_dir(root: Path) -> Path:
    return Path(root) / "proc"


def _hidden_dir(root: Path) -> Path:
    return Path(root) / "sim" / "hidden-fd"


def limits_text(memlock: Memlock) -> str:
    """/proc/<pid>/limits as fs/proc/base.c proc_pid_limits prints it."""

    def fmt(v: int | None) -> str:
        return "unlimited" if v is None else str(v)

    soft, hard = (None, None) if memlock is None else memlock
    lines = [f"{'Limit':<25} {'Soft Limit':<20} {'Hard Limit':<20} {'Units':<10}\n"]
    for name, unit, s, h in _LIMITS:
        cur_soft, cur_hard = (fmt(soft), fmt(hard)) if name == "Max locked memory" else (s, h)
        row = f"{name:<25} {cur_soft:<20} {cur_hard:<20} "
        lines.append(row + (f"{unit:<10}" if unit else "") + "\n")
    return "".join(lines)


def _cgroup_text(unit: str | None, uid: int) -> str:
    if unit is None:
        return f"0::/user.slice/user-{uid}.slice/session-1.scope\n"
    if unit.endswith(".scope"):
        return f"0::/user.slice/user-{uid}.slice/{unit}\n"
    return f"0::/system.slice/{unit}\n"


def _status_text(comm: str, pid: int, uid: int, gid: int) -> str:
    return (
        f"Name:\t{comm}\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t{pid}\nNgid:\t0\nPid:\t{pid}\nPPid:\t1\n"
        f"TracerPid:\t0\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nGid:\t{gid}\t{gid}\t{gid}\t{gid}\nFDSize:\t64\n"
        "Groups:\t\nThreads:\t1\n"
    )


def _publish(root: Path, staged: Path, pid: int | None, status: Callable[[int], str]) -> int:
    """Move a fully written process directory into place under its pid (the given one, or the next free
    one). A rename is atomic: a process appears whole or not at all, even if whoever starts it is killed
    half-way (a half-written entry would look like a process outside its unit and block its pid)."""
    base = proc_dir(root)
    if pid is not None:
        if pid < 1:
            raise ValueError("a pid is a positive number")
        candidates: Iterable[int] = [pid]
    else:
        existing = [int(n) for n in os.listdir(base) if n.isdigit()]
        candidates = itertools.count(max([FIRST_AUTO_PID - 1, *existing]) + 1)
    for candidate in candidates:
        target = base / str(candidate)
        if target.exists():
            continue
        (staged / "status").write_text(status(candidate), encoding="utf-8")  # it names the pid
        try:
            os.rename(staged, target)  # onto a missing name only; a pid taken meanwhile: next one
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            continue
        return candidate
    shutil.rmtree(staged, ignore_errors=True)
    raise FileExistsError(f"pid {pid} is taken")


def add_process(
    root: Path,
    *,
    exe: str,
    pid: int | None = None,
    uid: int = 0,
    gid: int | None = None,
    fds: Iterable[str] = (),
    cgroup_unit: str | None = None,
    memlock: Memlock = DEFAULT_MEMLOCK,
    args: Sequence[str] | None = None,
    comm: str | None = None,
) -> int:
    """Start a fake process holding `fds` (logical paths) open; returns its pid. `memlock` is the
    (soft, hard) RLIMIT_MEMLOCK in bytes, None for unlimited."""
    if not exe.startswith("/"):
        raise ValueError("exe is the absolute logical path of the executable")
    base = proc_dir(root)
    base.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=".starting-", dir=base))
    name = (comm if comm is not None else os.path.basename(exe))[: TASK_COMM_LEN - 1]
    argv = list(args) if args is not None else [exe]
    (staged / "comm").write_text(name + "\n", encoding="utf-8")
    (staged / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in argv))
    os.symlink(exe, staged / "exe")
    (staged / "cgroup").write_text(_cgroup_text(cgroup_unit, uid), encoding="utf-8")
    (staged / "limits").write_text(limits_text(memlock), encoding="utf-8")
    fd_dir = staged / "fd"
    fd_dir.mkdir()
    for n, target in enumerate(["/dev/null", "/dev/null", "/dev/null", *fds]):
        os.symlink(target, fd_dir / str(n))
    os.chmod(staged, 0o755)  # noqa: S103 -- like /proc/<pid>: anyone may look
    return _publish(root, staged, pid, lambda p: _status_text(name, p, uid, uid if gid is None else gid))


def _fd_dir(root: Path, pid: int) -> Path:
    visible = proc_dir(root) / str(pid) / "fd"
    if visible.is_dir():
        return visible
    hidden = _hidden_dir(root) / str(pid)
    if hidden.is_dir():
        return hidden
    raise ProcessLookupError(f"no simulated process {pid}")


def add_fd(root: Path, pid: int, target: str) -> int:
    """The process opens `target` (a logical path); returns the new fd number."""
    d = _fd_dir(root, pid)
    used = {int(n) for n in os.listdir(d) if n.isdigit()}
    fd = next(n for n in range(len(used) + 1) if n not in used)
    os.symlink(target, d / str(fd))
    return fd


def _device_files_path(root: Path) -> Path:
    return Path(root) / "sim" / "vfio-device-files.json"


def open_vfio_device(root: Path, pid: int, addr: str) -> int:
    """The process gets a VFIO device file of `addr` (VFIO_GROUP_GET_DEVICE_FD); returns its fd. It keeps
    the group open in the kernel (its group file) until closed, even after the group fd is."""
    fd = add_fd(root, pid, VFIO_DEVICE_FILE)
    table = _device_files(root)
    table[f"{pid}:{fd}"] = addr
    _device_files_path(root).write_text(json.dumps(table, sort_keys=True), encoding="utf-8")
    return fd


def _device_files(root: Path) -> dict[str, str]:
    path = _device_files_path(root)
    return dict(json.loads(path.read_text(encoding="utf-8"))) if path.exists() else {}


def vfio_device_holders(root: Path, addrs: Iterable[str]) -> list[tuple[int, str]]:
    """(pid, address) for every VFIO device file of one of `addrs` a process still holds."""
    wanted = set(addrs)
    if not wanted:
        return []
    out = []
    for key, addr in _device_files(root).items():
        pid, _, fd = key.partition(":")
        if addr not in wanted:
            continue
        with contextlib.suppress(OSError, ProcessLookupError):
            if os.readlink(_fd_dir(root, int(pid)) / fd) == VFIO_DEVICE_FILE:
                out.append((int(pid), addr))
    return sorted(out)


def close_fd(root: Path, pid: int, target: str) -> None:
    """The process closes every fd it holds on `target`."""
    d = _fd_dir(root, pid)
    for name in os.listdir(d):
        with contextlib.suppress(OSError):
            if os.readlink(d / name) == target:
                os.unlink(d / name)


def remove_process(root: Path, pid: int) -> None:
    """The process exits (closing everything it held). Removing a missing process is not an error."""
    shutil.rmtree(proc_dir(root) / str(pid), ignore_errors=True)
    shutil.rmtree(_hidden_dir(root) / str(pid), ignore_errors=True)
    table = _device_files(root)
    kept = {k: a for k, a in table.items() if not k.startswith(f"{pid}:")}
    if kept != table:  # its device files close with it: a later process with this pid holds none
        _device_files_path(root).write_text(json.dumps(kept, sort_keys=True), encoding="utf-8")


def set_fd_unreadable(root: Path, pid: int) -> None:
    """Make /proc/<pid>/fd unlistable, as it is for a process vfiod may not inspect.

    The directory is replaced by a regular file so listing it fails with ENOTDIR: tests and the demo run
    as root, and CAP_DAC_OVERRIDE lets root read a directory whatever chmod says, so mode bits cannot make
    it unreadable. The links move to sim/hidden-fd/<pid> because the kernel still knows what is open.
    """
    fd_dir = proc_dir(root) / str(pid) / "fd"
    if not fd_dir.is_dir():
        raise ProcessLookupError(f"no simulated process {pid} with a readable fd directory")
    hidden = _hidden_dir(root)
    hidden.mkdir(parents=True, exist_ok=True)
    os.replace(fd_dir, hidden / str(pid))
    fd_dir.write_bytes(b"")
    os.chmod(fd_dir, 0)


def pids(root: Path) -> list[int]:
    try:
        return sorted(int(n) for n in os.listdir(proc_dir(root)) if n.isdigit())
    except FileNotFoundError:
        return []


def open_files(root: Path) -> dict[int, list[str]]:
    """pid -> logical paths it holds open: the kernel's view, including processes whose fd/ Host cannot
    read. A process or fd that disappears while being read is skipped."""
    out: dict[int, list[str]] = {}
    for pid in pids(root):
        try:
            d = _fd_dir(root, pid)
            names = os.listdir(d)
        except (ProcessLookupError, OSError):
            continue
        targets = []
        for name in names:
            with contextlib.suppress(OSError):
                targets.append(os.readlink(d / name))
        out[pid] = targets
    return out


def holders(root: Path, paths: Iterable[str]) -> list[tuple[int, str]]:
    """Every (pid, path) where a simulated process holds one of the logical `paths` open."""
    wanted = set(paths)
    if not wanted:
        return []
    return sorted(
        (pid, t) for pid, targets in open_files(root).items() for t in sorted(set(targets)) if t in wanted
    )


def unit_of_pid(root: Path, pid: int) -> str | None:
    try:
        text = (proc_dir(root) / str(pid) / "cgroup").read_text(encoding="utf-8")
    except OSError:
        return None
    last = text.strip().rpartition(":")[2].rstrip("/").rpartition("/")[2]
    return last or None


def _nvidia_gpu_nodes(root: Path) -> list[str]:
    try:
        names = os.listdir(Path(root) / "dev")
    except FileNotFoundError:
        return []
    minors = sorted(int(m[1]) for n in names if (m := _NVIDIA_NODE_RE.fullmatch(n)))
    return [f"/dev/nvidia{m}" for m in minors]


def start(root: Path, spec: ProcessSpec) -> int | None:
    """Start a profile's process as it would start now: it opens the declared nodes that exist (and every
    /dev/nvidiaN if it holds GPUs). None if its pid is taken."""
    fds = [f for f in spec.fds if f.startswith("/dev/") and os.path.lexists(Path(root) / f[1:])]
    if spec.hold_nvidia_gpus:
        fds += [n for n in _nvidia_gpu_nodes(root) if n not in fds]
    try:
        return add_process(
            root,
            exe=spec.exe,
            pid=spec.pid,
            uid=spec.uid,
            fds=fds,
            cgroup_unit=spec.cgroup_unit,
            args=spec.args or None,
        )
    except FileExistsError:
        return None


def _profile(root: Path) -> Profile:
    return Profile.from_json((Path(root) / "sim" / "profile.json").read_text(encoding="utf-8"))


def stop_unit(root: Path, unit: str) -> list[int]:
    """Stop every process in systemd unit `unit` (what `systemctl stop` does); returns their pids."""
    stopped = [pid for pid in pids(root) if unit_of_pid(root, pid) == unit]
    for pid in stopped:
        remove_process(root, pid)
    return stopped


def start_unit(root: Path, unit: str) -> list[int]:
    """Start the profile's processes of `unit` that are not running; returns their pids."""
    started = []
    for spec in _profile(root).processes:
        if spec.cgroup_unit == unit:
            pid = start(root, spec)
            if pid is not None:
                started.append(pid)
    return started


def unit_active(root: Path, unit: str) -> bool:
    return any(unit_of_pid(root, pid) == unit for pid in pids(root))


def reset(root: Path, profile: Profile) -> None:
    """Boot: every process is gone, then the profile's own start."""
    for pid in pids(root):
        remove_process(root, pid)
    shutil.rmtree(_hidden_dir(root), ignore_errors=True)
    for spec in profile.processes:
        start(root, spec)
