"""The bus connection vfiod (and vfioctl) use: dbus-fast's asyncio `MessageBus` with a writer that waits.

dbus-fast 5.2's `_MessageWriter.write_callback` treats `BlockingIOError` (EAGAIN: the socket to dbus-daemon
is momentarily full) like any other error and finalizes the connection. It is the bug of python-dbus-next
issue #153 (fix proposed in PR #154, never merged), carried into dbus-fast unchanged. For vfiod it meant
that anyone able to make it answer faster than dbus-daemon reads (a burst of large inspect replies) took it
off the bus. `PatientWriter` is upstream's writer with that one difference: on EAGAIN (or EINTR) it keeps
its place in the message and waits for the socket to become writable again. A full socket slows vfiod
down; it no longer ends the connection.

It also keeps count of the bytes it holds for each destination (marshalled but not yet written), which is
what the service's per-caller cap on queued replies reads (`queued_bytes`).

The subclass reaches into dbus-fast's private writer, so dbus-fast is pinned to the 5.2 series in
pyproject.toml; `tests/bus/test_connection.py` checks upstream still has the bug (then this module is
still needed) and that the patched writer rides out a stopped dbus-daemon.
"""

from __future__ import annotations

import array
import asyncio
import socket
from collections import Counter, deque
from typing import Any

from dbus_fast import Message
from dbus_fast.aio import MessageBus
from dbus_fast.aio.message_bus import _MessageWriter


def _settle(fut: asyncio.Future[Any] | None, exc: Exception | None = None) -> None:
    if fut is None or fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)


class PatientWriter(_MessageWriter):
    """dbus-fast's writer, but EAGAIN means "wait for writability", and bytes are counted per destination."""

    def __init__(self, bus: MessageBus) -> None:
        super().__init__(bus)
        self.queued: Counter[str] = Counter()  # destination -> bytes held here, not yet written
        self._owners: deque[tuple[str, int]] = deque()  # parallel to self.messages
        self._owner: tuple[str, int] | None = None  # the message being written

    def buffer_message(self, msg: Message, future: asyncio.Future[Any] | None = None) -> None:
        super().buffer_message(msg, future)
        owner = (msg.destination or "", len(self.messages[-1][0]))
        self._owners.append(owner)
        self.queued[owner[0]] += owner[1]

    def _written(self) -> None:
        if self._owner is not None:
            who, size = self._owner
            self.queued[who] -= size
            if self.queued[who] <= 0:
                del self.queued[who]
            self._owner = None

    def write_callback(self, remove_writer: bool = True) -> None:
        sock, fd = self.sock, self.fd
        assert sock is not None and fd is not None  # a writer exists only on a connected bus
        try:
            while True:
                if self.buf is None:
                    if not self.messages:
                        if remove_writer:
                            self.loop.remove_writer(fd)
                        return
                    buf, unix_fds, fut = self.messages.popleft()
                    self._owner = self._owners.popleft() if self._owners else None
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
                self._written()
                _settle(self.fut)
        except Exception as e:
            if self.bus._user_disconnect:
                _settle(self.fut)
            else:
                _settle(self.fut, e)
            self.bus._finalize(e)


class Connection(MessageBus):
    """A `MessageBus` whose writer is a `PatientWriter`."""

    async def connect(self) -> Connection:
        await super().connect()
        old = self._writer
        assert old is not None and self._fd is not None
        # connect() built upstream's writer and may have registered its callback; nothing has been queued
        # on it that Hello did not already flush, but carry over anything there is rather than assume.
        self._loop.remove_writer(self._fd)
        writer = PatientWriter(self)
        for buf, fds, fut in old.messages:
            writer.messages.append((buf, fds, fut))
            writer._owners.append(("", len(buf)))
        writer.buf, writer.offset, writer.unix_fds, writer.fut = old.buf, old.offset, old.unix_fds, old.fut
        self._writer = writer
        if writer.buf is not None or writer.messages:
            writer.schedule_write()
        return self

    def queued_bytes(self, destination: str) -> int:
        """Bytes of messages to `destination` marshalled but still waiting for the socket."""
        writer = self._writer
        return writer.queued.get(destination, 0) if isinstance(writer, PatientWriter) else 0
