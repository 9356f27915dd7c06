"""Drive a sans-I/O backend login core through a transcript, for the backend core tests.

A script is a list of steps: ("S", bytes) the server sends, ("C", bytes) what the core must
have sent by then, ("TLS",) the driver finished the handshake the core asked for, ("EOF",)
the server closed. `mode` feeds server bytes "whole", one "bytes" at a time, or with `extra`
appended to the last ("trailing"), which the core must leave for the relay.
"""

from __future__ import annotations

from typing import Any

from mailgate.protocols.events import BackendFailed, BackendReady, Send, StartTLS


def run(
    core: Any, script: list[tuple[Any, ...]], mode: str, extra: bytes
) -> tuple[BackendReady | BackendFailed, bytes]:
    """Return (final event, bytes the core never saw)."""
    sent = bytearray()
    tls_asked = False
    final: BackendReady | BackendFailed | None = None
    leftover = b""

    def absorb(events: list[Any]) -> None:
        nonlocal tls_asked, final
        for event in events:
            assert final is None, f"event after the verdict: {event!r}"
            if isinstance(event, Send):
                sent.extend(event.data)
            elif isinstance(event, StartTLS):
                tls_asked = True
            else:
                assert isinstance(event, BackendReady | BackendFailed)
                final = event

    for index, (kind, *args) in enumerate(script):
        if kind == "S":
            data = args[0]
            if mode == "trailing" and index == len(script) - 1:
                data += extra
            pieces = [data[i : i + 1] for i in range(len(data))] if mode == "bytes" else [data]
            for at, piece in enumerate(pieces):
                if final is not None:  # a real driver stops feeding here: the rest is the relay's
                    leftover += b"".join(pieces[at:])
                    break
                absorb(core.receive(piece))
        elif kind == "C":
            assert bytes(sent) == args[0]
            sent.clear()
        elif kind == "TLS":
            assert tls_asked and not sent
            tls_asked = False
            absorb(core.tls_started())
        elif kind == "EOF":  # also during a TLS handshake the driver never finished
            tls_asked = False
            absorb(core.receive(b""))
    assert not sent, f"unchecked bytes sent: {bytes(sent)!r}"
    assert not tls_asked
    assert final is not None, "no verdict"
    return final, leftover
