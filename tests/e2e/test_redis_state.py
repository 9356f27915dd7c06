"""The cluster's Lua scripts against a real redis-server: the throttle's rules are NodeState's
(random sequences run through both, on the same clock), leases are counted once across
owners and go with an owner whose heartbeat stops, and affinity never gives one user two
members while either holds a session or a login on its way."""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailgate import redisconn
from mailgate.config import LimitsSettings, ThrottleSettings
from mailgate.nodestate import Attempt, NodeState
from mailgate.redisstore import ClaimRequest, LoginRequest, RedisState, ThrottleParams

from .conftest import peers

THROTTLE = ThrottleSettings(
    lockout_after=3, lockout=30.0, window=60.0, per_ip_users=2, concurrent_per_user=2,
    concurrent_per_ip=3,
)  # fmt: skip
PARAMS = ThrottleParams(3, 30_000, 60_000, 2, 3, 2)


class Clock:
    def __init__(self) -> None:
        self.ms = 1_700_000_000_000

    def __call__(self) -> int:
        return self.ms


@pytest.fixture
def redis_url(redis: peers.Peer) -> Iterator[str]:
    yield f"redis://127.0.0.1:{redis.ports['redis']}/0"


def state(url: str, owner: str, clock: Clock, prefix: str) -> RedisState:
    client = redisconn.client(redisconn.parse_url(url), timeout=5.0)
    return RedisState(client, prefix, owner, clock=clock)


def login(ticket: str, attempt: Attempt, **kw: Any) -> LoginRequest:
    return LoginRequest(
        ticket=ticket,
        deadline_ms=kw.pop("deadline_ms", 10**9),
        throttle=kw.pop("throttle", PARAMS),
        ip=attempt.ip,
        user=attempt.user or "",
        trusted=attempt.trusted,
        limits=kw.pop("limits", None),
        lease_user=kw.pop("lease_user", attempt.user or ""),
        claims=kw.pop("claims", ()),
    )


async def equivalence(url: str, seed: int) -> int:
    rng = random.Random(seed)
    clock = Clock()
    rs = state(url, "node/x/1", clock, f"eq{seed}-{secrets.token_hex(3)}")
    ns = NodeState(THROTTLE, LimitsSettings())
    ips = ["192.0.2.1", "192.0.2.2", "198.51.100.7"]
    users = ["alice@example.com", "bob@example.com", "carol@example.com", None]
    open_: list[tuple[str, Attempt]] = []
    steps = 0
    try:
        for step in range(400):
            clock.ms += rng.choice([0, 0, 5, 1000, 7000, 31_000, 61_000])
            now = clock.ms / 1000.0
            if open_ and rng.random() < 0.55:
                ticket, attempt = open_.pop(rng.randrange(len(open_)))
                outcome = rng.choice(["failed", "failed", "ok", "tempfail"])
                identity = rng.choice([None, None, None, "alice@example.com"])
                if identity == attempt.user:
                    identity = None
                expected = ns.end(attempt, outcome, now, identity)
                got = await rs.settle(
                    ticket, PARAMS, attempt.ip, attempt.user or "", attempt.trusted, outcome,
                    identity or "", None, (),
                )  # fmt: skip
                where = f"seed {seed} step {step}: end {attempt} {outcome} {identity}"
                assert got.ip_failures == expected.ip_failures, where
                assert got.user_failures == expected.user_failures, where
                assert got.locked == expected.locked, where
                assert got.spraying == expected.spraying, where
                assert got.identity_locked == expected.identity_locked, where
            else:
                attempt = Attempt(rng.choice(ips), rng.choice(users), rng.random() < 0.1)
                ticket = f"t{step}"
                admission = ns.begin(attempt, now)
                answer = await rs.login(login(ticket, attempt))
                where = f"seed {seed} step {step}: begin {attempt}"
                assert answer.verdict == admission.verdict.value, where
                assert answer.ip_failures == admission.ip_failures, where
                assert answer.user_failures == admission.user_failures, where
                assert answer.spraying == admission.spraying, where
                assert answer.locked_for == pytest.approx(admission.locked_for, abs=0.002), where
                if answer.verdict == "allowed":
                    open_.append((ticket, attempt))
            steps += 1
    finally:
        await rs.close()
    return steps


@pytest.mark.parametrize("seed", range(6))
def test_the_throttle_in_redis_follows_nodestate(redis_url: str, seed: int) -> None:
    assert asyncio.run(equivalence(redis_url, seed)) == 400


