"""A flooding D-Bus client for the flood tests and the bench: N connections, each keeping K calls in flight.

It speaks the wire protocol itself (SASL EXTERNAL, Hello, then raw marshalled calls) and uses only the
standard library, so an unprivileged user can run it with the system's python3 from a world-readable copy
(the integration suite starts it with setpriv; the venv and the clone are root's). The messages come
ready-made from `templates()` (run by the test, with dbus-fast): this client only patches each call's
serial, so it needs no marshaller.

    python3 flood.py ADDRESS TEMPLATES.json CONNECTIONS IN_FLIGHT SECONDS [TOTAL]

Each connection sends calls until IN_FLIGHT are unanswered, then one more per reply, for SECONDS (or
until TOTAL calls per connection are sent); then it waits up to 60 s for the rest of its replies. It prints
one JSON object: per connection, how many calls were sent, answered ok, refused with Error.Busy, failed
otherwise (by error name), left unanswered, and the longest wait for a reply while calls were in flight.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import struct
import sys
import time
from typing import Any

BUS_NAME = "org.hypeman.Devices1"
MANAGER_PATH = "/org/hypeman/Devices1"
MANAGER_IFACE = "org.hypeman.Devices1.Manager"
BUSY = b"org.hypeman.Devices1.Error.Busy"
DRAIN_SECONDS = 60.0
METHOD_RETURN, ERROR = 2, 3


def templates(member: str = "ListAvailable", signature: str = "a{sv}", body: list[Any] | None = None) -> str:
    """The Hello and the call as hex (for the JSON file the client reads); needs dbus-fast."""
    from dbus_fast import Message, Variant

    if body is None:
        body = [{"all": Variant("b", True)}]
    hello = Message(
        "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "Hello", serial=1
    )
    call = Message(
        destination=BUS_NAME,
        path=MANAGER_PATH,
        interface=MANAGER_IFACE,
        member=member,
        signature=signature,
        body=body,
        serial=0x7FFFFFFF,
    )
    data = call._marshall(False)
    assert data[:1] == b"l" and data[8:12] == struct.pack("<I", 0x7FFFFFFF)  # little-endian, serial at 8
    return json.dumps({"hello": hello._marshall(False).hex(), "call": data.hex()})


def _socket_path(address: str) -> str:
    for part in address.split(";"):
        kind, _, rest = part.partition(":")
        if kind == "unix":
            opts = dict(kv.split("=", 1) for kv in rest.split(","))
            if "path" in opts:
                return opts["path"]
    raise ValueError(f"{address}: only unix:path= addresses are supported")


def _frame(buf: bytearray) -> tuple[int, bytes] | None:
    """(message type, header bytes) of the first whole message in `buf`, removed from it; None if none."""
    if len(buf) < 16:
        return None
    order = "<" if buf[0:1] == b"l" else ">"
    body_len, _serial, fields_len = struct.unpack_from(order + "III", buf, 4)
    header_end = 16 + fields_len + (-fields_len % 8)
    total = header_end + body_len
    if len(buf) < total:
        return None
    kind, header = buf[1], bytes(buf[16:header_end])
    del buf[:total]
    return kind, header


class Flooder:
    """One connection keeping `in_flight` calls unanswered."""

    def __init__(self, address: str, hello: bytes, call: bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(_socket_path(address))
        self.sock.sendall(b"\0AUTH EXTERNAL " + str(os.geteuid()).encode().hex().encode() + b"\r\n")
        line = b""
        while not line.endswith(b"\r\n"):
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionError("dbus-daemon closed the connection during authentication")
            line += chunk
        if not line.startswith(b"OK"):
            raise ConnectionError(f"dbus-daemon refused SASL EXTERNAL: {line!r}")
        self.sock.sendall(b"BEGIN\r\n" + hello)
        self.inbuf = bytearray()
        while True:  # the Hello reply: the first method return
            got = _frame(self.inbuf)
            if got is None:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("dbus-daemon closed the connection after Hello")
                self.inbuf += chunk
            elif got[0] == METHOD_RETURN:
                break
        self.sock.setblocking(False)
        self.call = bytearray(call)
        self.serial = 1
        self.outbuf = bytearray()
        self.sent = self.ok = self.busy = 0
        self.errors: dict[str, int] = {}
        self.last_reply = time.monotonic()
        self.longest_wait = 0.0

    @property
    def unanswered(self) -> int:
        return self.sent - self.ok - self.busy - sum(self.errors.values())

    def queue_calls(self, upto: int, total: int | None) -> None:
        while self.unanswered < upto and (total is None or self.sent < total):
            if self.unanswered == 0:
                self.last_reply = time.monotonic()  # waiting starts with the first call in flight
            self.serial += 1
            struct.pack_into("<I", self.call, 8, self.serial)
            self.outbuf += self.call
            self.sent += 1

    def write(self) -> None:
        if self.outbuf:
            try:
                n = self.sock.send(self.outbuf)
            except BlockingIOError:
                return
            del self.outbuf[:n]

    def read(self) -> bool:
        try:
            chunk = self.sock.recv(1 << 20)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        self.inbuf += chunk
        while (got := _frame(self.inbuf)) is not None:
            kind, header = got
            if kind not in (METHOD_RETURN, ERROR):
                continue  # a signal (NameAcquired) is not a reply
            now = time.monotonic()
            self.longest_wait = max(self.longest_wait, now - self.last_reply)
            self.last_reply = now
            if kind == METHOD_RETURN:
                self.ok += 1
            elif BUSY in header:
                self.busy += 1
            else:
                start = header.find(b"org.")
                name = (
                    header[start : header.find(b"\0", start)].decode(errors="replace") if start >= 0 else "?"
                )
                self.errors[name] = self.errors.get(name, 0) + 1
        return True

    def report(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "ok": self.ok,
            "busy": self.busy,
            "errors": self.errors,
            "unanswered": self.unanswered,
            "longest_wait": round(self.longest_wait, 3),
        }


def flood(
    address: str,
    hello: bytes,
    call: bytes,
    connections: int,
    in_flight: int,
    seconds: float,
    total: int | None,
) -> list[dict[str, Any]]:
    flooders = [Flooder(address, hello, call) for _ in range(connections)]
    sel = selectors.DefaultSelector()
    for f in flooders:
        sel.register(f.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, f)
    sending_until = time.monotonic() + seconds
    drain_until = sending_until + DRAIN_SECONDS
    closed: set[int] = set()
    while True:
        now = time.monotonic()
        sending = now < sending_until and (total is None or any(f.sent < total for f in flooders))
        for f in flooders:
            if id(f) in closed:
                continue
            if sending:
                f.queue_calls(in_flight, total)
            sel.modify(f.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if f.outbuf else 0), f)
        if not sending and all(f.unanswered == 0 and not f.outbuf for f in flooders):
            break
        if now > drain_until:
            break
        for key, events in sel.select(timeout=0.1):
            f = key.data
            if events & selectors.EVENT_WRITE:
                f.write()
            if events & selectors.EVENT_READ and not f.read():
                closed.add(id(f))
                sel.unregister(f.sock)
        if len(closed) == len(flooders):
            break
    reports = [f.report() for f in flooders]
    for f in flooders:
        f.sock.close()
    return reports


def main(argv: list[str]) -> int:
    address, template_file = argv[0], argv[1]
    connections, in_flight, seconds = int(argv[2]), int(argv[3]), float(argv[4])
    total = int(argv[5]) if len(argv) > 5 else None
    with open(template_file, encoding="utf-8") as fh:
        t = json.load(fh)
    reports = flood(
        address, bytes.fromhex(t["hello"]), bytes.fromhex(t["call"]), connections, in_flight, seconds, total
    )
    print(json.dumps(reports), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
