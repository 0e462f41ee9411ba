"""The Debian package: `make deb` (packaging/build-deb.sh) output against the architecture's file table,
lintian, the maintainer scripts' upgrade behaviour, `systemd-analyze verify` of the shipped unit, and an
install/run/purge in a throw-away overlay of this machine's root (a private mount namespace; nothing on
the host changes and no /sys is mounted in it).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.support.realstack import PATH, REPO, unavailable

pytestmark = pytest.mark.slow

# Every path the package itself ships (FILES in vfiod(8) lists those an admin meets).
TABLE = {
    "/usr/sbin/vfiod",
    "/usr/bin/vfioctl",
    "/usr/share/dbus-1/system.d/org.hypeman.Devices1.conf",
    "/usr/share/dbus-1/system-services/org.hypeman.Devices1.service",
    "/lib/systemd/system/vfiod.service",
    "/usr/lib/modules-load.d/vfiod.conf",
    "/usr/lib/tmpfiles.d/vfiod.conf",
    "/usr/lib/systemd/catalog/vfiod.catalog",
    "/usr/share/polkit-1/actions/org.hypeman.devices.policy",
    "/usr/share/polkit-1/rules.d/50-org.hypeman.devices.rules",
    "/usr/share/dbus-1/interfaces/org.hypeman.Devices1.xml",
    "/usr/share/man/man8/vfiod.8.gz",
    "/usr/share/man/man1/vfioctl.1.gz",
    "/usr/share/man/man5/vfiod.toml.5.gz",
    "/usr/share/bash-completion/completions/vfioctl",
    "/usr/share/bash-completion/completions/vfiod",
}
# The table's other two rows are made on the host, not shipped: /var/lib/vfiod/vfiod.db (the daemon
# creates it in the state directory, made by tmpfiles and StateDirectory=) and /etc/vfiod/vfiod.toml
# (optional, written by the admin; ConfigurationDirectory= makes /etc/vfiod).
NOT_SHIPPED = {"/var/lib/vfiod/vfiod.db", "/etc/vfiod/vfiod.toml"}
# What else a package of it holds: the private Python tree, its docs (copyright, changelog, the hypeman
# drop-in example) and its lintian overrides.
SUPPORT_PREFIXES = ("/usr/lib/vfiod/", "/usr/share/doc/vfiod/")
SUPPORT_FILES = {
    "/usr/share/lintian/overrides/vfiod",
    "/usr/share/doc/vfiod/examples/hypeman-vfiod.conf",
    "/usr/share/doc/vfiod/examples/vfiod.toml.example",
}
BUILD_TOOLS = ("dpkg-buildpackage", "dh", "dpkg-deb", "lintian")


@pytest.fixture(scope="module")
def deb() -> Iterator[Path]:
    missing = [t for t in BUILD_TOOLS if shutil.which(t) is None]
    if missing:
        unavailable(f"missing {', '.join(missing)} (apt-get install dpkg-dev debhelper lintian)")
    out = Path(tempfile.mkdtemp(prefix="vfiod-deb-"))
    try:
        yield _build_deb("bookworm", out, lintian=False)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _contents(deb: Path) -> dict[str, str]:
    """path -> mode string of every entry."""
    r = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True)
    out = {}
    for line in r.stdout.splitlines():
        fields = line.split(None, 5)
        path = fields[5].split(" -> ")[0]
        out["/" + path.removeprefix("./").rstrip("/")] = fields[0]
    return out


def _field(deb: Path, name: str) -> str:
    return subprocess.run(
        ["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_file_name_and_version(deb: Path) -> None:
    version = _field(deb, "Version")
    assert deb.name == f"vfiod_{version}_amd64.deb"
    assert _field(deb, "Architecture") == "amd64"


def test_file_list_matches_the_architecture_table(deb: Path) -> None:
    entries = _contents(deb)
    files = {p for p, mode in entries.items() if not mode.startswith("d")}
    assert not TABLE - files, f"missing from the package: {sorted(TABLE - files)}"
    assert not NOT_SHIPPED & files
    extra = sorted(p for p in files - TABLE if not p.startswith(SUPPORT_PREFIXES) and p not in SUPPORT_FILES)
    assert not extra, f"files outside the architecture table: {extra}"
    assert entries["/usr/sbin/vfiod"].startswith("-rwxr-xr-x")
    assert entries["/usr/bin/vfioctl"].startswith("-rwxr-xr-x")
    assert "/usr/lib/vfiod/vfiod/__init__.py" in files
    assert not any("__pycache__" in p or p.endswith(".pyc") for p in files), "bytecode is made by postinst"


def test_lintian_passes(deb: Path) -> None:
    r = subprocess.run(
        ["lintian", "--fail-on", "error,warning", "--display-info", str(deb)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    print(r.stdout)
    assert r.returncode == 0, f"lintian:\n{r.stdout}\n{r.stderr}"


def test_depends_on_debian_python_and_bundles_the_rest(deb: Path) -> None:
    depends = _field(deb, "Depends")
    for dep in ("python3 (>= 3.11~)", "python3 (<< 3.12)", "python3-systemd", "polkitd", "dbus", "adduser"):
        assert dep in depends, depends
    assert "pydantic" not in depends and "dbus-fast" not in depends
    files = _contents(deb)
    for top in ("pydantic", "pydantic_core", "dbus_fast"):
        assert f"/usr/lib/vfiod/{top}/__init__.py" in files, f"{top} is not bundled"
    assert not any(p.startswith("/usr/lib/vfiod/systemd/") for p in files), "python3-systemd is Debian's"


def test_maintainer_scripts_never_restart_on_upgrade(deb: Path, tmp_path: Path) -> None:
    subprocess.run(["dpkg-deb", "-e", str(deb), str(tmp_path)], check=True)
    postinst = (tmp_path / "postinst").read_text()
    prerm = (tmp_path / "prerm").read_text()
    assert "addgroup --system --quiet hypeman" in postinst
    assert "deb-systemd-helper enable 'vfiod.service'" in postinst
    # dh_installsystemd --no-stop-on-upgrade: postinst only starts (a no-op for a running unit), prerm
    # stops only on removal, and there is no preinst stop.
    assert "restart" not in postinst.replace("try-restart", "")
    assert "deb-systemd-invoke start 'vfiod.service'" in postinst
    stops = [line for line in prerm.splitlines() if "deb-systemd-invoke stop" in line]
    assert stops, prerm
    assert re.search(r'\[ "\$1" = remove \]', prerm), prerm
    assert not (tmp_path / "preinst").exists() or "stop" not in (tmp_path / "preinst").read_text()
    for script in ("postinst", "prerm", "postrm"):
        subprocess.run(["sh", "-n", str(tmp_path / script)], check=True)


def test_systemd_analyze_verify_of_the_shipped_unit(deb: Path, tmp_path: Path) -> None:
    """The unpacked unit, with ExecStart pointing at the unpacked launcher and its man page findable."""
    if shutil.which("systemd-analyze") is None:
        unavailable("systemd-analyze is not installed")
    root = tmp_path / "root"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    unit = (root / "lib/systemd/system/vfiod.service").read_text()
    assert "ExecStart=/usr/sbin/vfiod run\n" in unit
    (tmp_path / "vfiod.service").write_text(
        unit.replace("ExecStart=/usr/sbin/vfiod", f"ExecStart={root}/usr/sbin/vfiod")
    )
    env = dict(os.environ, MANPATH=str(root / "usr/share/man"))
    r = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "vfiod.service")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0 and not r.stderr.strip(), f"systemd-analyze verify:\n{r.stderr}"


INSTALL_SCRIPT = r"""
set -eu
deb=$1; work=$2
mount -t tmpfs tmpfs "$work"
mkdir "$work/upper" "$work/work" "$work/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$work/upper,workdir=$work/work" "$work/root"
R=$work/root
# Only /dev/null and a fresh /proc: no /sys, no host /dev in the chroot.
[ -e "$R/dev/null" ] || touch "$R/dev/null"
mount --bind /dev/null "$R/dev/null"
mount -t proc proc "$R/proc"
cp "$deb" "$R/tmp/vfiod.deb"
inroot() { chroot "$R" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 "$@"; }
inroot dpkg --purge vfiod >/dev/null 2>&1 || true
inroot dpkg -i /tmp/vfiod.deb
echo "== group"; inroot getent group hypeman
echo "== state"; inroot stat -c '%a %U' /var/lib/vfiod
echo "== pyc"; inroot find /usr/lib/vfiod -name '*.pyc' | wc -l
echo "== imports"
inroot /usr/bin/python3 -I -c '
import sys; sys.path.insert(0, "/usr/lib/vfiod")
import dbus_fast, pydantic, pydantic_core, systemd.daemon, vfiod
print(pydantic.VERSION, pydantic.__file__, systemd.daemon.__file__, vfiod.__file__)'
echo "== check"; inroot sh -c 'cd / && vfiod check --simulate workstation-l4 --json' | head -c 200; echo
echo "== vfioctl"; inroot vfioctl --help | head -1
echo "== reinstall"; inroot dpkg -i /tmp/vfiod.deb
echo "== purge"; inroot dpkg --purge vfiod
echo "== after"; inroot sh -c 'ls -d /usr/lib/vfiod /var/lib/vfiod /usr/sbin/vfiod 2>&1 || true'
"""


def test_installs_runs_and_purges_in_an_overlay_root(deb: Path) -> None:
    if os.geteuid() != 0:
        unavailable("installing the package into an overlay of / needs root")
    for tool in ("unshare", "chroot", "mount"):
        if shutil.which(tool, path=PATH) is None:
            unavailable(f"{tool} is not installed")
    work = Path(tempfile.mkdtemp(prefix="vfiod-install-"))
    try:
        r = subprocess.run(
            [
                "unshare",
                "-m",
                "--propagation",
                "private",
                "bash",
                "-c",
                INSTALL_SCRIPT,
                "sh",
                str(deb),
                str(work),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = r.stdout
    assert r.returncode == 0, f"install script failed:\n{out}\n{r.stderr}"
    section = dict(re.findall(r"(?ms)^== (\w+)\n(.*?)(?=^== |\Z)", out))
    assert re.match(r"hypeman:x:\d+:", section["group"]), out
    assert section["state"].strip() == "700 root", out
    assert int(section["pyc"].strip()) > 50, "postinst did not byte-compile /usr/lib/vfiod"
    imports = section["imports"].split()
    assert imports[0].startswith("2."), f"pydantic v2 must be the bundled one: {imports}"
    assert imports[1].startswith("/usr/lib/vfiod/pydantic/")
    assert imports[2].startswith("/usr/lib/python3/dist-packages/systemd/")
    assert imports[3] == "/usr/lib/vfiod/vfiod/__init__.py"
    assert section["check"].lstrip().startswith("{"), out
    assert section["vfioctl"].startswith("usage: vfioctl"), out
    after = section["after"]
    for gone in ("/usr/lib/vfiod", "/var/lib/vfiod", "/usr/sbin/vfiod"):
        assert f"cannot access '{gone}'" in after, f"{gone} is still there after purge: {after}"


CLEAN_ROOT_ENV = "VFIOD_DEB_CLEAN_ROOT"
CLEAN_RUN_SCRIPT = r"""
set -eu
cd /
dbus-daemon --session --print-address=3 --nofork --nopidfile 3>/tmp/address &
bus=$!
for i in $(seq 50); do [ -s /tmp/address ] && break; sleep 0.1; done
A=$(cat /tmp/address)
vfiod run --bus "$A" --simulate workstation-l4 >/tmp/vfiod.log 2>&1 &
daemon=$!
for i in $(seq 100); do vfioctl --address "$A" status >/dev/null 2>&1 && break; sleep 0.1; done
echo "== register"; vfioctl --address "$A" --json register 0000:a2:00.0 --name l4 >/dev/null && echo ok
echo "== attach"; vfioctl --address "$A" attach vm1 l4 --include-group >/dev/null && echo ok
echo "== detach"; vfioctl --address "$A" detach vm1 >/dev/null && echo ok
kill "$daemon"; wait "$daemon" || true
kill "$bus"; wait "$bus" || true
echo "== group"; getent group hypeman
echo "== python"; python3 --version
echo "== pydantic"
python3 -I -c 'import sys; sys.path.insert(0, "/usr/lib/vfiod"); import pydantic; print(pydantic.__file__)'
echo "== log"; tail -5 /tmp/vfiod.log
"""


CLEAN_DISTS = ("bookworm", "trixie")
ROOTS = Path.home() / ".cache/vfiod/roots"  # outside the clone: every clone and CI run reuses them


def _depends_names(deb: Path) -> list[str]:
    """The packages the .deb's Depends name (the first of each alternative, without versions)."""
    names = {re.sub(r"[\s(:].*", "", alt.split("|")[0].strip()) for alt in _field(deb, "Depends").split(",")}
    return sorted(n for n in names if n)


