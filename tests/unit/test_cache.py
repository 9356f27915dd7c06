"""Cached: a burst of logins asks the directory once; only routes are remembered, briefly."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable
from dataclasses import replace
from typing import TypeVar

import pytest

from mailgate import names
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


def same(a: Decision, b: Decision) -> bool:
    """The same cached route: one lookup (its number) and the same password for the backend."""
    assert isinstance(a, Route) and isinstance(b, Route), (a, b)
    secret = Secret("")  # Secret compares by identity: compare the rest, then the values
    same_route = replace(a, secret=secret) == replace(b, secret=secret)
    return same_route and a.secret.reveal() == b.secret.reveal()


def test_a_hit_skips_the_directory() -> None:
    cached, directory, _ = make()

    async def go() -> None:
        first = await cached.authenticate(creds(), client())
        for ip in ("192.0.2.1", "192.0.2.2"):
            assert same(await cached.authenticate(creds(), client(ip=ip)), first)

    run(go())
    assert directory.calls == 1


def test_entries_expire_after_the_ttl() -> None:
    cached, directory, clock = make(ttl=60.0)

    async def go() -> None:
        first = await cached.authenticate(creds(), client())
        clock.now += 59.9
        assert same(await cached.authenticate(creds(), client()), first)
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
        await cached.authenticate(creds("alicia"), client())
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
        assert same(await cached.authenticate(creds(), client()), second)

    run(go())
    assert directory.calls == 2


# --- no secret in the cache (issue 8, item 4) -------------------------------------------------

MASTER = "the-master-password"


class MasterDirectory(Directory):
    """Routes to a master-user mailstore: the backend login uses the master password, which the
    directory keeps (as SqlDirectory does) and hands to the cache on a hit."""

    def __init__(self) -> None:
        super().__init__()
        self.master: Secret | None = Secret(MASTER)

    async def authenticate(self, creds: Credentials, client: ClientInfo) -> Decision:
        decision = await super().authenticate(creds, client)
        if not isinstance(decision, Route) or self.master is None:
            return decision
        return replace(decision, user=creds.user + "*proxy", secret=self.master)

    def master_secret(self, route: Route) -> Secret | None:
        return self.master if route.user.endswith("*proxy") else None


def secrets_reachable(root: object, skip: object, *wanted: str) -> list[object]:
    """Every object reachable from `root` that holds one of `wanted` as text or bytes.

    The walk follows gc.get_referents (attributes, slots, containers, a Secret's slot) and
    stops at the wrapped directory (`skip`: not the cache), classes, modules and functions
    (whose globals are the test module, which holds the constants themselves).
    """
    found, seen, stack = [], {id(skip)}, [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, type | type(asyncio) | type(secrets_reachable)):
            continue
        seen.add(id(obj))
        if isinstance(obj, str) and any(w in obj for w in wanted):
            found.append(obj)
        if isinstance(obj, bytes | bytearray | memoryview):
            data = bytes(obj)
            found += [obj for w in wanted if w.encode() in data]
        if isinstance(obj, Secret) and any(w in obj.reveal() for w in wanted):
            found.append(obj)
        stack.extend(gc.get_referents(obj))
    return found


def walked(root: object, skip: object) -> set[type]:
    """The types of what the walk visits: proof that it reached the entries."""
    types, seen, stack = set(), {id(skip)}, [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, type | type(asyncio) | type(walked)):
            continue
        seen.add(id(obj))
        types.add(type(obj))
        stack.extend(gc.get_referents(obj))
    return types


@pytest.mark.parametrize("inner", [Directory, MasterDirectory])
def test_the_cache_holds_neither_the_password_nor_the_master_password(
    inner: type[Directory],
) -> None:
    directory = inner()
    cached = Cached(directory, ttl=60.0, size=100, clock=FakeClock())

    async def go() -> None:
        first = await cached.authenticate(creds(), client())
        assert isinstance(first, Route)
        assert first.secret.reveal() == (MASTER if inner is MasterDirectory else PASSWORD)

    run(go())
    assert len(cached) == 1
    assert Route in walked(cached, directory)  # the walk reached the entry's route
    assert secrets_reachable(cached, directory, PASSWORD, MASTER) == []


def test_a_hit_logs_in_with_the_password_the_client_just_sent() -> None:
    cached, directory, _ = make()

    async def go() -> None:
        await cached.authenticate(creds(), client())
        sent = creds("  ALICE ")  # another spelling, the same name: a hit
        hit = await cached.authenticate(sent, client())
        assert isinstance(hit, Route) and hit.secret is sent.secret

    run(go())
    assert directory.calls == 1


def test_a_master_route_hit_takes_the_master_password_from_the_directory() -> None:
    directory = MasterDirectory()
    cached = Cached(directory, ttl=60.0, size=100, clock=FakeClock())

    async def go() -> None:
        await cached.authenticate(creds(), client())
        directory.master = Secret("rotated-master")  # the next lookup of the store saw this
        hit = await cached.authenticate(creds(), client())
        assert isinstance(hit, Route) and hit.secret.reveal() == "rotated-master"
        assert directory.calls == 1
        directory.master = None  # the mailstore lost its master user: look the login up again
        again = await cached.authenticate(creds(), client())
        assert isinstance(again, Route) and again.secret.reveal() == PASSWORD
        assert directory.calls == 2

    run(go())


def test_a_route_whose_secret_comes_from_nowhere_known_is_not_cached() -> None:
    class Odd(Directory):
        async def authenticate(self, creds: Credentials, client: ClientInfo) -> Decision:
            decision = await super().authenticate(creds, client)
            return replace(decision, secret=Secret("stored-cleartext"))  # type: ignore[type-var]

    directory = Odd()
    cached = Cached(directory, ttl=60.0, size=100, clock=FakeClock())

    async def go() -> None:
        for _ in range(2):
            await cached.authenticate(creds(), client())

    run(go())
    assert (directory.calls, len(cached)) == (2, 0)


def test_the_key_is_the_directorys_own_spelling_of_the_name() -> None:
    class KeepsCase(Directory):
        def canonical_name(self, raw: str) -> str:
            return names.normalise(raw, lower_local=False)

    keeps = KeepsCase()
    cached = Cached(keeps, ttl=60.0, size=100, clock=FakeClock())
    folding, default_directory, _ = make()

    async def go() -> None:
        for cache in (cached, folding):
            for user in ("alice@example.com", "Alice@EXAMPLE.com  ", "alice@example.COM"):
                await cache.authenticate(creds(user), client())
            for _ in range(2):  # a name the directory refuses is never remembered
                await cache.authenticate(creds("ali\u200bce@example.com"), client())

    run(go())
    assert (keeps.calls, len(cached)) == (2 + 2, 2)  # "Alice" is someone else there
    assert (default_directory.calls, len(folding)) == (1 + 2, 1)
