"""A full socket to dbus-daemon slows vfiod down and never takes it off the bus (python-dbus-next #153).

The socket is driven full for real: dbus-daemon is stopped with SIGSTOP, so nothing reads vfiod's end, and
vfiod keeps sending until the kernel says EAGAIN; then dbus-daemon is continued.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from dbus_fast import Message, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.aio import message_bus as upstream

from tests.bus.conftest import Clients, StartVfiod
from tests.bus.support.harness import Client, LoopThread, PrivateBus, Reply
from vfiod.bus.connection import Connection

BIG = "x" * 60_000  # a signal body; a few of them fill a unix socket's send buffer


# What PatientWriter and Connection rely on, as read in dbus-fast 5.2.0: the writer's fields and its
# buffer_message/schedule_write, MessageBus.connect building `_writer`, and `_finalize`/`_user_disconnect`.
# A dbus-fast release that changes any of these fails here: re-read them against vfiod/bus/connection.py
# (and whether upstream fixed EAGAIN, which test_a_full_socket_to_dbus_daemon[upstream] tells), then
# record the new digests.
CHECKED_AGAINST = {
    "_MessageWriter": "cd3a53620d57b769",
    "MessageBus.connect": "5c3169c8cd2dc6bc",
    "MessageBus._finalize": "1f1d99eab349ed9e",
}


def test_the_upstream_internals_the_patch_relies_on_are_unchanged() -> None:
    objects = {
        "_MessageWriter": upstream._MessageWriter,
        "MessageBus.connect": upstream.MessageBus.connect,
        "MessageBus._finalize": upstream.MessageBus._finalize,
    }
    digests = {
        name: hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]
        for name, obj in objects.items()
    }
    assert digests == CHECKED_AGAINST


@contextmanager
def stopped(bus: PrivateBus) -> Iterator[None]:
    """dbus-daemon stopped (reads nothing) for the block."""
    os.kill(bus.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(bus.proc.pid, signal.SIGCONT)


def fill(lt: LoopThread, conn: MessageBus, *, to: str, at_least: int = 64) -> int:
    """Send big signals to `to` until the socket is full (the writer then holds messages back)."""

    async def go() -> int:
        sent = 0
        while conn.connected and (sent < at_least or not conn._writer.messages):  # type: ignore[union-attr]
            msg = Message.new_signal("/t", "org.example.T", "Big", "s", [BIG])
            msg.destination = to
            try:
                conn.send(msg)
            except OSError:  # upstream: the writer finalized the connection inside send()
                break
            sent += 1
            await asyncio.sleep(0)
            if sent > 10_000:
                break
        return sent

    return lt.run(go())


@pytest.mark.parametrize("cls", [MessageBus, Connection], ids=["upstream", "vfiod"])
def test_a_full_socket_to_dbus_daemon(bus: PrivateBus, cls: type[MessageBus]) -> None:
    sender_lt, receiver_lt = LoopThread("sender"), LoopThread("receiver")
    try:
        receiver = Client(receiver_lt, bus.address)
        got: list[int] = []
        receiver.bus.add_message_handler(lambda m: got.append(1) if m.member == "Big" else None)

        async def connect() -> MessageBus:
            return await cls(bus_address=bus.address).connect()

        conn = sender_lt.run(connect())
        with stopped(bus):
            sent = fill(sender_lt, conn, to=receiver.unique_name)
            time.sleep(0.2)
        if cls is MessageBus:
            # Upstream finalizes on EAGAIN. If this fails, dbus-fast fixed its writer: drop PatientWriter.
            assert not conn.connected
            return
        assert conn.connected
        deadline = time.monotonic() + 20
        while len(got) < sent and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(got) == sent  # every message went out, in full, once dbus-daemon read again
        assert isinstance(conn, Connection)
        assert conn.queued_bytes(receiver.unique_name) == 0
        receiver.close()
        sender_lt.run(asyncio.sleep(0))
        conn.disconnect()
    finally:
        sender_lt.close()
        receiver_lt.close()


def test_queued_bytes_are_counted_per_destination(bus: PrivateBus) -> None:
    lt = LoopThread("sender")
    try:
        a, b = Client(lt, bus.address), Client(lt, bus.address)

        async def connect() -> Connection:
            return await Connection(bus_address=bus.address).connect()

        conn = lt.run(connect())
        with stopped(bus):
            fill(lt, conn, to=a.unique_name)
            held = conn.queued_bytes(a.unique_name)
            assert held > 0
            assert conn.queued_bytes(b.unique_name) == 0
            writer = conn._writer
            assert writer is not None
            assert held == sum(len(m[0]) for m in writer.messages) + (
                len(writer.buf) if writer.buf is not None else 0
            )
        deadline = time.monotonic() + 20
        while conn.queued_bytes(a.unique_name) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert conn.queued_bytes(a.unique_name) == 0
        conn.disconnect()
        a.close()
        b.close()
    finally:
        lt.close()


def test_vfiod_answers_every_call_across_a_stopped_bus(
    bus: PrivateBus, start_vfiod: StartVfiod, clients: Clients
) -> None:
    """Before the fix: "the bus connection was lost" and every call below went unanswered."""
    vfiod = start_vfiod("dgx-h100")
    replies: list[Reply] = []
    lock = threading.Lock()

    def one() -> None:
        r = clients.bob.m("ListAvailable", "a{sv}", {"all": Variant("b", True)})
        with lock:
            replies.append(r)

    workers = [threading.Thread(target=one) for _ in range(30)]
    for w in workers:
        w.start()
    time.sleep(0.05)  # the calls reach vfiod; its replies then pile up against a bus that reads nothing
    with stopped(bus):
        time.sleep(2)
    for w in workers:
        w.join(60)
    assert vfiod.daemon.bus is not None and vfiod.daemon.bus.connected
    assert len(replies) == 30
    assert all(r.ok for r in replies), {r.short for r in replies if not r.ok}
    assert {len(r.value()) for r in replies} == {len(replies[0].value())}
