"""The README's demo (`tools/demo.sh`, what `make demo` runs): it runs to the end, exits 0, stops what it
started, and its output shows the workflow's key facts in order: the IOMMU group conflict without
include_group, the device on vfio-pci once attached, cloud-hypervisor's --device line, and the GPU back
on nvidia after Detach; then the vGPU chapter: profiles, two AttachVGPUs spread over both GPUs, the QEMU and
cloud-hypervisor lines, and the slots back after Detach."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "tools/demo.sh"
VFIOD = REPO / ".venv/bin/vfiod"


def _vfiod_has_run() -> bool:
    if not VFIOD.exists():
        return False
    probe = subprocess.run([VFIOD, "run", "--help"], capture_output=True, text=True, timeout=30, check=False)
    return probe.returncode == 0


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _vfiod_has_run(), reason="`vfiod run` is not available yet"),
]


def test_demo_runs_to_the_end_and_shows_the_workflow(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    env.pop("DBUS_SESSION_BUS_ADDRESS", None)
    start = time.monotonic()
    proc = subprocess.run(
        ["bash", DEMO], capture_output=True, text=True, timeout=120, cwd=REPO, env=env, check=False
    )
    elapsed = time.monotonic() - start
    out = proc.stdout
    assert proc.returncode == 0, f"demo failed ({proc.returncode}):\n{out}\n{proc.stderr}"
    assert elapsed < 60, f"the demo took {elapsed:.0f} s"
    assert "FAILED" not in out and "Traceback" not in out + proc.stderr

    # Every call is printed before its reply.
    for call in ("GetHostStatus", "ListAvailable", "RegisterDevice", "Attach", "Detach", "ListDevices"):
        assert f"org.hypeman.Devices1.Manager {call} " in out, call

    conflict = out.index("IOMMUGroupConflict")
    attached = out.index('"vfio-pci"', conflict)
    device_line = out.index("--device path=/sys/bus/pci/devices/0000:a2:00.0/", attached)
    audio_line = out.index("--device path=/sys/bus/pci/devices/0000:a2:00.1/", attached)
    detach = out.index("Detach sasa{sv} ml-training 0 0", max(device_line, audio_line))
    back = out.index('"driver" s "nvidia"', detach)
    assert '"driver" s "snd_hda_intel"' in out[back - 2000 : back + 2000]
    assert "vfioctl" in out[back:] and "nvidia" in out[out.index("vfioctl --address", back) :]
    # GPU sharing: the vGPU chapter on l40s-vgpu, in order
    sharing = out.index("--simulate l40s-vgpu", back)
    profiles = out.index("NVIDIA L40S-4Q", out.index("vfioctl --address", sharing))
    first = out.index("AttachVGPU ssa{sv} vm-a 'NVIDIA L40S-4Q'", profiles)
    second = out.index("AttachVGPU ssa{sv} vm-b 'NVIDIA L40S-4Q'", first)
    qemu = out.index("qemu-system-x86_64 -uuid 5a0d1f58-3c3a-4b8e-9a55-2f1d8e6b0a01", second)
    assert out.index("-device vfio-pci,sysfsdev=/sys/bus/pci/devices/0000:a2:", qemu)
    assert out.index("--device path=/sys/bus/pci/devices/0000:b3:", qemu)  # the other GPU: least loaded
    used = out.index('"vgpu_slots_used" u 2', qemu)
    freed = out.index('"vgpu_slots_used" u 0', out.index("Detach sasa{sv} vm-b 0 0", used))
    assert freed > used
    assert out.rstrip().endswith("stopping vfiod and the bus.")

    # It stopped what it started and removed its directory.
    assert list(tmp_path.iterdir()) == []
    assert _processes_mentioning(str(tmp_path)) == []


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in args:
            found.append(args)
    return found
