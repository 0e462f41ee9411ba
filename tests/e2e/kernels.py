"""The guest kernels of the real-kernel suite: Debian's `linux-image-amd64` of three releases (bullseye's
5.10, bookworm's 6.1, trixie's 6.12), each resolved with `apt-cache depends` of its own release and fetched
with `apt-get download` through a private apt configuration (sources, lists and archives under the cache,
the host's apt state untouched), then unpacked and depmod'ed once per kernel package under
`<cache>/kernel/<package>/` (the package name carries the version: a new upload is a new entry).

Lists are fetched once and reused; when the mirror no longer has what they name, they are refreshed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

SUITES: dict[str, str] = {"bullseye": "5.10", "bookworm": "6.1", "trixie": "6.12"}
DEFAULT_SUITE = "bookworm"
METAPACKAGE = "linux-image-amd64"
MIRROR = "http://deb.debian.org/debian"
SECURITY = "http://deb.debian.org/debian-security"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"

Run = Callable[..., str]


@dataclass(frozen=True)
class PrivateApt:
    """apt-get and apt-cache for one release, with everything of theirs under `root`."""

    root: Path
    suite: str

    def options(self) -> list[str]:
        r = self.root
        return [
            *("-o", f"Dir::Etc::SourceList={r / 'sources.list'}"),
            *("-o", f"Dir::Etc::SourceParts={r / 'sources.list.d'}"),
            *("-o", f"Dir::Etc::Preferences={r / 'preferences'}"),
            *("-o", f"Dir::Etc::PreferencesParts={r / 'preferences.d'}"),
            *("-o", f"Dir::State={r / 'state'}"),
            *("-o", f"Dir::State::status={r / 'status'}"),
            *("-o", f"Dir::Cache={r / 'cache'}"),
            *("-o", "APT::Architecture=amd64"),
            *("-o", "Acquire::Languages=none"),
        ]

    def set_up(self) -> None:
        r = self.root
        for d in ("sources.list.d", "preferences.d", "state/lists/partial", "cache/archives/partial"):
            (r / d).mkdir(parents=True, exist_ok=True)
        (r / "preferences").touch()
        (r / "status").touch()
        signed = f"[signed-by={KEYRING}]"
        (r / "sources.list").write_text(
            f"deb {signed} {MIRROR} {self.suite} main\n"
            f"deb {signed} {MIRROR} {self.suite}-updates main\n"
            f"deb {signed} {SECURITY} {self.suite}-security main\n",
            encoding="utf-8",
        )

    def has_lists(self) -> bool:
        lists = self.root / "state" / "lists"
        return lists.is_dir() and any(p.name.endswith("_Packages") for p in lists.iterdir())

    def update(self, run: Run) -> None:
        run(["apt-get", *self.options(), "update"], timeout=600)

    def cache(self, run: Run, *args: str) -> str:
        return run(["apt-cache", *self.options(), *args], timeout=120)

    def download(self, run: Run, packages: Sequence[str], dest: Path) -> None:
        run(["apt-get", *self.options(), "download", *packages], cwd=dest, timeout=900)


def ready(apt: PrivateApt, run: Run) -> PrivateApt:
    """`apt` set up, with its lists (fetched the first time)."""
    apt.set_up()
    if not apt.has_lists():
        apt.update(run)
    return apt


def private_apt(cache: Path, suite: str, run: Run) -> PrivateApt:
    if suite not in SUITES:
        raise ValueError(f"no kernel suite {suite!r} (known: {', '.join(SUITES)})")
    return ready(PrivateApt(cache / "apt" / suite, suite), run)


def resolve_package(apt: PrivateApt, run: Run) -> str:
    """The package `linux-image-amd64` of the release depends on now (never a hard-coded version)."""
    out = apt.cache(run, "depends", METAPACKAGE)
    for line in out.splitlines():
        key, _, value = line.strip().partition(":")
        name = value.strip()
        if key in ("Depends", "|Depends") and name.startswith("linux-image-") and not name.startswith("<"):
            return name
    raise LookupError(f"apt-cache depends {METAPACKAGE} ({apt.suite}) names no kernel package:\n{out}")


def fetch_all(apt: PrivateApt, run: Run, packages: Sequence[str], work: Path) -> list[Path]:
    """`apt-get download` of the packages into `work` (lists refreshed once if the mirror moved on)."""
    try:
        apt.download(run, packages, work)
    except Exception:  # stale lists name a version the mirror dropped: refresh them once
        apt.update(run)
        apt.download(run, packages, work)
    return sorted(work.glob("*.deb"))


def fetch(apt: PrivateApt, run: Run, package: str, work: Path) -> Path:
    """The one package's .deb, downloaded into `work` (`fetch_all`)."""
    debs = fetch_all(apt, run, [package], work)
    if len(debs) != 1:
        raise LookupError(f"apt-get download {package} left {len(debs)} .deb files in {work}")
    return debs[0]


def unpack(run: Run, deb: Path, work: Path) -> str:
    """`dpkg -x` and `depmod -b` of a kernel package into `work/root`; its kernel version."""
    run(["dpkg", "-x", deb, work / "root"], timeout=600)
    deb.unlink()
    merged = work / "root" / "usr" / "lib" / "modules"
    if merged.is_dir() and not (work / "root" / "lib" / "modules").exists():
        # trixie ships modules under /usr/lib (merged /usr); the guest and depmod -b look in /lib
        (work / "root" / "lib").mkdir(exist_ok=True)
        merged.rename(work / "root" / "lib" / "modules")
    kvers = sorted(os.listdir(work / "root" / "lib" / "modules"))
    if len(kvers) != 1:
        raise LookupError(f"{deb.name} holds modules for {kvers}, expected exactly one kernel")
    kver = kvers[0]
    run(["depmod", "-b", work / "root", kver], timeout=300)  # dpkg -x skips the postinst
    if not (work / "root" / "boot" / f"vmlinuz-{kver}").is_file():
        raise LookupError(f"{deb.name} has no /boot/vmlinuz-{kver}")
    return kver
