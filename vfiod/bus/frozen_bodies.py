"""Reply bodies marshalled once and sent many times: what makes a shared snapshot cheap on the wire too.

A shared inspect result (vfiod/bus/shared_reads.py) is one Python object answered to many callers. For a
large host, `ListAvailable {all: true}` is half a megabyte of variants, and marshalling it took most of the
event loop's time under a read flood: every reply marshalled the same body again. `FrozenBodies` keeps
the marshalled body of such objects (the service registers them with `freeze`; they are never mutated
afterwards), and `marshall` then builds only the small header around it.

The header is built the way dbus-fast 5.2's `Message._marshall` builds a method return's (the fields it
writes, in its order: reply serial, destination, signature); `tests/bus/test_frozen_bodies.py` checks the
bytes are identical to dbus-fast's own for the same message.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

from dbus_fast import Message, MessageType, Variant
from dbus_fast._private.marshaller import Marshaller

KEEP: Final = 16  # bodies kept (a few per inspect method and argument set are live at any time)
_LITTLE_ENDIAN: Final = ord("l")
_PROTOCOL_VERSION: Final = 1
_REPLY_SERIAL, _DESTINATION, _SIGNATURE = 5, 6, 8  # header field codes (D-Bus specification)


def _header(msg: Message, body_len: int) -> bytearray:
    fields: list[tuple[int, Variant]] = []
    if msg.reply_serial:
        fields.append((_REPLY_SERIAL, Variant("u", msg.reply_serial)))
    if msg.destination:
        fields.append((_DESTINATION, Variant("s", msg.destination)))
    if msg.signature:
        fields.append((_SIGNATURE, Variant("g", msg.signature)))
    header = Marshaller(
        "yyyyuua(yv)",
        [
            _LITTLE_ENDIAN,
            MessageType.METHOD_RETURN.value,
            msg.flags.value,
            _PROTOCOL_VERSION,
            body_len,
            msg.serial,
            fields,
        ],
    )
    buf = header.marshall()
    buf += bytes(-len(buf) % 8)  # the body starts on an 8-byte boundary
    return buf


class FrozenBodies:
    """Objects registered as immutable reply values, each with its marshalled body once it is sent."""

    def __init__(self, keep: int = KEEP) -> None:
        self._keep = keep
        # id(value) -> (value, signature, body bytes or None until first sent). Holding `value` keeps its
        # id from being reused by another object while the entry exists.
        self._bodies: OrderedDict[int, tuple[object, str, bytes | None]] = OrderedDict()
        self.hits = 0

    def freeze(self, value: object) -> None:
        """`value` will be sent as a reply's only argument, possibly many times, and never changed."""
        entry = self._bodies.get(id(value))
        if entry is None or entry[0] is not value:
            self._bodies[id(value)] = (value, "", None)
        self._bodies.move_to_end(id(value))
        while len(self._bodies) > self._keep:
            self._bodies.popitem(last=False)

    def marshall(self, msg: Message) -> bytearray | None:
        """The whole message, if it is a method return of one frozen value without fds; else None (the
        caller marshals it as usual)."""
        if msg.message_type is not MessageType.METHOD_RETURN or msg.unix_fds or len(msg.body) != 1:
            return None
        entry = self._bodies.get(id(msg.body[0]))
        if entry is None or entry[0] is not msg.body[0]:
            return None
        value, signature, body = entry
        if body is None or signature != msg.signature:
            body = bytes(Marshaller(msg.signature, msg.body).marshall())
            self._bodies[id(value)] = (value, msg.signature, body)
        else:
            self.hits += 1
        return _header(msg, len(body)) + body
