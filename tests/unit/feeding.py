"""Feed a sans-I/O core the same bytes three ways (h11's test_io idea, design rule 10).

Any core with `receive(bytes) -> list[event]` works: IMAP, POP3, SMTP. A case passes only if
feeding it whole, one byte at a time, and followed by an unfinished line gives the same events:
a parser that depends on how reads happen to be split is caught here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

# An unfinished line: it must change nothing, whatever state the core is left in.
TRAILING = b"Z"
WAYS = ("whole", "bytewise", "trailing")


class Receiver(Protocol):
    def receive(self, data: bytes) -> list[Any]: ...


def chunks(data: bytes, way: str) -> list[bytes]:
    if way == "whole":
        return [data]
    if way == "bytewise":
        return [data[i : i + 1] for i in range(len(data))]
    if way == "trailing":
        return [data + TRAILING]
    raise ValueError(way)


def feed(core: Receiver, data: bytes, way: str = "whole") -> list[Any]:
    """Feed `data` to `core` split as `way` says; all the events, in order."""
    events: list[Any] = []
    for chunk in chunks(data, way):
        events += core.receive(chunk)
    return events


def feed_ways(core_factory: Callable[[], Receiver], data: bytes) -> list[tuple[str, list[Any]]]:
    """(way, events) for each way, each with a fresh core from `core_factory`."""
    return [(way, feed(core_factory(), data, way)) for way in WAYS]


def comparable(events: list[Any]) -> list[object]:
    """Events with secrets revealed: `Secret` compares only through `equals`, never with ==."""
    out: list[object] = []
    for event in events:
        creds = getattr(event, "credentials", None)
        if creds is not None:
            out.append(
                (type(event).__name__, dataclasses.replace(creds, secret=None), reveal(creds))
            )
        else:
            out.append(event)
    return out


def reveal(creds: Any) -> str:
    return str(creds.secret.reveal())


def same_every_way(core_factory: Callable[[], Receiver], data: bytes) -> list[Any]:
    """The events of `data`, after checking that all three ways agree."""
    results = feed_ways(core_factory, data)
    first = comparable(results[0][1])
    for way, events in results[1:]:
        assert comparable(events) == first, f"fed {way}, the events differ from fed whole"
    return results[0][1]
