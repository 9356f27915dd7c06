"""Throttled: delays that grow, lock-outs that hold against a correct password, resets."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import pytest

from mailgate.auth.throttle import Throttled
from mailgate.config import LimitsSettings, ThrottleSettings
from mailgate.networks import NetworkList
from mailgate.nodestate import MAX_KEYS, NodeState
from mailgate.statestore import Fallback, LocalStore
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
    directory: Directory | None = None, trusted: tuple[str, ...] = (), **overrides: Any
) -> tuple[Throttled, Directory, FakeClock]:
    values: dict[str, Any] = dict(
        free=2, base_delay=1.0, max_delay=8.0, lockout_after=100, lockout=300.0, window=900.0
    )
    values.update(overrides)
    directory = directory or Directory()
    clock = FakeClock()
    settings = ThrottleSettings(**values)
    store = LocalStore(NodeState(settings, LimitsSettings()), clock=clock)
    throttled = Throttled(directory, settings, store, NetworkList.parse(list(trusted)))
    return throttled, directory, clock


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
        await waits(throttled, 4)  # the fourth failure spends the budget: lock-out starts
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
    assert any("locking out ip 192.0.2.1" in w and "4 failures" in w for w in warnings)
    assert any("locking out user alice" in w for w in warnings)
    assert not any("wrong" in w or PASSWORD in w for w in warnings)


def test_ip_lockout_covers_every_user_from_that_ip() -> None:
    throttled, _, _ = make(lockout_after=3)

    async def go() -> None:
        for i in range(3):
            await throttled.authenticate(creds(f"guess{i}"), client("198.51.100.7"))
        refused = await throttled.authenticate(creds("bob", PASSWORD), client("198.51.100.7"))
        assert isinstance(refused, Reject)
        assert await throttled.authenticate(creds("bob", PASSWORD), client("192.0.2.9")) == ROUTE

    run(go())


def test_user_lockout_covers_every_ip_and_any_case() -> None:
    throttled, _, _ = make(lockout_after=3)

    async def go() -> None:
        for i in range(3):
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


def test_the_node_state_is_bounded_and_evicts_the_oldest_windows() -> None:
    settings = ThrottleSettings(window=100.0)
    state = NodeState(settings, LimitsSettings())
    from mailgate.nodestate import Attempt

    for i in range(MAX_KEYS + 10):
        admission = state.begin(Attempt(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", None), 1.0)
        state.end(Attempt(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", None), "failed", 1.0)
        assert admission.ip_failures == 0
    assert len(state.keys(2.0)) <= MAX_KEYS


# --- issue 8 item 1: a guess is counted before it is checked --------------------------------


class SlowDirectory(Directory):
    """Every check takes a while, so that guesses pile up in flight."""

    async def authenticate(self, creds: Credentials, client: ClientInfo) -> Decision:
        await asyncio.sleep(0.05)
        return await super().authenticate(creds, client)


@pytest.mark.parametrize("source", ["one address", "many addresses"])
def test_parallel_guesses_never_pass_the_budget(source: str) -> None:
    """300 guesses at once for one user: no more than lockout_after reach the password check,
    and the right password among the later ones does not get in."""
    throttled, directory, _ = make(SlowDirectory(), lockout_after=20, concurrent_per_user=1000)

    async def go() -> list[Decision]:
        guesses = [
            throttled.authenticate(
                creds(password=PASSWORD if i == 299 else f"guess{i}"),
                client("192.0.2.1" if source == "one address" else f"10.0.{i // 250}.{i % 250}"),
            )
            for i in range(300)
        ]
        return list(await asyncio.gather(*guesses))

    decisions = run(go())
    assert directory.calls <= 20
    assert not any(isinstance(d, Route) for d in decisions)


def test_concurrent_logins_per_user_are_bounded_with_a_temporary_failure() -> None:
    throttled, directory, _ = make(SlowDirectory(), concurrent_per_user=3)

    async def go() -> list[Decision]:
        return list(
            await asyncio.gather(
                *(throttled.authenticate(creds(password=PASSWORD), client()) for _ in range(5))
            )
        )

    decisions = run(go())
    assert sum(isinstance(d, Route) for d in decisions) == 3
    assert sum(isinstance(d, TempFail) for d in decisions) == 2
    assert directory.calls == 3


def test_a_cancelled_check_gives_its_reservation_back() -> None:
    throttled, _, _ = make(SlowDirectory(), lockout_after=2, concurrent_per_user=1)

    async def go() -> Decision:
        task = asyncio.ensure_future(throttled.authenticate(creds(), client()))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await throttled.authenticate(creds(password=PASSWORD), client())

    assert run(go()) == ROUTE


def test_spraying_many_users_from_one_address_gets_the_maximum_delay() -> None:
    throttled, _, _ = make(per_ip_users=3)

    async def go() -> list[float]:
        out = []
        for i in range(5):
            decision = await throttled.authenticate(creds(f"user{i}"), client())
            assert isinstance(decision, Reject)
            out.append(decision.wait)
        return out

    assert run(go()) == [0, 0, 1, 8, 8]  # users 4 and 5 are past per_ip_users


def test_trusted_networks_have_no_address_budget_but_users_keep_theirs() -> None:
    throttled, _, _ = make(trusted=("10.0.0.0/8",), lockout_after=3)

    async def go() -> None:
        for i in range(10):  # a webmail host logs in many users, some with typos
            await throttled.authenticate(creds(f"user{i}"), client("10.1.2.3"))
        assert await throttled.authenticate(creds("bob", PASSWORD), client("10.1.2.3")) == ROUTE
        for _ in range(3):
            await throttled.authenticate(creds("alice"), client("10.1.2.3"))
        locked = await throttled.authenticate(creds("alice", PASSWORD), client("10.1.2.3"))
        assert isinstance(locked, Reject)

    run(go())


def test_a_lock_out_follows_the_identity_the_directory_matched() -> None:
    class Folding(Directory):
        """A database that folds "Vïctim" to "victim" (a MySQL collation)."""

        async def authenticate(self, creds: Credentials, client: ClientInfo) -> Decision:
            self.calls += 1
            if creds.secret.equals(PASSWORD):
                return replace(ROUTE, identity="alice")
            return Reject(identity="alice")

    throttled, _, _ = make(Folding(), lockout_after=3)

    async def go() -> Decision:
        for spelling in ("alice", "alïce", "ALICE "):
            await throttled.authenticate(creds(spelling), client("192.0.2.7"))
        return await throttled.authenticate(creds("alÎce", PASSWORD), client("198.51.100.1"))

    assert isinstance(run(go()), Reject)


class BrokenStore(LocalStore):
    """A shared store that stopped answering."""

    async def begin(self, attempt: Any) -> Any:
        raise ConnectionError("gone")

    async def end(self, attempt: Any, outcome: str, identity: str | None) -> Any:
        raise ConnectionError("gone")


def test_a_broken_store_falls_back_to_local_counting(caplog: pytest.LogCaptureFixture) -> None:
    settings = ThrottleSettings(free=0, base_delay=1.0, max_delay=8.0, lockout_after=3)
    local = LocalStore(NodeState(settings, LimitsSettings()))
    store = Fallback(BrokenStore(NodeState(settings, LimitsSettings())), local, "the test store")
    throttled = Throttled(Directory(), settings, store)
    caplog.set_level(logging.WARNING)

    async def go() -> list[Decision]:
        return [await throttled.authenticate(creds(), client()) for _ in range(4)]

    decisions = run(go())
    # The third failure spends the budget and locks; the fourth guess is refused unasked.
    assert [d.wait for d in decisions if isinstance(d, Reject)] == [1, 2, 4, 8]
    assert sum("the test store unavailable" in r.getMessage() for r in caplog.records) == 1
