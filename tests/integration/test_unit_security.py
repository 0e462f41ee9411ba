"""systemd/vfiod.service: its sandbox exposure, the settings the job needs, and `systemd-analyze verify`.

`systemd-analyze security --offline=true` scores a unit file without systemd running (0.0 best, 10.0
worst). Its `--threshold` is on a 0-100 scale and it exits 0 even for UNSAFE units, so the score is parsed.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.support.realstack import REPO, unavailable
from vfiod.config import DEFAULT_TEXTFILE

UNIT = REPO / "systemd/vfiod.service"
MAX_EXPOSURE = 3.0
CAPABILITIES = {"CAP_CHOWN", "CAP_FOWNER", "CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"}


def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        unavailable("systemd-analyze is not installed (apt-get install systemd)")
        raise AssertionError("unreachable")
    return exe


def unit_settings(path: Path = UNIT) -> dict[str, list[str]]:
    """Every Key=value of the unit, in order (keys may repeat)."""
    out: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def exposure(unit: Path) -> tuple[float, str]:
    r = subprocess.run(
        [_systemd_analyze(), "security", "--offline=true", "--no-pager", unit.name],
        cwd=unit.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, f"systemd-analyze security failed: {r.stderr}"
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?) (\w+)", r.stdout)
    assert m, f"no exposure level in the output:\n{r.stdout}\n{r.stderr}"
    return float(m.group(1)), r.stdout


def test_exposure_is_at_most_3(capsys: pytest.CaptureFixture[str]) -> None:
    score, report = exposure(UNIT)
    flagged = "\n".join(line for line in report.splitlines() if line.startswith("✗"))
    with capsys.disabled():  # shown in every run, not only on failure
        print(
            f"\n[systemd-analyze security --offline=true {UNIT.name}: exposure {score} (max {MAX_EXPOSURE})]"
        )
    assert score <= MAX_EXPOSURE, f"exposure {score} > {MAX_EXPOSURE}; flagged:\n{flagged}"


def _explained(lines: list[str], key: str) -> bool:
    """`key=` is set right under a comment block containing "Open", or an "# Open" comment names `key=`."""
    for i, line in enumerate(lines):
        if line.startswith("#") and "Open" in line and f"{key}=" in line:
            return True
        if line.startswith(f"{key}="):
            j = i - 1
            while j >= 0 and lines[j].startswith("#"):
                if "Open" in lines[j]:
                    return True
                j -= 1
    return False


def test_every_open_setting_says_why() -> None:
    """Each check systemd-analyze flags (✗) must be explained by an "# Open" comment in the unit."""
    _score, report = exposure(UNIT)
    lines = [line.strip() for line in UNIT.read_text().splitlines()]
    flagged = [line[1:].split()[0] for line in report.splitlines() if line.startswith("✗")]
    assert flagged, report
    for name in flagged:  # e.g. CapabilityBoundingSet=~CAP_SYS_PTRACE, User=/DynamicUser=
        key = re.split(r"[=/]", name, maxsplit=1)[0]
        assert _explained(lines, key), f"{name} is left open without an '# Open' comment saying why"


def test_the_job_needs_are_set() -> None:
    s = unit_settings()
    assert s["Type"] == ["dbus"] and s["BusName"] == ["org.hypeman.Devices1"]
    assert s["ExecStart"] == ["/usr/sbin/vfiod run"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["Restart"] == ["on-failure"]
    assert s["NotifyAccess"] == ["main"] and s["WatchdogSec"]
    assert s["StateDirectory"] == ["vfiod"] and s["ConfigurationDirectory"] == ["vfiod"]
    assert s["WantedBy"] == ["multi-user.target"]
    assert "modprobe@vfio_pci.service" in " ".join(s["Wants"])
    assert "modprobe@vfio_pci.service" in " ".join(s["After"])
    caps = set(" ".join(s["CapabilityBoundingSet"]).split())
    assert caps == CAPABILITIES, f"capabilities {sorted(caps)}"
    assert not any("CAP_SYS_ADMIN" in " ".join(v) for v in s.values()), "no setting may grant CAP_SYS_ADMIN"
    assert s.get("AmbientCapabilities", [""]) == [""]
    assert s["NoNewPrivileges"] == ["yes"]
    assert set(" ".join(s["RestrictAddressFamilies"]).split()) == {"AF_UNIX", "AF_NETLINK"}
    assert s["ProtectSystem"] == ["strict"] and s["DevicePolicy"] == ["closed"]
    assert "char-vfio rw" in s["DeviceAllow"]
    # the sysfs it writes, and the metrics textfile's default directory ("-": absent is fine)
    textfiles = f"-{Path(DEFAULT_TEXTFILE).parent}"
    assert set(" ".join(s["ReadWritePaths"]).split()) == {"/sys/bus/pci", "/sys/devices", textfiles}


def test_dbus_activation_points_at_the_unit() -> None:
    svc = configparser.ConfigParser(interpolation=None)
    svc.optionxform = str  # type: ignore[assignment,method-assign]
    svc.read(REPO / "dbus/org.hypeman.Devices1.service")
    sect = svc["D-BUS Service"]
    assert dict(sect) == {
        "Name": "org.hypeman.Devices1",
        "Exec": "/usr/sbin/vfiod run",
        "User": "root",
        "SystemdService": "vfiod.service",
    }


def test_verify_where_the_daemon_is_installed() -> None:
    """`systemd-analyze verify` of the unit as installed (the package's own unpacked copy is verified in
    test_deb_package.py, on every machine)."""
    exe = _systemd_analyze()
    if not Path("/usr/sbin/vfiod").exists():
        pytest.skip("ExecStart=/usr/sbin/vfiod does not exist on this machine (the package is not installed)")
    unit = Path("/lib/systemd/system/vfiod.service")
    if not unit.exists():
        unit = UNIT
    r = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0 and not r.stderr.strip(), f"systemd-analyze verify: {r.stderr}"
