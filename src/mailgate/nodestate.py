"""The state one node's workers share: login budgets, lock-outs and session counts.

One `NodeState` lives in the supervisor; the workers reach it over their channel (see
`statechannel.py`), so a budget is one budget for every worker of the node, and for both
generations of workers during a reload. With `[cluster] redis_url` the workers use Redis
instead (`redisstate.py`) and this is their fallback while Redis is unreachable.

A guess is counted before it is checked: `begin` reserves an attempt against the user's and
the address's budgets and refuses it when failures plus attempts in flight reach the budget,
so however many guesses arrive at once, no more than `lockout_after` reach the password check
in a window. `end` settles the reservation with the outcome.

Sessions are leases: `acquire` counts a logged-in session against the per-user, per-user-and-
address and per-address limits and `release` gives it back; every lease belongs to a worker,
and all of a worker's leases go when the worker does (`forget_worker`), so a crashed worker
leaks nothing.

Pure and synchronous: no I/O, the clock is passed in.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum

from mailgate.config import LimitsSettings, ThrottleSettings

# Keys each table holds at most: an entry is a few hundred bytes, so tens of MB at worst. A
# flood of fresh addresses evicts the oldest windows first, i.e. the slowest guessers.
MAX_KEYS = 100_000
# Distinct user hashes remembered per address and window: enough to tell "more than
# per_ip_users" for any sane setting, bounded whatever an address tries.
MAX_USERS_PER_IP = 256


class Verdict(Enum):
    ALLOWED = "allowed"
    LOCKED = "locked"  # a lock-out is running for the address or the user
    BUDGET = "budget"  # failures and attempts in flight have reached lockout_after
    CONCURRENT = "concurrent"  # too many attempts in flight at once (a temporary refusal)
    MOVING = "moving"  # the user is being moved (cluster.py): a temporary refusal


@dataclass(frozen=True, slots=True)
class Attempt:
    """One login attempt as the throttle counts it."""

    ip: str  # the subscriber key of the client address (addresses.subscriber)
    user: str | None  # the normalised user key, None without a name (SMTP relay)
    trusted: bool = False  # from trusted_networks: the address's own budget does not apply


@dataclass(frozen=True, slots=True)
class Admission:
    verdict: Verdict
    ip_failures: int = 0  # failures in the current window, before this attempt
    user_failures: int = 0
    spraying: bool = False  # the address tried more than per_ip_users users in the window
    locked_for: float = 0.0  # seconds the lock-out still runs (LOCKED only)


@dataclass(frozen=True, slots=True)
class Settled:
    """What ending an attempt did: the counts after it, and the lock-outs it started."""

    ip_failures: int
    user_failures: int
    locked: tuple[str, ...] = ()  # "ip", "user" when this failure started a lock-out
    spraying: bool = False
    identity_locked: bool = False  # the directory's identity for the user is locked out


class LeaseRefusal(Enum):
    PER_USER = "per_user"
    PER_USER_IP = "per_user_ip"
    PER_IP = "per_ip"


@dataclass(slots=True)
class _Counter:
    window_start: float
    failures: int = 0
    inflight: int = 0
    locked_until: float = 0.0
    users: set[bytes] = field(default_factory=set)  # failed user hashes (address keys)
    listed_at: float = 0.0  # when it took its place in the expiry order (memory only)


class NodeState:
    """See the module docstring. Keys are strings: "ip:..." and "user:..."."""

    def __init__(self, throttle: ThrottleSettings, limits: LimitsSettings) -> None:
        self.throttle = throttle
        self.limits = limits
        # Oldest first, so expired windows and eviction victims are at the front.
        self._counters: OrderedDict[str, _Counter] = OrderedDict()
        # Sessions: key -> {worker: count}.
        self._leases: dict[str, dict[int, int]] = {}

    def configure(self, throttle: ThrottleSettings, limits: LimitsSettings) -> None:
        """A reload: new budgets apply to the next attempt; counts are kept."""
        self.throttle, self.limits = throttle, limits

    # --- the login budget -------------------------------------------------------------------

    def begin(self, attempt: Attempt, now: float) -> Admission:
        s = self.throttle
        ip = self._counter("ip:" + attempt.ip, now)
        user = self._counter("user:" + attempt.user, now) if attempt.user else None
        counters = [c for c in (None if attempt.trusted else ip, user) if c is not None]
        for counter in counters:
            if counter.locked_until > now:
                return self._admission(Verdict.LOCKED, ip, user, counter.locked_until - now)
        if s.lockout_after > 0:
            for counter in counters:
                if counter.failures >= s.lockout_after:
                    # Spent, and the lock-out it earned is over: one guess at a time, and a
                    # failure locks again (a guess per lock-out, as before any reservation).
                    if counter.inflight:
                        return self._admission(Verdict.BUDGET, ip, user)
                elif counter.failures + counter.inflight >= s.lockout_after:
                    return self._admission(Verdict.BUDGET, ip, user)
        if (user is not None and user.inflight >= s.concurrent_per_user) or (
            not attempt.trusted and ip.inflight >= s.concurrent_per_ip
        ):
            return self._admission(Verdict.CONCURRENT, ip, user)
        ip.inflight += 1
        if user is not None:
            user.inflight += 1
        return self._admission(Verdict.ALLOWED, ip, user)

    def end(
        self, attempt: Attempt, outcome: str, now: float, identity: str | None = None
    ) -> Settled:
        """Settle an allowed attempt: outcome is "ok", "failed" or "tempfail" (not counted).

        `identity` is the user the directory matched when it differs from `attempt.user` (a
        database whose collation folds names): its failures count too, and a lock-out of it
        holds whatever the spelling."""
        ip = self._counter("ip:" + attempt.ip, now)
        user = self._counter("user:" + attempt.user, now) if attempt.user else None
        for counter in (ip, user):
            if counter is not None and counter.inflight > 0:
                counter.inflight -= 1
        matched = self._counter("user:" + identity, now) if identity else None
        identity_locked = matched is not None and matched.locked_until > now
        locked: list[str] = []
        if outcome == "failed":
            if not attempt.trusted:
                ip.failures += 1
                if attempt.user and len(ip.users) < MAX_USERS_PER_IP:
                    ip.users.add(_user_hash(attempt.user))
            for counter in (user, matched):
                if counter is not None:
                    counter.failures += 1
            for kind, counter in (("ip", None if attempt.trusted else ip), ("user", user)):
                if counter is not None and self._lock_if_spent(counter, now):
                    locked.append(kind)
            if matched is not None:
                identity_locked = self._lock_if_spent(matched, now) or identity_locked
        elif outcome == "ok":
            for counter in (user, matched):
                if counter is not None:
                    counter.failures = 0
        return Settled(
            ip_failures=ip.failures,
            user_failures=max(user.failures if user else 0, matched.failures if matched else 0),
            locked=tuple(locked),
            spraying=self._spraying(ip),
            identity_locked=identity_locked,
        )

    def show(self, key: str, now: float) -> dict[str, object] | None:
        """The operator's view of one key ("ip:..." or "user:..."), or None."""
        counter = self._counters.get(key)
        ended = counter is not None and now - counter.window_start >= self.throttle.window
        if counter is None or (ended and counter.locked_until <= now):
            return None
        return {
            "key": key,
            "failures": 0 if ended else counter.failures,
            "in_flight": counter.inflight,
            "locked_for": max(0.0, counter.locked_until - now),
            "window_left": max(0.0, counter.window_start + self.throttle.window - now),
            "users_tried": 0 if ended else len(counter.users),
        }

    def keys(self, now: float) -> list[str]:
        """Keys with failures or a lock-out now, most recent first (for `throttle show`)."""
        self._expire(now)
        window = self.throttle.window
        counters = reversed(self._counters.items())
        return [
            key
            for key, c in counters
            if (c.failures and now - c.window_start < window) or c.locked_until > now
        ]

    def clear(self, key: str) -> bool:
        """Forget a key's failures and lock-out (`mailgate throttle clear`)."""
        counter = self._counters.get(key)
        if counter is None:
            return False
        counter.failures = 0
        counter.locked_until = 0.0
        counter.users.clear()
        return True

    # --- sessions ----------------------------------------------------------------------------

    def acquire(
        self, worker: int, user: str | None, ip: str, trusted: bool = False
    ) -> LeaseRefusal | None:
        """Count one logged-in session, unless a limit says no (0 = no limit)."""
        limits = self.limits
        checks = []
        if user:
            checks.append((f"u:{user}", limits.per_user, LeaseRefusal.PER_USER))
            checks.append((f"ui:{user}|{ip}", limits.per_user_ip, LeaseRefusal.PER_USER_IP))
        if not trusted:
            checks.append((f"i:{ip}", limits.per_ip, LeaseRefusal.PER_IP))
        for key, limit, refusal in checks:
            if limit and self._sessions(key) >= limit:
                return refusal
        for key, _, _ in checks:
            owners = self._leases.setdefault(key, {})
            owners[worker] = owners.get(worker, 0) + 1
        return None

    def release(self, worker: int, user: str | None, ip: str, trusted: bool = False) -> None:
        keys = [f"u:{user}", f"ui:{user}|{ip}"] if user else []
        if not trusted:
            keys.append(f"i:{ip}")
        for key in keys:
            owners = self._leases.get(key)
            if not owners or not owners.get(worker):
                continue
            owners[worker] -= 1
            if not owners[worker]:
                del owners[worker]
            if not owners:
                del self._leases[key]

    def forget_worker(self, worker: int) -> int:
        """A worker is gone: its sessions are gone with it. Returns how many leases went."""
        gone = 0
        for key in list(self._leases):
            owners = self._leases[key]
            gone += owners.pop(worker, 0)
            if not owners:
                del self._leases[key]
        return gone

    def sessions_of(self, user: str) -> int:
        return self._sessions(f"u:{user}")

    # --- internals ---------------------------------------------------------------------------

    def _sessions(self, key: str) -> int:
        return sum(self._leases.get(key, {}).values())

    def _counter(self, key: str, now: float) -> _Counter:
        self._expire(now)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = _Counter(now, listed_at=now)
            while len(self._counters) > MAX_KEYS:
                self._evict()
        elif now - counter.window_start >= self.throttle.window:
            # Its window ended: failures start again (a running lock-out stays). Decided when
            # the key is used, as Redis decides it (redislua.py), never by another key's use.
            counter.window_start, counter.failures = now, 0
            counter.users.clear()
        return counter

    def _expire(self, now: float) -> None:
        """Forget counters whose window ended, unless locked or in flight (memory only: the
        rules are `_counter`'s). The front is the oldest listed."""
        window = self.throttle.window
        while self._counters:
            key, first = next(iter(self._counters.items()))
            if now - first.listed_at < window:
                return
            idle = first.locked_until <= now and not first.inflight
            if idle and now - first.window_start >= window:
                del self._counters[key]
                continue
            # Still needed: it takes its place at the back.
            self._counters.move_to_end(key)
            first.listed_at = now

    def _evict(self) -> None:
        for key, counter in self._counters.items():
            if not counter.inflight:
                del self._counters[key]
                return
        self._counters.popitem(last=False)  # everything is in flight: the oldest goes

    def _lock_if_spent(self, counter: _Counter, now: float) -> bool:
        limit = self.throttle.lockout_after
        if limit <= 0 or counter.failures < limit or counter.locked_until > now:
            return False
        counter.locked_until = now + self.throttle.lockout
        return True

    def _spraying(self, ip: _Counter) -> bool:
        limit = self.throttle.per_ip_users
        return bool(limit) and len(ip.users) > limit

    def _admission(
        self,
        verdict: Verdict,
        ip: _Counter,
        user: _Counter | None,
        locked_for: float = 0.0,
    ) -> Admission:
        return Admission(
            verdict,
            ip_failures=ip.failures,
            user_failures=user.failures if user else 0,
            spraying=self._spraying(ip),
            locked_for=locked_for,
        )


def _user_hash(user: str) -> bytes:
    return hashlib.blake2b(user.encode("utf-8", "surrogateescape"), digest_size=8).digest()
