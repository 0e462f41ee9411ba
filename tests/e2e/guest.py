"""Host side of the real-kernel suite: build (once, cached) and boot a QEMU guest running Debian's kernel.

Everything the guest needs is built here and cached outside the clone, under `~/.cache/vfiod/e2e/` (or
`$XDG_CACHE_HOME/vfiod/e2e`, or `$VFIOD_E2E_CACHE`), keyed so that a new kernel or a different package list
builds anew and anything else is reused (by every clone on the machine, and CI):

    kernel/<package>/root/          `dpkg -x` of the current bookworm kernel package + `depmod -b`
    kernel/<package>/initramfs-<key>.cpio.gz   static busybox, the modules to mount the root, guest/init.sh
    kernel/<package>/root/lib/modules/<kver>/extra/{mtty,mbochs}.ko   the kernel's sample mdev drivers,
                                    built out of tree from the matching linux-source (see ensure_mdev_samples)
    mdevctl-<version>/              `dpkg -x` of Debian's mdevctl (run from here in the guest)
    rootfs-<key>/                   `mmdebstrap --variant=minbase bookworm` with ROOT_PACKAGES
    nvme-<key>.img                  a small ext4 image the guest mounts from an emulated NVMe disk
    runs/<name>-<stamp>/            one boot's `out` share: the source snapshot, run.sh, results, logs

The cache folder is exported read-only to the guest over 9p (tag `hostroot`, 00:10.0); the guest's root is
an overlay of `rootfs-<key>` with a tmpfs upper layer, and the kernel's modules are bind-mounted from
`kernel/<package>/root`. The run folder is the writable 9p share `out` (00:11.0), mounted at `/out`: it
carries a snapshot of the source tree in (so concurrent edits cannot change a running guest) and the
results out. Nothing is installed into the host and nothing on the host's /sys is touched.

A boot is bounded by `timeout`, and the guest reports through `isa-debug-exit`: QEMU exits with
(code << 1) | 1, so an odd status carries the guest's code and anything else means the guest never reported.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.e2e import kernels, tap

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
GUEST_FILES = HERE / "guest"

SUITE = kernels.DEFAULT_SUITE  # the guest root's release (every kernel boots the same root)
# The guest's root: a clean Debian 12 with what the issue names, plus pci.ids for device names.
ROOT_PACKAGES: tuple[str, ...] = (
    "systemd",
    "dbus",
    "polkitd",
    "python3",
    "python3-systemd",
    "kmod",
    "util-linux",
    "procps",
    "iproute2",
    "pci.ids",
    "qemu-system-x86",  # the real VMM (paused, TCG) that takes the devices vfiod hands over
)
# What the initramfs needs to mount the root: virtio-pci, 9p over virtio, overlayfs.
INITRAMFS_MODULES: tuple[str, ...] = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
BUSYBOX = Path("/bin/busybox")
# Bump to rebuild cached roots after changing how they are made.
ROOTFS_FORMAT = 1
NVME_FORMAT = 1

HOST_TOOLS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "mmdebstrap": "mmdebstrap",
    "depmod": "kmod",
    "modprobe": "kmod",
    "mke2fs": "e2fsprogs",
    "apt-get": "apt",
    "apt-cache": "apt",
    "dpkg": "dpkg",
    "timeout": "coreutils",
    "make": "make",
    "gcc-12": "gcc-12",
    "xz": "xz-utils",
}
MDEV_SAMPLES = ("mtty", "mbochs")
MDEV_SAMPLES_FORMAT = 1

# Guest console lines are kept; QEMU's own chatter goes to qemu.log next to them.
DEFAULT_MEMORY_MB = 1536
KEEP_RUNS = 6


class SetupError(RuntimeError):
    """The host cannot build or boot the guest (a missing tool, a failed download...)."""


def cache_dir() -> Path:
    """Outside the clone (`$XDG_CACHE_HOME/vfiod/e2e`, else `~/.cache/vfiod/e2e`), so that fresh clones and CI
    on the same machine reuse what is keyed by version; `$VFIOD_E2E_CACHE` overrides it."""
    given = os.environ.get("VFIOD_E2E_CACHE")
    if given:
        return Path(given)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vfiod" / "e2e"


def missing_tools() -> list[str]:
    """Debian packages to install for the tools this module runs (empty when all are there)."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    missing = {pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool, path=path) is None}
    if not BUSYBOX.is_file():
        missing.add("busybox-static")
    return sorted(missing)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = env.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"
    env["LC_ALL"] = "C"
    env.setdefault("DEBIAN_FRONTEND", "noninteractive")
    return env


