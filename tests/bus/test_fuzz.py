"""Fuzzing every method's arguments through a dbus-fast client: whatever is sent, an error reply is one of
the contract's errors and never carries a traceback."""

from __future__ import annotations

from typing import Any

import pytest
from dbus_fast import Variant
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.bus.conftest import Clients, StartVfiod
from tests.bus.support.harness import PolkitMock, Reply
from tests.bus.support.helpers import GPU, register
from vfiod.bus.methods import OPTIONS
from vfiod.bus.names import ACTION_ADMIN, ACTION_ATTACH, ACTION_INSPECT, ACTION_REGISTER, ERROR_PREFIX

SIGNATURES = {
    "ListAvailable": "a{sv}",
    "ListDevices": "a{sv}",
    "GetDevice": "sa{sv}",
    "GetHostStatus": "a{sv}",
    "RegisterDevice": "ssa{sv}",
    "UnregisterDevice": "sa{sv}",
    "Attach": "sasa{sv}",
    "Detach": "sasa{sv}",
    "Bind": "sa{sv}",
    "Unbind": "sa{sv}",
    "Reconcile": "asa{sv}",
    "Recover": "sa{sv}",
    "ImportHypeman": "sa{sv}",
    "SetVirtualFunctions": "sua{sv}",
    "ListProfiles": "a{sv}",
    "ListVGPUs": "a{sv}",
    "AttachVGPU": "ssa{sv}",
    "GetMetrics": "a{sv}",
}
LEAKS = ("Traceback", 'File "/', "site-packages", '.py", line')

text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=40)
# Mostly values that mean something here (so calls reach the manager), sometimes anything.
meaningful = st.sampled_from(
    [
        "gpu",
        "pci-0000-a2-00-1",
        GPU,
        "0000:a2:00.1",
        "0000:00:02.0",
        "0000:ff:1f.7",
        "vm1",
        "vm2",
        "",
        "/tmp",
        "mtty-2",
        "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001",
    ]
)
strings = st.one_of(meaningful, meaningful, meaningful, meaningful, text, st.just("a" * 300))
option_keys = st.one_of(st.sampled_from(sorted({k for opts in OPTIONS.values() for k in opts})), text)
scalars: st.SearchStrategy[Variant] = st.one_of(
    st.booleans().map(lambda v: Variant("b", v)),
    strings.map(lambda v: Variant("s", v)),
    st.integers(0, 2**32 - 1).map(lambda v: Variant("u", v)),
    st.integers(-(2**31), 2**31 - 1).map(lambda v: Variant("i", v)),
    st.integers(0, 255).map(lambda v: Variant("y", v)),
    st.integers(-(2**63), 2**63 - 1).map(lambda v: Variant("x", v)),
    st.floats(allow_nan=False).map(lambda v: Variant("d", v)),
    st.lists(strings, max_size=4).map(lambda v: Variant("as", v)),
    st.dictionaries(strings, strings, max_size=4).map(lambda v: Variant("a{ss}", v)),
)
variants = st.one_of(scalars, scalars.map(lambda v: Variant("v", v)))
random_options = st.dictionaries(option_keys, variants, max_size=4)
TYPED: dict[str, st.SearchStrategy[Variant]] = {
    "b": st.booleans().map(lambda v: Variant("b", v)),
    "s": strings.map(lambda v: Variant("s", v)),
    "u": st.one_of(st.sampled_from([0, 1, 65534]), st.integers(0, 2**32 - 1)).map(lambda v: Variant("u", v)),
    "y": st.integers(0, 255).map(lambda v: Variant("y", v)),
    "a{ss}": st.dictionaries(strings, strings, max_size=3).map(lambda v: Variant("a{ss}", v)),
}


def options_for(member: str) -> st.SearchStrategy[dict[str, Variant]]:
    """Mostly the method's own options with the right types (so calls get past option checking), sometimes
    anything at all."""
    typed = st.fixed_dictionaries({}, optional={k: TYPED[sig] for k, sig in OPTIONS[member].items()})
    return st.one_of(typed, typed, random_options)


def arguments(member: str) -> st.SearchStrategy[list[Any]]:
    signature = SIGNATURES[member]
    parts = {
        "s": strings,
        "u": st.one_of(st.sampled_from([0, 1, 2, 7]), st.integers(0, 2**32 - 1)),
        "as": st.lists(strings, max_size=5),
        "a{sv}": options_for(member),
    }
    out: list[st.SearchStrategy[Any]] = []
    rest = signature
    while rest:
        for token in ("a{sv}", "as", "s", "u"):
            if rest.startswith(token):
                out.append(parts[token])
                rest = rest[len(token) :]
                break
        else:
            raise AssertionError(signature)
    return st.tuples(*out).map(list)


calls = st.sampled_from(sorted(SIGNATURES)).flatmap(lambda m: st.tuples(st.just(m), arguments(m)))


def check(reply: Reply) -> None:
    if reply.ok:
        return
    assert reply.error.startswith(ERROR_PREFIX), (reply.error, reply.text)
    assert reply.error.removeprefix(ERROR_PREFIX).isidentifier()
    assert reply.text, reply.error
    for leak in LEAKS:
        assert leak not in reply.text, reply.text


@pytest.fixture
def world(start_vfiod: StartVfiod, clients: Clients, polkit: PolkitMock) -> Clients:
    """One vfiod for all examples of a test (a function-scoped fixture is set up once per test, not per
    example), with a registered GPU and every action allowed, so calls get past authorization."""
    start_vfiod()
    register(clients.root, GPU, "gpu")
    polkit.allow(ACTION_INSPECT, ACTION_REGISTER, ACTION_ATTACH, ACTION_ADMIN)
    return clients


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
@given(call=calls, as_root=st.booleans())
def test_fuzz_every_method(world: Clients, call: tuple[str, list[Any]], as_root: bool) -> None:
    member, args = call
    who = world.root if as_root else world.alice
    check(who.m(member, SIGNATURES[member], *args))


wrong_bodies = st.sampled_from(
    [
        ("", []),
        ("s", ["x"]),
        ("i", [1]),
        ("as", [["x"]]),
        ("ss", ["a", "b"]),
        ("sas", ["a", []]),
        ("a{ss}", [{}]),
    ]
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], database=None
)
@given(member=st.sampled_from(sorted(SIGNATURES)), body=wrong_bodies)
def test_fuzz_wrong_signatures(world: Clients, member: str, body: tuple[str, list[Any]]) -> None:
    signature, args = body
    if signature == SIGNATURES[member]:
        return
    reply = world.alice.call(member, signature, args)
    assert reply.error == ERROR_PREFIX + "InvalidArgument", (member, signature, reply)
    check(reply)
