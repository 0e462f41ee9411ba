"""The order in which vfiod's bus connection writes what it has queued: receivers take turns.

When dbus-daemon reads vfiod's socket more slowly than vfiod answers (a flood of half-megabyte
`ListAvailable` replies), messages wait in the connection's writer. Written first-in first-out, a small
reply to root or hypeman would wait behind every large reply queued for the flooding callers. `Outbox`
keeps one queue per destination and hands out their messages in turn, so a reply waits for at most one
message per other receiver.

What D-Bus promises is kept: each receiver gets vfiod's messages in the order vfiod sent them. Messages to
one destination keep their order; a message without a destination (a broadcast signal, which any
connection may receive through a match rule) is a barrier: it goes out after everything queued before it
and before everything queued after it.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterator
from typing import Any

Item = tuple[bytearray, Any, Any]  # (marshalled message, unix fds, future), as dbus-fast's writer keeps them


class _Turns:
    """Messages to named destinations, taken one per destination in turn."""

    def __init__(self) -> None:
        self.queues: dict[str, deque[tuple[int, Item]]] = {}
        self.order: deque[str] = deque()

    def push(self, destination: str, size: int, item: Item) -> None:
        queue = self.queues.get(destination)
        if queue is None:
            queue = self.queues[destination] = deque()
            self.order.append(destination)
        queue.append((size, item))

    def pop(self) -> tuple[str, int, Item]:
        destination = self.order.popleft()
        queue = self.queues[destination]
        size, item = queue.popleft()
        if queue:
            self.order.append(destination)
        else:
            del self.queues[destination]
        return destination, size, item

    def __bool__(self) -> bool:
        return bool(self.order)

    def __iter__(self) -> Iterator[Item]:
        for queue in self.queues.values():
            for _, item in queue:
                yield item


class Outbox:
    """What dbus-fast's writer keeps in `messages`, with receivers taking turns (see the module docstring).

    `queued` counts the bytes waiting per destination ("" for broadcasts), including the message being
    written until `written()` is called for it."""

    def __init__(self) -> None:
        self._segments: deque[_Turns | tuple[int, Item]] = deque()
        self._count = 0
        self.queued: Counter[str] = Counter()
        self.current: tuple[str, int] | None = None  # destination and size of the message last taken

    def push(self, destination: str, size: int, item: Item) -> None:
        if destination:
            last = self._segments[-1] if self._segments else None
            if not isinstance(last, _Turns):
                last = _Turns()
                self._segments.append(last)
            last.push(destination, size, item)
        else:
            self._segments.append((size, item))
        self._count += 1
        self.queued[destination] += size

    def popleft(self) -> Item:
        first = self._segments[0]
        if isinstance(first, _Turns):
            destination, size, item = first.pop()
            if not first:
                self._segments.popleft()
        else:
            self._segments.popleft()
            destination, (size, item) = "", first
        self._count -= 1
        self.current = (destination, size)
        return item

    def written(self) -> None:
        """The message last taken is on the socket in full."""
        if self.current is None:
            return
        destination, size = self.current
        self.queued[destination] -= size
        if self.queued[destination] <= 0:
            del self.queued[destination]
        self.current = None

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def __iter__(self) -> Iterator[Item]:
        for segment in self._segments:
            if isinstance(segment, _Turns):
                yield from segment
            else:
                yield segment[1]