def _run(cmd: Sequence[str | Path], *, cwd: Path | None = None, timeout: float = 600) -> str:
    argv = [str(c) for c in cmd]
    try:
        proc = subprocess.run(
            argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError as e:
        raise SetupError(f"{argv[0]} is not installed (make deps)") from e
    except subprocess.TimeoutExpired as e:
        raise SetupError(f"{' '.join(argv)} did not finish within {timeout:g} s") from e
    if proc.returncode != 0:
        raise SetupError(
            f"{' '.join(argv)} failed with status {proc.returncode}:\n{proc.stderr.strip()[-4000:]}"
        )
    return proc.stdout


run_command = _run  # the set-up's command runner (SetupError with the output), for the fetching modules


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive flock: two test runs building the same cache entry take turns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:12]


# ----- kernel ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kernel:
    package: str  # linux-image-6.1.0-NN-amd64
    kver: str  # 6.1.0-NN-amd64
    dir: Path  # cache/kernel/<package>
    suite: str = kernels.DEFAULT_SUITE  # the Debian release it comes from

    @property
    def root(self) -> Path:
        return self.dir / "root"

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.kver}"

    @property
    def modules(self) -> Path:
        return self.root / "lib" / "modules" / self.kver


def resolve_kernel_package(suite: str = kernels.DEFAULT_SUITE, cache: Path | None = None) -> str:
    """The package `linux-image-amd64` of `suite` depends on right now (never a hard-coded version)."""
    apt = kernels.private_apt(cache or cache_dir(), suite, _run)
    try:
        return kernels.resolve_package(apt, _run)
    except LookupError as e:
        raise SetupError(str(e)) from None


def ensure_kernel(cache: Path | None = None, suite: str = kernels.DEFAULT_SUITE) -> Kernel:
    """Download and unpack the current kernel of `suite` once (tests/e2e/kernels.py); later calls reuse it."""
    cache = cache or cache_dir()
    package = resolve_kernel_package(suite, cache)
    dest = cache / "kernel" / package
    done = dest / ".complete"
    if not done.is_file():
        with _locked(cache / "kernel" / f".{package}.lock"):
            if not done.is_file():
                _build_kernel(cache, suite, package, dest)
    kver = done.read_text(encoding="utf-8").strip()
    return Kernel(package=package, kver=kver, dir=dest, suite=suite)


def _build_kernel(cache: Path, suite: str, package: str, dest: Path) -> None:
    work = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)
    work.mkdir(parents=True)
    apt = kernels.private_apt(cache, suite, _run)
    try:
        deb = kernels.fetch(apt, _run, package, work)
        kver = kernels.unpack(_run, deb, work)
    except LookupError as e:
        raise SetupError(str(e)) from None
    (work / ".complete").write_text(kver + "\n", encoding="utf-8")
    work.rename(dest)


TARBALL_ENV = "VFIOD_E2E_KERNEL_TARBALL"


def kernel_tarball() -> Path | None:
    """The kernel tarball (`boot/vmlinuz-*` + `lib/modules/<version>/`) named by $VFIOD_E2E_KERNEL_TARBALL,
    None when unset or missing."""
    raw = os.environ.get(TARBALL_ENV, "")
    return Path(raw) if raw and Path(raw).is_file() else None


