"""Start-up with many devices to recover fits systemd's start timeout: vfiod takes its bus name at once and
finishes the interrupted operations in the background, side by side.

The host (`synthetic:N`, GPU + HDMI audio pairs) is left as a vfiod killed in the middle of a Detach of
every GPU would leave it: attached, `releasing`, the detach journaled. Every unbind from vfio-pci then
hangs in the kernel, so each device needs its writes' deadlines (3 s here) before it is known `stuck`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.bus.support.harness import Client, LoopThread, PrivateBus
from tests.bus.support.helpers import ok
from tests.core.support.crashes import open_manager
from vfiod.bus.names import BUS_NAME
from vfiod.core.context import Caller
from vfiod.core.discovery import discover
from vfiod_sim import build, faults

HM = Caller(uid=1000)
DEADLINE = 3


def interrupted_detaches(sim_root: Path, gpus: int) -> list[str]:
    """Attach every GPU, then leave each mid-Detach as a killed vfiod would; returns the GPU addresses."""
    build(sim_root, f"synthetic:{2 * gpus}")
    m = open_manager(sim_root, sim_root / "var/lib/vfiod")
    m.startup()
    addrs = []
    for n, avail in enumerate(discover(m.host)):
        if n == gpus:
            break
        m.register(HM, avail.pci_address, f"gpu{n}")
        m.attach(HM, f"vm{n}", [f"gpu{n}"], include_group=True)
        addrs.append(avail.pci_address)
    for row in m.registry.list_devices():
        att = m.registry.attachment_of_device(row.id)
        assert att is not None
        m.registry.update_device(row.id, state="releasing")
        m.registry.journal_function(
            action="detach",
            boot_id=m.boot_id,
            operation=f"detach-{att.instance_id}",
            device_id=row.id,
            pci_address=str(row.pci_address),
            iommu_group=row.iommu_group,
            from_driver=row.native_driver,
            native_module=row.native_module,
            to_driver="",
        )
    m.registry.close()
    faults.inject(sim_root, "hang", kind="hang", path="/sys/bus/pci/drivers/vfio-pci/unbind")
    return addrs


def states(c: Client) -> dict[str, str]:
    return {r["pci_address"]: r["state"] for r in ok(c.m("ListDevices", "a{sv}", {}))}


@pytest.mark.slow
@pytest.mark.parametrize("gpus", [8, 16])
def test_startup_takes_the_name_first_and_recovers_in_the_background(
    tmp_path: Path, bus: PrivateBus, gpus: int
) -> None:
    sim_root = tmp_path / "host"
    addrs = interrupted_detaches(sim_root, gpus)
    conf = tmp_path / "vfiod.toml"
    conf.write_text(f"[deadlines]\ndefault = {DEADLINE}\n", encoding="utf-8")
    log = tmp_path / "vfiod.log"
    lt = LoopThread("startup")
    # systemd's side of sd_notify: the STATUS= lines it would show in `systemctl status vfiod`
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(0.5)
    messages: list[bytes] = []

    def read_notifications() -> None:
        with contextlib.suppress(OSError):
            while True:
                with contextlib.suppress(TimeoutError):
                    messages.append(notify.recv(4096))

    reader = threading.Thread(target=read_notifications, daemon=True)
    reader.start()
    argv = [sys.executable, "-m", "vfiod.cli.daemon", "run", "--bus", bus.address]
    argv += ["--simulate", f"synthetic:{2 * gpus}", "--sim-root", str(sim_root), "--config", str(conf)]
    with open(log, "wb") as out:
        started = time.monotonic()
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=out,
            env=dict(os.environ, PYTHONUNBUFFERED="1", NOTIFY_SOCKET=str(tmp_path / "notify")),
        )
    try:
        c = Client(lt, bus.address)
        while not c.bus_call("NameHasOwner", "s", BUS_NAME).value():
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() - started < 30
            time.sleep(0.02)
        named = time.monotonic() - started
        # while the GPUs are being recovered, a call on one answers Recovering (not a hang, not a guess)
        busy = c.m("Detach", "sasa{sv}", "vm0", [], {})
        assert busy.short == "Recovering", busy
        while any(s in ("releasing", "binding") for s in states(c).values()) or len(states(c)) < 2 * gpus:
            assert time.monotonic() - started < 90, states(c)
            time.sleep(0.1)
        settled = time.monotonic() - started
        final = states(c)
        text = log.read_text(errors="replace")
        print(f"{gpus} stuck GPUs: bus name after {named:.1f} s, every device settled after {settled:.1f} s")
        assert named < 5.0
        assert settled < 60.0
        assert set(final.values()) == {"stuck"}
        deadline = time.monotonic() + 10
        while not any(b"STATUS=serving" in m for m in messages):
            assert time.monotonic() < deadline, messages
            time.sleep(0.05)
        statuses = [m.decode() for m in messages if b"STATUS=" in m]
        assert any(f"STATUS=recovering 0 of {2 * gpus} devices" in m for m in statuses), statuses
        assert any(f"STATUS=recovering {2 * gpus} of {2 * gpus} devices" in m for m in statuses), statuses
        for addr in addrs:  # stuck, with the write still pending named
            assert f"{addr}: could not finish an interrupted detach: writing '{addr}' to " in text, [
                line for line in text.splitlines() if addr in line and "startup" in line
            ]
            assert "vfio-pci/unbind did not complete within 3 s" in text
        c.close()
    finally:
        faults.release(sim_root, "hang")
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        lt.close()
        notify.close()
