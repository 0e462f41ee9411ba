"""What one connection may cost vfiod: calls in flight and replies waiting, beyond which it gets Busy.

The cap is per unique name: the caller over it is refused at once and nothing is done for it; another
connection (of the same uid, or root) is served as before; the caller is served again once its earlier
calls are answered.
"""

from __future__ import annotations

import threading

from tests.bus.conftest import Clients, StartVfiod
from tests.bus.support.harness import Reply
from tests.bus.support.helpers import GPU, b, ok, register
from vfiod_sim import faults


def test_a_caller_at_its_cap_gets_busy_and_nothing_is_done(start_vfiod: StartVfiod, clients: Clients) -> None:
    vfiod = start_vfiod()
    register(clients.root, GPU, "gpu")
    vfiod.service.max_calls_per_caller = 1
    faults.inject(vfiod.root, "hang", kind="hang", path="/sys/bus/pci/drivers/nvidia/unbind")
    held: list[Reply] = []
    worker = threading.Thread(
        target=lambda: held.append(clients.root.m("Bind", "sa{sv}", "gpu", {"include_group": b(True)}))
    )
    worker.start()
    try:
        assert faults.wait_hung(vfiod.root, "hang", 10), "the bind did not reach the kernel"
        writes = vfiod.trace_len()
        busy = clients.root.m("Unbind", "sa{sv}", "gpu", {})
        assert busy.short == "Busy", busy
        assert "1 calls in flight (at most 1)" in busy.text
        assert "nothing was done" in busy.text
        assert clients.root.m("ListDevices", "a{sv}", {}).short == "Busy"
        # other connections are not held back by this one's cap
        assert "gpu" in {d["name"] for d in ok(clients.bob.m("ListDevices", "a{sv}", {}))}
        assert vfiod.trace_len() == writes
    finally:
        faults.release(vfiod.root, "hang")
        worker.join(30)
    assert held and held[0].ok, held
    # answered: the caller's slot is free again
    assert ok(clients.root.m("GetDevice", "sa{sv}", "gpu", {}))["driver"] == "vfio-pci"
    assert vfiod.service.refused_busy == 2


def test_a_caller_whose_replies_wait_unread_gets_busy(start_vfiod: StartVfiod, clients: Clients) -> None:
    vfiod = start_vfiod()
    conn = vfiod.service.bus
    bob = clients.bob.unique_name
    # What Connection.queued_bytes reports while the socket to dbus-daemon is full with replies to bob
    # (tests/bus/test_connection.py measures that part against a stopped dbus-daemon).
    real = conn.queued_bytes  # type: ignore[attr-defined]
    conn.queued_bytes = lambda who: 20 * 1024 * 1024 if who == bob else real(who)  # type: ignore[attr-defined]
    try:
        busy = clients.bob.m("ListDevices", "a{sv}", {})
        assert busy.short == "Busy", busy
        assert "bytes of replies it has not read yet" in busy.text
        ok(clients.alice.m("ListDevices", "a{sv}", {}))
    finally:
        conn.queued_bytes = real  # type: ignore[attr-defined]
    ok(clients.bob.m("ListDevices", "a{sv}", {}))


def test_standard_interfaces_count_against_the_cap(start_vfiod: StartVfiod, clients: Clients) -> None:
    vfiod = start_vfiod()
    vfiod.service.max_calls_per_caller = 0
    reply = clients.bob.call("Ping", interface="org.freedesktop.DBus.Peer")
    assert reply.short == "Busy", reply
    vfiod.service.max_calls_per_caller = 4
    assert clients.bob.call("Ping", interface="org.freedesktop.DBus.Peer").ok
    assert vfiod.service._calls_of == {}  # every call counted was released
