"""Active health checks of pool members: connect, read the greeting, optionally TLS.

A check is what a client's first second looks like to the mailstore: TCP connect, the
protocol's greeting (`* OK`, `+OK`, `220`), with `check_tls` the TLS handshake the logins do
(implicit, or after STARTTLS / STLS / EHLO+STARTTLS), then a polite LOGOUT / QUIT. The
whole check is bounded by `check_timeout`. Results go to `report` as `HealthEvent`s; the
state machine in pools.py decides what they mean.

`HealthChecker` runs in whichever process is given it: today each worker runs its own (the
cost per member is workers x 60 / check_interval connections a minute); the supervisor can
run one for the node instead and broadcast the events (see routing.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from mailgate import metrics
from mailgate.backend.pools import EventKind, Health, HealthEvent, HealthState, Member, Pool
from mailgate.values import BackendTLS

log = logging.getLogger("mailgate.backend.health")

GREETINGS = {"imap": b"* OK", "pop3": b"+OK", "smtp": b"220"}
STARTTLS = {"imap": b"hc1 STARTTLS\r\n", "pop3": b"STLS\r\n", "smtp": b"STARTTLS\r\n"}
STARTTLS_OK = {"imap": b"hc1 OK", "pop3": b"+OK", "smtp": b"220"}
GOODBYE = {"imap": b"hc2 LOGOUT\r\n", "pop3": b"QUIT\r\n", "smtp": b"QUIT\r\n"}
# A greeting or reply line longer than this is not a mail server's (Dovecot's greeting with
# its capabilities is ~200 bytes).
MAX_LINE = 8192
# Lines of an EHLO reply read before STARTTLS; Postfix sends about 10.
MAX_EHLO_LINES = 64


@dataclass(frozen=True, slots=True)
class CheckTarget:
    host: str
    port: int
    protocol: str  # whose greeting to expect
    tls: BackendTLS  # none: the greeting is enough
    tls_context: ssl.SSLContext | None
    server_name: str | None
    helo_name: str = "localhost"


class CheckFailed(Exception):
    """What went wrong, in words for the log and `mailgate backend list`."""


async def check(target: CheckTarget, timeout: float) -> str:
    """One check; returns the greeting (for the log) or raises CheckFailed."""
    try:
        async with asyncio.timeout(timeout):
            return await _check(target)
    except TimeoutError:
        raise CheckFailed(f"no greeting within {timeout:g} s") from None
    except ssl.SSLError as e:
        raise CheckFailed(f"TLS: {e.reason or e}") from None
    except OSError as e:
        raise CheckFailed(f"connect: {e.strerror or e}") from None


async def _check(target: CheckTarget) -> str:
    implicit = target.tls is BackendTLS.IMPLICIT
    reader, writer = await asyncio.open_connection(
        target.host,
        target.port,
        ssl=target.tls_context if implicit else None,
        server_hostname=(target.server_name or target.host) if implicit else None,
        limit=MAX_LINE,
    )
    try:
        greeting = await _line(reader)
        if not greeting.startswith(GREETINGS[target.protocol]):
            raise CheckFailed(f"unexpected greeting {_printable(greeting)!r}")
        if target.tls is BackendTLS.STARTTLS and target.tls_context is not None:
            await _starttls(reader, writer, target)
        writer.write(GOODBYE[target.protocol])
        with contextlib.suppress(OSError):
            await writer.drain()
        return _printable(greeting)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def _starttls(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: CheckTarget
) -> None:
    proto = target.protocol
    if proto == "smtp":
        writer.write(b"EHLO " + target.helo_name.encode("ascii", "replace") + b"\r\n")
        for _ in range(MAX_EHLO_LINES):
            line = await _line(reader)
            if not line.startswith(b"250"):
                raise CheckFailed(f"EHLO refused: {_printable(line)!r}")
            if line[3:4] != b"-":
                break
    writer.write(STARTTLS[proto])
    reply = await _line(reader)
    while proto == "imap" and reply.startswith(b"* "):  # untagged lines before the tagged OK
        reply = await _line(reader)
    if not reply.startswith(STARTTLS_OK[proto]):
        raise CheckFailed(f"STARTTLS refused: {_printable(reply)!r}")
    await writer.start_tls(target.tls_context, server_hostname=target.server_name or target.host)  # type: ignore[arg-type]


async def _line(reader: asyncio.StreamReader) -> bytes:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError:
        raise CheckFailed("closed the connection") from None
    except asyncio.LimitOverrunError:
        raise CheckFailed("line too long") from None
    return line.rstrip(b"\r\n")


def _printable(data: bytes) -> str:
    text = data[:120].decode("utf-8", "replace")
    return "".join(c if c.isprintable() else "?" for c in text)


class HealthChecker:
    """Checks every member of every pool at its pool's `check_interval` (0: never).

    `target(pool, member)` says where and how to check; `report(event)` gets each result
    (and a PROBE event before the check of a half-open member, so no login probes it too).
    """

    def __init__(
        self,
        state: HealthState,
        target: Callable[[Pool, Member], CheckTarget],
        report: Callable[[HealthEvent], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._state = state
        self._target = target
        self._report = report
        self._clock = clock
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for pool in self._state.pools.values():
            if pool.settings.check_interval > 0:
                self._tasks.append(asyncio.ensure_future(self._run(pool)))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _run(self, pool: Pool) -> None:
        interval = pool.settings.check_interval
        # Workers (and nodes) that start together would check in step: start at a random
        # point of the first interval.
        await asyncio.sleep(random.uniform(0, min(interval, 1.0)))
        while True:
            started = self._clock()
            await asyncio.gather(*(self.check_member(pool, m) for m in pool.members))
            await asyncio.sleep(max(0.0, interval - (self._clock() - started)))

    async def check_member(self, pool: Pool, member: Member) -> bool | None:
        """Check one member now (if it wants checking); True/False, or None if skipped."""
        now = self._clock()
        if not self._state.wants_check(member, now):
            return None
        if self._state.member(pool.name, member.name).health is Health.HALF_OPEN:
            self._report(HealthEvent(EventKind.PROBE, pool.name, member.name, now))
        target = self._target(pool, member)
        begun = time.perf_counter()
        try:
            detail = await check(target, pool.settings.check_timeout)
            ok = True
        except CheckFailed as e:
            detail, ok = str(e), False
        except Exception as e:  # a check must never kill the checker
            detail, ok = f"internal error: {type(e).__name__}", False
            log.exception("health check of %s/%s", pool.name, member.name)
        elapsed = time.perf_counter() - begun
        metrics.observe_check(pool.name, member.name, ok, elapsed)
        kind = EventKind.CHECK_OK if ok else EventKind.CHECK_FAILED
        self._report(HealthEvent(kind, pool.name, member.name, self._clock(), detail))
        return ok
