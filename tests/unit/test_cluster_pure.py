"""The cluster's pure pieces: Redis URLs, the [cluster] and affinity settings, the members a
node offers a user (assignable) and keeps users on (serving), the local choice without Redis,
what an admin command changed, and the health endpoint's answers."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import pytest

from mailgate import config
from mailgate.affinity import Affinity, AssignedPlan, affinity_user, assignable, serving
from mailgate.backend import pools as P
from mailgate.backend.routing import BackendRouter, NoBackend
from mailgate.clusteradmin import changed_scope, find_member
from mailgate.healthz import HealthEndpoint, Phase
from mailgate.loopguard import LoopGuard
from mailgate.redisconn import Keys, RedisUrlError, parse_url
from mailgate.values import Route, Secret


def test_redis_urls() -> None:
    assert parse_url("redis://:pw@10.0.0.5:6380/2").kind == "direct"
    sentinel = parse_url("redis+sentinel://u:p%40ss@s1:26380,s2/mymaster/3?sentinel_password=x")
    assert sentinel.kind == "sentinel"
    assert sentinel.hosts == (("s1", 26380), ("s2", 26379))
    assert (sentinel.service, sentinel.db, sentinel.username, sentinel.password) == (
        "mymaster", 3, "u", "p@ss"
    )  # fmt: skip
    assert sentinel.sentinel_password == "x"
    assert "p@ss" not in sentinel.describe()
    cluster = parse_url("rediss+cluster://[::1]:7000,10.0.0.2:7001")
    assert (cluster.kind, cluster.tls, cluster.hosts) == (
        "cluster", True, (("::1", 7000), ("10.0.0.2", 7001))
    )  # fmt: skip
    for bad in ("redis+sentinel://s1", "redis+cluster://h/1", "redis+pony://h", "nope"):
        with pytest.raises(RedisUrlError):
            parse_url(bad)
    assert "secret" not in parse_url("redis://:secret@h:1/0").describe()


def test_keys_share_one_hash_tag() -> None:
    keys = Keys("mail")
    assert keys("a", "stores", "alice") == "{mail}:a:stores:alice"
    assert keys.live == "{mail}:live"


def parse(raw: dict[str, Any]) -> config.Settings:
    return config.parse(raw, base_dir=Path("."))


def test_cluster_and_affinity_settings() -> None:
    s = parse({"cluster": {"redis_url": "redis+sentinel://s1/m", "node_name": "n1", "lease": 10}})
    assert (s.cluster.node_name, s.cluster.lease, s.cluster.prefix) == ("n1", 10.0, "mailgate")
    assert parse({"throttle": {"redis_url": "redis://h"}}).cluster.redis_url == "redis://h"
    for bad, says in (
        ({"cluster": {"redis_url": "http://h"}}, "redis_url"),
        ({"cluster": {"redis_url": "redis+sentinel://h"}}, "SERVICE"),
        ({"cluster": {"node_name": "a b"}}, "node_name"),
        ({"cluster": {"move_parallel": 0}}, "move_parallel"),
        ({"pool": [{"name": "p", "members": ["h:1"], "affinity": True}]}, "shared_storage"),
        ({"pool": [{"name": "p", "members": ["h:1"], "user_expire": 5}]}, "user_expire"),
        ({"health_listen": "nowhere"}, "health_listen"),
    ):
        with pytest.raises(config.ConfigError, match=says):
            parse(bad)
    pool = parse(
        {"pool": [{"name": "p", "members": ["h:1"], "shared_storage": True, "affinity": True}]}
    ).pools[0]
    assert pool.affinity and pool.user_expire == 900.0


def router(**pool: Any) -> BackendRouter:
    raw = {
        "name": "stores",
        "members": [
            {"name": "a", "host": "10.0.0.1", "imap": 143},
            {"name": "b", "host": "10.0.0.2", "imap": 143, "weight": 2},
            {"name": "c", "host": "10.0.0.3", "imap": 143},
        ],
        "shared_storage": True,
        "affinity": True,
        "reconnect_spread": 100.0,
        **pool,
    }
    settings = config.parse({"pool": [raw]}, base_dir=Path(".")).pools
    return BackendRouter(settings, LoopGuard.for_listeners([]), clock=lambda: 1000.0)


def event(r: BackendRouter, kind: P.EventKind, member: str) -> None:
    r.apply_remote(P.HealthEvent(kind, "stores", member, r.clock()))


def test_assignable_follows_rendezvous_over_what_takes_new_users() -> None:
    r = router()
    pool = r.pools["stores"]
    order = [m.name for m in P.rendezvous_order(pool.members, "alice@example.com")]
    assert assignable(pool, r.state, "alice@example.com", 1000.0) == tuple(order)
    event(r, P.EventKind.DRAIN, order[0])
    assert assignable(pool, r.state, "alice@example.com", 1000.0) == tuple(order[1:])
    assert order[0] in serving(pool, r.state)  # draining keeps its users
    event(r, P.EventKind.DOWN, order[0])
    assert order[0] not in serving(pool, r.state)


def test_a_ramping_member_takes_only_the_users_the_ramp_lets_in() -> None:
    r = router()
    pool = r.pools["stores"]
    event(r, P.EventKind.DRAIN, "a")
    event(r, P.EventKind.UP, "a")  # ramping from now, over 100 s
    users = [f"u{i}@example.com" for i in range(200)]
    early = [u for u in users if "a" in assignable(pool, r.state, u, 1010.0)]
    assert early and all(P.ramp_position(u) < 0.1 for u in early)
    assert len([u for u in users if "a" in assignable(pool, r.state, u, 1200.0)]) > len(early)


def test_without_redis_a_node_keeps_the_member_it_saw_and_never_offers_two() -> None:
    r = router()
    hook = Affinity(r, None)
    r.affinity = hook
    route = Route("stores", 143, "alice@example.com", Secret("x"), pool="stores")
    plan = asyncio.run(r.plan_login(route, "imap", "alice@example.com"))
    assert isinstance(plan, AssignedPlan)
    first = plan.next()
    assert first is not None and first.member is not None and plan.next() is None
    other = next(m for m in ("a", "b", "c") if m != first.member.name)
    from mailgate.redisstore import Claim

    hook.remember(Claim("stores", affinity_user("alice@example.com"), other, "ok"))
    again = asyncio.run(r.plan_login(route, "imap", "alice@example.com"))
    assert isinstance(again, AssignedPlan)
    target = again.next()
    assert target is not None and target.member is not None and target.member.name == other
    for m in ("a", "b", "c"):
        event(r, P.EventKind.DOWN, m)
    assert isinstance(asyncio.run(r.plan_login(route, "imap", "bob@example.com")), NoBackend)


def test_an_assigned_member_that_drains_or_ramps_still_takes_its_users() -> None:
    r = router()
    hook = Affinity(r, None)
    r.affinity = hook
    from mailgate.redisstore import Claim

    hook.remember(Claim("stores", "alice@example.com", "a", "ok"))
    event(r, P.EventKind.DRAIN, "a")  # serving, not assignable: the remembered user stays
    route = Route("stores", 143, "alice@example.com", Secret("x"), pool="stores")
    plan = asyncio.run(r.plan_login(route, "imap", "alice@example.com"))
    assert isinstance(plan, AssignedPlan)
    target = plan.next()
    assert target is not None and target.member is not None and target.member.name == "a"


def test_a_kick_makes_a_node_forget_the_member_it_would_guess_without_redis() -> None:
    """After a move's kick, a node that cannot reach Redis must not send the user back to the
    member the move took them from (it chooses as for a new user instead)."""
    r = router()
    hook = Affinity(r, None)
    r.affinity = hook
    from mailgate.redisstore import Claim

    user = "alice@example.com"
    hook.remember(Claim("stores", user, "a", "ok"))
    event(r, P.EventKind.DRAIN, "a")  # a drain: its users are moved away, one kick each
    route = Route("stores", 143, user, Secret("x"), pool="stores")

    def member() -> str:
        plan = asyncio.run(r.plan_login(route, "imap", user))
        assert isinstance(plan, AssignedPlan)
        target = plan.next()
        assert target is not None and target.member is not None
        return target.member.name

    assert member() == "a"
    assert hook.forget(user, "stores/b") == 0  # a kick elsewhere changes nothing
    assert hook.forget("bob@example.com", "stores/a") == 0
    assert member() == "a"
    assert hook.forget("Alice@Example.com", "stores/a") == 1
    assert member() == assignable(r.pools["stores"], r.state, user, 1000.0)[0] != "a"
    hook.remember(Claim("stores", user, "c", "ok"))
    assert hook.forget(user, None) == 1  # a kick of the user anywhere


def test_affinity_user_names() -> None:
    assert affinity_user("Alice@Example.COM") == "alice@example.com"
    assert affinity_user("192.0.2.7") == "ip:192.0.2.7"


def args(**kw: Any) -> argparse.Namespace:
    return argparse.Namespace(**kw)


def test_what_an_admin_command_changed() -> None:
    assert changed_scope(args(user_command="passwd", address="a@x")) == {"user": "a@x"}
    assert changed_scope(args(user_command="list")) is None
    assert changed_scope(args(domain_command="disable", name="x.org")) == {"domain": "x.org"}
    assert changed_scope(args(mailstore_command="set-pool", name="s")) == {}
    assert changed_scope(args(directory_command="init")) is None
    assert changed_scope(args(user_command="app-password", app_password_command="list")) is None


def test_find_member_names_affinity_members_only() -> None:
    s = parse(
        {
            "pool": [
                {"name": "p", "members": [{"name": "a", "host": "h"}], "shared_storage": True,
                 "affinity": True},
                {"name": "q", "members": [{"name": "a", "host": "h2"}]},
            ]
        }
    )  # fmt: skip
    pool, member = find_member(s, "a")  # type: ignore[misc]
    assert (pool.name, member) == ("p", "a")
    assert isinstance(find_member(s, "q/a"), str)


async def health_answers() -> list[bytes]:
    endpoint = HealthEndpoint("127.0.0.1:0", lambda: "redis=up")
    await endpoint.start()
    answers = []
    try:
        for phase in (Phase.STARTING, Phase.SERVING, Phase.DRAINING):
            endpoint.phase = phase
            reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.bound_port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answers.append(await reader.read())
            writer.close()
    finally:
        await endpoint.close()
    return answers


def test_the_health_endpoint_says_when_to_send_clients() -> None:
    starting, serving_, draining = asyncio.run(health_answers())
    assert starting.startswith(b"HTTP/1.1 503 ") and starting.endswith(b"starting redis=up\n")
    assert serving_.startswith(b"HTTP/1.1 200 OK") and serving_.endswith(b"ok redis=up\n")
    assert draining.startswith(b"HTTP/1.1 503 ") and b"draining" in draining


def test_the_haproxy_config_in_the_docs_is_the_tested_one() -> None:
    root = Path(__file__).resolve().parents[2]
    example = (root / "examples" / "haproxy-cluster.cfg").read_text().rstrip("\n")
    docs = (root / "docs" / "scale-out.md").read_text()
    block = docs.split("```haproxy\n", 1)[1].split("\n```", 1)[0]
    assert block == example
