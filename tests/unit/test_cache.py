"""Cached: a burst of logins asks the directory once; only routes are remembered, briefly."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from mailgate.auth.cache import Cached
from mailgate.values import (
    ClientInfo,
    Credentials,
    Decision,
    Method,
    Reject,
    Route,
    Secret,
    TempFail,
)

T = TypeVar("T")
PASSWORD = "s3cret-p4ss"


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


class Directory:
    """Every user's password is PASSWORD; routes are numbered so a fresh lookup is visible."""

    def __init__(self) -> None:
        self.calls = 0
        self.down = False
        self.gate: asyncio.Event | None = None
        self.closed = False

    async def authenticate(self, creds: Credentials, client: ClientInfo) -> Decision:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            return TempFail("database down")
        if not creds.secret.equals(PASSWORD):
            return Reject()
        return Route("10.0.0.5", 143, creds.user, creds.secret, mailstore=f"lookup{self.calls}")

    async def close(self) -> None:
        self.closed = True


def creds(
    user: str = "alice", password: str = PASSWORD, method: Method = Method.PLAIN
) -> Credentials:
    return Credentials(method, user, Secret(password))


def client(protocol: str = "imap", ip: str = "192.0.2.1") -> ClientInfo:
    return ClientInfo(ip, 40000, protocol)


def make(ttl: float = 60.0, size: int = 100) -> tuple[Cached, Directory, FakeClock]:
    directory, clock = Directory(), FakeClock()
    return Cached(directory, ttl=ttl, size=size, clock=clock), directory, clock


def test_a_hit_skips_the_directory() -> None:
    cached, directory, _ = make()

    async def go() -> None:
        first = await cached.authenticate(creds(), client())
        for ip in ("192.0.2.1", "192.0.2.2"):
            assert await cached.authenticate(creds(), client(ip=ip)) is first

    run(go())
    assert directory.calls == 1


def test_entries_expire_after_the_ttl() -> None:
    cached, directory, clock = make(ttl=60.0)

    async def go() -> None:
        first = await cached.authenticate(creds(), client())
        clock.now += 59.9
        assert await cached.authenticate(creds(), client()) is first
        clock.now += 0.2
        second = await cached.authenticate(creds(), client())
        assert isinstance(second, Route)
        assert second.mailstore == "lookup2"

    run(go())
    assert directory.calls == 2


def test_size_is_bounded_least_recently_used_first() -> None:
    cached, directory, _ = make(size=2)

    async def go() -> None:
        await cached.authenticate(creds("a"), client())
        await cached.authenticate(creds("b"), client())
        await cached.authenticate(creds("a"), client())  # a is now the most recent
        await cached.authenticate(creds("c"), client())  # evicts b
        assert len(cached) == 2
        calls = directory.calls
        await cached.authenticate(creds("a"), client())
        await cached.authenticate(creds("c"), client())
        assert directory.calls == calls
        await cached.authenticate(creds("b"), client())
        assert directory.calls == calls + 1

    run(go())


def test_reject_and_tempfail_are_not_cached() -> None:
    cached, directory, _ = make()

    async def go() -> None:
        for _ in range(3):
            assert await cached.authenticate(creds(password="wrong"), client()) == Reject()
        directory.down = True
        for _ in range(2):
            assert isinstance(await cached.authenticate(creds(), client()), TempFail)
        directory.down = False
        assert isinstance(await cached.authenticate(creds(), client()), Route)

    run(go())
    assert directory.calls == 6
    assert len(cached) == 1


def test_a_different_password_protocol_or_user_misses() -> None:
    cached, directory, _ = make()

    async def go() -> None:
        await cached.authenticate(creds(), client())
        assert await cached.authenticate(creds(password=PASSWORD + "x"), client()) == Reject()
        await cached.authenticate(creds(), client("pop3"))
        await cached.authenticate(creds("Alice"), client())
        await cached.authenticate(creds(method=Method.LOGIN), client())

    run(go())
    assert directory.calls == 5


def test_challenge_methods_are_never_cached() -> None:
    cached, directory, _ = make()
    cram = Credentials(Method.CRAM_MD5, "alice", Secret(PASSWORD), salt="<1.2@host>")

    async def go() -> None:
        for _ in range(3):
            await cached.authenticate(cram, client())

    run(go())
    assert directory.calls == 3
    assert len(cached) == 0


def test_flush_forgets_everything_even_a_lookup_in_flight() -> None:
    cached, directory, _ = make()

    async def go() -> None:
        await cached.authenticate(creds("a"), client())
        cached.flush()
        assert len(cached) == 0
        await cached.authenticate(creds("a"), client())
        assert directory.calls == 2
        directory.gate = asyncio.Event()
        pending = asyncio.ensure_future(cached.authenticate(creds("b"), client()))
        await asyncio.sleep(0)
        cached.flush()
        directory.gate.set()
        assert isinstance(await pending, Route)
        directory.gate = None
        await cached.authenticate(creds("b"), client())
        assert directory.calls == 4  # the answer from before the flush was not kept

    run(go())


def test_concurrent_identical_misses_share_one_lookup() -> None:
    cached, directory, _ = make()

    async def go() -> None:
        directory.gate = asyncio.Event()
        tasks = [asyncio.ensure_future(cached.authenticate(creds(), client())) for _ in range(5)]
        wrong = asyncio.ensure_future(cached.authenticate(creds(password="bad"), client()))
        await asyncio.sleep(0)
        tasks[0].cancel()  # one client hangs up: the others still get their answer
        directory.gate.set()
        results = await asyncio.gather(*tasks[1:])
        assert all(r is results[0] and isinstance(r, Route) for r in results)
        assert await wrong == Reject()

    run(go())
    assert directory.calls == 2


def test_keys_hold_no_password_and_ttl_zero_disables() -> None:
    cached, _, _ = make()
    run(cached.authenticate(creds(), client()))
    assert PASSWORD not in repr(list(cached._entries))
    off, directory, _ = make(ttl=0)

    async def go() -> None:
        for _ in range(3):
            await off.authenticate(creds(), client())

    run(go())
    assert directory.calls == 3


def test_close_flushes_and_closes_the_inner_authenticator() -> None:
    cached, directory, _ = make()
    run(cached.authenticate(creds(), client()))
    run(cached.close())
    assert directory.closed
    assert len(cached) == 0


def test_a_login_after_flush_does_not_join_a_lookup_from_before() -> None:
    cached, directory, _ = make()

    async def go() -> None:
        directory.gate = asyncio.Event()
        before = asyncio.ensure_future(cached.authenticate(creds(), client()))
        await asyncio.sleep(0.01)
        cached.flush()
        after = asyncio.ensure_future(cached.authenticate(creds(), client()))
        await asyncio.sleep(0.01)
        assert directory.calls == 2
        directory.gate.set()
        first, second = await before, await after
        assert isinstance(first, Route) and isinstance(second, Route)
        directory.gate = None
        assert await cached.authenticate(creds(), client()) is second

    run(go())
    assert directory.calls == 2
