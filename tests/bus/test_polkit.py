"""Authorization through polkit (python-dbusmock's polkitd): every method and privileged option, allowed
and denied; a denied call changes nothing. Plus what polkit is asked, the inspect cache, uid 0, the audit
log, and the mode without polkitd."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Message, MessageFlag, MessageType, Variant

from tests.bus.conftest import Clients, Running, StartVfiod
from tests.bus.support.harness import Client, LoopThread, PolkitMock, PrivateBus, Reply
from tests.bus.support.helpers import GPU, attach, b, detach, device, devices, ok, register
from vfiod.bus.names import (
    ACTION_ADMIN,
    ACTION_ATTACH,
    ACTION_INSPECT,
    ACTION_REGISTER,
    BUS_NAME,
    DEVICE_IFACE,
    INTROSPECTABLE_IFACE,
    MANAGER_IFACE,
    MANAGER_PATH,
    OBJECT_MANAGER_IFACE,
    PEER_IFACE,
    PROPERTIES_IFACE,
)
from vfiod.config import Config, PerCaller

ALL_ACTIONS = (ACTION_INSPECT, ACTION_REGISTER, ACTION_ATTACH, ACTION_ADMIN)
USB = "0000:00:14.0"  # not a display controller: registering it needs admin
SRIOV_PF = "0000:00:09.0"  # qemu-q35's SR-IOV NVMe


@dataclass
class World:
    vfiod: Running
    clients: Clients
    polkit: PolkitMock
    tmp: Path
    gpu_path: str = ""
    scratch: dict[str, Any] = field(default_factory=dict)

    def as_alice(self, *actions: str) -> None:
        self.polkit.allow(*actions)


Setup = Callable[[World], None]
Act = Callable[[World], Reply]


def gpu_registered(w: World) -> None:
    w.gpu_path = register(w.clients.root, GPU, "gpu")["object_path"]


def gpu_bound(w: World) -> None:
    gpu_registered(w)
    ok(w.clients.root.m("Bind", "sa{sv}", "gpu", {"include_group": b(True)}))


def alice_attached(w: World) -> None:
    gpu_registered(w)
    w.polkit.allow(ACTION_ATTACH)
    ok(attach(w.clients.alice, "vm1", "gpu", include_group=b(True)))


def bob_attached(w: World) -> None:
    gpu_registered(w)
    w.polkit.allow(ACTION_ATTACH)
    ok(attach(w.clients.bob, "vm1", "gpu", include_group=b(True)))


def hypeman_dir(w: World) -> None:
    meta = w.tmp / "hypeman" / "devices" / "d"
    meta.mkdir(parents=True)
    (meta / "metadata.json").write_text(
        json.dumps({"id": "abcdefghijklmnopqrstuvwx", "name": "old", "pci_address": GPU}), encoding="utf-8"
    )


def nothing(w: World) -> None:
    pass


def vgpu_kept(w: World) -> None:
    """l40s-vgpu: a vGPU alice kept (Detach keep_bound) on the first GPU, which its SR-IOV cycle destroys."""
    w.polkit.allow(ACTION_ATTACH)
    pin = {"parent": Variant("s", "0000:a2:00.0")}
    ok(w.clients.alice.m("AttachVGPU", "ssa{sv}", "vm1", "NVIDIA L40S-4Q", pin))
    ok(detach(w.clients.alice, "vm1", keep_bound=b(True)))


def std(member: str, signature: str, *args: Any, iface: str, path: str | None = None) -> Act:
    return lambda w: w.clients.alice.call(
        member, signature, list(args), path=path or w.gpu_path or MANAGER_PATH, interface=iface
    )


@dataclass(frozen=True)
class Case:
    """`act` as alice needs `needs` (actions); denied = every other action allowed. `denied_error` is what a
    denial returns (NotOwner for detaching someone else's attachment, by the contract)."""

    id: str
    setup: Setup
    act: Act
    needs: tuple[str, ...]
    denied_error: str = "NotAuthorized"
    profile: str = "workstation-l4"


CASES = [
    Case(
        "ListAvailable", nothing, lambda w: w.clients.alice.m("ListAvailable", "a{sv}", {}), (ACTION_INSPECT,)
    ),
    Case(
        "ListDevices",
        gpu_registered,
        lambda w: w.clients.alice.m("ListDevices", "a{sv}", {}),
        (ACTION_INSPECT,),
    ),
    Case(
        "GetDevice",
        gpu_registered,
        lambda w: w.clients.alice.m("GetDevice", "sa{sv}", "gpu", {}),
        (ACTION_INSPECT,),
    ),
    Case(
        "GetHostStatus", nothing, lambda w: w.clients.alice.m("GetHostStatus", "a{sv}", {}), (ACTION_INSPECT,)
    ),
    Case(
        "RegisterDevice",
        nothing,
        lambda w: w.clients.alice.m("RegisterDevice", "ssa{sv}", GPU, "gpu", {}),
        (ACTION_REGISTER,),
    ),
    Case(
        "RegisterDevice-non-display",
        nothing,
        lambda w: w.clients.alice.m("RegisterDevice", "ssa{sv}", USB, "usb", {}),
        (ACTION_REGISTER, ACTION_ADMIN),
    ),
    Case(
        "UnregisterDevice",
        gpu_registered,
        lambda w: w.clients.alice.m("UnregisterDevice", "sa{sv}", "gpu", {}),
        (ACTION_REGISTER,),
    ),
    Case(
        "Attach",
        gpu_registered,
        lambda w: attach(w.clients.alice, "vm1", "gpu", include_group=b(True)),
        (ACTION_ATTACH,),
    ),
    Case(
        "Attach-owner_uid",
        gpu_registered,
        lambda w: attach(
            w.clients.alice, "vm1", "gpu", include_group=b(True), owner_uid=Variant("u", w.clients.bob.uid)
        ),
        (ACTION_ATTACH, ACTION_ADMIN),
    ),
    Case(
        "Attach-force",
        gpu_registered,
        lambda w: attach(w.clients.alice, "vm1", "gpu", include_group=b(True), force=b(True)),
        (ACTION_ATTACH, ACTION_ADMIN),
    ),
    Case(
        "Detach",
        alice_attached,
        lambda w: w.clients.alice.m("Detach", "sasa{sv}", "vm1", [], {}),
        (ACTION_ATTACH,),
    ),
    Case(
        "Detach-another-users",
        alice_attached,
        lambda w: w.clients.bob.m("Detach", "sasa{sv}", "vm1", [], {}),
        (ACTION_ATTACH, ACTION_ADMIN),
        denied_error="NotOwner",
    ),
    Case(
        "Bind",
        gpu_registered,
        lambda w: w.clients.alice.m("Bind", "sa{sv}", "gpu", {"include_group": b(True)}),
        (ACTION_ADMIN,),
    ),
    Case("Unbind", gpu_bound, lambda w: w.clients.alice.m("Unbind", "sa{sv}", "gpu", {}), (ACTION_ADMIN,)),
    Case(
        "Reconcile",
        alice_attached,
        lambda w: w.clients.alice.m("Reconcile", "asa{sv}", [], {}),
        (ACTION_ATTACH,),
    ),
    Case(
        "Reconcile-all_users",
        bob_attached,
        lambda w: w.clients.alice.m("Reconcile", "asa{sv}", [], {"all_users": b(True)}),
        (ACTION_ATTACH, ACTION_ADMIN),
    ),
    Case("Recover", gpu_bound, lambda w: w.clients.alice.m("Recover", "sa{sv}", "gpu", {}), (ACTION_ADMIN,)),
    Case(
        "ImportHypeman",
        hypeman_dir,
        lambda w: w.clients.alice.m("ImportHypeman", "sa{sv}", str(w.tmp / "hypeman"), {}),
        (ACTION_ADMIN,),
    ),
    Case(
        "ListProfiles",
        nothing,
        lambda w: w.clients.alice.m("ListProfiles", "a{sv}", {}),
        (ACTION_INSPECT,),
        profile="mdev-samples",
    ),
    Case(
        "ListVGPUs",
        nothing,
        lambda w: w.clients.alice.m("ListVGPUs", "a{sv}", {}),
        (ACTION_INSPECT,),
        profile="mdev-samples",
    ),
    Case(
        "AttachVGPU",
        nothing,
        lambda w: w.clients.alice.m("AttachVGPU", "ssa{sv}", "vm1", "mtty-2", {}),
        (ACTION_ATTACH,),
        profile="mdev-samples",
    ),
    Case(
        "AttachVGPU-owner_uid",
        nothing,
        lambda w: w.clients.alice.m(
            "AttachVGPU", "ssa{sv}", "vm1", "mtty-2", {"owner_uid": Variant("u", w.clients.bob.uid)}
        ),
        (ACTION_ATTACH, ACTION_ADMIN),
        profile="mdev-samples",
    ),
    Case(
        "Recover-gpu",
        vgpu_kept,
        lambda w: w.clients.alice.m("Recover", "sa{sv}", "0000:a2:00.0", {}),
        (ACTION_ADMIN,),
        profile="l40s-vgpu",
    ),
    Case(
        "SetVirtualFunctions",
        nothing,
        lambda w: w.clients.alice.m("SetVirtualFunctions", "sua{sv}", SRIOV_PF, 2, {}),
        (ACTION_ADMIN,),
        profile="qemu-q35",
    ),
    Case("Introspect", gpu_registered, std("Introspect", "", iface=INTROSPECTABLE_IFACE), (ACTION_INSPECT,)),
    Case("Ping", nothing, std("Ping", "", iface=PEER_IFACE), (ACTION_INSPECT,)),
    Case(
        "Properties.Get",
        gpu_registered,
        std("Get", "ss", DEVICE_IFACE, "State", iface=PROPERTIES_IFACE),
        (ACTION_INSPECT,),
    ),
    Case(
        "Properties.GetAll",
        gpu_registered,
        std("GetAll", "s", DEVICE_IFACE, iface=PROPERTIES_IFACE),
        (ACTION_INSPECT,),
    ),
    Case(
        "GetManagedObjects",
        gpu_registered,
        std("GetManagedObjects", "", iface=OBJECT_MANAGER_IFACE, path=MANAGER_PATH),
        (ACTION_INSPECT,),
    ),
]


def snapshot(w: World) -> tuple[object, ...]:
    """What a call could change: the registry as ListDevices shows it, every sysfs write, node owners."""
    nodes = w.vfiod.root / "sim" / "nodes.json"
    return (
        devices(w.clients.root),
        w.vfiod.trace_len(),
        nodes.read_text(encoding="utf-8") if nodes.exists() else "",
    )


@pytest.mark.parametrize("allowed", [True, False], ids=["allowed", "denied"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_polkit_matrix(
    case: Case, allowed: bool, start_vfiod: StartVfiod, clients: Clients, polkit: PolkitMock, tmp_path: Path
) -> None:
    w = World(start_vfiod(profile=case.profile), clients, polkit, tmp_path)
    case.setup(w)
    before = snapshot(w)
    granted = set(case.needs) if allowed else set(ALL_ACTIONS) - {case.needs[-1]}
    polkit.allow(*sorted(granted))
    polkit.clear()
    reply = case.act(w)
    if allowed:
        assert reply.ok or reply.short not in ("NotAuthorized", "NotOwner"), (reply.error, reply.text)
        assert reply.ok, (reply.error, reply.text)
        asked = {a for a, *_ in polkit.checks()}
        assert asked <= set(case.needs), asked
        if set(case.needs) - {ACTION_INSPECT}:
            # the call does change something when allowed, so "nothing changed" below means something
            assert snapshot(w) != before
    else:
        assert reply.short == case.denied_error, (reply.error, reply.text)
        assert "Traceback" not in reply.text
        assert snapshot(w) == before


def test_properties_set_answers_read_only(
    start_vfiod: StartVfiod, clients: Clients, polkit: PolkitMock
) -> None:
    """Every property is read-only: Properties.Set answers the standard PropertyReadOnly to whoever may read
    it (before, it said NotAuthorized, as if someone else could), and UnknownProperty for no property."""
    start_vfiod()
    path = register(clients.root, GPU, "gpu")["object_path"]

    def set_name(c: Client, prop: str = "Name") -> Reply:
        args = [DEVICE_IFACE, prop, Variant("s", "x")]
        return c.call("Set", "ssv", args, path=path, interface=PROPERTIES_IFACE)

    polkit.allow(ACTION_INSPECT)
    for c in (clients.alice, clients.root):
        reply = set_name(c)
        assert reply.error == "org.freedesktop.DBus.Error.PropertyReadOnly", reply
        assert "read-only" in reply.text
    assert set_name(clients.root, "NoSuchThing").error == "org.freedesktop.DBus.Error.UnknownProperty"
    assert device(clients.root, "gpu")["name"] == "gpu"


def test_what_polkit_is_asked(start_vfiod: StartVfiod, clients: Clients, polkit: PolkitMock) -> None:
    start_vfiod()
    register(clients.root, GPU, "gpu")
    register(clients.root, "0000:a2:00.1", "audio")
    polkit.allow(ACTION_INSPECT, ACTION_ATTACH)
    polkit.clear()
    ok(attach(clients.alice, "vm1", "gpu", "audio"))
    checks = [c for c in polkit.checks() if c[0] == ACTION_ATTACH]
    subject = f"system-bus-name:{clients.alice.unique_name}"
    assert checks == [
        (ACTION_ATTACH, {"instance": "vm1", "device": "gpu", "pci_address": GPU}, 0, subject),
        (ACTION_ATTACH, {"instance": "vm1", "device": "audio", "pci_address": "0000:a2:00.1"}, 0, subject),
    ]
    polkit.clear()
    # Detach naming devices is asked the same way: once per device, with the same details
    ok(
        clients.alice.m(
            "Detach", "sasa{sv}", "vm1", ["audio", "gpu", "gpu"], {"keep_bound": Variant("b", True)}
        )
    )
    assert [c for c in polkit.checks() if c[0] == ACTION_ATTACH] == [
        (ACTION_ATTACH, {"instance": "vm1", "device": "audio", "pci_address": "0000:a2:00.1"}, 0, subject),
        (ACTION_ATTACH, {"instance": "vm1", "device": "gpu", "pci_address": GPU}, 0, subject),
    ]
    ok(attach(clients.alice, "vm1", "gpu", "audio"))
    polkit.clear()
    reply = clients.alice.m(
        "Detach", "sasa{sv}", "vm1", [], {}, flags=MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION
    )
    assert reply.ok, reply
    checks = [c for c in polkit.checks() if c[0] == ACTION_ATTACH]
    assert checks == [(ACTION_ATTACH, {"instance": "vm1"}, 1, subject)]  # interactive only when allowed


def test_inspect_is_cached_until_polkit_changes(
    start_vfiod: StartVfiod, clients: Clients, polkit: PolkitMock
) -> None:
    start_vfiod()
    polkit.clear()
    for _ in range(3):
        ok(clients.alice.m("ListDevices", "a{sv}", {}))
    assert [c[0] for c in polkit.checks()] == [ACTION_INSPECT]
    polkit.allow()  # sends Changed: the cached "yes" is forgotten
    assert clients.alice.m("ListDevices", "a{sv}", {}).short == "NotAuthorized"
    polkit.clear()
    ok(clients.root.m("ListDevices", "a{sv}", {}))
    ok(clients.root.m("RegisterDevice", "ssa{sv}", GPU, "", {}))
    assert polkit.checks() == []  # uid 0 is never a question


def test_mutating_calls_are_audited(
    start_vfiod: StartVfiod, clients: Clients, polkit: PolkitMock, caplog: pytest.LogCaptureFixture
) -> None:
    start_vfiod()
    caplog.set_level(logging.INFO, logger="vfiod.audit")
    polkit.allow(ACTION_INSPECT)
    assert clients.alice.m("RegisterDevice", "ssa{sv}", GPU, "gpu", {}).short == "NotAuthorized"
    polkit.allow(ACTION_INSPECT, ACTION_REGISTER)
    ok(clients.alice.m("RegisterDevice", "ssa{sv}", GPU, "gpu", {}))
    records = [r for r in caplog.records if r.name == "vfiod.audit" and r.__dict__.get("POLKIT_ACTION")]
    assert [(r.__dict__["POLKIT_RESULT"], r.__dict__["CALLER_UID"]) for r in records] == [
        ("no", clients.alice.uid),
        ("yes", clients.alice.uid),
    ]
    for r in records:
        fields = r.__dict__
        assert fields["ACTION"] == "register-device" and fields["METHOD"] == "RegisterDevice"
        assert fields["POLKIT_ACTION"] == ACTION_REGISTER
        assert fields["CALLER_PID"] and fields["CALLER_EXE"].startswith("/")
        assert fields["PCI_ADDRESS"] == GPU


def test_caller_identity_is_forgotten_when_the_caller_leaves(
    start_vfiod: StartVfiod, clients: Clients, threads: dict[str, LoopThread], bus: PrivateBus
) -> None:
    vfiod = start_vfiod()
    extra = Client(threads["alice"], bus.address)
    ok(extra.m("ListDevices", "a{sv}", {}))
    authz = vfiod.daemon.authz
    assert authz is not None
    assert extra.unique_name in authz._ids
    name = extra.unique_name
    extra.close()
    ok(clients.root.m("ListDevices", "a{sv}", {}))  # a round trip: NameOwnerChanged has been handled
    assert name not in authz._ids


def test_without_polkitd_only_root_and_the_daemons_uid(
    start_vfiod: StartVfiod,
    bare_bus: PrivateBus,
    threads: dict[str, LoopThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    start_vfiod(on=bare_bus)
    first = next(r for r in caplog.records if r.name.startswith("vfiod"))
    assert "no polkitd" in first.getMessage() and "denies every other caller" in first.getMessage()
    root = Client(threads["root"], bare_bus.address)
    alice = Client(threads["alice"], bare_bus.address)
    try:
        ok(root.m("ListDevices", "a{sv}", {}))
        denied = alice.m("ListDevices", "a{sv}", {})
        assert denied.short == "NotAuthorized" and "no polkitd" in denied.text
        assert alice.call("Introspect", "", [], interface=INTROSPECTABLE_IFACE).short == "NotAuthorized"
    finally:
        root.close()
        alice.close()


def _burst(c: Client, n: int, member: str, signature: str, *args: Any) -> list[Reply]:
    """`n` calls sent at once on one connection, answers in order."""

    async def go() -> list[Message]:
        msgs = [
            Message(
                destination=BUS_NAME,
                path=MANAGER_PATH,
                interface=MANAGER_IFACE,
                member=member,
                signature=signature,
                body=list(args),
            )
            for _ in range(n)
        ]
        return list(await asyncio.gather(*(c.bus.call(m) for m in msgs)))

    out = []
    for reply in c.lt.run(go(), 60):
        if reply.message_type == MessageType.ERROR:
            out.append(Reply(False, list(reply.body), reply.error_name or "", str(reply.body[0])))
        else:
            out.append(Reply(True, list(reply.body)))
    return out


# Callers here send more calls at once than the default per-connection cap allows (that cap has tests of
# its own in test_caller_caps.py).
ROOMY = Config(per_caller=PerCaller(max_calls_in_flight=128))


def test_concurrent_callers_keep_their_identity(
    start_vfiod: StartVfiod, clients: Clients, polkit: PolkitMock
) -> None:
    start_vfiod(config=ROOMY)  # 40 calls at once from one connection: above the default cap
    register(clients.root, GPU, "gpu")
    polkit.allow(ACTION_INSPECT)  # alice may not Bind; root may
    results: dict[str, list[Reply]] = {}
    opts = {"include_group": b(True)}
    workers = [
        threading.Thread(
            target=lambda: results.__setitem__(
                "alice", _burst(clients.alice, 40, "Bind", "sa{sv}", "gpu", opts)
            )
        ),
        threading.Thread(
            target=lambda: results.__setitem__(
                "root", _burst(clients.root, 40, "Bind", "sa{sv}", "gpu", opts)
            )
        ),
    ]
    for t in workers:
        t.start()
    for t in workers:
        t.join(60)
    assert {r.short for r in results["alice"]} == {"NotAuthorized"}
    assert all(r.ok for r in results["root"]), {r.error for r in results["root"]}


def test_many_polkit_checks_in_flight(
    start_vfiod: StartVfiod,
    clients: Clients,
    polkit: PolkitMock,
    threads: dict[str, LoopThread],
    bus: PrivateBus,
) -> None:
    """More concurrent checks than dbus-daemon lets one connection wait for (128): vfiod queues its own."""
    start_vfiod(config=ROOMY)
    polkit.allow(ACTION_INSPECT, ACTION_ATTACH)
    extra = [Client(threads["alice"], bus.address) for _ in range(2)]
    try:
        replies: list[Reply] = []
        workers = [
            threading.Thread(
                target=lambda c=c: replies.extend(_burst(c, 70, "Detach", "sasa{sv}", "vm", [], {}))
            )
            for c in (clients.alice, *extra)
        ]
        for t in workers:
            t.start()
        for t in workers:
            t.join(60)
        assert len(replies) == 210
        assert all(r.ok for r in replies), {(r.error, r.text) for r in replies if not r.ok}
        assert len([c for c in polkit.checks() if c[0] == ACTION_ATTACH]) == 210
    finally:
        for c in extra:
            c.close()
