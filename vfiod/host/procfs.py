"""What vfiod reads from /proc and from modprobe's configuration: the process table (who holds which device
node, an executable, a cgroup, the memlock limit), mounts, swap areas, default routes, the kernel command
line, and the modprobe.d files in the order modprobe reads them.

All of it goes through `Host` (its roots and its read primitives), so a simulated or copied tree reads the
same way as the real host; nothing here raises for an unreadable or malformed file (a missing /proc file
is an empty one).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vfiod.host.errors import ProcUnreadable
from vfiod.host.host import Host

_OCTAL_ESCAPE_RE = re.compile(r"\\([0-7]{3})")
_RTF_UP = 0x0001  # include/uapi/linux/route.h
_RTF_REJECT = 0x0200


def unescape(text: str) -> str:
    """mountinfo and /proc/swaps write space, tab, newline and backslash as octal escapes."""
    return _OCTAL_ESCAPE_RE.sub(lambda m: chr(int(m[1], 8)), text)


@dataclass(frozen=True)
class Mount:
    """One line of a mountinfo file."""

    majmin: str
    mountpoint: str
    fstype: str
    source: str


def parse_mountinfo(text: str) -> list[Mount]:
    out = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) < sep + 3:
            continue
        out.append(
            Mount(
                majmin=fields[2],
                mountpoint=unescape(fields[4]),
                fstype=fields[sep + 1],
                source=unescape(fields[sep + 2]),
            )
        )
    return out


def mounts(host: Host) -> list[Mount]:
    """Our own mount namespace plus PID 1's (the host's, if vfiod runs in a private one), deduplicated."""
    seen: set[Mount] = set()
    out: list[Mount] = []
    for rel in ("self/mountinfo", "1/mountinfo"):
        text = host.read_text(host.roots.proc / rel)
        if text is None:
            continue
        for m in parse_mountinfo(text):
            if m not in seen:
                seen.add(m)
                out.append(m)
    return out


def swap_partitions(host: Host) -> list[str]:
    """The block devices of /proc/swaps (`/dev/nvme0n1p3`); a swap file lives on a mounted filesystem."""
    out = []
    for line in (host.read_text(host.roots.proc / "swaps") or "").splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2 and parts[1] == "partition":
            out.append(unescape(parts[0]))
    return out


def default_route_interfaces(host: Host) -> dict[str, set[str]]:
    """Interface name -> the families ("IPv4", "IPv6") whose default route leaves through it."""
    out: dict[str, set[str]] = {}
    v4 = host.read_text(host.roots.proc / "net/route") or ""
    for line in v4.splitlines()[1:]:
        f = line.split()
        if len(f) < 8:
            continue
        try:
            flags = int(f[3], 16)
        except ValueError:
            continue
        if f[1] == "00000000" and f[7] == "00000000" and flags & _RTF_UP and not flags & _RTF_REJECT:
            out.setdefault(f[0], set()).add("IPv4")
    v6 = host.read_text(host.roots.proc / "net/ipv6_route") or ""
    for line in v6.splitlines():
        f = line.split()
        if len(f) < 10:
            continue
        try:
            flags = int(f[8], 16)
        except ValueError:
            continue
        if f[0] == "0" * 32 and f[1] == "00" and flags & _RTF_UP and not flags & _RTF_REJECT and f[9] != "lo":
            out.setdefault(f[9], set()).add("IPv6")
    return out


def cpu_vendor(host: Host) -> str:
    """The first CPU's `vendor_id` in /proc/cpuinfo (GenuineIntel, AuthenticAMD, ...); "" if unknown."""
    for line in (host.read_text(host.roots.proc / "cpuinfo") or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "vendor_id":
            return value.strip()
    return ""


def cmdline(host: Host) -> str:
    """The kernel command line, "" if unreadable."""
    return host.read_text(host.roots.proc / "cmdline") or ""


@dataclass(frozen=True)
class ModprobeFile:
    path: str  # as the host names it: "/etc/modprobe.d/vfio.conf"
    text: str


def modprobe_dirs(host: Host) -> list[tuple[str, Path]]:
    """(logical directory, where it is read from) in modprobe's order of precedence (modprobe.d(5)):
    /etc, /run, /usr/local/lib, /lib and /usr/lib."""
    r = host.roots
    return [
        ("/etc/modprobe.d", r.etc / "modprobe.d"),
        ("/run/modprobe.d", r.run / "modprobe.d"),
        ("/usr/local/lib/modprobe.d", r.usr / "local/lib/modprobe.d"),
        ("/lib/modprobe.d", r.lib / "modprobe.d"),
        ("/usr/lib/modprobe.d", r.usr / "lib/modprobe.d"),
    ]


def modprobe_files(host: Host) -> list[ModprobeFile]:
    """Every `*.conf` modprobe reads, in the order it reads them: sorted by file name across the
    directories, a name in an earlier directory hiding the same name in later ones (so
    /etc/modprobe.d/x.conf overrides, and an empty one disables, a packaged /lib/modprobe.d/x.conf).
    On a merged-/usr system /lib is /usr/lib: a directory reached twice is read once."""
    chosen: dict[str, ModprobeFile | None] = {}
    seen_dirs: set[Path] = set()
    for logical, real in modprobe_dirs(host):
        resolved = real.resolve()
        if resolved in seen_dirs:
            continue
        seen_dirs.add(resolved)
        for name in host.list_dir(real):
            if not name.endswith(".conf") or name in chosen:
                continue  # modprobe reads only *.conf; the first directory with a name wins
            text = host.read_text(real / name)  # an unreadable one still hides the later ones
            chosen[name] = None if text is None else ModprobeFile(f"{logical}/{name}", text)
    return [f for name in sorted(chosen) if (f := chosen[name]) is not None]


# ----- processes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessInfo:
    """What the busy checks need to know about a process holding something open."""

    pid: int
    uid: int | None
    exe: str
    comm: str
    cgroup: str


def pids(host: Host) -> list[int]:
    return sorted(int(n) for n in host.list_dir(host.roots.proc) if n.isdigit())


def fd_targets(host: Host, pid: int) -> list[str]:
    """Targets of every open fd of a process; ProcUnreadable unless the process is simply gone."""
    fd_dir = host.roots.proc / str(pid) / "fd"
    try:
        names = os.listdir(fd_dir)
    except FileNotFoundError:
        return []  # the process exited while we looked
    except OSError as e:
        raise ProcUnreadable(pid, "fd", e) from e
    out = []
    for name in names:
        try:
            out.append(os.readlink(fd_dir / name))
        except FileNotFoundError:
            continue  # the fd was closed while we looked
        except OSError as e:
            raise ProcUnreadable(pid, f"fd/{name}", e) from e
    return out


def process_info(host: Host, pid: int) -> ProcessInfo:
    base = host.roots.proc / str(pid)
    try:
        exe = os.readlink(base / "exe")
    except OSError:
        exe = ""
    uid: int | None = None
    status = host.read_text(base / "status") or ""
    for line in status.splitlines():
        if line.startswith("Uid:"):
            parts = line.split()
            if len(parts) > 1 and parts[1].isdigit():
                uid = int(parts[1])
    return ProcessInfo(
        pid=pid,
        uid=uid,
        exe=exe.removesuffix(" (deleted)"),
        comm=host.read_text(base / "comm") or "",
        cgroup=host.read_text(base / "cgroup") or "",
    )


def memlock_limit(host: Host, pid: int) -> tuple[int | None, int | None] | None:
    """(soft, hard) RLIMIT_MEMLOCK in bytes from /proc/<pid>/limits; None = unlimited; whole None =
    unreadable."""
    text = host.read_text(host.roots.proc / str(pid) / "limits")
    if text is None:
        return None
    for line in text.splitlines():
        if line.startswith("Max locked memory"):
            parts = line[len("Max locked memory") :].split()
            if len(parts) < 2:
                return None

            def val(s: str) -> int | None:
                return None if s == "unlimited" else int(s)

            try:
                return val(parts[0]), val(parts[1])
            except ValueError:
                return None
    return None


def iter_holders(host: Host, logical_paths: set[str]) -> Iterator[tuple[ProcessInfo, str]]:
    """Every (process, path) where a process has one of `logical_paths` open."""
    for pid in pids(host):
        targets = fd_targets(host, pid)
        hits = sorted({t for t in targets if t in logical_paths})
        if hits:
            info = process_info(host, pid)
            for hit in hits:
                yield info, hit