async def leases_across_owners(url: str) -> None:
    clock = Clock()
    prefix = f"lease-{secrets.token_hex(3)}"
    a, b = state(url, "n1/a/1", clock, prefix), state(url, "n2/b/1", clock, prefix)
    alice = Attempt("192.0.2.1", "alice@example.com")
    limits = (2, 0, 0)
    try:
        await a.heartbeat(30_000)
        await b.heartbeat(30_000)
        first = await a.login(login("t1", alice, throttle=None, limits=limits))
        second = await b.login(login("t2", alice, throttle=None, limits=limits))
        third = await b.login(login("t3", alice, throttle=None, limits=limits))
        assert (first.lease, second.lease, third.lease) == ("ok", "ok", "per_user")
        # b's heartbeat stops; past its lease, a's heartbeat reaps it: its session is gone.
        clock.ms += 31_000
        assert await a.heartbeat(30_000) == (False, 1, 3)  # b held u:, ui: and i: of one
        again = await a.login(login("t4", alice, throttle=None, limits=limits))
        assert again.lease == "ok"
        # b comes back: Redis forgot it, so it writes what it holds again.
        added, _, _ = await b.heartbeat(30_000)
        assert added
        await b.resync(30_000, {"u:alice@example.com": 1}, [])
        refused = await a.login(login("t5", alice, throttle=None, limits=limits))
        assert refused.lease == "per_user"
        for _ in range(2):  # a gives both of its sessions back: b's one is left
            a.release_later(["u:alice@example.com", "ui:alice@example.com|192.0.2.1"])
        await asyncio.sleep(0.2)  # the batch goes out on the loop's next turns
        assert (await a.login(login("t6", alice, throttle=None, limits=limits))).lease == "ok"
    finally:
        await a.close()
        await b.close()


def test_leases_are_one_count_across_owners_and_go_with_a_dead_one(redis_url: str) -> None:
    asyncio.run(leases_across_owners(redis_url))


def claim(user: str, assignable: tuple[str, ...], serving: tuple[str, ...]) -> ClaimRequest:
    return ClaimRequest("stores", user, 900_000, assignable, serving)


async def affinity(url: str) -> None:
    clock = Clock()
    prefix = f"aff-{secrets.token_hex(3)}"
    n1, n2 = state(url, "n1/a/1", clock, prefix), state(url, "n2/b/1", clock, prefix)
    alice = Attempt("192.0.2.1", "alice@example.com")

    async def ask(node: RedisState, ticket: str, req: ClaimRequest) -> tuple[str, str]:
        answer = await node.login(login(ticket, alice, throttle=None, claims=[req]))
        return answer.claims[0].member, answer.claims[0].status

    try:
        both = ("a", "b")
        # First login: the node's first assignable member; the other node, whose view
        # prefers b, still gets a: the record wins.
        assert await ask(n1, "t1", claim("alice", both, both)) == ("a", "ok")
        assert await ask(n2, "t2", claim("alice", ("b", "a"), both)) == ("a", "ok")
        # n2 thinks a is down while t1's login is on its way there: no second member.
        assert await ask(n2, "t3", claim("alice", ("b",), ("b",))) == ("a", "busy")
        n1.session_start_later("t1", "stores", "alice", "a", 900_000, [], lambda *c: None)
        n2.drop_claims_later("t2", [("stores", "alice")])
        await asyncio.sleep(0.2)
        assert await ask(n2, "t4", claim("alice", ("b",), ("b",))) == ("a", "busy")
        # The session ends: nothing holds alice on a, so a node that finds a down moves her.
        n1.session_end_later("stores", "alice", "a", 900_000)
        await asyncio.sleep(0.2)
        n2.drop_claims_later("t4", [("stores", "alice")])
        await asyncio.sleep(0.2)
        assert await ask(n2, "t5", claim("alice", ("b",), ("b",))) == ("b", "ok")
        # A draining member keeps a user who still has sessions there.
        n2.session_start_later("t5", "stores", "alice", "b", 900_000, [], lambda *c: None)
        await asyncio.sleep(0.2)
        assert await ask(n1, "t6", claim("alice", ("a",), both)) == ("b", "ok")
        # A move: logins get "moving" until it ends; then the new member.
        token = "mv1"
        member, holders = await n1.run("move_begin", "stores", "alice", token, 30_000)
        assert (member, holders) == (b"b", 2)  # b's session and t6's login
        assert (await ask(n2, "t7", claim("alice", both, both)))[1] == "moving"
        assert await n1.run("move_end", "stores", "alice", token, "a", 900_000, "0") == 1
        assert await ask(n2, "t8", claim("alice", ("b", "a"), both)) == ("a", "ok")
    finally:
        await n1.close()
        await n2.close()


def test_affinity_keeps_a_user_on_one_member_from_every_node(redis_url: str) -> None:
    asyncio.run(affinity(redis_url))


