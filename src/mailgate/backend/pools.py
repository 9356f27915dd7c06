"""Backend pools: which member a login goes to, and the health of every member.

Pure and synchronous: no I/O and no clock (every call is given `now`, monotonic seconds), so
the breaker, the reconnect ramp and the member choice are tested with an injected clock.
`health.py` runs the active checks and `routing.py` puts this to work for the sessions.

A member's life (the circuit breaker):

    up --failures_to_down consecutive failures--> down --half_open_after--> half-open
    half-open --one probe (a check or a login) succeeds--> up (ramping)   ... fails --> down

Failures are active checks that fail and temporary backend login failures (a backend in
trouble, `BackendError.temporary`); a refused password is the backend working, a success.
An operator may also set a member `down` (maintenance: no new logins, no checks) or
`drain` (no new logins; checks go on; sessions continue), and `up` again.

When a member starts taking logins again (after an outage, a probe, or `up`), it takes them
from a growing share of users: at `t` seconds after, a user is let in if their ramp position
(a hash of the user, uniform in [0, 1)) is below `t / reconnect_spread`. The share of users
grows linearly, the same in every worker and on every node (no counters to share), and a user
once let in stays let in, so nobody flaps between members. With 10,000 clients retrying,
about 10,000 / reconnect_spread new users arrive per second instead of 10,000 at once
(Dovecot's login_proxy_max_disconnect_delay spreads the reconnects the same way, at the other
end of the outage).

The state is plain data: `HealthState.apply(event)` takes an event (from this process, or
broadcast by the process that runs the checks), returns the state changes, and
`snapshot()` / `restore()` carry the whole state to a new worker as JSON.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from mailgate.config import PoolMemberSettings, PoolSettings

# Detail text kept per member (last check result): one readable line.
DETAIL_MAX = 200
_U64 = float(1 << 64)


class Health(StrEnum):
    UP = "up"
    DOWN = "down"
    HALF_OPEN = "half-open"


class Admin(StrEnum):
    """What the operator said (`mailgate backend up|down|drain NAME`)."""

    ENABLED = "enabled"  # the health decides
    DOWN = "down"  # maintenance: no new logins and no checks
    DRAIN = "drain"  # no new logins; checks go on, sessions continue


class EventKind(StrEnum):
    CHECK_OK = "check-ok"
    CHECK_FAILED = "check-failed"
    LOGIN_OK = "login-ok"  # the backend answered a login (even "wrong password")
    LOGIN_FAILED = "login-failed"  # connect failed, or a temporary backend failure
    PROBE = "probe"  # a half-open member's one probe started (a check or a login)
    UP = "up"  # operator commands
    DOWN = "down"
    DRAIN = "drain"


ADMIN_EVENTS = {
    EventKind.UP: Admin.ENABLED,
    EventKind.DOWN: Admin.DOWN,
    EventKind.DRAIN: Admin.DRAIN,
}
_OK = frozenset({EventKind.CHECK_OK, EventKind.LOGIN_OK})
_FAILED = frozenset({EventKind.CHECK_FAILED, EventKind.LOGIN_FAILED})


@dataclass(frozen=True, slots=True)
class HealthEvent:
    """Something that happened to one member, at `at` (monotonic seconds)."""

    kind: EventKind
    pool: str
    member: str
    at: float
    detail: str = ""  # for checks: what failed, or the greeting; for the log

    def to_json(self) -> list[Any]:
        return [self.kind.value, self.pool, self.member, self.at, self.detail]

    @classmethod
    def from_json(cls, data: Sequence[Any]) -> HealthEvent:
        kind, pool, member, at, detail = data
        return cls(EventKind(kind), str(pool), str(member), float(at), str(detail))


@dataclass(frozen=True, slots=True)
class Change:
    """A member's state changed (for the log, the metrics and a broadcast)."""

    pool: str
    member: str
    before: str  # MemberState.state values: up, down, draining, half-open
    after: str
    at: float
    why: str