def ensure_tarball_kernel(tarball: Path, cache: Path | None = None) -> Kernel:
    """A kernel given as a tarball, unpacked once under `<cache>/kernel/tarball-<sha256 prefix>/root/`."""
    cache = cache or cache_dir()
    digest = hashlib.sha256()
    with open(tarball, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    package = f"tarball-{digest.hexdigest()[:16]}"
    dest = cache / "kernel" / package
    done = dest / ".complete"
    if not done.is_file():
        with _locked(cache / "kernel" / f".{package}.lock"):
            if not done.is_file():
                work = dest.with_name(dest.name + ".tmp")
                shutil.rmtree(work, ignore_errors=True)
                shutil.rmtree(dest, ignore_errors=True)
                (work / "root").mkdir(parents=True)
                _run(["tar", "-xf", tarball, "-C", work / "root"], timeout=600)
                versions = sorted(p.name for p in (work / "root/lib/modules").iterdir() if p.is_dir())
                if len(versions) != 1 or not (work / "root/boot" / f"vmlinuz-{versions[0]}").is_file():
                    raise SetupError(f"{tarball} needs boot/vmlinuz-V and one lib/modules/V/ ({versions})")
                (work / ".complete").write_text(versions[0] + "\n", encoding="utf-8")
                work.rename(dest)
    kver = done.read_text(encoding="utf-8").strip()
    return Kernel(package=package, kver=kver, dir=dest, suite="tarball")


def module_chain(kernel: Kernel, module: str) -> list[Path]:
    """`modprobe --show-depends`: the module files to insmod for `module`, dependencies first."""
    out = _run(["modprobe", "--show-depends", "-d", kernel.root, "-S", kernel.kver, module], timeout=60)
    chain: list[Path] = []
    for line in out.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "insmod":
            chain.append(Path(words[1]))
    return chain


def ensure_mdev_samples(kernel: Kernel) -> None:
    """The kernel's sample mdev drivers (samples/vfio-mdev: mtty, mbochs), which Debian does not build,
    built once out of tree against this kernel's headers from the same version's linux-source, installed
    under the cached kernel's `extra/` and depmod'ed. Nothing is installed into the host."""
    marker = kernel.dir / f".mdev-samples-{MDEV_SAMPLES_FORMAT}"
    if marker.is_file():
        return
    with _locked(kernel.dir.parent / f".{kernel.package}.mdev.lock"):
        if not marker.is_file():
            _build_mdev_samples(kernel, marker)


def _build_mdev_samples(kernel: Kernel, marker: Path) -> None:
    work = kernel.dir / "mdev-build"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    headers = f"linux-headers-{kernel.kver}"
    apt = kernels.private_apt(kernel.dir.parent.parent, kernel.suite, _run)  # the kernel's own release
    version = apt.cache(_run, "show", "--no-all-versions", headers)
    version = next(line.split()[1] for line in version.splitlines() if line.startswith("Version:"))
    depends = apt.cache(_run, "depends", headers)
    common = next(w for line in depends.splitlines() for w in line.split() if w.endswith("-common"))
    series = kernel.kver.split(".")[0] + "." + kernel.kver.split(".")[1]  # 6.1
    packages = [f"{headers}={version}", f"{common}={version}", f"linux-source-{series}={version}"]
    packages += [f"linux-kbuild-{series}", "linux-compiler-gcc-12-x86"]
    apt.download(_run, packages, work)
    for deb in sorted(work.glob("*.deb")):
        _run(["dpkg", "-x", deb, work / "x"], timeout=600)
        deb.unlink()
    tree = work / "x" / "usr" / "src"
    tarball = tree / f"linux-source-{series}.tar.xz"
    samples = f"linux-source-{series}/samples/vfio-mdev"
    _run(["tar", "-xJf", tarball, "-C", work, "--wildcards", f"{samples}/*"], timeout=600)
    tarball.unlink()
    # The headers' Makefile includes the common headers by their installed path: point it at the copy.
    makefile = tree / headers / "Makefile"
    makefile.write_text(
        makefile.read_text(encoding="utf-8").replace(f"/usr/src/{common}/", f"{tree / common}/"),
        encoding="utf-8",
    )
    build = work / "build"
    build.mkdir()
    for name in MDEV_SAMPLES:
        shutil.copy(work / samples / f"{name}.c", build / f"{name}.c")
    (build / "Kbuild").write_text(f"obj-m := {' '.join(f'{n}.o' for n in MDEV_SAMPLES)}\n", encoding="utf-8")
    _run(["make", "-C", tree / headers, f"M={build}", "modules"], timeout=600)
    extra = kernel.modules / "extra"
    extra.mkdir(exist_ok=True)
    for name in MDEV_SAMPLES:
        shutil.copy(build / f"{name}.ko", extra / f"{name}.ko")
    _run(["depmod", "-b", kernel.root, kernel.kver], timeout=300)
    shutil.rmtree(work)
    marker.write_text(f"{version}\n", encoding="utf-8")


def ensure_mdevctl(cache: Path) -> Path:
    """Debian's mdevctl, unpacked (not installed: its udev dependency would change the guests), for the
    guest to compare its view of the mdevs with vfiod's. Returns the binary."""
    version = _run(["apt-cache", "show", "--no-all-versions", "mdevctl"], timeout=120)
    version = next(line.split()[1] for line in version.splitlines() if line.startswith("Version:"))
    dest = cache / f"mdevctl-{version}"
    binary = dest / "usr" / "bin" / "mdevctl"
    if binary.is_file():
        return binary
    with _locked(cache / ".mdevctl.lock"):
        if not binary.is_file():
            work = dest.with_name(dest.name + ".tmp")
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            _run(["apt-get", "download", f"mdevctl={version}"], cwd=work, timeout=600)
            (deb,) = work.glob("*.deb")
            _run(["dpkg", "-x", deb, work], timeout=600)
            deb.unlink()
            if not (work / binary.relative_to(dest)).is_file():
                raise SetupError(f"mdevctl {version} has no {binary.relative_to(dest)}")
            shutil.rmtree(dest, ignore_errors=True)
            work.rename(dest)
    return binary


# ----- initramfs ---------------------------------------------------------------------------------------


class _Cpio:
    """A newc archive written in memory: lets the initramfs carry /dev/console without mknod."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = (
            self._ino,
            mode,
            0,  # uid
            0,  # gid
            2 if mode & 0o170000 == 0o040000 else 1,
            0,  # mtime: a fixed value keeps the archive reproducible
            len(data),
            0,
            0,
            rdev[0],
            rdev[1],
            len(encoded),
            0,
        )
        self._ino += 1
        header = b"070701" + b"".join(f"{v:08x}".encode() for v in fields)
        self._parts.append(header + encoded + b"\0" * (-(len(header) + len(encoded)) % 4))
        self._parts.append(data + b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, 0o100000 | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, 0o020000 | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self._parts)


def initramfs_modules(kernel: Kernel) -> list[Path]:
    seen: list[Path] = []
    for module in INITRAMFS_MODULES:
        for path in module_chain(kernel, module):
            if path not in seen:
                seen.append(path)
    return seen


def ensure_initramfs(kernel: Kernel) -> Path:
    init = (GUEST_FILES / "init.sh").read_bytes()
    busybox = BUSYBOX.read_bytes()
    modules = initramfs_modules(kernel)
    key = _digest(init, hashlib.sha256(busybox).hexdigest(), *(str(m) for m in modules))
    out = kernel.dir / f"initramfs-{key}.cpio.gz"
    if out.is_file():
        return out
    cpio = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "modules", "share", "rw", "newroot"):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.file("bin/busybox", busybox, 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", init, 0o755)
    names: list[str] = []
    for path in modules:
        data = path.read_bytes()
        name = path.name
        if name.endswith(".xz"):  # busybox insmod does not decompress
            data = lzma.decompress(data)
            name = name.removesuffix(".xz")
        cpio.file(f"modules/{name}", data)
        names.append(name)
    cpio.file("modules/order", "".join(f"{n}\n" for n in names).encode())  # none: all built in
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.write_bytes(gzip.compress(cpio.finish(), compresslevel=6, mtime=0))
    tmp.rename(out)
    return out


# ----- root file system --------------------------------------------------------------------------------


def rootfs_key() -> str:
    return _digest(SUITE, "minbase", ",".join(sorted(ROOT_PACKAGES)), str(ROOTFS_FORMAT))


def _apt_sources() -> list[str]:
    """The host's apt sources for SUITE (files mmdebstrap pastes into the root), so the guest's packages
    come from wherever this host gets its own."""
    found: list[str] = []
    candidates = [Path("/etc/apt/sources.list")]
    sources_d = Path("/etc/apt/sources.list.d")
    if sources_d.is_dir():
        candidates += sorted(p for p in sources_d.iterdir() if p.suffix in (".list", ".sources"))
    for path in candidates:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            continue
        if SUITE in text:
            found.append(str(path))
    return found


def ensure_rootfs(cache: Path | None = None) -> Path:
    """A cached `mmdebstrap --variant=minbase bookworm` tree with ROOT_PACKAGES; built once per key."""
    cache = cache or cache_dir()
    name = f"rootfs-{rootfs_key()}"
    dest = cache / name
    done = cache / f"{name}.complete"
    if not done.is_file():
        with _locked(cache / f".{name}.lock"):
            if not done.is_file():
                _build_rootfs(dest)
                done.write_text(json.dumps({"suite": SUITE, "packages": sorted(ROOT_PACKAGES)}) + "\n")
    return dest


def _build_rootfs(dest: Path) -> None:
    work = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)
    cmd: list[str | Path] = [
        "mmdebstrap",
        "--variant=minbase",
        "--mode=root",
        f"--include={','.join(ROOT_PACKAGES)}",
        "--skip=cleanup/apt/lists",
        SUITE,
        work,
        *_apt_sources(),
    ]
    _run(cmd, timeout=3600)
    work.rename(dest)


# ----- the NVMe disk -----------------------------------------------------------------------------------


def ensure_nvme_image(cache: Path | None = None) -> Path:
    """A 16 MiB ext4 image with one marker file; QEMU opens it with snapshot=on so it never changes."""
    cache = cache or cache_dir()
    out = cache / f"nvme-{NVME_FORMAT}.img"
    if out.is_file():
        return out
    with _locked(cache / ".nvme.lock"):
        if out.is_file():
            return out
        seed = cache / f"nvme-seed.tmp{os.getpid()}"
        shutil.rmtree(seed, ignore_errors=True)
        seed.mkdir(parents=True)
        (seed / "vfiod-e2e-data").write_text("the guest mounts this disk: it is host-critical\n")
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            f.truncate(16 * 1024 * 1024)
        _run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "e2edata", "-d", seed, tmp], timeout=120)
        shutil.rmtree(seed, ignore_errors=True)
        tmp.rename(out)
    return out


# ----- the package -------------------------------------------------------------------------------------


def ensure_deb(cache: Path | None = None) -> Path:
    """The project's .deb: `$VFIOD_E2E_DEB` when set (e.g. what `make deb` left in dist/), else built now
    from the working tree with packaging/build-deb.sh (without lintian) into this clone's `.cache/deb`
    (`cache`: another folder of this tree's own), never into the shared cache."""
    given = os.environ.get("VFIOD_E2E_DEB")
    if given:
        path = Path(given)
        if not path.is_file():
            raise SetupError(f"VFIOD_E2E_DEB={given} is not a file")
        return path
    cache = cache or REPO / ".cache"
    cache.mkdir(parents=True, exist_ok=True)
    outdir = cache / "deb"
    with _locked(cache / ".deb.lock"):
        shutil.rmtree(outdir, ignore_errors=True)
        outdir.mkdir(parents=True)
        out = _run(
            ["bash", REPO / "packaging" / "build-deb.sh", "--outdir", outdir, "--no-lintian"], timeout=900
        )
    debs = sorted(outdir.glob("vfiod_*.deb"))
    if len(debs) != 1:
        raise SetupError(f"packaging/build-deb.sh left {len(debs)} packages in {outdir}:\n{out}")
    return debs[0]


# ----- one boot ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Images:
    cache: Path
    kernel: Kernel
    initramfs: Path
    rootfs: Path
    nvme: Path
    mdevctl: Path


def prepare(
    cache: Path | None = None, suite: str = kernels.DEFAULT_SUITE, tarball: Path | None = None
) -> Images:
    """Everything a boot needs, built or taken from the cache: the kernel of `suite` (the sample mdev
    drivers only for the default, bookworm's), or the kernel in `tarball`, and the same bookworm root for
    every kernel."""
    if os.geteuid() != 0:
        raise SetupError("the real-kernel suite runs as root (QEMU reads the root-owned guest tree)")
    missing = missing_tools()
    if missing:
        raise SetupError(f"missing Debian packages: {' '.join(missing)} (make deps)")
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    if tarball is not None:
        kernel = ensure_tarball_kernel(tarball, cache)
    else:
        kernel = ensure_kernel(cache, suite)
        if suite == kernels.DEFAULT_SUITE:
            ensure_mdev_samples(kernel)
    return Images(
        cache=cache,
        kernel=kernel,
        initramfs=ensure_initramfs(kernel),
        rootfs=ensure_rootfs(cache),
        nvme=ensure_nvme_image(cache),
        mdevctl=ensure_mdevctl(cache),
    )


@dataclass(frozen=True)
class BootSpec:
    """What one guest does: `script` is bash run by the guest's init after the common setup."""

    name: str
    script: str
    timeout: float = 900.0  # wall clock for the whole boot, QEMU included
    memory_mb: int = DEFAULT_MEMORY_MB
    init: str = "/out/guest/stage2.sh"
    append: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)  # copied into the run folder (path inside it)
    devices: tuple[str, ...] = ()  # more `-device` values for this boot only


@dataclass
class BootResult:
    spec: BootSpec
    run_dir: Path
    qemu_status: int
    duration: float
    command: list[str]

    @property
    def guest_code(self) -> int | None:
        """The code the guest wrote to isa-debug-exit, None if it never reported (hang, panic, crash)."""
        if self.qemu_status > 0 and self.qemu_status % 2 == 1 and self.qemu_status != 125:
            return self.qemu_status >> 1
        return None

    @property
    def timed_out(self) -> bool:
        return self.qemu_status in (124, 137)

    @property
    def console_log(self) -> Path:
        return self.run_dir / "console.log"

    def describe(self) -> str:
        if self.timed_out:
            what = f"timed out after {self.spec.timeout:g} s"
        elif self.guest_code is None:
            what = f"ended without a report (QEMU status {self.qemu_status})"
        else:
            what = f"guest exit code {self.guest_code}"
        return f"boot {self.spec.name!r}: {what} in {self.duration:.1f} s ({self.run_dir})"

    def console_tail(self, lines: int = 200) -> str:
        try:
            text = self.console_log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no console log)"
        return "\n".join(text.splitlines()[-lines:])


