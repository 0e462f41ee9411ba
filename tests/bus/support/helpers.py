"""Small helpers shared by the bus tests."""

from __future__ import annotations

from typing import Any

from dbus_fast import Variant

from tests import machines
from tests.bus.support.harness import Client, Reply

# workstation-l4's functions as the bus carries them (plain strings; tests/machines.py names them)
GPU = str(machines.L4)
AUDIO = str(machines.L4_AUDIO)
IGPU = str(machines.IGPU)
ABSENT = "0000:ff:1f.7"


def plain(value: Any) -> Any:
    """A reply value with every Variant unwrapped."""
    if isinstance(value, Variant):
        return plain(value.value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def b(value: bool) -> Variant:
    return Variant("b", value)


def ok(reply: Reply) -> Any:
    assert reply.ok, f"{reply.error}: {reply.text}"
    return plain(reply.body[0] if len(reply.body) == 1 else reply.body)


def register(c: Client, addr: str = GPU, name: str = "l4", **opts: Variant) -> dict[str, Any]:
    path, rec = ok(c.m("RegisterDevice", "ssa{sv}", addr, name, dict(opts)))
    assert path == rec["object_path"]
    return dict(rec)


def devices(c: Client) -> list[dict[str, Any]]:
    return list(ok(c.m("ListDevices", "a{sv}", {})))


def device(c: Client, key: str) -> dict[str, Any]:
    return dict(ok(c.m("GetDevice", "sa{sv}", key, {})))


def attach(c: Client, instance: str, *names: str, **opts: Variant) -> Reply:
    return c.m("Attach", "sasa{sv}", instance, list(names), dict(opts))


def detach(c: Client, instance: str, *names: str, **opts: Variant) -> Reply:
    return c.m("Detach", "sasa{sv}", instance, list(names), dict(opts))
