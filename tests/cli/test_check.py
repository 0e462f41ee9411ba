"""Tests for `vfiod check` (vfiod.cli.daemon.main + vfiod.cli.check): the acceptance reports on the
simulator, the JSON shape, human output, and exit status 2 without a traceback for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.cli.support.completion import complete
from tests.core.support.fake_sys import FakeSys, workstation
from vfiod.cli.daemon import main
from vfiod.cli.report import ABSENT, PASS, status_checks
from vfiod.core.hoststatus import host_status
from vfiod_sim.simulation import Simulation

REPO = Path(__file__).resolve().parents[2]
VFIOD = REPO / ".venv/bin/vfiod"


def run_json(capsys: pytest.CaptureFixture[str], *args: str, status: int = 0) -> dict[str, Any]:
    assert main(["check", *args, "--json"]) == status
    out = capsys.readouterr().out
    doc: dict[str, Any] = json.loads(out)
    # Exactly {"host", "devices", "sharing", "vmm"}, sorted keys, compact (one line: the C encoder).
    assert set(doc) == {"host", "devices", "sharing", "vmm"}
    assert out == json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n"
    return doc


def devices_by_addr(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["pci_address"]: d for d in doc["devices"]}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    fs = FakeSys(tmp_path / "host")
    workstation(fs)
    fs.pci("0000:00:01.0", cls="0x060400", driver="pcieport", group=12, header=1)
    fs.pci(
        "0000:a2:00.0",
        parent="0000:00:01.0",
        vendor="10de",
        device="27b8",
        cls="0x030200",
        group=12,
        driver="nvidia",
        reset="flr bus",
    )
    fs.pci(
        "0000:a2:00.1",
        parent="0000:00:01.0",
        vendor="10de",
        device="22bc",
        cls="0x040300",
        group=12,
        driver="snd_hda_intel",
    )
    fs.pci("0000:00:1f.0", cls="0x060100", driver="lpc_ich", group=12)  # ISA bridge sharing the group
    return fs.root


# ----- acceptance on the simulator -----------------------------------------------------------------------


def test_workstation_l4(capsys: pytest.CaptureFixture[str]) -> None:
    doc = run_json(capsys, "--simulate", "workstation-l4")
    got = devices_by_addr(doc)
    gpu = got["0000:a2:00.0"]
    assert gpu["vendor_name"] == "NVIDIA Corporation"
    assert gpu["device_name"] == "AD104GL [L4]"
    assert gpu["type"] == "gpu"
    assert "0000:a2:00.1" in gpu["iommu_group_members"]
    assert "0000:a2:00.1" not in got  # the audio function is not a candidate of its own
    igpu = got["0000:00:02.0"]
    assert igpu["host_critical"].startswith("is the boot VGA with the console bound to it")
    assert not igpu["passthrough_ready"]
    assert doc["host"]["iommu_enabled"] is True
    assert doc["host"]["gpu_mode"] == "passthrough"


def test_workstation_l4_all_marks_nic_and_nvme(capsys: pytest.CaptureFixture[str]) -> None:
    doc = run_json(capsys, "--simulate", "workstation-l4", "--all")
    critical = {d["pci_address"]: d["host_critical"] for d in doc["devices"] if d["host_critical"]}
    classes = {d["pci_address"]: d["class"] for d in doc["devices"]}
    assert any(classes[a].startswith("0108") and r.startswith("backs /") for a, r in critical.items())
    assert any(classes[a].startswith("0200") and "default route" in r for a, r in critical.items())


def test_no_iommu(capsys: pytest.CaptureFixture[str]) -> None:
    doc = run_json(capsys, "--simulate", "no-iommu", status=1)  # the IOMMU check FAILs
    host = doc["host"]
    assert host["iommu_enabled"] is False
    # the simulated CPU names no vendor: both ways, and never the amd_iommu=on that no kernel knows
    assert any("intel_iommu=on" in p and "AMD-Vi" in p for p in host["problems"])
    assert not any("amd_iommu=on" in p for p in host["problems"])
    assert doc["devices"], "devices without an IOMMU group are reported, not dropped"
    for d in doc["devices"]:
        assert d["iommu_group"] == -1
        assert any("intel_iommu=on" in b for b in d["blockers"])
    # No usable slot is no slot (before, the L4 counted and the text said "✓ GPU passthrough").
    assert (host["gpu_mode"], host["gpu_slots_total"]) == ("none", 0)
    assert main(["check", "--simulate", "no-iommu"]) == 1
    text = capsys.readouterr().out
    assert "GPU passthrough: no usable slot" in text and "✓ GPU passthrough" not in text
    assert "  ! GPU passthrough: no usable slot" in text  # a warning, the IOMMU is what fails
    assert text.rstrip().endswith("Result: FAIL (IOMMU enabled (0 IOMMU groups))")
    # optional features a host lacks are not failures: "-", never ✗
    assert "  - iommufd (/dev/iommu)" in text and "✗ iommufd" not in text


def test_human_report_on_the_simulator(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--simulate", "workstation-l4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Host\n")
    assert "✓ IOMMU enabled" in out
    assert "0000:a2:00.0" in out and "AD104GL [L4]" in out


def test_console_script_subprocess() -> None:
    if not VFIOD.exists():
        subprocess.run([str(REPO / ".venv/bin/pip"), "install", "-q", "-e", str(REPO)], check=True)
    proc = subprocess.run(
        [str(VFIOD), "check", "--simulate", "workstation-l4", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    gpu = devices_by_addr(doc)["0000:a2:00.0"]
    assert (gpu["vendor_name"], gpu["device_name"], gpu["type"]) == (
        "NVIDIA Corporation",
        "AD104GL [L4]",
        "gpu",
    )
    assert "Traceback" not in proc.stderr


# ----- hand-built trees --------------------------------------------------------------------------------


def test_sysfs_root_tree_json(capsys: pytest.CaptureFixture[str], tree: Path) -> None:
    doc = run_json(capsys, "--sysfs-root", str(tree), "--pci-ids", "/nonexistent/pci.ids")
    got = devices_by_addr(doc)
    assert list(got) == ["0000:00:02.0", "0000:a2:00.0"]
    gpu = got["0000:a2:00.0"]
    assert gpu["vendor_name"] == "10de" and gpu["device_name"] == "27b8"
    # The LPC bridge is bound to a host driver in the L4's group, in another slot: a real blocker.
    assert gpu["blockers"] == [
        "IOMMU group 12 also holds 0000:00:1f.0 (lpc_ich), which the host is using; it must be passed "
        "through with it or unbound"
    ]
    assert doc["host"]["gpu_slots_total"] == 1


def test_sysfs_root_tree_all(capsys: pytest.CaptureFixture[str], tree: Path) -> None:
    doc = run_json(capsys, "--sysfs-root", str(tree), "--all")
    got = devices_by_addr(doc)
    assert got["0000:03:00.0"]["host_critical"].startswith("backs / (ext4 on /dev/nvme0n1p2)")
    assert got["0000:00:1f.6"]["host_critical"].startswith("carries the IPv4 and IPv6 default route")
    assert got["0000:a2:00.1"]["type"] == "pci"


def test_human_report(capsys: pytest.CaptureFixture[str], tree: Path) -> None:
    assert main(["check", "--sysfs-root", str(tree), "--pci-ids", "/nonexistent"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "Host"
    assert "  ✓ IOMMU enabled (5 IOMMU groups)" in lines
    assert "  ! vfio-pci loaded (vfiod loads it on first use)" in lines  # a warning: vfiod loads it
    assert (
        "  ✗ vfio-pci is not loaded: modprobe vfio-pci (vfiod loads it through modprobe@vfio_pci.service)"
        in lines
    )
    header = next(line for line in lines if line.lstrip().startswith("ADDRESS"))
    for column in ("DEVICE", "TYPE", "GROUP", "MEMBERS", "DRIVER", "RESET", "READY"):
        assert column in header
    gpu_row = next(line for line in lines if line.lstrip().startswith("0000:a2:00.0"))
    assert "0000:a2:00.1 (snd_hda_intel)" in gpu_row
    assert "0000:00:1f.0 (lpc_ich)" in gpu_row
    assert "flr,bus" in gpu_row and gpu_row.rstrip().endswith("no")
    blocker = lines[lines.index(gpu_row) + 1]
    assert blocker.strip().startswith("✗ IOMMU group 12 also holds 0000:00:1f.0 (lpc_ich)")
    igpu_row = next(line for line in lines if line.lstrip().startswith("0000:00:02.0"))
    assert "the host needs it: it is the boot VGA" in lines[lines.index(igpu_row) + 1]


def test_ascii_fallback_for_terminals_without_unicode(tree: Path) -> None:
    import argparse
    import io

    from vfiod.cli import check

    buf = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    args = argparse.Namespace(simulate=None, sysfs_root=tree, all=False, json=False, pci_ids=None)
    assert check.run(args, out=buf) == 0
    buf.flush()
    text = buf.buffer.getvalue().decode("ascii")
    assert "ok IOMMU enabled" in text and "! vfio-pci loaded" in text and "Result: PASS" in text


def test_sysfs_root_that_is_a_bare_sysfs_mount(capsys: pytest.CaptureFixture[str], tree: Path) -> None:
    # Without sys/ inside, DIR is sysfs itself and /dev, /proc, /etc are the real ones (read only).
    assert main(["check", "--sysfs-root", str(tree / "sys"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert "0000:a2:00.0" in devices_by_addr(doc)


# ----- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["check", "--simulate"],
        ["check", "--no-such-option"],
        ["check", "--simulate", "workstation-l4", "--sysfs-root", "/tmp"],
        ["run", "--no-such-option"],
    ],
)
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip()


def test_unknown_profile(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--simulate", "no-such-profile"]) == 2
    captured = capsys.readouterr()
    assert "'no-such-profile'" in captured.err and "workstation-l4" in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_missing_sysfs_root(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["check", "--sysfs-root", str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert main(["check", "--help"]) == 0
    assert "--simulate" in capsys.readouterr().out


def test_module_entry_point_runs() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "vfiod.cli.daemon", "check", "--simulate", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr


def test_vendor_vgpu_host(capsys: pytest.CaptureFixture[str]) -> None:
    """l40s-vgpu: the VFs are vGPU parents of NVIDIA's vendor-specific VFIO, not passthrough candidates;
    vGPU readiness in the status, the sharing section and the last line."""
    doc = run_json(capsys, "--simulate", "l40s-vgpu", "--all")
    host = doc["host"]
    assert (
        host["gpu_mode"],
        host["vgpu_parents"],
        host["vgpu_slots_allocatable"],
        host["gpu_slots_total"],
    ) == (
        "vgpu",
        64,
        64,
        0,
    )
    offered = doc["sharing"]["profiles"]
    assert {p["framework"] for p in offered} == {"vendor-vfio"} and len(offered) == 64 * 17
    vf = next(d for d in doc["devices"] if d["pci_address"] == "0000:a2:00.4")
    assert not vf["passthrough_ready"] and any("vendor-VFIO" in b for b in vf["blockers"])
    assert main(["check", "--simulate", "l40s-vgpu"]) == 0
    out = capsys.readouterr().out
    assert "vendor-VFIO parents 0000:a2:00.4 ... 0000:b3:04.3 (64): 1152 (NVIDIA L40S-1Q)" in out
    tail = out.rstrip().splitlines()[-2:]
    assert tail == [
        "Ready for vGPUs: 64 can be created now (vfioctl profiles shows which)",
        "Result: PASS (warnings above, if any)",
    ]


def test_functions_without_a_usable_reset_are_warned_about(capsys: pytest.CaptureFixture[str]) -> None:
    """The QEMU guest's devices have no reset method (as the real kernel shows them): each listed GPU
    carries the warning Attach gives, under it in the text report, and stays ready (not a blocker); the
    L4, whose first reset is FLR, carries none."""
    doc = run_json(capsys, "--simulate", "qemu-q35")
    bochs = devices_by_addr(doc)["0000:00:03.0"]
    assert bochs["passthrough_ready"] is True and bochs["reset_methods"] == []
    assert len(bochs["warnings"]) == 1 and "has no reset method" in bochs["warnings"][0]
    l4 = devices_by_addr(run_json(capsys, "--simulate", "workstation-l4"))["0000:a2:00.0"]
    assert l4["reset_methods"] == ["flr", "bus"] and l4["warnings"] == []
    assert main(["check", "--simulate", "qemu-q35"]) == 0
    text = capsys.readouterr().out
    assert "      ! 0000:00:03.0 has no reset method" in text


def test_colour_only_on_a_terminal_and_never_with_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse
    import io

    from vfiod.cli import check

    class Terminal(io.StringIO):
        encoding = "utf-8"

        def isatty(self) -> bool:
            return True

    args = argparse.Namespace(simulate="workstation-l4", sysfs_root=None, all=False, json=False, pci_ids=None)
    monkeypatch.delenv("NO_COLOR", raising=False)
    tty = Terminal()
    assert check.run(args, out=tty) == 0
    assert "\x1b[32m✓\x1b[0m IOMMU enabled" in tty.getvalue() and "\x1b[33m!\x1b[0m" in tty.getvalue()
    monkeypatch.setenv("NO_COLOR", "1")
    plain = Terminal()
    assert check.run(args, out=plain) == 0
    assert "\x1b[" not in plain.getvalue() and "✓ IOMMU enabled" in plain.getvalue()
    piped = io.StringIO()
    monkeypatch.delenv("NO_COLOR")
    assert check.run(args, out=piped) == 0 and "\x1b[" not in piped.getvalue()


def test_bash_completion_of_vfiod() -> None:
    assert complete("vfiod", "ch") == ["check"]
    assert complete("vfiod", "check", "--si") == ["--simulate"]
    assert complete("vfiod", "check", "--simulate", "qemu") == ["qemu-q35", "qemu-q35-iommufd"]


def test_the_hand_over_modes_this_host_supports(tmp_path: Path) -> None:
    """`vfiod check` says whether Attach can hand descriptors over (handoff fd) and, if not, what the kernel
    lacks: Debian's 6.1 has neither VFIO cdevs nor iommufd; QEMU's q35 on a 6.12 with both shows its cdevs
    once vfio is loaded."""

    def handoff_line(sim: Simulation) -> tuple[str, str]:
        (line,) = [c for c in status_checks(host_status(sim.host).to_record()) if "hand-over" in c[1]]
        return line

    debian = Simulation.open(tmp_path / "l4", "workstation-l4")
    mark, text = handoff_line(debian)
    assert mark == ABSENT and text.endswith(
        "fd: this kernel has no VFIO device cdevs (CONFIG_VFIO_DEVICE_CDEV); this kernel has no iommufd "
        "(CONFIG_IOMMUFD)"
    )
    q35 = Simulation.open(tmp_path / "q35", "qemu-q35-iommufd")
    mark, text = handoff_line(q35)
    assert mark == ABSENT and "shows once vfio is loaded" in text and "iommufd" not in text
    q35.kernel.load_module("vfio")
    assert handoff_line(q35) == (
        PASS,
        "hand-over modes: node and fd (descriptors from OpenDevices; nodes stay root's)",
    )
