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

Descriptors vfiod hands over in a reply (OpenDevices) are vfiod's until the reply is written: the writer
closes them right after the `sendmsg` that carried them (the kernel has put copies in the socket by then),
and the connection closes any still waiting when it goes. A reply is never written with a descriptor
closed early, whose number could by then name another file.

Negotiating descriptors changes how dbus-fast 5.2 reads, too: it then reads each message with as many
`recvmsg` calls as it has parts (header, fields, body) and reads on until the socket is empty before it
gives the event loop back, so a caller flooding vfiod with calls held every other caller's replies up for
seconds. vfiod takes no descriptors, so the daemon's connection (`keep_received_fds=False`) reads as if
none were negotiated: plain `recv` of whole buffers, and the kernel releases whatever descriptors a sender
attached (a read without room for control data does; nothing is installed in vfiod's table). vfioctl's
connection, which receives OpenDevices' descriptors, reads as upstream does. And dbus-fast looks for
descriptors to send in every reply of a connection that negotiated them, variants included (a walk of a
hundred thousand variants for a large ListAvailable): a method whose reply type has no `h` gets a handler
built as if none were negotiated.

The subclass reaches into dbus-fast's private writer, so dbus-fast is pinned to the 5.2 series in
pyproject.toml; `tests/bus/test_connection.py` checks upstream still has the bug (then this module is
still needed) and that the patched writer rides out a stopped dbus-daemon.
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
from collections import Counter
from collections.abc import Callable, Iterable
from copy import copy
from functools import partial
from typing import Any

import dbus_fast.aio.message_bus
from dbus_fast import Message
from dbus_fast._private.unmarshaller import Unmarshaller
from dbus_fast.aio import MessageBus
from dbus_fast.aio.message_bus import _MessageWriter
from dbus_fast.aio.message_reader import _message_reader
from dbus_fast.service import ServiceInterface

from vfiod.bus.frozen_bodies import FrozenBodies
from vfiod.bus.outbox import Outbox
from vfiod.logevents import Action

log = logging.getLogger("vfiod.bus")


def message_reader(
    sock: socket.socket | None,
    process: Callable[[Message], None],
    finalize: Callable[[Exception | None], None],
    negotiate_unix_fd: bool,
) -> Callable[[], None]:
    """dbus-fast's `build_message_reader`, but a `Connection` that keeps no received descriptors reads as
    one that negotiated none (see the module docstring)."""
    bus = getattr(process, "__self__", None)
    receive = negotiate_unix_fd and not (isinstance(bus, Connection) and not bus.keeps_received_fds)
    return partial(_message_reader, Unmarshaller(None, sock, receive), process, finalize, receive)


# MessageBus.connect builds its reader through this module global (dbus-fast 5.2).
dbus_fast.aio.message_bus.build_message_reader = message_reader  # type: ignore[attr-defined]


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
                        sent, self.unix_fds = self.unix_fds, None
                        if isinstance(self.bus, Connection):
                            self.bus.handed_over(sent)
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

    def __init__(self, *args: Any, keep_received_fds: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.frozen = FrozenBodies()
        self._handing_over: set[int] = set()  # descriptors in replies not written yet: vfiod's to close
        # False (the daemon): descriptors are negotiated only to be sent; any a sender attaches is dropped
        # by the kernel on arrival (message_reader)
        self.keeps_received_fds = keep_received_fds

    def _make_method_handler(self, interface: ServiceInterface, method: Any) -> Callable[..., None]:
        if "h" in method.out_signature:
            return super()._make_method_handler(interface, method)
        negotiated, self._negotiate_unix_fd = self._negotiate_unix_fd, False
        try:  # dbus-fast 5.2 takes the flag once, when it builds the handler (at export)
            return super()._make_method_handler(interface, method)
        finally:
            self._negotiate_unix_fd = negotiated

    def hand_over(self, fds: Iterable[int]) -> None:
        """`fds` go out in a reply about to be sent: close each once the message carrying it is written
        (or the connection goes). Only for a connection that passes descriptors."""
        if not self._negotiate_unix_fd:
            raise RuntimeError("this bus connection does not pass unix descriptors")
        self._handing_over.update(fds)

    def handed_over(self, fds: Iterable[int], sent: bool = True) -> None:
        """A message carrying `fds` was written (`sent`), or will never be: close those vfiod handed over."""
        closed = 0
        for fd in fds:
            if fd in self._handing_over:
                self._handing_over.discard(fd)
                os.close(fd)
                closed += 1
        if closed:
            log.info(
                "%d descriptors %s; vfiod's copies closed",
                closed,
                "handed over in a reply" if sent else "not handed over (the bus connection went)",
                extra={"ACTION": Action.HAND_OVER},
            )

    def _finalize(self, err: Exception | None = None) -> None:
        try:
            super()._finalize(err)
        finally:
            self.handed_over(list(self._handing_over), sent=False)  # never written: nobody received them

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
