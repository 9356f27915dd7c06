"""Throttled: delays that grow, lock-outs that hold against a correct password, resets."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest

from mailgate.auth.throttle import MemoryFailureStore, RedisFailureStore, Throttled
from mailgate.config import ThrottleSettings
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
PASSWORD = "correct horse"
ROUTE = Route("10.0.0.5", 143, "alice", Secret(PASSWORD))


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Directory:
    """alice's password is PASSWORD; everyone else is unknown. `down` makes it an outage."""

    calls: int = 0
    down: bool = False
    closed: bool = False
    users: dict[str, str] = field(default_factory=lambda: {"alice": PASSWORD, "bob": PASSWORD})

    async def authenticate(self, creds: Credentials, client: ClientInfo) -> Decision:
        self.calls += 1
        if self.down:
            return TempFail("database down")
        if creds.method is Method.NONE:
            return Reject("relay denied")
        stored = self.users.get(creds.user.lower())
        if stored is not None and creds.secret.equals(stored):
            return ROUTE
        return Reject()

    async def close(self) -> None:
        self.closed = True


def creds(user: str = "alice", password: str = "wrong") -> Credentials:
    return Credentials(Method.PLAIN, user, Secret(password))


def client(ip: str = "192.0.2.1") -> ClientInfo:
    return ClientInfo(ip, 50000, "imap")


def make(
    directory: Directory | None = None, **overrides: Any
) -> tuple[Throttled, Directory, FakeClock]:
    values: dict[str, Any] = dict(
        free=2, base_delay=1.0, max_delay=8.0, lockout_after=100, lockout=300.0, window=900.0
    )
    values.update(overrides)
    directory = directory or Directory()
    clock = FakeClock()
    return Throttled(directory, ThrottleSettings(**values), clock=clock), directory, clock


async def waits(
    throttled: Throttled, n: int, user: str = "alice", ip: str = "192.0.2.1"
) -> list[float]:
    out = []
    for _ in range(n):
        decision = await throttled.authenticate(creds(user), client(ip))
        assert isinstance(decision, Reject)
        out.append(decision.wait)
    return out


def test_delays_grow_after_the_free_failures_up_to_the_maximum() -> None:
    throttled, _, _ = make()
    assert run(waits(throttled, 8)) == [0, 0, 1, 2, 4, 8, 8, 8]


def test_correct_password_is_routed_without_delay() -> None:
    throttled, _, _ = make()

    async def go() -> Decision:
        await waits(throttled, 4)
        return await throttled.authenticate(creds(password=PASSWORD), client())

    assert run(go()) == ROUTE


def test_inner_reject_is_kept_with_the_longer_wait() -> None:
    class Slow(Directory):
        async def authenticate(self, creds: Credentials, client: ClientInfo) -> Decision:
            return Reject("No such luck.", wait=5.0, error_code="535 5.7.8")

    throttled, _, _ = make(Slow())
    decisions = run(waits(throttled, 6))
    assert decisions == [5, 5, 5, 5, 5, 8]
    last = run(throttled.authenticate(creds(), client()))
    assert last == Reject("No such luck.", wait=8.0, error_code="535 5.7.8")


def test_unknown_user_and_wrong_password_get_the_same_answers() -> None:
    a, _, _ = make()
    b, _, _ = make()

    async def go(t: Throttled, user: str) -> list[Decision]:
        return [await t.authenticate(creds(user), client()) for _ in range(6)]

    assert run(go(a, "alice")) == run(go(b, "nobody"))