def _snapshot_source(dest: Path) -> None:
    """Copy the package and the e2e suite into the run folder: the guest sees this tree, unchanged by
    edits made on the host while it runs."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".mypy_cache")
    for package in ("vfiod", "vfiod_sim"):
        shutil.copytree(REPO / package, dest / package, ignore=ignore)
    (dest / "tests").mkdir(parents=True)
    shutil.copy2(REPO / "tests" / "__init__.py", dest / "tests" / "__init__.py")
    shutil.copytree(HERE, dest / "tests" / "e2e", ignore=ignore)


def _prune_runs(runs: Path, name: str) -> None:
    old = sorted(runs.glob(f"{name}-*"), key=lambda p: p.stat().st_mtime)
    for path in old[:-KEEP_RUNS]:
        shutil.rmtree(path, ignore_errors=True)


def qemu_command(images: Images, run_dir: Path, spec: BootSpec) -> list[str]:
    kernel = images.kernel
    append = [
        "console=ttyS0",
        "intel_iommu=on",
        "iommu=pt",
        "panic=-1",
        "loglevel=4",
        f"e2e.root={images.rootfs.name}",
        f"e2e.kdir={kernel.root.relative_to(images.cache)}",
        f"e2e.init={spec.init}",
        *spec.append,
    ]
    return [
        "timeout",
        "-k",
        "10",
        f"{spec.timeout:g}",
        "qemu-system-x86_64",
        *("-machine", "q35,kernel-irqchip=split", "-accel", "tcg,thread=multi", "-cpu", "max"),
        *("-smp", "2", "-m", str(spec.memory_mb)),
        *("-nodefaults", "-no-user-config", "-display", "none", "-vga", "none"),
        *("-serial", f"file:{run_dir / 'console.log'}", "-monitor", "none", "-no-reboot"),
        *("-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"),
        *("-device", "intel-iommu,intremap=on,caching-mode=on,device-iotlb=off"),
        *("-kernel", str(kernel.vmlinuz), "-initrd", str(images.initramfs), "-append", " ".join(append)),
        *(
            "-fsdev",
            f"local,id=fs0,path={images.cache},security_model=none,readonly=on,multidevs=remap",
            "-device",
            "virtio-9p-pci,fsdev=fs0,mount_tag=hostroot,addr=0x10.0",
        ),
        *(
            "-fsdev",
            f"local,id=fs1,path={run_dir},security_model=none,multidevs=remap",
            "-device",
            "virtio-9p-pci,fsdev=fs1,mount_tag=out,addr=0x11.0",
        ),
        # a GPU with its HDMI audio: one slot, one IOMMU group
        *("-device", "VGA,addr=0x2.0,multifunction=on", "-device", "intel-hda,addr=0x2.1"),
        *("-device", "bochs-display,addr=0x3.0"),
        *("-device", "e1000,addr=0x4.0,mac=52:54:00:12:34:01"),
        *("-device", "virtio-net-pci,addr=0x5.0,mac=52:54:00:12:34:02"),
        *("-device", "pcie-root-port,id=rp1,chassis=1,slot=1,addr=0x6.0"),
        *("-device", "edu,addr=0x7.0"),
        # a disk the guest mounts: host-critical
        *("-drive", f"file={images.nvme},if=none,id=nvm0,format=raw,snapshot=on"),
        *("-device", "nvme,serial=vfiod-e2e,drive=nvm0,addr=0x8.0"),
        # an SR-IOV physical function (QEMU's only SR-IOV device in 7.2): 2 VFs at 00:09.1-2 when enabled
        *("-device", "nvme-subsys,id=subsys0"),
        *(
            "-device",
            "nvme,serial=vfiod-sriov,subsys=subsys0,sriov_max_vfs=2,sriov_vq_flexible=4,"
            "sriov_vi_flexible=2,max_ioqpairs=6,addr=0x9.0",
        ),
        # a group with a bridge: pcie-pci-bridge + e1000 + edu
        *("-device", "pcie-pci-bridge,id=br1,bus=rp1"),
        *("-device", "e1000,bus=br1,addr=0x1,mac=52:54:00:12:34:03", "-device", "edu,bus=br1,addr=0x2"),
        *(arg for device in spec.devices for arg in ("-device", device)),
    ]


def boot(spec: BootSpec, images: Images) -> BootResult:
    """Boot one guest that runs `spec.script`, wait for it (bounded) and return where its results are."""
    runs = images.cache / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    _prune_runs(runs, spec.name)
    run_dir = runs / f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    run_dir.mkdir()
    _snapshot_source(run_dir / "src")
    shutil.copytree(GUEST_FILES, run_dir / "guest")
    for script in (run_dir / "guest").glob("*.sh"):
        script.chmod(0o755)
    env_lines = "".join(f"export {k}={_shell_quote(v)}\n" for k, v in sorted(spec.env.items()))
    (run_dir / "run.sh").write_text(
        "#!/bin/bash\n# written by tests/e2e/guest.py; run by guest/stage2.sh\n"
        "export PYTHONPATH=/out/src PYTHONDONTWRITEBYTECODE=1\n" + env_lines + spec.script + "\n",
        encoding="utf-8",
    )
    for d in ("logs", "trace"):
        (run_dir / d).mkdir()
    for rel, src in spec.files.items():
        dest = run_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)
    cmd = qemu_command(images, run_dir, spec)
    (run_dir / "qemu-command.txt").write_text(" ".join(cmd) + "\n", encoding="utf-8")
    started = time.monotonic()
    with open(run_dir / "qemu.log", "wb") as log:
        try:
            proc = subprocess.run(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, timeout=spec.timeout + 60, check=False
            )
            status = proc.returncode
        except subprocess.TimeoutExpired:
            status = 124
    duration = time.monotonic() - started
    result = BootResult(spec=spec, run_dir=run_dir, qemu_status=status, duration=duration, command=cmd)
    (run_dir / "boot.json").write_text(
        json.dumps(
            {
                "name": spec.name,
                "qemu_status": status,
                "guest_code": result.guest_code,
                "duration": round(duration, 2),
                "kernel": images.kernel.kver,
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    return result


@dataclass
class GuestRun:
    """One finished boot and the scenario results it sent back through the `out` share."""

    boot: BootResult
    report: tap.TapReport

    def result(self, name: str) -> tap.TapResult | None:
        return self.report.by_name().get(name)

    def text(self, relative: str, limit: int = 20000) -> str:
        try:
            data = (self.boot.run_dir / relative).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return f"({relative}: missing)"
        return data if len(data) <= limit else "...\n" + data[-limit:]

    def failure(self, name: str) -> tuple[str, str] | None:
        """None when scenario `name` passed; else ("fail" | "skip", a report for a person): the TAP
        diagnostics, the scenario's guest log and trace, and the guest console's tail."""
        res = self.result(name)
        if res is not None and res.ok:
            return ("skip", res.skip) if res.skip else None
        head = [self.boot.describe()]
        if res is None:
            head.append(f"the guest reported no result for {name!r}")
            if self.report.bail_out:
                head.append(f"bail out: {self.report.bail_out}")
        else:
            head.extend(res.diagnostics)
        parts = [
            "\n".join(head),
            f"--- guest log logs/{name}.log ---\n{self.text(f'logs/{name}.log')}",
            f"--- trace: {self.boot.run_dir / 'trace' / (name + '.json')}",
            f"--- guest console (tail) {self.boot.console_log} ---\n{self.boot.console_tail(150)}",
        ]
        return ("fail", "\n".join(parts))


def boot_suite(
    images: Images,
    name: str,
    script: str,
    timeout: float = 900.0,
    files: dict[str, Path] | None = None,
    init: str = "/out/guest/stage2.sh",
    append: tuple[str, ...] = (),
    devices: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> GuestRun:
    """Boot one guest for a group of scenarios; its results are read whether or not it finished."""
    spec = BootSpec(
        name=name,
        script=script,
        timeout=timeout,
        files=files or {},
        init=init,
        append=append,
        devices=devices,
        env=env or {},
    )
    result = boot(spec, images)
    return GuestRun(boot=result, report=tap.read(result.run_dir / "results.tap"))


SYSTEMD_PREPARE = "exec bash /out/guest/systemd-prepare.sh"


def boot_under_systemd(
    images: Images, name: str, deb: Path, *, suite: str = "systemd", devices: tuple[str, ...] = ()
) -> GuestRun:
    """Boot with systemd as PID 1: guest/systemd-prepare.sh installs `deb` and a unit that runs the
    runner's `suite` once the system is up; `devices` are more `-device`s for this boot."""
    return boot_suite(
        images,
        name,
        SYSTEMD_PREPARE,
        timeout=900,
        files={f"pkg/{deb.name}": deb},
        append=("e2e.exec=/lib/systemd/systemd",),
        devices=devices,
        env={"E2E_SUITE": suite},
    )


def _shell_quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"
