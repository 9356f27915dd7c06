"""The node's shared state: budgets reserved before the check, lock-outs, session leases."""

from __future__ import annotations

import pytest

from mailgate.config import LimitsSettings, ThrottleSettings
from mailgate.nodestate import Attempt, LeaseRefusal, NodeState, Verdict

THROTTLE = ThrottleSettings(lockout_after=3, lockout=300.0, window=900.0, per_ip_users=2)
ALICE = Attempt("192.0.2.1", "alice@example.com")


def state(**limits: int) -> NodeState:
    return NodeState(THROTTLE, LimitsSettings(**limits))


def test_attempts_in_flight_count_against_the_budget() -> None:
    s = state()
    assert [s.begin(ALICE, 0.0).verdict for _ in range(4)] == [
        Verdict.ALLOWED,
        Verdict.ALLOWED,
        Verdict.ALLOWED,
        Verdict.BUDGET,  # three in flight: a fourth guess would pass lockout_after
    ]


def test_the_failure_that_spends_the_budget_locks_out() -> None:
    s = state()
    for _ in range(3):
        assert s.begin(ALICE, 0.0).verdict is Verdict.ALLOWED
        settled = s.end(ALICE, "failed", 0.0)
    assert settled.locked == ("ip", "user")
    admission = s.begin(Attempt("198.51.100.9", "alice@example.com"), 10.0)
    assert admission.verdict is Verdict.LOCKED
    assert admission.locked_for == pytest.approx(290.0)


def test_after_a_lock_out_one_guess_at_a_time_and_a_failure_locks_again() -> None:
    s = state()
    for _ in range(3):
        s.begin(ALICE, 0.0)
        s.end(ALICE, "failed", 0.0)
    assert s.begin(ALICE, 301.0).verdict is Verdict.ALLOWED
    assert s.begin(ALICE, 301.0).verdict is Verdict.BUDGET
    assert s.end(ALICE, "failed", 301.0).locked == ("ip", "user")
    assert s.begin(ALICE, 302.0).verdict is Verdict.LOCKED


def test_success_clears_the_user_and_tempfail_counts_nothing() -> None:
    s = state()
    s.begin(ALICE, 0.0)
    s.end(ALICE, "failed", 0.0)
    s.begin(ALICE, 0.0)
    assert s.end(ALICE, "tempfail", 0.0).user_failures == 1
    s.begin(ALICE, 0.0)
    settled = s.end(ALICE, "ok", 0.0)
    assert (settled.user_failures, settled.ip_failures) == (0, 1)


def test_windows_end() -> None:
    s = state()
    s.begin(ALICE, 0.0)
    s.end(ALICE, "failed", 0.0)
    assert s.begin(ALICE, 901.0).user_failures == 0


def test_trusted_addresses_have_no_address_budget() -> None:
    s = state()
    for i in range(10):
        webmail = Attempt("10.0.0.5", f"user{i}@example.com", trusted=True)
        assert s.begin(webmail, 0.0).verdict is Verdict.ALLOWED
        assert s.end(webmail, "failed", 0.0).locked == ()


def test_spraying_is_distinct_users_failed_from_one_address() -> None:
    s = state()
    spraying = []
    for i in range(4):
        guess = Attempt("203.0.113.7", f"user{i}@example.com")
        s.begin(guess, 0.0)
        spraying.append(s.end(guess, "failed", 0.0).spraying)
    assert spraying == [False, False, True, True]


def test_an_identity_the_directory_matched_keeps_its_lock_whatever_the_spelling() -> None:
    s = state()
    for spelling in ("Alice@example.com", "alïce@example.com", "ALICE@example.com"):
        attempt = Attempt(f"198.51.100.{len(spelling)}", spelling)
        s.begin(attempt, 0.0)
        s.end(attempt, "failed", 0.0, identity="alice@example.com")
    other = Attempt("192.0.2.200", "aLiCe@example.com")
    s.begin(other, 1.0)
    assert s.end(other, "ok", 1.0, identity="alice@example.com").identity_locked


def test_concurrent_logins_per_user_are_bounded() -> None:
    s = NodeState(ThrottleSettings(concurrent_per_user=2), LimitsSettings())
    verdicts = [s.begin(Attempt(f"10.0.0.{i}", "bob"), 0.0).verdict for i in range(3)]
    assert verdicts == [Verdict.ALLOWED, Verdict.ALLOWED, Verdict.CONCURRENT]


def test_show_and_clear() -> None:
    s = state()
    for _ in range(3):
        s.begin(ALICE, 0.0)
        s.end(ALICE, "failed", 0.0)
    shown = s.show("user:alice@example.com", 5.0)
    assert shown is not None and shown["failures"] == 3 and shown["locked_for"] == 295.0
    assert set(s.keys(5.0)) == {"ip:192.0.2.1", "user:alice@example.com"}
    assert s.clear("user:alice@example.com")
    assert s.begin(Attempt("198.51.100.1", "alice@example.com"), 6.0).verdict is Verdict.ALLOWED


# --- sessions ---------------------------------------------------------------------------------


def test_leases_hold_the_limits_per_user_per_user_and_address_per_address() -> None:
    s = state(per_user=3, per_user_ip=2, per_ip=4)
    assert s.acquire(1, "alice", "192.0.2.1") is None
    assert s.acquire(2, "alice", "192.0.2.1") is None
    assert s.acquire(1, "alice", "192.0.2.1") is LeaseRefusal.PER_USER_IP
    assert s.acquire(1, "alice", "192.0.2.2") is None
    assert s.acquire(1, "alice", "192.0.2.3") is LeaseRefusal.PER_USER
    assert s.acquire(1, "bob", "192.0.2.1") is None
    assert s.acquire(1, "carol", "192.0.2.1") is None
    assert s.acquire(1, "dave", "192.0.2.1") is LeaseRefusal.PER_IP
    s.release(2, "alice", "192.0.2.1")
    assert s.acquire(1, "alice", "192.0.2.3") is None


def test_a_workers_leases_go_with_it() -> None:
    s = state(per_user=2)
    assert s.acquire(7, "alice", "192.0.2.1") is None
    assert s.acquire(7, "alice", "192.0.2.2") is None
    assert s.acquire(8, "alice", "192.0.2.3") is LeaseRefusal.PER_USER
    assert s.forget_worker(7) == 6  # two sessions, each counted per user, user+address, address
    assert s.acquire(8, "alice", "192.0.2.3") is None
    assert s.sessions_of("alice") == 1


def test_no_limits_configured_counts_but_refuses_nothing() -> None:
    s = state()
    assert all(s.acquire(1, "alice", "192.0.2.1") is None for _ in range(1000))
