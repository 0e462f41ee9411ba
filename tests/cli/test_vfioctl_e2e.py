"""vfioctl end to end: a private bus, the real service (`vfiod run --simulate workstation-l4`) on it, and
every subcommand at least once: the seed's workflow (register → attach conflict → attach with
--include-group → idempotent repeat → detach), the exit statuses of NotFound, DeviceNotFound,
InvalidPCIAddress and the conflict class, `--json` parsed everywhere, `monitor` seeing a bind, and
import-hypeman reading a hypeman data directory.

The tests of this module run in file order against one service (one simulated host); each leaves the
devices as it found them unless it says otherwise.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cli.support.buses import private_bus, read_until
from vfiod.cli import vfioctl

REPO = Path(__file__).resolve().parents[2]
VFIOD = REPO / ".venv/bin/vfiod"
GPU, AUDIO = "0000:a2:00.0", "0000:a2:00.1"


def _vfiod_has_run() -> bool:
    if not VFIOD.exists():
        return False
    probe = subprocess.run([VFIOD, "run", "--help"], capture_output=True, text=True, timeout=30, check=False)
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(not _vfiod_has_run(), reason="`vfiod run` is not available yet")


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    with private_bus() as addr, tempfile.TemporaryDirectory(prefix="vfioctl-e2e-") as tmp:
        log = Path(tmp) / "vfiod.log"
        with log.open("w") as log_file:
            proc = subprocess.Popen(
                [VFIOD, "run", "--bus", addr, "--simulate", "workstation-l4", "--state-dir", f"{tmp}/state"],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        try:
            end = time.monotonic() + 20
            while True:
                status = subprocess.run(
                    ["busctl", f"--address={addr}", "status", "org.hypeman.Devices1"],
                    capture_output=True,
                    check=False,
                )
                if status.returncode == 0:
                    break
                if proc.poll() is not None or time.monotonic() > end:
                    pytest.fail(f"vfiod did not come up on the bus:\n{log.read_text()}")
                time.sleep(0.1)
            yield addr
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def ctl(capsys: pytest.CaptureFixture[str], address: str, *args: str) -> tuple[int, str, str]:
    code = vfioctl.main(["--address", address, *args])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


def ctl_json(capsys: pytest.CaptureFixture[str], address: str, *args: str) -> Any:
    code, out, err = ctl(capsys, address, "--json", *args)
    assert code == 0, err
    return json.loads(out)


def by_addr(devices: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["pci_address"]: d for d in devices}


def test_status_check_and_discovery(address: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = ctl(capsys, address, "status")
    assert code == 0 and "IOMMU enabled" in out
    status = ctl_json(capsys, address, "status")
    assert status["iommu_enabled"] is True and status["gpu_mode"] == "passthrough"
    report = ctl_json(capsys, address, "check")
    assert sorted(report) == ["devices", "host", "sharing"]
    assert by_addr(report["devices"])[AUDIO]["current_driver"] == "snd_hda_intel"
    code, out, _ = ctl(capsys, address, "check")
    assert code == 0 and "Ready:" in out and GPU in out
    gpus = by_addr(ctl_json(capsys, address, "list-available"))
    assert GPU in gpus and AUDIO not in gpus  # only display controllers without --all
    assert AUDIO in by_addr(ctl_json(capsys, address, "list-available", "--all"))
    code, out, _ = ctl(capsys, address, "list-available")
    assert code == 0 and "AD104GL" in out


def test_register_show_and_input_errors(address: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = ctl(capsys, address, "register", "0000:zz:00.0")
    assert (code, out) == (2, "") and err.startswith("vfioctl: InvalidPCIAddress: ")
    code, _, err = ctl(capsys, address, "register", "0000:0f:00.0")
    assert code == 3 and err.startswith("vfioctl: DeviceNotFound: ")
    code, _, err = ctl(capsys, address, "register", GPU, "--name", "bad name")
    assert code == 2 and err.startswith("vfioctl: InvalidName: ")
    device = ctl_json(capsys, address, "register", GPU, "--name", "l4-gpu", "--tag", "pool=ml")
    assert device["name"] == "l4-gpu" and device["driver"] == "nvidia" and device["tags"] == {"pool": "ml"}
    assert device["object_path"].startswith("/org/hypeman/Devices1/devices/")
    code, _, err = ctl(capsys, address, "register", GPU, "--name", "other")
    assert code == 5 and err.startswith("vfioctl: AlreadyExists: ")
    code, _, err = ctl(capsys, address, "register", AUDIO, "--name", "l4-gpu")
    assert code == 5 and err.startswith("vfioctl: NameExists: ")
    code, _, err = ctl(capsys, address, "show", "no-such-device")
    assert code == 3 and err.startswith("vfioctl: NotFound: ")
    assert ctl_json(capsys, address, "show", "l4-gpu")["id"] == device["id"]
    assert ctl_json(capsys, address, "show", device["id"])["name"] == "l4-gpu"
    code, out, _ = ctl(capsys, address, "show", "l4-gpu")
    assert code == 0 and "sysfs_path" in out and f"/sys/bus/pci/devices/{GPU}/" in out
    assert [d["name"] for d in ctl_json(capsys, address, "list", "--tag", "pool=ml")] == ["l4-gpu"]
    assert ctl_json(capsys, address, "list", "--tag", "pool=other") == []


def test_attach_workflow(address: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = ctl(capsys, address, "attach", "ml-training", "l4-gpu")
    assert code == 5 and out == ""
    assert err.startswith("vfioctl: IOMMUGroupConflict: ") and AUDIO in err
    assert ctl_json(capsys, address, "show", "l4-gpu")["driver"] == "nvidia"  # all or nothing

    code, out, _ = ctl(capsys, address, "attach", "ml-training", "l4-gpu", "--include-group")
    assert code == 0
    assert f"--device path=/sys/bus/pci/devices/{GPU}/" in out
    assert f"--device path=/sys/bus/pci/devices/{AUDIO}/" in out
    devices = by_addr(ctl_json(capsys, address, "list"))
    assert devices[GPU]["driver"] == "vfio-pci" and devices[GPU]["state"] == "attached"
    assert devices[AUDIO]["driver"] == "vfio-pci" and devices[AUDIO]["attached_to"] == "ml-training"

    again = ctl_json(capsys, address, "attach", "ml-training", "l4-gpu", "--include-group")
    assert again["changed"] is False and not any(a["changed"] for a in again["attachments"])
    roles = {a["pci_address"]: a["role"] for a in again["attachments"]}
    assert roles == {GPU: "requested", AUDIO: "companion"}
    assert again["cloud_hypervisor_args"] == [
        "--device",
        f"path=/sys/bus/pci/devices/{GPU}/",
        "--device",
        f"path=/sys/bus/pci/devices/{AUDIO}/",
    ]
    code, _, err = ctl(capsys, address, "attach", "other-vm", "l4-gpu", "--include-group")
    assert code == 5 and err.startswith("vfioctl: InUse: ")
    code, _, err = ctl(capsys, address, "unregister", "l4-gpu")
    assert code == 5 and err.startswith("vfioctl: InUse: ")

    code, out, _ = ctl(capsys, address, "detach", "ml-training")
    assert code == 0 and "l4-gpu (0000:a2:00.0): nvidia" in out
    devices = by_addr(ctl_json(capsys, address, "list"))
    assert devices[GPU]["driver"] == "nvidia" and devices[AUDIO]["driver"] == "snd_hda_intel"
    assert devices[GPU]["attached_to"] == ""
    detached = ctl_json(capsys, address, "detach", "ml-training")  # idempotent
    assert detached["released"] == [] and detached["instance"] == "ml-training"


def test_bind_unbind_exclusive(address: str, capsys: pytest.CaptureFixture[str]) -> None:
    bound = ctl_json(capsys, address, "bind", "l4-gpu", "--include-group")
    assert bound["bound"] == "l4-gpu" and bound["device"]["driver"] == "vfio-pci" and bound["changed"] is True
    code, _, err = ctl(capsys, address, "bind", "l4-gpu", "--exclusive")
    assert code == 5 and err.startswith("vfioctl: AlreadyBound: ")
    assert ctl_json(capsys, address, "bind", "l4-gpu")["changed"] is False  # idempotent without --exclusive
    for name in ("l4-gpu", "pci-0000-a2-00-1"):
        assert ctl_json(capsys, address, "unbind", name)["changed"] is True
    assert ctl_json(capsys, address, "unbind", "l4-gpu")["changed"] is False
    code, _, err = ctl(capsys, address, "unbind", "l4-gpu", "--exclusive")
    assert code == 5 and err.startswith("vfioctl: NotBound: ")
    devices = by_addr(ctl_json(capsys, address, "list"))
    assert devices[GPU]["driver"] == "nvidia" and devices[AUDIO]["driver"] == "snd_hda_intel"


def test_reconcile_and_recover(address: str, capsys: pytest.CaptureFixture[str]) -> None:
    ctl_json(capsys, address, "attach", "stale-vm", "l4-gpu", "--include-group")
    dry = ctl_json(capsys, address, "reconcile", "--dry-run", "some-live-vm")
    assert isinstance(dry.get("findings"), list)
    assert by_addr(ctl_json(capsys, address, "list"))[GPU]["attached_to"] == "stale-vm"  # dry run
    code, out, _ = ctl(capsys, address, "reconcile", "some-live-vm")
    assert code == 0 and "Reconcile" in out
    devices = by_addr(ctl_json(capsys, address, "list"))
    assert devices[GPU]["attached_to"] == "" and devices[GPU]["driver"] == "nvidia"
    assert isinstance(ctl_json(capsys, address, "recover", "--dry-run"), dict)
    code, out, _ = ctl(capsys, address, "recover")
    assert code == 0 and out.startswith("Recover")
    code, _, err = ctl(capsys, address, "recover", "no-such-device")
    assert code == 3 and err.startswith("vfioctl: NotFound: ")


def test_monitor_sees_a_bind(address: str, capsys: pytest.CaptureFixture[str]) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "vfiod.cli.vfioctl", "--address", address, "monitor"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        read_until(proc, proc.stderr, "Monitoring org.hypeman.Devices1")
        assert ctl(capsys, address, "attach", "watched-vm", "l4-gpu", "--include-group")[0] == 0
        line = read_until(proc, proc.stdout, "Driver=vfio-pci")
        assert "changed" in line and "(0000:a2:00." in line
        assert ctl(capsys, address, "detach", "watched-vm")[0] == 0
        read_until(proc, proc.stdout, "Driver=nvidia")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_import_hypeman_and_unregister(
    address: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    record = {
        "id": "h" + "1" * 23,
        "name": "usb-ctrl",
        "type": "pci",
        "pci_address": "0000:00:14.0",
        "vendor_id": "8086",
        "created_at": "2025-12-01T10:00:00Z",
    }
    (tmp_path / "devices" / record["id"]).mkdir(parents=True)
    (tmp_path / "devices" / record["id"] / "metadata.json").write_text(json.dumps(record))
    report = ctl_json(capsys, address, "import-hypeman", str(tmp_path))
    assert report["imported"] == 1, report
    assert ctl_json(capsys, address, "show", "usb-ctrl")["id"] == record["id"]
    code, out, _ = ctl(capsys, address, "import-hypeman", str(tmp_path))  # already there: reported
    assert code == 0 and "already registered" in out

    for name in ("usb-ctrl", "l4-gpu"):
        code, out, _ = ctl(capsys, address, "unregister", name)
        assert code == 0 and out == f"Unregistered {name}\n"
    code, _, err = ctl(capsys, address, "unregister", "l4-gpu")
    assert code == 3 and err.startswith("vfioctl: NotFound: ")


def test_vfs_of_a_function_without_sr_iov(address: str, capsys: pytest.CaptureFixture[str]) -> None:
    """workstation-l4 has no SR-IOV PF: the GPU is refused by name, nothing changes (the VF workflow is in
    tests/bus/test_methods.py and the real-kernel suite)."""
    code, _, err = ctl(capsys, address, "vfs", GPU, "2")
    assert code == 2 and err.startswith("vfioctl: InvalidArgument: ") and "no SR-IOV capability" in err
    code, _, err = ctl(capsys, address, "vfs", "0000:a2:00", "2")
    assert code == 2 and err.startswith("vfioctl: InvalidPCIAddress: ")
