"""A frozen reply body is marshalled once, and the messages built around it are byte for byte what
dbus-fast itself marshals (so a dbus-fast upgrade that changes its header layout fails here)."""

from __future__ import annotations

from dbus_fast import Message, MessageFlag, MessageType, Variant

from vfiod.bus.frozen_bodies import FrozenBodies


def call(serial: int, sender: str) -> Message:
    return Message(
        destination="org.hypeman.Devices1",
        path="/org/hypeman/Devices1",
        interface="org.hypeman.Devices1.Manager",
        member="ListAvailable",
        signature="a{sv}",
        body=[{}],
        serial=serial,
        sender=sender,
    )


def test_frozen_replies_are_what_dbus_fast_marshals() -> None:
    value = [
        {"pci_address": Variant("s", f"0000:{i:02x}:00.0"), "iommu_group": Variant("i", i)}
        for i in range(200)
    ]
    frozen = FrozenBodies()
    frozen.freeze(value)
    for serial, sender in ((7, ":1.5"), (4_000_000_000, ":1.123456"), (1, ":1.9")):
        reply = Message.new_method_return(call(serial, sender), "aa{sv}", [value])
        reply.serial = serial + 1
        assert bytes(frozen.marshall(reply) or b"") == bytes(reply._marshall(False))
    assert frozen.hits == 2  # marshalled once, reused twice
    flagged = Message.new_method_return(call(3, ":1.7"), "aa{sv}", [value])
    flagged.flags = MessageFlag.NO_AUTOSTART
    flagged.serial = 9
    assert bytes(frozen.marshall(flagged) or b"") == bytes(flagged._marshall(False))


def test_only_frozen_method_returns_are_taken() -> None:
    frozen = FrozenBodies(keep=2)
    value: list[int] = [1, 2, 3]
    reply = Message.new_method_return(call(1, ":1.1"), "ai", [value])
    assert frozen.marshall(reply) is None  # not frozen
    frozen.freeze(value)
    assert frozen.marshall(reply) is not None
    err = Message.new_error(call(2, ":1.1"), "org.example.Error", "no")
    assert frozen.marshall(err) is None
    signal = Message.new_signal("/p", "org.example.I", "S", "ai", [value])
    assert signal.message_type is MessageType.SIGNAL and frozen.marshall(signal) is None
    # bounded: the oldest entries go
    frozen.freeze([4])
    frozen.freeze([5])
    assert frozen.marshall(reply) is None