@dataclass(slots=True)
class MemberState:
    health: Health = Health.UP
    admin: Admin = Admin.ENABLED
    failures: int = 0  # consecutive
    changed_at: float = 0.0  # when `health` last changed
    ramp_from: float | None = None  # taking logins again since then; None: fully
    probe_at: float | None = None  # a half-open probe is under way since then
    last_check_at: float | None = None
    last_check_ok: bool | None = None
    last_check_detail: str = ""

    @property
    def state(self) -> str:
        """What the operator sees: the admin setting wins over the health."""
        if self.admin is Admin.DOWN:
            return "down"
        if self.admin is Admin.DRAIN:
            return "draining"
        return self.health.value

    def to_json(self) -> dict[str, Any]:
        return {
            "health": self.health.value,
            "admin": self.admin.value,
            "failures": self.failures,
            "changed_at": self.changed_at,
            "ramp_from": self.ramp_from,
            "last_check_at": self.last_check_at,
            "last_check_ok": self.last_check_ok,
            "last_check_detail": self.last_check_detail,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MemberState:
        return cls(
            health=Health(data["health"]),
            admin=Admin(data["admin"]),
            failures=int(data["failures"]),
            changed_at=float(data["changed_at"]),
            ramp_from=None if data["ramp_from"] is None else float(data["ramp_from"]),
            last_check_at=None if data["last_check_at"] is None else float(data["last_check_at"]),
            last_check_ok=data["last_check_ok"],
            last_check_detail=str(data["last_check_detail"]),
        )


@dataclass(frozen=True, slots=True)
class Admission:
    """May a login go to this member now? `probe`: it is the half-open member's one probe."""

    admitted: bool
    why: str = ""  # why not, for the log: "down", "draining", "ramping", ...
    probe: bool = False


ADMITTED = Admission(True)


@dataclass(frozen=True, slots=True)
class Member:
    """One mailstore of a pool, as configured."""

    pool: str
    name: str
    host: str
    ports: Mapping[str, int]
    weight: float = 1.0

    @classmethod
    def of(cls, pool: str, m: PoolMemberSettings) -> Member:
        return cls(pool, m.name, m.host, m.ports, m.weight)

    def port(self, protocol: str) -> int:
        return self.ports[protocol]

    @property
    def key(self) -> tuple[str, str]:
        return (self.pool, self.name)


@dataclass(frozen=True, slots=True)
class Pool:
    settings: PoolSettings
    members: tuple[Member, ...] = field(default=())

    @classmethod
    def of(cls, settings: PoolSettings) -> Pool:
        return cls(settings, tuple(Member.of(settings.name, m) for m in settings.members))

    @property
    def name(self) -> str:
        return self.settings.name

    def member(self, name: str) -> Member | None:
        return next((m for m in self.members if m.name == name), None)


# --- choosing a member -----------------------------------------------------------------------


def _unit(*parts: str) -> float:
    """A stable hash of `parts` in (0, 1): the same in every process and on every node."""
    digest = hashlib.blake2b("\0".join(parts).encode("utf-8", "surrogateescape"), digest_size=8)
    return (int.from_bytes(digest.digest(), "big") + 0.5) / _U64


def rendezvous_order(members: Iterable[Member], key: str) -> list[Member]:
    """Members in `key`'s order of preference: weighted rendezvous hashing (highest random
    weight). The first is the user's member while it is healthy; taking a member away moves
    only its own users, each to the next in their own order, so the load spreads by weight.
    The score -w / ln(u) makes P(member first) = w / sum(w) (Schindelhauer and Schomaker)."""
    return sorted(
        members, key=lambda m: -m.weight / math.log(_unit(m.pool, m.name, key)), reverse=True
    )


def ramp_position(key: str) -> float:
    """Where `key` stands in a reconnect ramp: uniform in (0, 1), independent of its order."""
    return _unit("ramp", key)


def candidates(pool: Pool, key: str, preferred: Member | None = None) -> list[Member]:
    """The members a login of `key` may try, best first: the seam where a remembered
    affinity (issue 12: Redis) or an auth service's choice comes in, as `preferred`.

    Shared storage: every member, `preferred` first, then the user's rendezvous order.
    Otherwise the user's member only: `preferred` (the one the route named), or the first in
    the user's rendezvous order over all members, whatever their health (a user's mailbox
    does not move because a server is down).
    """
    order = rendezvous_order(pool.members, key)
    if preferred is not None:
        order = [preferred] + [m for m in order if m is not preferred]
    return order if pool.settings.shared_storage else order[:1]


# --- health ----------------------------------------------------------------------------------


class HealthState:
    """The health of every member of every pool; one per process (or one per node, in the
    process that runs the checks, broadcasting its changes)."""

    def __init__(self, pools: Iterable[Pool], now: float = 0.0) -> None:
        self.pools = {p.name: p for p in pools}
        self._members: dict[tuple[str, str], MemberState] = {
            m.key: MemberState(changed_at=now) for p in self.pools.values() for m in p.members
        }

    def member(self, pool: str, member: str) -> MemberState:
        return self._members[(pool, member)]

    def settings(self, pool: str) -> PoolSettings:
        return self.pools[pool].settings

    # --- events -------------------------------------------------------------------------------

    def apply(self, event: HealthEvent) -> list[Change]:
        """Take one event; returns the changes of state it caused (often none)."""
        ms = self._members.get((event.pool, event.member))
        if ms is None:
            return []  # a member removed by a reload: nothing to do
        rules = self.settings(event.pool)
        before = ms.state
        changes = self._due(event.pool, event.member, ms, event.at)
        kind = event.kind
        if kind in (EventKind.CHECK_OK, EventKind.CHECK_FAILED):
            ms.last_check_at = event.at
            ms.last_check_ok = kind is EventKind.CHECK_OK
            ms.last_check_detail = event.detail[:DETAIL_MAX]
        if kind in ADMIN_EVENTS:
            why = self._admin(ms, ADMIN_EVENTS[kind], event.at)
        elif kind is EventKind.PROBE:
            ms.probe_at = event.at
            why = ""
        elif kind in _OK:
            why = self._succeeded(ms, event.at)
        else:
            why = self._failed(ms, rules, event.at, event.detail)
        mid = changes[-1].after if changes else before
        if ms.state != mid:
            changes.append(Change(event.pool, event.member, mid, ms.state, event.at, why))
        return changes

    def _admin(self, ms: MemberState, admin: Admin, now: float) -> str:
        was_taking = ms.admin is Admin.ENABLED and ms.health is Health.UP
        ms.admin = admin
        if admin is not Admin.ENABLED:
            ms.ramp_from = None
            return f"operator: {admin.value}"
        if ms.health is Health.DOWN:  # probe it now rather than after half_open_after
            self._set(ms, Health.HALF_OPEN, now)
        elif not was_taking:
            ms.ramp_from = now
        return "operator: up"

    def _succeeded(self, ms: MemberState, now: float) -> str:
        ms.failures = 0
        if ms.health is Health.HALF_OPEN:
            self._set(ms, Health.UP, now)
            ms.ramp_from = now if ms.admin is Admin.ENABLED else None
            return "probe succeeded"
        return ""  # a success on a down member is a login from before: not a probe

    def _failed(self, ms: MemberState, rules: PoolSettings, now: float, detail: str) -> str:
        if ms.health is Health.HALF_OPEN:
            self._set(ms, Health.DOWN, now)
            return f"probe failed: {detail}"
        if ms.health is Health.DOWN:
            return ""
        ms.failures += 1
        if ms.failures >= rules.failures_to_down:
            self._set(ms, Health.DOWN, now)
            ms.ramp_from = None
            return f"{ms.failures} failures in a row, the last: {detail}"
        return ""

    @staticmethod
    def _set(ms: MemberState, health: Health, now: float) -> None:
        ms.health = health
        ms.changed_at = now
        ms.probe_at = None

    # --- time ---------------------------------------------------------------------------------

    def tick(self, now: float) -> list[Change]:
        """Changes due by the clock alone (down -> half-open; a finished ramp)."""
        changes: list[Change] = []
        for (pool, name), ms in self._members.items():
            changes += self._due(pool, name, ms, now)
        return changes

    def _due(self, pool: str, name: str, ms: MemberState, now: float) -> list[Change]:
        rules = self.settings(pool)
        if ms.ramp_from is not None and now - ms.ramp_from >= rules.reconnect_spread:
            ms.ramp_from = None
        if ms.health is Health.DOWN and now - ms.changed_at >= rules.half_open_after:
            before = ms.state
            self._set(ms, Health.HALF_OPEN, now)
            if ms.state != before:
                why = f"down for {rules.half_open_after:g} s: one probe allowed"
                return [Change(pool, name, before, ms.state, now, why)]
        return []

    # --- admission ------------------------------------------------------------------------------

    def admit(self, member: Member, key: str, now: float) -> Admission:
        """May a login of `key` go to `member` now? A half-open member admits one probe:
        the caller that gets `probe=True` must report its outcome (LOGIN_OK/LOGIN_FAILED)."""
        ms = self._members[member.key]
        rules = self.settings(member.pool)
        self._due(member.pool, member.name, ms, now)  # the router's tick() logs the change
        if ms.admin is not Admin.ENABLED:
            return Admission(False, ms.state)
        if ms.health is Health.DOWN:
            return Admission(False, "down")
        if ms.health is Health.HALF_OPEN:
            # A probe whose outcome never came (its client left) expires after a breaker's
            # period, so a member is never stuck half-open.
            if ms.probe_at is not None and now - ms.probe_at < rules.half_open_after:
                return Admission(False, "half-open, probe under way")
            ms.probe_at = now
            return Admission(True, "half-open probe", probe=True)
        if ms.ramp_from is not None and rules.reconnect_spread > 0:
            share = (now - ms.ramp_from) / rules.reconnect_spread
            if share < 1.0:
                if ramp_position(key) >= share:
                    return Admission(False, f"ramping up ({share:.0%} of users)")
            else:
                ms.ramp_from = None
        return ADMITTED

    def wants_check(self, member: Member, now: float) -> bool:
        """Active checks skip members in maintenance and down members until half-open."""
        ms = self._members[member.key]
        if ms.admin is Admin.DOWN:
            return False
        self._due(member.pool, member.name, ms, now)
        return ms.health is not Health.DOWN

    # --- the whole state as JSON ----------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything, JSON-serialisable: {"pool": {"member": {...}}}."""
        out: dict[str, dict[str, Any]] = {}
        for (pool, name), ms in self._members.items():
            out.setdefault(pool, {})[name] = ms.to_json()
        return out

    def restore(self, snapshot: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> None:
        """Take the state of members that still exist from `snapshot` (after a reload, a new
        worker starts with what the old ones knew)."""
        for pool, members in snapshot.items():
            for name, data in members.items():
                if (pool, name) in self._members:
                    self._members[(pool, name)] = MemberState.from_json(data)