async def resync_while_sessions_come_and_go(url: str) -> tuple[int, int]:
    """What Redis counts for alice after two resyncs: one with her only session ending
    while the write is on its way, one with a session beginning meanwhile."""
    from mailgate.cluster import ClusterStore
    from mailgate.config import parse
    from mailgate.statestore import LocalStore

    prefix = f"resync-{secrets.token_hex(3)}"
    settings = parse(
        {"cluster": {"redis_url": url, "lease": 30, "prefix": prefix}, "limits": {"per_user": 2}},
        base_dir=Path("."),
    )
    redis = RedisState(redisconn.client(redisconn.parse_url(url), 5.0), prefix, "n1/r/1")
    store = ClusterStore(redis, LocalStore(NodeState(settings.throttle, settings.limits)), settings)
    alice = ("alice@example.com", "192.0.2.1", False)

    async def counted() -> int:
        await asyncio.sleep(0.1)  # a lease given back goes in the next batch
        return int(await redis.call("HGET", redis.keys.base + "l", "u:" + alice[0]) or 0)

    try:
        await redis.heartbeat(store.lease_ms)
        assert await store.acquire(*alice) is None  # Redis away: counted on the node
        writing = asyncio.ensure_future(store.resync({}))
        await asyncio.sleep(0)  # the resync's write is on its way to Redis
        await store.release(*alice)
        await writing
        after_an_end = await counted()
        store.healthy = False  # away again, and back with a session starting meanwhile
        writing = asyncio.ensure_future(store.resync({}))
        await asyncio.sleep(0)
        assert await store.acquire(*alice) is None
        await writing
        after_a_start = await counted()
        await store.release(*alice)
        return after_an_end, after_a_start
    finally:
        await redis.close()


def test_a_resync_counts_the_sessions_that_end_or_begin_while_it_writes(redis_url: str) -> None:
    # Without this, an ended session stayed counted in Redis as long as the worker lived
    # (a user locked out at per_user on every node), and a new one was never counted.
    assert asyncio.run(resync_while_sessions_come_and_go(redis_url)) == (0, 1)


async def move_of_a_session_redis_never_counted(
    url: str,
) -> tuple[Any, list[dict[str, Any]], str]:
    """alice is assigned to a, and Redis counts nothing of hers: her session there began on a
    worker that counted on its own node while Redis did not answer (it tells Redis at its
    resync). A node answers the move's kick as clusternode.py does."""
    import json

    from mailgate import clusteradmin
    from mailgate.config import parse

    prefix = f"move-{secrets.token_hex(3)}"
    settings = parse(
        {
            "cluster": {"redis_url": url, "prefix": prefix, "move_delay": 0.05},
            "pool": [{"name": "stores", "members": ["10.0.0.1:143", "10.0.0.2:143"],
                      "shared_storage": True, "affinity": True}],
        },
        base_dir=Path("."),
    )  # fmt: skip
    pool = settings.pools[0]
    a, b = (m.name for m in pool.members)
    redis = RedisState(redisconn.client(redisconn.parse_url(url), 5.0), prefix, "admin")
    kicks: list[dict[str, Any]] = []
    pubsub = redis.client.pubsub()
    await pubsub.subscribe(clusteradmin.channel(redis, "kick"))

    async def node() -> None:
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is not None:
                kicks.append(json.loads(message["data"]))
                await redis.call("RPUSH", redis.keys("kr", kicks[-1]["id"]), 1)

    answering = asyncio.ensure_future(node())
    try:
        answer = await redis.login(
            LoginRequest("t1", 10**6, None, "", "", True, None, "",
                         [ClaimRequest(pool.name, "alice@example.com", 900_000, (a,), (a, b))])
        )  # fmt: skip
        assert answer.claims[0].member == a
        await redis.call("DEL", redis.keys("ap", pool.name, "alice@example.com"))  # not counted
        moved = await clusteradmin.move(redis, settings, pool, "alice@example.com", b)
        return moved, kicks, a
    finally:
        answering.cancel()
        with contextlib.suppress(BaseException):
            await answering
        await pubsub.aclose()
        await redis.close()


def test_a_move_kicks_the_users_sessions_on_the_old_member_even_if_redis_counts_none(
    redis_url: str,
) -> None:
    # Before, a move kicked only when Redis counted sessions or logins of the user: a session
    # Redis was not told of stayed on the old member while the user's next ones went to the
    # new one (a user on two stores at once).
    moved, kicks, old = asyncio.run(move_of_a_session_redis_never_counted(redis_url))
    assert moved.ok and moved.kicked == 1, moved
    assert [(k["user"], k["backend"]) for k in kicks] == [("alice@example.com", f"stores/{old}")]
