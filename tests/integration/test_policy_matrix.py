"""Who may do what, end to end: the real vfiod on a private system bus with our shipped bus policy, the real
polkitd with our shipped actions and rules, and unprivileged callers driving it with gdbus via setpriv.

The stack: `vfiod run --simulate workstation-l4 --bus <private bus>` as root (the kernel is the simulator
in a temporary directory; the real /sys is never touched). Users: `hmtest` (member of group `hypeman`),
`stranger`, `nobody` and root. What each may do is the contract (the XML's method docs and AUTHORIZATION
in vfiod(8)):
- anyone may inspect; the stranger (and nobody) may not register, attach, detach or bind;
- the hypeman member may register candidates and attach/detach its own devices, but not register other
  devices, detach another user's attachment, bind/unbind/recover, or use owner_uid/force;
- nobody but root may own the name; the bus refuses interfaces vfiod does not publish;
- root may do all.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import machines
from tests.integration.support.realstack import (
    HMTEST,
    NOBODY,
    ROOT,
    STRANGER,
    Stack,
    User,
    gv_opts,
    gv_str,
    gv_strv,
    ok,
    refused,
    require_root_and_tools,
    start_stack,
    vfiod_argv,
)

PROFILE = "workstation-l4"
L4 = str(machines.L4)  # NVIDIA L4 (+ its HDMI audio): the profile's passthrough candidate
IGPU = str(machines.IGPU)  # the boot VGA: a candidate, registered by root for the inspect tests
USB = "0000:00:14.0"  # an xHCI controller: not a display controller, so registering it needs admin
NOT_AUTHORIZED = "org.hypeman.Devices1.Error.NotAuthorized"
NOT_OWNER = "org.hypeman.Devices1.Error.NotOwner"
IN_USE = "org.hypeman.Devices1.Error.InUse"
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
EVERYONE = (ROOT, HMTEST, STRANGER, NOBODY)
OUTSIDERS = (STRANGER, NOBODY)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    require_root_and_tools()
    argv = vfiod_argv(PROFILE)
    with start_stack(argv) as s:
        r = s.call(ROOT, "RegisterDevice", gv_str(IGPU), gv_str("igpu"), gv_opts())
        assert r.ok, f"root could not register {IGPU}: {r.describe()}\n{s.logs()}"
        yield s


def device(stack: Stack, name: str) -> dict[str, object]:
    """GetDevice as root, decoded: {key: value}."""
    reply = stack.busctl_json(
        "call",
        "org.hypeman.Devices1",
        "/org/hypeman/Devices1",
        "org.hypeman.Devices1.Manager",
        "GetDevice",
        "sa{sv}",
        name,
        "0",
    )
    assert isinstance(reply, dict)
    (record,) = reply["data"]
    return {k: v["data"] for k, v in record.items()}


def registered(stack: Stack) -> set[str]:
    reply = stack.busctl_json(
        "call",
        "org.hypeman.Devices1",
        "/org/hypeman/Devices1",
        "org.hypeman.Devices1.Manager",
        "ListDevices",
        "a{sv}",
        "0",
    )
    assert isinstance(reply, dict)
    (records,) = reply["data"]
    return {str(r["name"]["data"]) for r in records}


def register_as_root(stack: Stack, addr: str, name: str) -> None:
    if name not in registered(stack):
        ok(
            stack.call(ROOT, "RegisterDevice", gv_str(addr), gv_str(name), gv_opts()),
            f"root registers {name}",
        )


def unregister_as_root(stack: Stack, name: str) -> None:
    if name in registered(stack):
        ok(stack.call(ROOT, "UnregisterDevice", gv_str(name), gv_opts()), f"root unregisters {name}")


def detach_as_root(stack: Stack, instance: str) -> None:
    ok(stack.call(ROOT, "Detach", gv_str(instance), gv_strv([]), gv_opts()), f"root detaches {instance}")


# ----- the bus -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("user", EVERYONE, ids=lambda u: u.name)
def test_only_root_may_own_the_name(stack: Stack, user: User) -> None:
    r = stack.gdbus(
        user,
        "org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus.RequestName",
        gv_str("org.hypeman.Devices1"),
        "uint32 4",
    )
    if user is ROOT:
        assert r.ok and r.stdout.strip() == "(uint32 3,)", f"root: expected EXISTS, {r.describe()}"
    else:
        refused(r, ACCESS_DENIED, f"{user.name} RequestName")


@pytest.mark.parametrize("user", EVERYONE, ids=lambda u: u.name)
def test_the_bus_refuses_interfaces_vfiod_does_not_publish(stack: Stack, user: User) -> None:
    r = stack.call(user, "org.hypeman.Devices1.Internal.Shutdown")
    refused(r, ACCESS_DENIED, f"{user.name} calling an unlisted interface")
    assert "Rejected send message" in r.stderr, "the bus, not vfiod, must refuse it"


# ----- inspect ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("user", EVERYONE, ids=lambda u: u.name)
def test_everyone_may_inspect(stack: Stack, user: User) -> None:
    calls: list[tuple[str, tuple[str, ...], str]] = [
        ("ListAvailable", (gv_opts(),), "/org/hypeman/Devices1"),
        ("ListAvailable", (gv_opts(all=True),), "/org/hypeman/Devices1"),
        ("ListDevices", (gv_opts(),), "/org/hypeman/Devices1"),
        ("GetDevice", (gv_str("igpu"), gv_opts()), "/org/hypeman/Devices1"),
        ("GetHostStatus", (gv_opts(),), "/org/hypeman/Devices1"),
        ("org.freedesktop.DBus.Introspectable.Introspect", (), "/org/hypeman/Devices1"),
        ("org.freedesktop.DBus.ObjectManager.GetManagedObjects", (), "/org/hypeman/Devices1"),
        ("org.freedesktop.DBus.Peer.Ping", (), "/org/hypeman/Devices1"),
    ]
    obj = str(device(stack, "igpu")["object_path"])
    calls += [
        ("org.freedesktop.DBus.Properties.GetAll", (gv_str("org.hypeman.Devices1.Device"),), obj),
        (
            "org.freedesktop.DBus.Properties.Get",
            (gv_str("org.hypeman.Devices1.Device"), gv_str("State")),
            obj,
        ),
    ]
    for method, args, path in calls:
        ok(stack.call(user, method, *args, path=path), f"{user.name} {method}")


# ----- outsiders -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("user", OUTSIDERS, ids=lambda u: u.name)
def test_outsiders_may_not_register_attach_or_bind(stack: Stack, user: User) -> None:
    before = registered(stack)
    attempts: list[tuple[str, tuple[str, ...]]] = [
        ("RegisterDevice", (gv_str(L4), gv_str("theirs"), gv_opts())),
        ("UnregisterDevice", (gv_str("igpu"), gv_opts())),
        ("Attach", (gv_str("vm-x"), gv_strv(["igpu"]), gv_opts())),
        ("Detach", (gv_str("vm-x"), gv_strv([]), gv_opts())),
        ("Bind", (gv_str("igpu"), gv_opts())),
        ("Unbind", (gv_str("igpu"), gv_opts())),
        ("Reconcile", (gv_strv([]), gv_opts(dry_run=True))),
        ("Recover", (gv_str(""), gv_opts(dry_run=True))),
    ]
    for method, args in attempts:
        refused(stack.call(user, method, *args), NOT_AUTHORIZED, f"{user.name} {method}")
    assert registered(stack) == before
    assert device(stack, "igpu")["state"] == "host"


@pytest.mark.parametrize("user", EVERYONE, ids=lambda u: u.name)
def test_properties_are_read_only_for_everyone(stack: Stack, user: User) -> None:
    obj = str(device(stack, "igpu")["object_path"])
    r = stack.call(
        user,
        "org.freedesktop.DBus.Properties.Set",
        gv_str("org.hypeman.Devices1.Device"),
        gv_str("Name"),
        "<'renamed'>",
        path=obj,
    )
    assert not r.ok, f"{user.name} Properties.Set: {r.describe()}"
    assert device(stack, "igpu")["name"] == "igpu"


# ----- the hypeman group -----------------------------------------------------------------------------------


def test_hypeman_member_registers_candidates_only(stack: Stack) -> None:
    try:
        r = ok(stack.call(HMTEST, "RegisterDevice", gv_str(L4), gv_str("hm-l4"), gv_opts()), "register L4")
        assert "hm-l4" in r.stdout
        assert "hm-l4" in registered(stack)
        refused(
            stack.call(HMTEST, "RegisterDevice", gv_str(USB), gv_str("hm-usb"), gv_opts()),
            NOT_AUTHORIZED,
            "hmtest registering a device outside the default candidates",
        )
        assert "hm-usb" not in registered(stack)
        ok(stack.call(HMTEST, "UnregisterDevice", gv_str("hm-l4"), gv_opts()), "unregister")
        assert "hm-l4" not in registered(stack)
    finally:
        unregister_as_root(stack, "hm-l4")
        unregister_as_root(stack, "hm-usb")


def test_hypeman_member_attaches_and_detaches_its_own(stack: Stack) -> None:
    register_as_root(stack, L4, "l4")
    try:
        r = ok(
            stack.call(HMTEST, "Attach", gv_str("vm-hm"), gv_strv(["l4"]), gv_opts(include_group=True)),
            "hmtest Attach",
        )
        assert L4 in r.stdout and "0000:a2:00.1" in r.stdout, r.stdout
        d = device(stack, "l4")
        assert (d["state"], d["attached_to"], d["owner_uid"]) == ("attached", "vm-hm", HMTEST.uid), d
        # Idempotent: the same attach again returns the same records.
        ok(
            stack.call(HMTEST, "Attach", gv_str("vm-hm"), gv_strv(["l4"]), gv_opts(include_group=True)),
            "again",
        )
        ok(stack.call(HMTEST, "Detach", gv_str("vm-hm"), gv_strv([]), gv_opts()), "hmtest Detach")
        d = device(stack, "l4")
        assert d["state"] == "host" and d["attached_to"] == "" and d["driver"] == "nvidia", d
    finally:
        detach_as_root(stack, "vm-hm")
        unregister_as_root(stack, "l4")


def test_hypeman_member_may_not_use_admin_powers(stack: Stack) -> None:
    register_as_root(stack, L4, "l4")
    try:
        attempts: list[tuple[str, tuple[str, ...]]] = [
            (
                "Attach",
                (gv_str("vm-hm"), gv_strv(["l4"]), gv_opts(include_group=True, owner_uid=STRANGER.uid)),
            ),
            ("Attach", (gv_str("vm-hm"), gv_strv(["l4"]), gv_opts(include_group=True, force=True))),
            ("Bind", (gv_str("l4"), gv_opts())),
            ("Unbind", (gv_str("l4"), gv_opts())),
            ("Recover", (gv_str(""), gv_opts(dry_run=True))),
            ("Reconcile", (gv_strv([]), gv_opts(dry_run=True, all_users=True))),
        ]
        for method, args in attempts:
            refused(stack.call(HMTEST, method, *args), NOT_AUTHORIZED, f"hmtest {method} {args}")
        # Its own attachments it may reconcile (attach action).
        ok(stack.call(HMTEST, "Reconcile", gv_strv([]), gv_opts(dry_run=True)), "hmtest Reconcile own")
        d = device(stack, "l4")
        assert d["state"] == "host" and d["driver"] == "nvidia", d
    finally:
        detach_as_root(stack, "vm-hm")
        unregister_as_root(stack, "l4")


def test_hypeman_member_may_not_detach_another_users_attachment(stack: Stack) -> None:
    register_as_root(stack, L4, "l4")
    try:
        ok(
            stack.call(ROOT, "Attach", gv_str("vm-root"), gv_strv(["l4"]), gv_opts(include_group=True)),
            "root",
        )
        refused(
            stack.call(HMTEST, "Detach", gv_str("vm-root"), gv_strv([]), gv_opts()),
            NOT_OWNER,
            "hmtest detaching root's instance",
        )
        refused(
            stack.call(HMTEST, "Detach", gv_str("vm-root"), gv_strv(["l4"]), gv_opts()),
            NOT_OWNER,
            "hmtest detaching root's device",
        )
        refused(
            stack.call(HMTEST, "Attach", gv_str("vm-hm"), gv_strv(["l4"]), gv_opts(include_group=True)),
            IN_USE,
            "hmtest attaching a device root's instance has",
        )
        d = device(stack, "l4")
        assert (d["state"], d["attached_to"], d["owner_uid"]) == ("attached", "vm-root", 0), d
    finally:
        detach_as_root(stack, "vm-root")
        unregister_as_root(stack, "l4")


# ----- root ------------------------------------------------------------------------------------------------


def test_root_may_do_everything(stack: Stack) -> None:
    register_as_root(stack, L4, "l4")
    try:
        # Register a device outside the default candidates (admin), bind and unbind it (admin).
        ok(stack.call(ROOT, "RegisterDevice", gv_str(USB), gv_str("usb"), gv_opts()), "register USB")
        ok(stack.call(ROOT, "Bind", gv_str("usb"), gv_opts()), "Bind")
        assert device(stack, "usb")["state"] == "vfio"
        ok(stack.call(ROOT, "Unbind", gv_str("usb"), gv_opts()), "Unbind")
        assert device(stack, "usb")["state"] == "host"
        # Attach for another uid, with force (admin); that uid may then detach it itself.
        ok(
            stack.call(
                ROOT,
                "Attach",
                gv_str("vm-for-hm"),
                gv_strv(["l4"]),
                gv_opts(include_group=True, owner_uid=HMTEST.uid, force=True),
            ),
            "Attach owner_uid force",
        )
        d = device(stack, "l4")
        assert (d["state"], d["owner_uid"]) == ("attached", HMTEST.uid), d
        ok(
            stack.call(ROOT, "Reconcile", gv_strv(["vm-for-hm"]), gv_opts(dry_run=True, all_users=True)),
            "Reconcile all_users",
        )
        ok(stack.call(ROOT, "Recover", gv_str(""), gv_opts(dry_run=True)), "Recover")
        ok(stack.call(HMTEST, "Detach", gv_str("vm-for-hm"), gv_strv([]), gv_opts()), "owner detaches")
        assert device(stack, "l4")["state"] == "host"
        ok(stack.call(ROOT, "UnregisterDevice", gv_str("usb"), gv_opts()), "Unregister")
    finally:
        detach_as_root(stack, "vm-for-hm")
        unregister_as_root(stack, "usb")
        unregister_as_root(stack, "l4")
