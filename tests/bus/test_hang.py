"""A sysfs write that hangs in the kernel never delays another caller."""

from __future__ import annotations

import threading
import time

from tests.bus.conftest import Clients, Running, StartVfiod
from tests.bus.support.harness import Reply
from tests.bus.support.helpers import AUDIO, GPU, b, ok, register
from vfiod.bus.uevents import Uevent
from vfiod_sim import faults


def hung_unbind(vfiod: Running, clients: Clients, result: list[Reply]) -> threading.Thread:
    """The GPU bound with its audio, then root's Unbind, whose first vfio-pci unbind hangs in the kernel
    (the call holds the group); `result` gets its reply once the hang is released."""
    register(clients.root, GPU, "gpu")
    ok(clients.root.m("Bind", "sa{sv}", "gpu", {"include_group": b(True)}))
    faults.inject(vfiod.root, "hang", kind="hang", path="/sys/bus/pci/drivers/vfio-pci/unbind")
    worker = threading.Thread(target=lambda: result.append(clients.root.m("Unbind", "sa{sv}", "gpu", {})))
    worker.start()
    assert faults.wait_hung(vfiod.root, "hang", 10), "the unbind did not reach the kernel"
    return worker


def test_list_devices_answers_while_an_unbind_hangs(start_vfiod: StartVfiod, clients: Clients) -> None:
    vfiod = start_vfiod()
    result: list[Reply] = []
    worker = hung_unbind(vfiod, clients, result)
    try:
        for who in (clients.bob, clients.root):
            started = time.monotonic()
            listed = ok(who.m("ListDevices", "a{sv}", {}))
            elapsed = time.monotonic() - started
            assert elapsed < 1.0, f"ListDevices took {elapsed:.2f} s while an unbind hung"
            assert {d["name"] for d in listed} >= {"gpu"}
        assert worker.is_alive()  # still hung
    finally:
        faults.release(vfiod.root, "hang")
        worker.join(30)
    assert result and result[0].ok, result
    assert ok(clients.root.m("GetDevice", "sa{sv}", "gpu", {}))["driver"] == "nvidia"


def test_pending_uevents_during_a_hung_unbind_do_not_stall_get_device(
    start_vfiod: StartVfiod, clients: Clients
) -> None:
    """20 uevents on the audio function while the GPU's unbind hangs (the call holds the group): before,
    each queued a refresh that blocked a read worker on the group lock, and GetDevice waited behind them."""
    vfiod = start_vfiod()
    result: list[Reply] = []
    worker = hung_unbind(vfiod, clients, result)
    try:

        async def uevents() -> None:
            for _ in range(20):
                vfiod.service.on_uevent(Uevent("change", AUDIO, "vfio-pci", f"/devices/x/{AUDIO}"))

        vfiod.lt.run(uevents())
        worst = 0.0
        for _ in range(5):
            started = time.monotonic()
            ok(clients.bob.m("GetDevice", "sa{sv}", "gpu", {}))
            worst = max(worst, time.monotonic() - started)
        print(f"GetDevice during the hung unbind after 20 uevents: worst of 5 calls {worst * 1000:.0f} ms")
        assert worst < 1.0, f"GetDevice took {worst:.2f} s during the hang"
        hung = [t.name for t in threading.enumerate() if t.name.startswith("sysfs-write")]
        assert len(hung) == 1, hung  # the one write in the kernel; nothing piled up behind it
        assert worker.is_alive()  # still hung
    finally:
        faults.release(vfiod.root, "hang")
        worker.join(60)
    assert result