def test_lockout_refuses_a_correct_password_without_asking(
    caplog: pytest.LogCaptureFixture,
) -> None:
    throttled, directory, clock = make(lockout_after=4, lockout=300.0)
    caplog.set_level(logging.WARNING, logger="mailgate.throttle")

    async def go() -> None:
        await waits(throttled, 5)  # the fifth failure is above the limit: lock-out starts
        calls = directory.calls
        locked = await throttled.authenticate(creds(password=PASSWORD), client())
        assert isinstance(locked, Reject)
        assert locked.message == Reject().message
        assert locked.wait > 0
        assert directory.calls == calls  # the directory was not asked
        clock.now += 299
        assert isinstance(await throttled.authenticate(creds(password=PASSWORD), client()), Reject)
        clock.now += 2
        assert await throttled.authenticate(creds(password=PASSWORD), client()) == ROUTE

    run(go())
    warnings = [r.getMessage() for r in caplog.records]
    assert any("locking out ip '192.0.2.1'" in w and "5 failures" in w for w in warnings)
    assert any("locking out user 'alice'" in w for w in warnings)
    assert not any("wrong" in w or PASSWORD in w for w in warnings)


def test_ip_lockout_covers_every_user_from_that_ip() -> None:
    throttled, _, _ = make(lockout_after=3)

    async def go() -> None:
        for i in range(4):
            await throttled.authenticate(creds(f"guess{i}"), client("198.51.100.7"))
        refused = await throttled.authenticate(creds("bob", PASSWORD), client("198.51.100.7"))
        assert isinstance(refused, Reject)
        assert await throttled.authenticate(creds("bob", PASSWORD), client("192.0.2.9")) == ROUTE

    run(go())


def test_user_lockout_covers_every_ip_and_any_case() -> None:
    throttled, _, _ = make(lockout_after=3)

    async def go() -> None:
        for i in range(4):
            await throttled.authenticate(creds("Alice"), client(f"203.0.113.{i}"))
        refused = await throttled.authenticate(creds("alice", PASSWORD), client("192.0.2.200"))
        assert isinstance(refused, Reject)
        assert await throttled.authenticate(creds("bob", PASSWORD), client("192.0.2.200")) == ROUTE

    run(go())


def test_ip_dimension_delays_a_spray_over_many_users() -> None:
    throttled, _, _ = make()

    async def go() -> list[float]:
        out = []
        for i in range(5):
            decision = await throttled.authenticate(creds(f"user{i}"), client())
            assert isinstance(decision, Reject)
            out.append(decision.wait)
        return out

    assert run(go()) == [0, 0, 1, 2, 4]


def test_ipv6_addresses_count_per_64() -> None:
    throttled, _, _ = make()

    async def go() -> list[float]:
        out = []
        for i in range(4):
            decision = await throttled.authenticate(
                creds(f"u{i}"), client(f"2001:db8:1:2::{i + 1}")
            )
            assert isinstance(decision, Reject)
            out.append(decision.wait)
        other = await throttled.authenticate(creds("u9"), client("2001:db8:1:3::1"))
        assert isinstance(other, Reject)
        out.append(other.wait)
        return out

    assert run(go()) == [0, 0, 1, 2, 0]


def test_success_resets_the_user_but_not_the_ip() -> None:
    throttled, _, _ = make(free=1)

    async def go() -> None:
        assert await waits(throttled, 3) == [0, 1, 2]
        assert await throttled.authenticate(creds(password=PASSWORD), client("192.0.2.50")) == ROUTE
        # alice starts again from another address; the first address still has its count.
        assert await waits(throttled, 1, ip="192.0.2.51") == [0]
        assert await waits(throttled, 1, user="carol") == [4]

    run(go())


def test_tempfail_is_not_counted() -> None:
    throttled, directory, _ = make(free=1)

    async def go() -> None:
        directory.down = True
        for _ in range(10):
            decision = await throttled.authenticate(creds(), client())
            assert decision == TempFail("database down")
        directory.down = False
        assert await waits(throttled, 2) == [0, 1]

    run(go())


def test_failures_expire_with_the_window() -> None:
    throttled, _, clock = make(window=900.0)

    async def go() -> None:
        assert await waits(throttled, 4) == [0, 0, 1, 2]
        clock.now += 899
        assert await waits(throttled, 1) == [4]
        clock.now += 2
        assert await waits(throttled, 4) == [0, 0, 1, 2]

    run(go())


