"""Inspect calls under load: identical reads share one scan, a change (vfiod's own write, a registry change,
another tool's bind announced by a uevent) is seen by the next read, and an unprivileged caller's reads
never hold up root's or a mutating call."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

from dbus_fast import Variant

from tests.bus.conftest import Clients, StartVfiod
from tests.bus.support.harness import PolkitMock, Reply
from tests.bus.support.helpers import AUDIO, GPU, b, ok, register
from vfiod.bus.names import ACTION_ATTACH, ACTION_INSPECT
from vfiod.core.discovery import AvailableDevice


def available(c: object, all_devices: bool = True) -> dict[str, str]:
    """ListAvailable as {pci_address: current_driver}."""
    recs = ok(c.m("ListAvailable", "a{sv}", {"all": Variant("b", all_devices)}))  # type: ignore[attr-defined]
    return {r["pci_address"]: r["current_driver"] for r in recs}


def test_identical_reads_share_a_scan(start_vfiod: StartVfiod, clients: Clients) -> None:
    vfiod = start_vfiod("dgx-h100")
    replies: list[Reply] = []
    lock = threading.Lock()

    def one(c: object) -> None:
        r = c.m("ListAvailable", "a{sv}", {"all": Variant("b", True)})  # type: ignore[attr-defined]
        with lock:
            replies.append(r)

    workers = [
        threading.Thread(target=one, args=(c,)) for c in (clients.alice, clients.bob) for _ in range(20)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert len(replies) == 40 and all(r.ok for r in replies)
    assert len({repr(r.value()) for r in replies}) == 1
    snaps = vfiod.service.snapshots
    assert snaps.scans + snaps.served == 40
    assert snaps.scans <= 10, (snaps.scans, snaps.served)  # 40 calls, a handful of scans


def test_changes_are_seen_by_the_next_read(start_vfiod: StartVfiod, clients: Clients) -> None:
    vfiod = start_vfiod()
    vfiod.service.snapshots.max_age = 3600.0  # only invalidation may end a snapshot here
    assert available(clients.bob)[GPU] == "nvidia"
    # vfiod's own writes
    register(clients.root, GPU, "gpu")
    ok(clients.root.m("Bind", "sa{sv}", "gpu", {"include_group": b(True)}))
    assert available(clients.bob)[GPU] == "vfio-pci"
    assert ok(clients.bob.m("GetDevice", "sa{sv}", "gpu", {}))["driver"] == "vfio-pci"
    # a registry change, which no uevent announces
    names = {d["name"] for d in ok(clients.bob.m("ListDevices", "a{sv}", {}))}
    ok(clients.root.m("RegisterDevice", "ssa{sv}", "0000:00:02.0", "igpu", {}))
    assert {d["name"] for d in ok(clients.bob.m("ListDevices", "a{sv}", {}))} == names | {"igpu"}
    # another tool, announced by a uevent
    assert available(clients.bob)[AUDIO] == "vfio-pci"
    subprocess.run(
        [sys.executable, "-m", "vfiod_sim", "unbind", str(vfiod.root), AUDIO, "vfio-pci"],
        check=True,
        timeout=30,
    )
    deadline = time.monotonic() + 10
    while available(clients.bob)[AUDIO] != "":
        assert time.monotonic() < deadline, "the uevent never ended the snapshot"
        time.sleep(0.05)


def test_root_and_mutating_calls_do_not_wait_for_a_flood(
    start_vfiod: StartVfiod, clients: Clients, polkit: PolkitMock
) -> None:
    """bob's scans take every slot of the shared read pool and hang there; root's GetDevice and alice's
    Attach + Detach still run, while another unprivileged read waits its turn."""
    vfiod = start_vfiod()
    polkit.allow(ACTION_INSPECT, ACTION_ATTACH)
    register(clients.root, GPU, "gpu")
    service = vfiod.service
    gate = threading.Event()
    real = service.manager.list_available

    def stuck(*, all_devices: bool = False) -> list[AvailableDevice]:
        gate.wait(30)
        return real(all_devices=all_devices)

    service.manager.list_available = stuck  # type: ignore[method-assign]
    service.lanes._slots = 2  # the shared pool: two reads at a time, both to be taken by bob's scans
    replies: list[Reply] = []
    flood = [
        threading.Thread(
            target=lambda i=i: replies.append(
                clients.bob.m("ListAvailable", "a{sv}", {"all": Variant("b", bool(i % 2))})
            )
        )
        for i in range(2)
    ]
    queued: list[Reply] = []
    alice = threading.Thread(target=lambda: queued.append(clients.bob.m("GetDevice", "sa{sv}", "gpu", {})))
    try:
        for t in flood:
            t.start()
        deadline = time.monotonic() + 10
        while service.snapshots.scans < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # the shared pool is full: another unprivileged read waits its turn...
        alice.start()
        time.sleep(0.3)
        assert queued == [] and service.lanes.queued == 1
        # ...but root's read and a mutating call do not
        assert ok(clients.root.m("GetDevice", "sa{sv}", "gpu", {}))["name"] == "gpu"
        ok(clients.alice.m("Attach", "sasa{sv}", "vm1", ["gpu"], {"include_group": b(True)}))
        ok(clients.alice.m("Detach", "sasa{sv}", "vm1", [], {}))
        assert replies == []  # bob is still waiting
    finally:
        gate.set()
        for t in flood:
            t.join(30)
        if alice.ident is not None:
            alice.join(30)
        service.manager.list_available = real  # type: ignore[method-assign]
    assert len(replies) == 2 and all(r.ok for r in replies)
    assert queued and queued[0].ok
