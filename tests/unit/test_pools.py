"""The pure parts of backend pools: the member choice, the breaker, the reconnect ramp, the
operator's commands, with an injected clock (no sockets, no event loop)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from mailgate import config
from mailgate.backend import pools as P
from mailgate.backend.routing import BackendRouter, NoBackend, Plan
from mailgate.loopguard import LoopGuard
from mailgate.values import Route, Secret


def settings(**pool: Any) -> config.PoolSettings:
    raw = {
        "name": "store",
        "members": ["10.0.0.1:143", "10.0.0.2:143", "10.0.0.3:143"],
        **pool,
    }
    return config.parse({"pool": [raw]}, base_dir=Path(".")).pools[0]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def state_of(pool: config.PoolSettings, clock: Clock) -> tuple[P.HealthState, P.Pool]:
    p = P.Pool.of(pool)
    return P.HealthState([p], clock()), p


def event(kind: P.EventKind, member: str, at: float, detail: str = "") -> P.HealthEvent:
    return P.HealthEvent(kind, "store", member, at, detail)


# --- the member choice ------------------------------------------------------------------------


def test_the_choice_is_stable_per_user_and_independent_of_member_order() -> None:
    pool = P.Pool.of(settings(shared_storage=True))
    reversed_pool = P.Pool(pool.settings, tuple(reversed(pool.members)))
    for user in (f"user{i}@example.com" for i in range(200)):
        first = [m.name for m in P.rendezvous_order(pool.members, user)]
        again = [m.name for m in P.rendezvous_order(reversed_pool.members, user)]
        assert first == again


def test_removing_a_member_moves_only_its_own_users() -> None:
    pool = P.Pool.of(settings(shared_storage=True))
    users = [f"u{i}@example.com" for i in range(2000)]
    before = {u: P.rendezvous_order(pool.members, u) for u in users}
    gone = pool.members[1]
    rest = [m for m in pool.members if m is not gone]
    for user in users:
        after = P.rendezvous_order(rest, user)[0]
        expected = next(m for m in before[user] if m is not gone)
        assert after is expected  # the next in the user's own order


def test_weights_share_the_users_in_proportion() -> None:
    raw = ["10.0.0.1:143", {"host": "10.0.0.2", "port": 143, "weight": 3}]
    pool = P.Pool.of(settings(members=raw))
    firsts = Counter(P.rendezvous_order(pool.members, f"user{i}")[0].name for i in range(8000))
    share = firsts["10.0.0.2:143"] / 8000
    assert 0.70 < share < 0.80  # expected 0.75; 8000 users make a 1-sigma of 0.005


def test_without_shared_storage_a_user_has_one_member_whatever_its_health() -> None:
    clock = Clock()
    state, pool = state_of(settings(), clock)
    user_member = P.candidates(pool, "alice")
    assert len(user_member) == 1
    for _ in range(3):
        state.apply(event(P.EventKind.CHECK_FAILED, user_member[0].name, clock()))
    assert P.candidates(pool, "alice") == user_member  # still the user's member: now down
    assert not state.admit(user_member[0], "alice", clock()).admitted


def test_a_preferred_member_comes_first() -> None:
    pool = P.Pool.of(settings(shared_storage=True))
    last = P.rendezvous_order(pool.members, "bob")[-1]
    assert P.candidates(pool, "bob", preferred=last)[0] is last
    assert P.candidates(pool, "bob", preferred=last)[1:] == [
        m for m in P.rendezvous_order(pool.members, "bob") if m is not last
    ]


# --- the breaker ------------------------------------------------------------------------------


def test_consecutive_failures_mark_down_and_a_success_resets_the_count() -> None:
    clock = Clock()
    state, pool = state_of(settings(failures_to_down=3), clock)
    m = pool.members[0]
    state.apply(event(P.EventKind.LOGIN_FAILED, m.name, clock()))
    state.apply(event(P.EventKind.CHECK_FAILED, m.name, clock()))
    state.apply(event(P.EventKind.LOGIN_OK, m.name, clock()))  # a refused password counts so
    assert state.member("store", m.name).failures == 0
    state.apply(event(P.EventKind.CHECK_FAILED, m.name, clock()))
    state.apply(event(P.EventKind.LOGIN_FAILED, m.name, clock()))
    changes = state.apply(event(P.EventKind.CHECK_FAILED, m.name, clock(), "refused"))
    assert [(c.before, c.after) for c in changes] == [("up", "down")]
    assert "3 failures in a row" in changes[0].why and "refused" in changes[0].why
    assert state.admit(m, "anyone", clock()) == P.Admission(False, "down")


def test_half_open_admits_one_probe_then_up_with_a_ramp() -> None:
    clock = Clock()
    state, pool = state_of(settings(half_open_after=10, reconnect_spread=30), clock)
    m = pool.members[0]
    for _ in range(3):
        state.apply(event(P.EventKind.LOGIN_FAILED, m.name, clock()))
    clock.now += 9.9
    assert not state.admit(m, "u1", clock()).admitted
    clock.now += 0.2
    probe = state.admit(m, "u1", clock())
    assert probe.admitted and probe.probe
    assert state.member("store", m.name).state == "half-open"
    assert state.admit(m, "u2", clock()) == P.Admission(False, "half-open, probe under way")
    changes = state.apply(event(P.EventKind.LOGIN_OK, m.name, clock()))
    assert [(c.before, c.after) for c in changes] == [("half-open", "up")]
    assert state.member("store", m.name).ramp_from == clock()


def test_a_failed_probe_goes_down_again_for_a_whole_period() -> None:
    clock = Clock()
    state, pool = state_of(settings(half_open_after=10), clock)
    m = pool.members[0]
    for _ in range(3):
        state.apply(event(P.EventKind.CHECK_FAILED, m.name, clock()))
    clock.now += 10
    assert state.tick(clock())[0].after == "half-open"
    assert state.wants_check(m, clock())  # the check may be the probe
    changes = state.apply(event(P.EventKind.CHECK_FAILED, m.name, clock(), "timeout"))
    assert [(c.before, c.after) for c in changes] == [("half-open", "down")]
    clock.now += 9
    assert not state.wants_check(m, clock()) and not state.admit(m, "u", clock()).admitted
    clock.now += 1
    assert state.admit(m, "u", clock()).probe


def test_a_probe_whose_outcome_never_comes_expires() -> None:
    clock = Clock()
    state, pool = state_of(settings(half_open_after=10), clock)
    m = pool.members[0]
    for _ in range(3):
        state.apply(event(P.EventKind.CHECK_FAILED, m.name, clock()))
    clock.now += 10
    assert state.admit(m, "u", clock()).probe  # its client leaves: no outcome
    clock.now += 10
    assert state.admit(m, "u", clock()).probe


# --- the reconnect ramp --------------------------------------------------------------------------


def test_the_ramp_lets_in_a_share_of_users_that_grows_linearly() -> None:
    clock = Clock()
    state, pool = state_of(settings(reconnect_spread=30, half_open_after=1), clock)
    m = pool.members[0]
    for _ in range(3):
        state.apply(event(P.EventKind.CHECK_FAILED, m.name, clock()))
    clock.now += 1
    state.apply(event(P.EventKind.CHECK_OK, m.name, clock()))  # the probe: up, ramping
    start = clock()
    users = [f"user{i}" for i in range(3000)]
    admitted_once: set[str] = set()
    for second in range(0, 31, 3):
        clock.now = start + second
        admitted = {u for u in users if state.admit(m, u, clock()).admitted}
        # Exactly the users whose position is below the share (deterministic) ...
        assert admitted == {u for u in users if P.ramp_position(u) < second / 30} or second == 30
        # ... about that share of them, and nobody let in before is refused later.
        assert abs(len(admitted) / len(users) - min(second / 30, 1.0)) < 0.05
        assert admitted_once <= admitted
        admitted_once = admitted
    assert len(admitted_once) == len(users)
    assert state.member("store", m.name).ramp_from is None  # over


def test_no_ramp_at_start_or_with_a_zero_spread() -> None:
    clock = Clock()
    state, pool = state_of(settings(reconnect_spread=0, half_open_after=1), clock)
    m = pool.members[0]
    assert state.admit(m, "u", clock()).admitted
    for _ in range(3):
        state.apply(event(P.EventKind.CHECK_FAILED, m.name, clock()))
    clock.now += 1
    state.apply(event(P.EventKind.CHECK_OK, m.name, clock()))
    assert all(state.admit(m, f"u{i}", clock()).admitted for i in range(100))


# --- the operator's commands ---------------------------------------------------------------------


def test_drain_and_down_refuse_new_logins_and_up_ramps_back() -> None:
    clock = Clock()
    state, pool = state_of(settings(reconnect_spread=10), clock)
    m = pool.members[0]
    state.apply(event(P.EventKind.DRAIN, m.name, clock()))
    assert state.member("store", m.name).state == "draining"
    assert state.admit(m, "u", clock()) == P.Admission(False, "draining")
    assert state.wants_check(m, clock())  # a draining member is still checked
    state.apply(event(P.EventKind.DOWN, m.name, clock()))
    assert state.member("store", m.name).state == "down"
    assert not state.wants_check(m, clock())  # maintenance: no checks
    changes = state.apply(event(P.EventKind.UP, m.name, clock()))
    assert [(c.before, c.after) for c in changes] == [("down", "up")]
    assert state.member("store", m.name).ramp_from == clock()


def test_up_on_a_member_the_checks_found_down_probes_it_at_once() -> None:
    clock = Clock()
    state, pool = state_of(settings(half_open_after=60), clock)
    m = pool.members[0]
    for _ in range(3):
        state.apply(event(P.EventKind.CHECK_FAILED, m.name, clock()))
    state.apply(event(P.EventKind.UP, m.name, clock()))
    assert state.member("store", m.name).state == "half-open"


def test_snapshot_and_restore_carry_the_state_as_json() -> None:
    clock = Clock()
    state, pool = state_of(settings(), clock)
    for _ in range(3):
        state.apply(event(P.EventKind.CHECK_FAILED, pool.members[0].name, clock(), "x"))
    state.apply(event(P.EventKind.DRAIN, pool.members[1].name, clock()))
    snap = json.loads(json.dumps(state.snapshot()))
    fresh, _ = state_of(settings(), clock)
    fresh.restore(snap)
    assert fresh.snapshot() == state.snapshot()
    wire = json.loads(json.dumps(event(P.EventKind.UP, "m", 3.5, "op").to_json()))
    assert P.HealthEvent.from_json(wire) == event(P.EventKind.UP, "m", 3.5, "op")


def router(clock: Clock, **pool: Any) -> BackendRouter:
    return BackendRouter([settings(**pool)], LoopGuard([("127.0.0.1", 143)]), clock=clock)


def route(host: str = "10.0.0.9", port: int = 143, pool: str | None = None) -> Route:
    return Route(host, port, "alice", Secret("pw"), pool=pool)


def test_router_commands_and_describe_are_json() -> None:
    clock = Clock()
    r = router(clock)
    reply = r.command("drain", "10.0.0.2:143")
    assert reply["ok"] and reply["members"][0]["state"] == "draining"
    assert P.HealthEvent.from_json(reply["events"][0]).kind is P.EventKind.DRAIN
    assert r.command("down", "store")["ok"]  # a pool's name: all its members
    assert {m["state"] for m in r.describe()} == {"down"}
    assert r.command("up", "store/10.0.0.1:143")["members"][0]["state"] == "up"
    assert not r.command("up", "nothing")["ok"]
    assert not r.command("reboot", "store")["ok"]
    listed = json.loads(json.dumps(r.command("list")))
    assert [m["member"] for m in listed["members"]] == [
        "10.0.0.1:143",
        "10.0.0.2:143",
        "10.0.0.3:143",
    ]
    first = listed["members"][0]
    assert set(first) >= {"pool", "member", "state", "failures", "last_check", "sessions"}


def test_router_routes_by_pool_name_member_address_or_not_at_all() -> None:
    clock = Clock()
    r = router(clock, shared_storage=True)
    plan = r.plan(route(pool="store"), "imap", "alice")
    assert isinstance(plan, Plan)
    first = plan.next()
    assert first is not None and first.member is not None and first.name.startswith("store/")
    by_host = r.plan(route(host="store"), "imap", "alice")  # an Auth-Server naming the pool
    assert isinstance(by_host, Plan)
    same = by_host.next()
    assert same is not None and same.member == first.member
    member = r.plan(route(host="10.0.0.3"), "imap", "alice")
    assert isinstance(member, Plan)
    named = member.next()
    assert named is not None and named.name == "store/10.0.0.3:143"
    outside = r.plan(route(host="10.9.9.9"), "imap", "alice")
    assert isinstance(outside, Plan)
    direct = outside.next()
    assert direct is not None and direct.member is None and direct.name == "10.9.9.9:143"
    assert outside.next() is None
    unknown = r.plan(route(pool="nope"), "imap", "alice")
    assert isinstance(unknown, NoBackend) and unknown.kind == "unknown_pool"


def test_router_falls_over_in_the_users_order_and_refuses_fast_when_none_takes() -> None:
    clock = Clock()
    r = router(clock, shared_storage=True)
    order = P.rendezvous_order(r.pools["store"].members, "alice")
    r.command("down", order[0].name)
    plan = r.plan(route(pool="store"), "imap", "alice")
    assert isinstance(plan, Plan)
    tried = [t.member for t in iter(plan.next, None)]
    assert tried == order[1:]
    r.command("drain", "store")
    none = r.plan(route(pool="store"), "imap", "alice")
    assert isinstance(none, Plan) and none.next() is None
    refusal = none.refusal()
    assert refusal.kind == "unavailable" and "draining" in refusal.reason


def test_router_refuses_a_route_to_its_own_listener() -> None:
    clock = Clock()
    r = router(clock)
    refusal = r.plan(route(host="127.0.0.1", port=143), "imap", "alice")
    assert isinstance(refusal, NoBackend) and refusal.kind == "loop"
    assert isinstance(r.plan(route(host="127.0.0.1", port=10143), "imap", "alice"), Plan)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"name": "p", "members": []}, "has no members"),
        ({"name": "p"}, "has no members"),
        ({"name": "p", "members": ["a:1", "a:1"]}, "two members are named"),
        ({"name": "p", "members": ["a:99999"]}, "not a port"),
        ({"name": "p", "members": [{"host": "a", "weight": 0}]}, "positive"),
        ({"name": "p", "members": ["a"], "failures_to_down": 0}, "at least 1"),
        ({"name": "p", "members": ["a"], "check_tls": True}, "check_tls needs TLS"),
        ({"name": "p", "members": ["a"], "colour": 1}, "unknown setting"),
    ],
)
def test_pool_config_errors_name_the_key(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(config.ConfigError, match=message):
        config.parse({"pool": [raw]}, base_dir=Path("."))


def test_an_address_is_in_one_pool_only() -> None:
    raw = [{"name": "a", "members": ["h:143"]}, {"name": "b", "members": ["h:143"]}]
    with pytest.raises(config.ConfigError, match="in one pool only"):
        config.parse({"pool": raw}, base_dir=Path("."))


def test_member_forms() -> None:
    raw = {
        "name": "p",
        "members": [
            "store1",
            "[2001:db8::1]:1143",
            {"host": "10.0.0.7", "imap": 10143, "pop3": 10110, "name": "b", "weight": 2.5},
        ],
    }
    members = config.parse({"pool": [raw]}, base_dir=Path(".")).pools[0].members
    assert (members[0].name, members[0].ports["imap"], members[0].ports["smtp"]) == (
        "store1",
        143,
        25,
    )
    assert (members[1].host, members[1].ports["pop3"]) == ("2001:db8::1", 1143)
    assert (members[2].name, members[2].ports["pop3"], members[2].weight) == ("b", 10110, 2.5)