def _base_root(dist: str, deb: Path) -> Path:
    """A minbase root of `dist` with the package's Depends installed (not the package), as a tarball
    cached by release and Depends: mmdebstrap downloads and unpacks it once (about 60 MB, a minute or
    two); later runs only extract it."""
    names = _depends_names(deb)
    key = hashlib.sha256(f"{dist} {' '.join(names)}".encode()).hexdigest()[:12]
    tarball = ROOTS / f"{dist}-minbase-{key}.tar"
    if tarball.exists():
        return tarball
    ROOTS.mkdir(parents=True, exist_ok=True)
    partial = tarball.with_suffix(f".{os.getpid()}.tar")
    r = subprocess.run(
        [
            "mmdebstrap",
            "--variant=minbase",
            "--skip=chroot/mount/sys",  # the real /sys never appears in the chroot
            f"--include={','.join(names)}",
            dist,
            str(partial),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert r.returncode == 0, f"mmdebstrap {dist}:\n{r.stderr[-4000:]}"
    partial.rename(tarball)
    return tarball


def _build_deb(dist: str, out: Path, *, lintian: bool = True) -> Path:
    """`packaging/build-deb.sh --dist DIST` into `out`: the one vfiod_<version>_amd64.deb it made."""
    r = subprocess.run(
        ["bash", str(REPO / "packaging/build-deb.sh"), "--dist", dist, "--outdir", str(out), "--builddir",
         str(out / "build"), *([] if lintian else ["--no-lintian"])],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )  # fmt: skip
    assert r.returncode == 0, f"build-deb.sh --dist {dist} failed:\n{r.stderr[-6000:]}"
    debs = sorted(out.glob("vfiod_*_amd64.deb"))
    assert len(debs) == 1, f"expected one vfiod_<version>_amd64.deb in {out}: {debs}"
    return debs[0]


@pytest.mark.parametrize("dist", CLEAN_DISTS)
def test_installs_and_runs_on_a_clean_debian_root(dist: str) -> None:
    """`make deb DIST=<release>`, then `dpkg -i` of it in a clean minbase root of that release (whose
    Depends mmdebstrap installed from the Debian mirror: cached), and the installed daemon (simulated
    kernel, private bus) and client run there: bookworm with its bundled wheels on Python 3.11, trixie on
    Python 3.13 with trixie's own python3-pydantic. Runs as root with mmdebstrap (CI); skipped otherwise
    unless VFIOD_DEB_CLEAN_ROOT=1 asks for it."""
    if os.geteuid() != 0 or shutil.which("mmdebstrap") is None:
        if os.environ.get(CLEAN_ROOT_ENV) == "1" or os.environ.get("VFIOD_REQUIRE_REAL_DAEMONS") == "1":
            unavailable("needs root and mmdebstrap (apt-get install mmdebstrap)")
        pytest.skip("needs root and mmdebstrap")
    work = Path(tempfile.mkdtemp(prefix=f"vfiod-clean-{dist}-"))
    try:
        deb = _build_deb(dist, work / "out")
        tarball = _base_root(dist, deb)
        root = work / "root"
        root.mkdir()
        subprocess.run(["tar", "-C", str(root), "-xf", str(tarball)], check=True, timeout=600)
        shutil.copy(deb, root / "tmp/vfiod.deb")
        script = (
            f'mount -t proc proc "{root}/proc"; mount --bind /dev/null "{root}/dev/null"; '
            f'exec chroot "{root}" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root sh -c "$0"'
        )
        install = (
            "echo '== install'; dpkg -i /tmp/vfiod.deb >/tmp/dpkg.log 2>&1 && echo ok || cat /tmp/dpkg.log\n"
        )
        r = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script, install + CLEAN_RUN_SCRIPT],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        out = r.stdout
        print(out)
        assert r.returncode == 0, f"{out}\n{r.stderr}"
        section = dict(re.findall(r"(?ms)^== (\w+)\n(.*?)(?=^== |\Z)", out))
        for step in ("install", "register", "attach", "detach"):
            assert section.get(step, "").strip() == "ok", (
                f"{step} failed on the clean {dist} root:\n{out}\n{r.stderr}"
            )
        assert section["group"].startswith("hypeman:x:"), out
        assert re.search(rf"^Python {CLEAN_PYTHON[dist]}", section["python"], re.M), out
        assert section["pydantic"].startswith(CLEAN_PYDANTIC[dist]), out  # bundled, or the release's own
    finally:
        shutil.rmtree(work, ignore_errors=True)


CLEAN_PYTHON = {"bookworm": "3.11", "trixie": "3.13"}
CLEAN_PYDANTIC = {
    "bookworm": "/usr/lib/vfiod/pydantic/",
    "trixie": "/usr/lib/python3/dist-packages/pydantic/",
}