def test_disabled_and_relay_pass_through() -> None:
    throttled, _, _ = make(enabled=False, lockout_after=1)
    assert run(waits(throttled, 5)) == [0, 0, 0, 0, 0]
    throttled, directory, _ = make(lockout_after=1)
    relay = Credentials(Method.NONE, "", Secret(""), smtp_from="MAIL FROM:<a@b>")

    async def go() -> None:
        for _ in range(5):
            assert await throttled.authenticate(relay, client()) == Reject("relay denied")
        assert await throttled.authenticate(creds(password=PASSWORD), client()) == ROUTE

    run(go())
    assert directory.calls == 6


def test_close_closes_the_inner_authenticator() -> None:
    throttled, directory, _ = make()
    run(throttled.close())
    assert directory.closed


def test_memory_store_is_bounded_and_evicts_the_oldest() -> None:
    clock = FakeClock()
    store = MemoryFailureStore(window=100.0, max_keys=3, clock=clock)

    async def go() -> None:
        for i in range(5):
            clock.now += 1
            assert await store.record_failure(f"k{i}") == 1
        assert len(store) == 3
        assert [await store.count(f"k{i}") for i in range(5)] == [0, 0, 1, 1, 1]
        await store.lock("a", clock.now + 10)
        assert await store.locked_until("a") == clock.now + 10
        clock.now += 10
        assert await store.locked_until("a") == 0.0
        await store.reset("k4")
        assert await store.count("k4") == 0

    run(go())


class BrokenStore(MemoryFailureStore):
    async def record_failure(self, key: str) -> int:
        raise ConnectionError("redis went away")

    async def locked_until(self, key: str) -> float:
        raise ConnectionError("redis went away")

    async def lock(self, key: str, until: float) -> None:
        raise ConnectionError("redis went away")


def test_a_broken_store_falls_back_to_local_counting(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    settings = ThrottleSettings(free=1, base_delay=1.0, max_delay=8.0, lockout_after=3)
    throttled = Throttled(Directory(), settings, BrokenStore(900.0, clock=clock), clock)
    caplog.set_level(logging.WARNING, logger="mailgate.throttle")
    assert run(waits(throttled, 5)) == [0, 1, 2, 4, 4]  # the fifth is locked out
    unavailable = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(unavailable) == 1


# --- Redis (optional: needs the redis package and a redis-server binary) ----------------------

REDIS_SERVER = shutil.which("redis-server")
try:
    import redis  # noqa: F401

    HAVE_REDIS = True
except ImportError:
    HAVE_REDIS = False


@pytest.fixture
def redis_url(tmp_path: Any) -> Any:
    if REDIS_SERVER is None or not HAVE_REDIS:
        missing = "needs redis-server and the redis package"
        if os.environ.get("MAILGATE_REQUIRE_PEERS") == "1":
            pytest.fail(f"{missing} (MAILGATE_REQUIRE_PEERS=1)")
        pytest.skip(missing)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", tmp_path],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_redis_store_counts_locks_and_resets(redis_url: str) -> None:
    async def go() -> None:
        store = RedisFailureStore(redis_url, window=900.0, prefix="test:")
        try:
            assert [await store.record_failure("ip:1") for _ in range(3)] == [1, 2, 3]
            assert await store.count("ip:1") == 3
            ttl = await store._redis.pttl("test:fail:ip:1")
            assert 0 < ttl <= 900_000  # the counter expires with the window
            await store.reset("ip:1")
            assert await store.count("ip:1") == 0
            assert await store.locked_until("user:a") == 0.0
            now = time.monotonic()
            await store.lock("user:a", now + 300)
            assert now + 298 < await store.locked_until("user:a") <= time.monotonic() + 300
        finally:
            await store.close()

    run(go())


def test_throttled_over_redis(redis_url: str) -> None:
    async def go() -> None:
        settings = ThrottleSettings(free=1, lockout_after=3, redis_url=redis_url)
        throttled = Throttled(Directory(), settings)
        try:
            assert await waits(throttled, 4, user="dave") == [0, 1, 2, 4]
            refused = await throttled.authenticate(creds("alice", PASSWORD), client())
            assert isinstance(refused, Reject)  # the IP is locked out, shared through Redis
        finally:
            await throttled.close()

    run(go())
