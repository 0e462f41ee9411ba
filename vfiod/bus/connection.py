"""The bus connection vfiod (and vfioctl) use: dbus-fast's asyncio `MessageBus` with a writer that waits.

dbus-fast 5.2's `_MessageWriter.write_callback` treats `BlockingIOError` (EAGAIN: the socket to dbus-daemon
is momentarily full) like any other error and finalizes the connection. It is the bug of python-dbus-next
issue #153 (fix proposed in PR #154, never merged), carried into dbus-fast unchanged. For vfiod it meant
that anyone able to make it answer faster than dbus-daemon reads (a burst of large inspect replies) took it
off the bus. `PatientWriter` is upstream's writer with that one difference: on EAGAIN (or EINTR) it keeps
its place in the message and waits for the socket to become writable again. A full socket slows vfiod
down; it no longer ends the connection.

What waits is kept in an `Outbox` (vfiod/bus/outbox.py) instead of one FIFO: receivers take turns, so a
small reply to root is not written after megabytes of replies to a flooding caller, and the bytes held for
each destination are counted, which is what the service's per-caller cap on queued replies reads
(`queued_bytes`).

The subclass reaches into dbus-fast's private writer, so dbus-fast is pinned to the 5.2 series in
pyproject.toml; `tests/bus/test_connection.py` checks upstream still has the bug (then this module is
still needed) and that the patched writer rides out a stopped dbus-daemon.
"""

from __future__ import annotations

import array
import asyncio
import socket
from collections import Counter
from copy import copy
from typing import Any

from dbus_fast import Message
from dbus_fast.aio import MessageBus
from dbus_fast.aio.message_bus import _MessageWriter

from vfiod.bus.frozen_bodies import FrozenBodies
from vfiod.bus.outbox import Outbox


def _settle(fut: asyncio.Future[Any] | None, exc: Exception | None = None) -> None:
    if fut is None or fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)


class PatientWriter(_MessageWriter):
    """dbus-fast's writer, but EAGAIN means "wait for writability", and what waits is an `Outbox`:
    receivers take turns, and the bytes waiting for each are counted."""

    def __init__(self, bus: MessageBus) -> None:
        super().__init__(bus)
        self.outbox = Outbox()
        self.messages = self.outbox  # type: ignore[assignment]  # upstream only appends, pops, tests truth

    @property
    def queued(self) -> Counter[str]:
        """destination -> bytes held here, not yet written."""
        return self.outbox.queued

    def buffer_message(self, msg: Message, future: asyncio.Future[Any] | None = None) -> None:
        # upstream's buffer_message, but a frozen body is not marshalled again, and the message goes to
        # its destination's queue
        frozen = self.bus.frozen if isinstance(self.bus, Connection) else None
        data = frozen.marshall(msg) if frozen is not None else None
        if data is None:
            data = msg._marshall(self.negotiate_unix_fd)
        fds = copy(msg.unix_fds) if msg.unix_fds else None
        self.outbox.push(msg.destination or "", len(data), (data, fds, future))

    def write_callback(self, remove_writer: bool = True) -> None:
        sock, fd = self.sock, self.fd
        assert sock is not None and fd is not None  # a writer exists only on a connected bus
        try:
            while True:
                if self.buf is None:
                    if not self.outbox:
                        if remove_writer:
                            self.loop.remove_writer(fd)
                        return
                    buf, unix_fds, fut = self.outbox.popleft()
                    self.unix_fds = unix_fds
                    self.buf = memoryview(buf)
                    self.offset = 0
                    self.fut = fut
                try:
                    if self.unix_fds and self.negotiate_unix_fd:
                        ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", self.unix_fds))]
                        self.offset += sock.sendmsg([self.buf[self.offset :]], ancdata)
                        self.unix_fds = None
                    else:
                        self.offset += sock.send(self.buf[self.offset :])
                except (BlockingIOError, InterruptedError):
                    # The socket is full (or a signal interrupted the send): nothing was written, the
                    # message keeps its place (and its fds), and the loop calls back once it is writable.
                    # Upstream finalizes the connection here (python-dbus-next #153).
                    return
                if self.offset < len(self.buf):
                    return  # partly written: wait for writability
                self.buf = None
                self.outbox.written()
                _settle(self.fut)
        except Exception as e:
            if self.bus._user_disconnect:
                _settle(self.fut)
            else:
                _settle(self.fut, e)
            self.bus._finalize(e)


class Connection(MessageBus):
    """A `MessageBus` whose writer is a `PatientWriter`, with reply bodies that can be frozen."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.frozen = FrozenBodies()

    async def connect(self) -> Connection:
        await super().connect()
        old = self._writer
        assert old is not None and self._fd is not None
        # connect() built upstream's writer and may have registered its callback; nothing has been queued
        # on it that Hello did not already flush, but carry over anything there is rather than assume.
        self._loop.remove_writer(self._fd)
        writer = PatientWriter(self)
        for buf, fds, fut in old.messages:
            writer.outbox.push("", len(buf), (buf, fds, fut))  # as broadcasts: they keep their order
        writer.buf, writer.offset, writer.unix_fds, writer.fut = old.buf, old.offset, old.unix_fds, old.fut
        self._writer = writer
        if writer.buf is not None or writer.messages:
            writer.schedule_write()
        return self

    def queued_bytes(self, destination: str) -> int:
        """Bytes of messages to `destination` marshalled but still waiting for the socket."""
        writer = self._writer
        return writer.queued.get(destination, 0) if isinstance(writer, PatientWriter) else 0
