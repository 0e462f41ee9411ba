"""A sysfs write that hangs in the kernel never delays another caller."""

from __future__ import annotations

import threading
import time

from tests.bus.conftest import Clients, StartVfiod
from tests.bus.harness import Reply
from tests.bus.helpers import GPU, b, ok, register
from vfiod.host.simulator import faults


def test_list_devices_answers_while_an_unbind_hangs(start_vfiod: StartVfiod, clients: Clients) -> None:
    vfiod = start_vfiod()
    register(clients.root, GPU, "gpu")
    ok(clients.root.m("Bind", "sa{sv}", "gpu", {"include_group": b(True)}))
    faults.inject(vfiod.root, "hang", kind="hang", path="/sys/bus/pci/drivers/vfio-pci/unbind")
    result: list[Reply] = []
    worker = threading.Thread(target=lambda: result.append(clients.root.m("Unbind", "sa{sv}", "gpu", {})))
    worker.start()
    try:
        assert faults.wait_hung(vfiod.root, "hang", 10), "the unbind did not reach the kernel"
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
