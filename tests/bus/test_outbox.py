"""The writer's outbox: receivers take turns, each receiver's messages keep their order, broadcasts are
barriers, and the bytes waiting per destination are counted."""

from __future__ import annotations

from vfiod.bus.outbox import Item, Outbox


def item(tag: str) -> Item:
    return (bytearray(tag.encode()), None, None)


def drain(box: Outbox) -> list[str]:
    out = []
    while box:
        out.append(box.popleft()[0].decode())
        box.written()
    return out


def test_a_small_reply_waits_for_one_message_per_other_receiver() -> None:
    box = Outbox()
    for i in range(50):
        box.push(":1.flood", 500_000, item(f"flood{i}"))
    box.push(":1.other", 500_000, item("other0"))
    box.push(":1.root", 100, item("root"))
    order = drain(box)
    assert order[:3] == ["flood0", "other0", "root"]
    assert [t for t in order if t.startswith("flood")] == [f"flood{i}" for i in range(50)]


def test_broadcasts_keep_their_place() -> None:
    box = Outbox()
    box.push(":1.a", 1, item("a0"))
    box.push(":1.a", 1, item("a1"))
    box.push(":1.b", 1, item("b0"))
    box.push("", 1, item("signal"))
    box.push(":1.b", 1, item("b1"))
    box.push(":1.a", 1, item("a2"))
    order = drain(box)
    assert order.index("signal") == 3  # after a0, a1, b0 (in turns), before b1 and a2
    assert sorted(order[:3]) == ["a0", "a1", "b0"] and order[:3].index("a0") < order[:3].index("a1")
    assert order[4:] == ["b1", "a2"]


def test_bytes_are_counted_until_written() -> None:
    box = Outbox()
    box.push(":1.a", 10, item("a0"))
    box.push(":1.a", 5, item("a1"))
    box.push("", 7, item("s"))
    assert box.queued == {":1.a": 15, "": 7} and len(box) == 3
    assert sum(len(i[0]) for i in box) == len("a0a1s")
    box.popleft()
    assert box.queued[":1.a"] == 15  # being written still counts
    box.written()
    assert box.queued[":1.a"] == 5
    drain(box)
    assert box.queued == {} and not box
