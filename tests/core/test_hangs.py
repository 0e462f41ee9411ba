"""Hung kernel writes and concurrent calls: retries answer at once instead of piling up hung writes, hung
threads are bounded, refreshes never wait behind a hung call, an instance's Detach waits for its Attach,
and device records are read as one snapshot."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.core.support.worlds import ADMIN, HM, Env, MakeEnv, drivers
from tests.machines import L4, L4_AUDIO
from vfiod.core import recovery
from vfiod.core.binder import Binder, NativeDriver
from vfiod.core.context import Report
from vfiod.core.deps import CoreDeps
from vfiod.core.errors import Timeout
from vfiod.core.registry import DeviceRow
from vfiod.host import host as host_module
from vfiod.host.pciaddr import DriverName
from vfiod_sim import faults, processes
from vfiod_sim.system import SimulatedModules

OVERRIDE = f"/sys/bus/pci/devices/{L4}/driver_override"


def hung_detach(e: Env) -> None:
    """vm1 attached, then a Detach whose driver_override write hangs in the kernel (Timeout: stuck)."""
    m = e.manager
    m.register(HM, str(L4), "l4-gpu")
    m.attach(HM, "vm1", ["l4-gpu"], include_group=True)
    faults.inject(e.root, "hang", kind="hang", path=OVERRIDE, value="nvidia")
    with pytest.raises(Timeout):
        m.detach(HM, "vm1")
    assert faults.wait_hung(e.root, "hang", 5)


def settle(e: Env) -> None:
    faults.release(e.root, "hang")
    deadline = time.monotonic() + 10
    while e.host.pending_writes():
        assert time.monotonic() < deadline
        time.sleep(0.02)


# ----- 4. retries do not pile up hung writes -----------------------------------------------------------


def test_pending_retries_answer_at_once_and_write_nothing(env: MakeEnv) -> None:
    e = env(deadline=0.5)
    m = e.manager
    hung_detach(e)
    writes, threads = len(e.writes), threading.active_count()
    for _ in range(20):
        started = time.monotonic()
        with pytest.raises(Timeout, match=r"has not finished .*driver_override <- 'nvidia' \(pending since"):
            m.detach(HM, "vm1")
        assert time.monotonic() - started < 0.4  # below the 0.5 s deadline: nothing was tried
    for call in (
        lambda: m.attach(HM, "vm1", ["l4-gpu"], include_group=True),
        lambda: m.unbind(ADMIN, "l4-gpu"),
        lambda: m.unregister(ADMIN, "l4-gpu"),
    ):
        with pytest.raises(Timeout, match="has not finished"):
            call()
    assert len(e.writes) == writes and threading.active_count() == threads
    assert len(e.host.pending()) == 1
    settle(e)


def test_pending_hung_threads_are_bounded(env: MakeEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_module, "MAX_HUNG_WRITES", 3)
    e = env("dgx-h100", deadline=0.2)
    m = e.manager
    gpus = [a for a in ("0000:1b:00.0", "0000:43:00.0", "0000:52:00.0", "0000:61:00.0", "0000:9d:00.0")]
    for n, addr in enumerate(gpus):
        m.register(HM, addr, f"gpu{n}")
    faults.inject(e.root, "hang", kind="hang", path="/sys/bus/pci/drivers/nvidia/unbind")
    threads = threading.active_count()
    messages = []
    for n in range(len(gpus)):
        with pytest.raises(Timeout) as err:
            m.bind(ADMIN, f"gpu{n}")
        messages.append(err.value.message)
    assert len(e.host.pending()) == 3
    assert threading.active_count() - threads <= 3
    assert all("did not complete" in t for t in messages[:3])
    assert all(
        "writes are still inside the kernel past their deadline (at most 3)" in t for t in messages[3:]
    )
    faults.release(e.root, "hang")


# ----- 5. refreshes never wait on a hung call ----------------------------------------------------------


def test_pending_refreshes_do_not_wait_behind_a_hung_call(
    env: MakeEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    e = env(deadline=3.0)
    m = e.manager
    m.register(HM, str(L4), "l4-gpu")
    m.attach(HM, "vm1", ["l4-gpu"], include_group=True)
    faults.inject(e.root, "hang", kind="hang", path=OVERRIDE, value="nvidia")
    calls: list[str] = []
    real = recovery.refresh_one

    def counted(deps: CoreDeps, row: DeviceRow, report: Report | None = None) -> None:
        calls.append(str(row.pci_address))
        real(deps, row, report)

    monkeypatch.setattr(recovery, "refresh_one", counted)

    def hung() -> None:
        with pytest.raises(Timeout):
            m.detach(HM, "vm1")

    detach = threading.Thread(target=hung)
    detach.start()
    assert faults.wait_hung(e.root, "hang", 5)  # the Detach holds the group, waiting on the kernel
    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: m.refresh_device(str(L4_AUDIO)), range(20)))  # 20 uevents
    assert time.monotonic() - started < 1.0
    assert m.get_device("l4-gpu").attached_to == "vm1"  # reads answer meanwhile
    assert calls == []  # deferred, not waiting
    detach.join(10)
    assert calls.count(str(L4_AUDIO)) == 1  # run once the Detach let go of the group: merged into one
    settle(e)


# ----- 6. an instance's Detach waits for its Attach ----------------------------------------------------


def test_detach_during_attach_waits_and_then_releases(env: MakeEnv) -> None:
    e = env()
    m = e.manager
    m.register(HM, str(L4), "l4-gpu")
    faults.inject(e.root, "slow", kind="delay", path="/sys/bus/pci/drivers/nvidia/unbind", seconds=1.0)
    outcome: dict[str, object] = {}
    attach = threading.Thread(
        target=lambda: outcome.setdefault("attach", m.attach(HM, "vm1", ["l4-gpu"], include_group=True))
    )
    attach.start()
    deadline = time.monotonic() + 5
    while m.registry.by_pci_address(L4).state != "binding":  # type: ignore[union-attr]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    m.detach(HM, "vm1")  # sent while the Attach is still binding
    attach.join(10)
    assert "attach" in outcome  # the Attach succeeded...
    dev = m.get_device("l4-gpu")  # ...and the Detach, which waited for it, released it
    assert (dev.state, dev.attached_to) == ("host", "")
    assert drivers(e, L4, L4_AUDIO) == ["nvidia", "snd_hda_intel"]
    assert m.registry.all_attachments() == [] and m.registry.open_intents() == []


# ----- 7. smaller: one snapshot per record, re-read before each restore step, whole processes ----------


def test_stuck_records_are_read_as_one_snapshot(env: MakeEnv) -> None:
    e = env()
    m = e.manager
    m.register(HM, str(L4), "l4-gpu")
    stop = threading.Event()
    seen: list[tuple[str, str]] = []

    def reader() -> None:
        while not stop.is_set():
            for d in m.list_devices():
                seen.append((d.state, d.attached_to))
            d = m.get_device("l4-gpu")
            seen.append((d.state, d.attached_to))

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for _ in range(5):
            m.attach(HM, "vm1", ["l4-gpu"], include_group=True)
            m.detach(HM, "vm1")
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert len(seen) > 50
    torn = [(s, a) for s, a in seen if (s == "attached") != bool(a) and s not in ("releasing", "stuck")]
    assert torn == []


def test_stuck_restore_rereads_the_driver_before_each_step(env: MakeEnv) -> None:
    """The device reaches its native driver between vfiod's first read and the unbind (an earlier probe
    the kernel finished late): no unbind of a driver it is no longer on, no probe, and no `stuck`."""
    e = env()
    m = e.manager
    m.register(HM, str(L4), "l4-gpu")
    m.bind(ADMIN, "l4-gpu", include_group=True)
    host = e.host
    real = host.set_driver_override

    def override_then_kernel_moves_it(addr: object, driver: DriverName | None) -> None:
        real(addr, driver)  # type: ignore[arg-type]
        if driver == "nvidia":  # the kernel (not vfiod) now finishes a probe of the device
            e.kernel.write_attribute(host.pci_drivers_dir / "vfio-pci" / "unbind", str(L4).encode())
            e.kernel.write_attribute(host.pci_drivers_dir / "nvidia" / "bind", str(L4).encode())

    host.set_driver_override = override_then_kernel_moves_it  # type: ignore[method-assign]
    try:
        Binder(host, SimulatedModules(e.kernel), verify_timeout=1.0).restore(
            L4, NativeDriver(DriverName.parse("nvidia"), DriverName.parse("nvidia"))
        )
    finally:
        host.set_driver_override = real  # type: ignore[method-assign]
    assert host.driver(L4) == "nvidia" and host.driver_override(L4) is None
    assert [w.path.rsplit("/", 1)[1] for w in e.writes[-2:]] == ["driver_override", "driver_override"]


def test_stuck_a_process_killed_while_starting_leaves_no_half_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: MakeEnv
) -> None:
    e = env()
    unit = "nvidia-persistenced.service"
    processes.stop_unit(e.root, unit)

    def killed(*a: object, **k: object) -> str:
        raise KeyboardInterrupt  # the process starting it dies here, half-way through

    monkeypatch.setattr(processes, "limits_text", killed)
    with pytest.raises(KeyboardInterrupt):
        processes.start_unit(e.root, unit)
    monkeypatch.undo()
    assert not processes.unit_active(e.root, unit)
    assert all((processes.proc_dir(e.root) / str(p) / "status").exists() for p in processes.pids(e.root))
    assert processes.start_unit(e.root, unit)  # its pid is free: it starts whole
    assert processes.unit_active(e.root, unit)
