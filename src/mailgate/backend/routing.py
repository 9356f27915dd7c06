"""From a route to the mailstore a login goes to: pools, health, the loop guard, the
operator's commands, and the backend metrics.

A route reaches a pool in one of three ways:

- it names one (`Route.pool`: a directory mailstore with a `pool`), or its host is a pool's
  name (an auth_http `Auth-Server: store-pool`, a custom directory query's `host`): the pool
  chooses the member, by the user's weighted rendezvous order;
- its host and port are a pool member's (an auth_http answer naming a host): that member,
  with the pool's health rules (and, with shared storage, the other members behind it);
- neither: it goes where it says, as before pools existed.

Then the loop guard refuses any target that is one of mailgate's own listeners.

`BackendRouter` is one per process. `plan()` gives the session the members to try, in order,
each admitted at the moment it is tried; `failed()` / `succeeded()` feed the passive checks;
`session_started()` counts sessions per member. `command()` and `describe()` are what the
control socket calls (`mailgate backend list|up|down|drain NAME`); `apply_remote()` takes
events from another process (the supervisor running the checks, another worker's commands),
and `publish` (if given) gets every event this process makes, to send them there.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from mailgate import metrics
from mailgate.backend import pools as P
from mailgate.backend.connect import BackendError
from mailgate.backend.health import CheckTarget, HealthChecker
from mailgate.config import PoolSettings, Settings
from mailgate.loopguard import LoopGuard
from mailgate.values import BackendTLS, Route

log = logging.getLogger("mailgate.backend.routing")

# Members one login tries in a shared-storage pool before the client gets its temporary
# failure: a second and third chance when a member fails between two checks, without making
# one login wait for every member of a large pool.
MAX_TRIES = 3
OPS = ("list", "up", "down", "drain")


@dataclass(frozen=True, slots=True)
class Target:
    """One login attempt: the route as the login uses it, and the member if any."""

    route: Route
    member: P.Member | None = None
    probe: bool = False
    key: str = ""  # whose login: the plan's key (the user, or the client address)

    @property
    def labels(self) -> tuple[str, str]:
        """(pool, member) for metrics; a backend outside pools is ("", host:port)."""
        if self.member is not None:
            return self.member.pool, self.member.name
        return "", _address(self.route.host, self.route.port)

    @property
    def name(self) -> str:
        """For the session log line and `mailgate who`: pool/member, or host:port."""
        pool, member = self.labels
        return f"{pool}/{member}" if pool else member


@dataclass(frozen=True, slots=True)
class NoBackend:
    """No member may take this login now: a fast temporary failure. `reason` is for the log."""

    reason: str
    kind: str  # the reason label of mailgate_backend_login_failures_total
    pool: str = ""
    member: str = ""


class Plan:
    """The members one login may try, best first, each admitted only when it is tried (so a
    half-open member's probe is claimed by the login that really makes it)."""

    __slots__ = ("_key", "_order", "_pool", "_protocol", "_route", "_router", "refusals", "tried")

    def __init__(
        self,
        router: BackendRouter,
        route: Route,
        protocol: str,
        key: str,
        pool: P.Pool | None = None,
        order: Sequence[P.Member] = (),
    ) -> None:
        self._router, self._route, self._protocol, self._key = router, route, protocol, key
        self._pool = pool
        self._order = list(order)
        self.refusals: list[str] = []
        self.tried = 0

    def next(self) -> Target | None:
        """The next member to try, or None when there is none (`refusal()` says why)."""
        if self.tried >= (MAX_TRIES if self._pool is not None else 1):
            return None
        if self._pool is None:
            self.tried += 1
            return Target(self._route)
        router = self._router
        while self._order:
            member = self._order.pop(0)
            admission = self._admit(member)
            if not admission.admitted:
                self.refusals.append(f"{member.name} {admission.why}")
                continue
            if admission.probe:
                router.record(
                    P.HealthEvent(P.EventKind.PROBE, member.pool, member.name, router.clock())
                )
            route = dataclasses.replace(
                self._route,
                host=member.host,
                port=member.port(self._protocol),
                tls=self._pool.settings.tls or self._route.tls,
                mailstore=self._route.mailstore or self._pool.name,
            )
            loop = router.guard.refuses(route.host, route.port)
            if loop:
                self.refusals.append(f"{member.name}: {loop}")
                continue
            self.tried += 1
            return Target(route, member, admission.probe, self._key)
        return None

    def _admit(self, member: P.Member) -> P.Admission:
        return self._router.state.admit(member, self._key, self._router.clock())

    def refusal(self) -> NoBackend:
        assert self._pool is not None
        pool = self._pool.name
        what = "; ".join(self.refusals) or "no member"
        kind = "loop" if any("proxy loop" in r for r in self.refusals) else "unavailable"
        return NoBackend(f"pool {pool}: no member takes logins now ({what})", kind, pool)


class AffinityHook(Protocol):
    """What a pool with `affinity = true` asks of the cluster (affinity.py)."""

    async def plan(
        self, router: BackendRouter, pool: P.Pool, route: Route, protocol: str, key: str
    ) -> Plan | NoBackend: ...

    def planned(self, pool: P.Pool | None) -> None: ...

    def session_started(self, target: Target) -> Callable[[], None]: ...

    def failed(self, target: Target) -> None: ...

    def forget(self, user: str | None, backend: str | None) -> int: ...


# A relayed session as counted on its member: the metric's labels, and the cluster's own
# ending for an affinity pool's session.
SessionCount = tuple[tuple[str, str], Callable[[], None] | None]


class BackendRouter:
    def __init__(
        self,
        pools: Sequence[PoolSettings],
        guard: LoopGuard,
        check_target: Callable[[P.Pool, P.Member], CheckTarget] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        publish: Callable[[P.HealthEvent], None] | None = None,
        run_checks: bool = True,
    ) -> None:
        self.clock = clock
        self.guard = guard
        self.pools = {p.name: P.Pool.of(p) for p in pools}
        self.state = P.HealthState(self.pools.values(), clock())
        self._by_address: dict[tuple[str, int], P.Member] = {
            (m.host, port): m
            for p in self.pools.values()
            for m in p.members
            for port in m.ports.values()
        }
        self._sessions: dict[tuple[str, str], int] = {}
        self._publish = publish
        self._checker = (
            HealthChecker(self.state, check_target, self.record, clock)
            if check_target is not None and run_checks and self.pools
            else None
        )
        self._started = False
        # Pools with `affinity = true` choose through this (set by the worker: affinity.py).
        self.affinity: AffinityHook | None = None
        for pool in self.pools.values():
            for member in pool.members:
                metrics.backend_state(member.pool, member.name, "up")

    @classmethod
    def from_settings(
        cls, settings: Settings, listening: Iterable[tuple[str, int]] | None = None, **kw: Any
    ) -> BackendRouter:
        """The router of a worker. `listening`: the (host, bound port) of every listener;
        by default the configured ones (a listener on port 0 is then not guarded)."""
        from mailgate import tls

        if listening is None:
            listening = [(lst.host, lst.port) for lst in settings.listeners]
        backend = settings.backend
        context = tls.backend_context(backend) if settings.pools else None

        def check_target(pool: P.Pool, member: P.Member) -> CheckTarget:
            s = pool.settings
            mode = (s.tls or backend.tls) if s.check_tls else BackendTLS.NONE
            return CheckTarget(
                member.host,
                member.port(s.check_protocol),
                s.check_protocol,
                mode,
                context,
                backend.server_name,
                settings.hostname,
            )

        return cls(settings.pools, LoopGuard.for_listeners(listening), check_target, **kw)

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the active checks (in a running event loop); again is harmless."""
        if not self._started and self._checker is not None:
            self._checker.start()
        self._started = True

    async def close(self) -> None:
        if self._checker is not None:
            await self._checker.close()

    # --- the login path ----------------------------------------------------------------------

    def plan(self, route: Route, protocol: str, key: str) -> Plan | NoBackend:
        """Where a login of `key` (the user, or the client address) may go, in order."""
        self.start()
        pool, preferred = self._pool_for(route)
        if pool is None:
            if route.pool is not None:
                return NoBackend(
                    f"the route names pool {route.pool!r}, which is not configured",
                    "unknown_pool",
                    route.pool,
                )
            loop = self.guard.refuses(route.host, route.port)
            if loop:
                return NoBackend(loop, "loop", "", _address(route.host, route.port))
            return Plan(self, route, protocol, key)
        for change in self.state.tick(self.clock()):
            self._changed(change)
        return Plan(self, route, protocol, key, pool, P.candidates(pool, key, preferred))

    async def plan_login(self, route: Route, protocol: str, key: str) -> Plan | NoBackend:
        """`plan`, and for a pool with `affinity = true` the user's one member (which may
        take a round trip to Redis when the login's first one did not settle it)."""
        hook = self.affinity
        if hook is None:
            return self.plan(route, protocol, key)
        pool, _ = self._pool_for(route)
        hook.planned(pool)
        if pool is None or not pool.settings.affinity:
            return self.plan(route, protocol, key)
        self.start()
        for change in self.state.tick(self.clock()):
            self._changed(change)
        return await hook.plan(self, pool, route, protocol, key)

    def _pool_for(self, route: Route) -> tuple[P.Pool | None, P.Member | None]:
        if route.pool is not None:
            return self.pools.get(route.pool), None
        if route.host in self.pools:
            return self.pools[route.host], None
        member = self._by_address.get((route.host, route.port))
        if member is None:
            return None, None
        return self.pools[member.pool], member

    def refused(self, refusal: NoBackend) -> None:
        """A login got no member (counted once per login)."""
        metrics.backend_failure(refusal.pool, refusal.member, refusal.kind)

    def failed(self, target: Target, error: BackendError) -> str:
        """A login attempt failed; returns the metric's reason. Only trouble (temporary) is
        a health failure: a refused password means the backend is working."""
        pool, member = target.labels
        if error.stage == "loop":
            reason = "loop"
        elif not error.temporary:
            reason = "refused"
        else:
            reason = "connect" if error.stage == "connect" else "temporary"
        metrics.backend_failure(pool, member, reason)
        if target.member is not None and reason != "loop":
            kind = P.EventKind.LOGIN_FAILED if error.temporary else P.EventKind.LOGIN_OK
            self.record(P.HealthEvent(kind, pool, member, self.clock(), error.detail))
        if self.affinity is not None and target.member is not None:
            self.affinity.failed(target)
        return reason

    def abandoned(self, target: Target) -> None:
        """A login that succeeded at `target` ends before its session begins (kicked on its
        way, or its client left): its affinity claim goes back now, not at its deadline (a
        move waits for the user's claims)."""
        if self.affinity is not None and target.member is not None:
            self.affinity.failed(target)

    def succeeded(self, target: Target) -> None:
        if target.member is not None:
            m = target.member
            self.record(P.HealthEvent(P.EventKind.LOGIN_OK, m.pool, m.name, self.clock()))

    def session_started(self, target: Target) -> SessionCount:
        """Count a relayed session on its member (and in the cluster's affinity, if its pool
        has it); give what this returns to `session_ended` when it ends (labels, not a
        closure, in the common case: idle sessions are many)."""
        labels = target.labels
        self._sessions[labels] = self._sessions.get(labels, 0) + 1
        metrics.backend_sessions(*labels, 1)
        member, hook = target.member, self.affinity
        if hook is not None and member is not None and self.pools[member.pool].settings.affinity:
            return labels, hook.session_started(target)
        return labels, None

    def session_ended(self, counted: SessionCount) -> None:
        labels, cluster_ended = counted
        left = self._sessions.get(labels, 1) - 1
        if left > 0:
            self._sessions[labels] = left
        else:
            self._sessions.pop(labels, None)
        metrics.backend_sessions(*labels, -1)
        if cluster_ended is not None:
            cluster_ended()

    # --- events -------------------------------------------------------------------------------

    def record(self, event: P.HealthEvent) -> None:
        """An event made here: apply it, and publish it to the other processes."""
        self.apply_remote(event)
        if self._publish is not None:
            self._publish(event)

    def apply_remote(self, event: P.HealthEvent) -> None:
        """An event from elsewhere (or here): apply it, log and count what changed."""
        for change in self.state.apply(event):
            self._changed(change)

    def _changed(self, change: P.Change) -> None:
        level = logging.WARNING if change.after == "down" else logging.INFO
        log.log(
            level,
            "backend %s/%s: %s -> %s (%s)",
            change.pool,
            change.member,
            change.before,
            change.after,
            change.why,
        )
        metrics.backend_state(change.pool, change.member, change.after, changed=True)

    # --- the operator's view ------------------------------------------------------------------

    def describe(self) -> list[dict[str, Any]]:
        """Every pool member, JSON-serialisable (`mailgate backend list`). `sessions` are this
        process's; the control socket sums them over the workers."""
        now = self.clock()
        return [self._describe(pool, m, now) for pool in self.pools.values() for m in pool.members]

    def _describe(self, pool: P.Pool, member: P.Member, now: float) -> dict[str, Any]:
        ms = self.state.member(pool.name, member.name)
        spread = pool.settings.reconnect_spread
        ramp = None
        if ms.ramp_from is not None and spread > 0:
            ramp = round(min(1.0, (now - ms.ramp_from) / spread), 3)
        last = None
        if ms.last_check_at is not None:
            last = {
                "ago": round(now - ms.last_check_at, 3),
                "ok": ms.last_check_ok,
                "detail": ms.last_check_detail,
            }
        return {
            "pool": pool.name,
            "member": member.name,
            "host": member.host,
            "ports": dict(member.ports),
            "weight": member.weight,
            "shared_storage": pool.settings.shared_storage,
            "state": ms.state,
            "health": ms.health.value,
            "admin": ms.admin.value,
            "failures": ms.failures,
            "since": round(now - ms.changed_at, 3),
            "ramp": ramp,
            "last_check": last,
            "sessions": self._sessions.get(member.key, 0),
        }

    def command(self, op: str, name: str = "") -> dict[str, Any]:
        """`mailgate backend list|up|down|drain NAME`. NAME is pool/member, a member's name
        (if only one pool has it), or a pool's name (all its members). The reply carries the
        events applied, for the caller to pass to the other processes (`apply_remote`)."""
        if op not in OPS:
            return {"ok": False, "error": f"unknown operation {op!r} (one of {', '.join(OPS)})"}
        if op == "list" and not name:
            return {"ok": True, "op": op, "members": self.describe()}
        found = self.find(name)
        if isinstance(found, str):
            return {"ok": False, "error": found}
        now = self.clock()
        events = []
        if op != "list":
            kind = P.EventKind(op)
            for m in found:
                event = P.HealthEvent(kind, m.pool, m.name, now, "operator")
                self.record(event)
                events.append(event.to_json())
        members = [self._describe(self.pools[m.pool], m, now) for m in found]
        return {"ok": True, "op": op, "members": members, "events": events}

    def find(self, name: str) -> list[P.Member] | str:
        """The members NAME means, or why it means none."""
        pool_name, slash, member_name = name.partition("/")
        if slash:
            pool = self.pools.get(pool_name)
            member = pool.member(member_name) if pool else None
            return [member] if member else f"no pool member {name!r}"
        matches = [m for p in self.pools.values() for m in p.members if m.name == name]
        if len(matches) > 1:
            named = ", ".join(f"{m.pool}/{m.name}" for m in matches)
            return f"{name!r} is in several pools; say which: {named}"
        if matches:
            return matches
        if name in self.pools:
            return list(self.pools[name].members)
        return f"no pool or pool member named {name!r}"


def affinity_key(route: Route, client_ip: str) -> str:
    """Whose login this is, for the member choice: the user as the directory stores it, the
    user the route logs in as, or (SMTP relay, no user) the client's address."""
    return route.identity or route.user or client_ip


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
