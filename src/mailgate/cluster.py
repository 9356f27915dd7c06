"""A worker's part of the cluster (`[cluster] redis_url`): its store, its heartbeat, and its
sessions in the registry.

`ClusterStore` is the worker's `Store` (statestore.py) when Redis is configured. A login asks
Redis once: `begin` reserves the attempt, takes the session's leases for the name the client
gave, and claims the user's member in every affinity pool, in one script; the session's
`acquire` and the router's affinity choice then find their answers in the login's ticket (a
context variable of the session's task) instead of asking again. The settlement of a
successful login, the start and end of a session and a lease given back are batched and not
waited for (redisstore.py). So Redis adds one round trip to a login; a failed login waits for
a second, its settlement, since its delay and lock-out depend on the counts.

While Redis does not answer (down, unreachable, failing over) the store counts on the node
(the supervisor's state, as without Redis), logged once: limits are the node's, `who` and
`kick` reach this node only, affinity is this node's own choice. No login is refused or
called a wrong password because of it. The heartbeat keeps asking; when Redis answers again,
the worker writes what it holds again (its leases, its users' assignments, its sessions in
the registry: a Redis that restarted empty is whole again) and uses Redis from then on.

Every worker is an owner, `node/boot/pid`: its leases and sessions are kept under that name
and live `lease` seconds past its last heartbeat (every lease/4), so a node that dies frees
its users' sessions within one lease (the surviving nodes' heartbeats reap it), and the
supervisor reaps a worker that exits at once (clusternode.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import json
import logging
import os
import secrets
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mailgate import redisconn
from mailgate.backend import pools as P
from mailgate.config import Settings
from mailgate.nodestate import Admission, Attempt, LeaseRefusal, Settled, Verdict
from mailgate.redisstore import (
    Claim,
    LoginRequest,
    RedisState,
    RedisUnavailable,
    ThrottleParams,
    lease_keys,
)
from mailgate.statestore import Store

if TYPE_CHECKING:
    from mailgate.affinity import Affinity
    from mailgate.backend.routing import BackendRouter
    from mailgate.session import Sessions

log = logging.getLogger("mailgate.cluster")

# While Redis does not answer, it is asked again this often (by the heartbeat).
PROBE_INTERVAL = 1.0
# The registry behind `mailgate who` on other nodes is this far behind at most.
REGISTRY_INTERVAL = 1.0
# Affinity records a heartbeat refreshes at most (the rest at the next one).
REFRESH_BATCH = 2000
# Writes of a resync at most, while sessions that end during a write make it stale.
RESYNC_ROUNDS = 3

_boot = secrets.token_hex(3)


def node_name(settings: Settings) -> str:
    return settings.cluster.node_name or socket.gethostname()


def owner_of(settings: Settings, pid: int) -> str:
    """The owner name of worker `pid` of this node. `_boot` is made once per supervisor
    (workers are forked from it), so a restarted node never takes a dead one's leases."""
    return f"{node_name(settings)}/{_boot}/{pid}"


def node_prefix(settings: Settings) -> str:
    """What every owner name of this node (this boot) starts with."""
    return f"{node_name(settings)}/{_boot}/"


def new_boot() -> None:
    """A supervisor starting: a fresh boot id for its workers' owner names."""
    global _boot
    _boot = secrets.token_hex(3)


def throttle_params(settings: Settings) -> ThrottleParams:
    t = settings.throttle
    return ThrottleParams(
        t.lockout_after,
        int(t.lockout * 1000),
        int(t.window * 1000),
        t.concurrent_per_user,
        t.concurrent_per_ip,
        t.per_ip_users,
    )


@dataclass(slots=True, eq=False)
class Ticket:
    """What one login attempt got from Redis, for the rest of the login to use."""

    id: str
    attempt: Attempt | None
    on_redis: bool
    lease: tuple[str | None, str, bool] | None = None  # the leases taken at begin
    lease_status: str = ""  # "" not asked, "ok", or the limit that refused
    lease_used: bool = False
    claims: dict[tuple[str, str], Claim] = field(default_factory=dict)
    held: set[tuple[str, str]] = field(default_factory=set)  # claims with a pending entry
    user_failures: int = 0  # the user's failures when the attempt began


TICKET: contextvars.ContextVar[Ticket | None] = contextvars.ContextVar(
    "mailgate_login_ticket", default=None
)
LeaseKey = tuple[str | None, str, bool]


class ClusterStore:
    """The worker's Store over Redis, with the node's store behind it (module docstring)."""

    def __init__(self, redis: RedisState, node: Store, settings: Settings) -> None:
        self.redis = redis
        self.node = node
        self.settings = settings
        self.throttle = throttle_params(settings)
        limits = settings.limits
        self.limits = (limits.per_user, limits.per_user_ip, limits.per_ip)
        self.leases_on = any(self.limits)
        self.lease_ms = int(settings.cluster.lease * 1000)
        # A login's reservation and claims live no longer than a login may take.
        self.deadline_ms = int(max(p.login_timeout for p in settings.protocols.values()) * 1000)
        self.affinity: Affinity | None = None
        self.healthy = False
        self._ids = itertools.count(1)
        self.held_redis: Counter[LeaseKey] = Counter()
        self.held_node: Counter[LeaseKey] = Counter()
        self.sessions: Counter[tuple[str, str, str]] = Counter()  # affinity (pool, user, member)
        self._refreshed: dict[tuple[str, str, str], float] = {}
        self.on_conflict: Callable[[str, str, str], None] = lambda pool, user, member: None
        # While a resync writes what this worker holds, leases are neither taken nor given
        # back (they wait in `_after_resync`), and it waits for the Redis calls under way.
        self.resyncing = False
        self._resynced = asyncio.Event()
        self._asking = 0
        redis.on_error = self._down

    # --- health -------------------------------------------------------------------------------

    def _down(self, error: BaseException) -> None:
        if self.healthy:
            log.warning(
                "Redis unavailable (%s): counting on this node (node-local limits, no "
                "cross-node who/kick) until it answers",
                error,
            )
            self.healthy = False

    @contextlib.contextmanager
    def _asking_redis(self) -> Iterator[None]:
        """Around a login's Redis call: a resync waits for those under way (`_calls_done`)."""
        self._asking += 1
        try:
            yield
        finally:
            self._asking -= 1

    def _ticket(self, attempt: Attempt | None, on_redis: bool) -> Ticket:
        ticket = Ticket(f"{self.redis.owner}:{next(self._ids)}", attempt, on_redis)
        TICKET.set(ticket)
        return ticket

    # --- Store: the login budget --------------------------------------------------------------

    async def begin(self, attempt: Attempt) -> Admission:
        if self.resyncing:
            await self._after_resync()
        if not self.healthy:
            self._ticket(attempt, False)
            return await self.node.begin(attempt)
        user = attempt.user or ""
        claims = self.affinity.requests(user) if self.affinity is not None and user else []
        ticket = Ticket(f"{self.redis.owner}:{next(self._ids)}", attempt, True)
        request = LoginRequest(
            ticket=ticket.id,
            deadline_ms=self.deadline_ms,
            throttle=self.throttle,
            ip=attempt.ip,
            user=user,
            trusted=attempt.trusted,
            limits=self.limits if self.leases_on else None,
            lease_user=user,
            claims=claims,
        )
        try:
            with self._asking_redis():
                answer = await self.redis.login(request)
        except RedisUnavailable as e:
            self._down(e)
            self._ticket(attempt, False)
            return await self.node.begin(attempt)
        TICKET.set(ticket)
        ticket.user_failures = answer.user_failures
        if answer.lease:
            ticket.lease_status = answer.lease
            ticket.lease = (attempt.user, attempt.ip, attempt.trusted)
            if answer.lease == "ok":
                self.held_redis[ticket.lease] += 1
        self._take_claims(ticket, answer.claims)
        verdict = Verdict(answer.verdict)
        return Admission(
            verdict, answer.ip_failures, answer.user_failures, answer.spraying, answer.locked_for
        )

    def _take_claims(self, ticket: Ticket, claims: Iterable[Claim]) -> None:
        for claim in claims:
            key = (claim.pool, claim.user)
            ticket.claims[key] = claim
            if claim.status == "ok":
                ticket.held.add(key)
                if self.affinity is not None:
                    self.affinity.remember(claim)

    async def end(self, attempt: Attempt, outcome: str, identity: str | None) -> Settled:
        if self.resyncing:
            await self._after_resync()
        ticket = TICKET.get()
        if ticket is None or ticket.attempt is not attempt or not ticket.on_redis:
            return await self.node.end(attempt, outcome, identity)
        lease: LeaseKey | None = None
        claims: tuple[tuple[str, str], ...] = ()
        if outcome != "ok":  # the attempt's leases and claims go back with it
            lease, ticket.lease, ticket.lease_status = self._taken_lease(ticket), None, ""
            claims, ticket.held = tuple(ticket.held), set()
        if not self.healthy:  # Redis went away during the login: Redis is told at resync
            return await self.node.end(attempt, outcome, identity)
        if outcome == "ok" and identity is None and not ticket.user_failures:
            self.redis.settled_later(ticket.id, attempt.ip, attempt.user or "")
            return Settled(0, 0)
        if outcome != "failed" and identity is None:
            leases = lease_keys(*lease) if lease is not None else []
            self.redis.settle_later(
                ticket.id, attempt.ip, attempt.user or "", outcome, leases, claims
            )
            return Settled(0, 0)
        args = (ticket.id, self.throttle, attempt.ip, attempt.user or "", attempt.trusted,
                outcome, identity or "", lease, claims)  # fmt: skip
        try:
            with self._asking_redis():
                s = await self.redis.settle(*args)
        except RedisUnavailable as e:
            self._down(e)
            return await self.node.end(attempt, outcome, identity)
        return Settled(s.ip_failures, s.user_failures, s.locked, s.spraying, s.identity_locked)

    def _taken_lease(self, ticket: Ticket) -> LeaseKey | None:
        """The begin's leases, no longer this ticket's (counted as given back)."""
        if ticket.lease_status != "ok" or ticket.lease is None:
            return None
        self.held_redis[ticket.lease] -= 1
        if self.held_redis[ticket.lease] <= 0:
            del self.held_redis[ticket.lease]
        return ticket.lease

    # --- Store: session leases -----------------------------------------------------------------

    async def acquire(self, user: str | None, ip: str, trusted: bool) -> LeaseRefusal | None:
        if self.resyncing:
            await self._after_resync()
        key = (user, ip, trusted)
        ticket = TICKET.get()
        if ticket is not None and ticket.on_redis and ticket.lease_status and not ticket.lease_used:
            ticket.lease_used = True
            if ticket.lease == key:
                if ticket.lease_status == "ok":
                    return None  # taken at begin, in the login's one round trip
                self._drop_claims(ticket)
                return LeaseRefusal(ticket.lease_status)
            # The directory's name for the user is another: those leases go back.
            taken = self._taken_lease(ticket)
            if taken is not None and self.healthy:
                self.redis.release_later(lease_keys(*taken))
        if not self.healthy:
            return await self._acquire_on_node(key)
        request = LoginRequest(
            ticket=ticket.id if ticket is not None else f"{self.redis.owner}:{next(self._ids)}",
            deadline_ms=self.deadline_ms,
            throttle=None,
            ip=ip,
            user="",
            trusted=trusted,
            limits=self.limits,
            lease_user=user or "",
        )
        try:
            with self._asking_redis():
                answer = await self.redis.login(request)
        except RedisUnavailable as e:
            self._down(e)
            return await self._acquire_on_node(key)
        if answer.lease == "ok":
            self.held_redis[key] += 1
            return None
        if ticket is not None:
            self._drop_claims(ticket)
        return LeaseRefusal(answer.lease)

    async def _acquire_on_node(self, key: LeaseKey) -> LeaseRefusal | None:
        refusal = await self.node.acquire(*key)
        if refusal is None:
            self.held_node[key] += 1
        return refusal

    async def release(self, user: str | None, ip: str, trusted: bool) -> None:
        if self.resyncing:
            await self._after_resync()
        key = (user, ip, trusted)
        if self.held_node[key] > 0:
            self.held_node[key] -= 1
            if not self.held_node[key]:
                del self.held_node[key]
            await self.node.release(user, ip, trusted)
            return
        if self.held_redis[key] > 0:
            self.held_redis[key] -= 1
            if not self.held_redis[key]:
                del self.held_redis[key]
            if self.healthy:
                self.redis.release_later(lease_keys(user, ip, trusted))
            return
        self.held_node.pop(key, None)
        self.held_redis.pop(key, None)
        await self.node.release(user, ip, trusted)  # not counted here: a no-op there too

    # --- affinity -----------------------------------------------------------------------------

    async def claim(self, affinity: Affinity, pool: P.Pool, user: str) -> Claim | None:
        """The user's member in `pool`: from the login's ticket, or one round trip; None while
        Redis does not answer."""
        ticket = TICKET.get()
        if ticket is not None and ticket.on_redis:
            found = ticket.claims.get((pool.name, user))
            if found is not None:
                return found
        if not self.healthy:
            return None
        if ticket is None or not ticket.on_redis:
            ticket = self._ticket(None, True)
        request = LoginRequest(
            ticket=ticket.id,
            deadline_ms=self.deadline_ms,
            throttle=None,
            ip="",
            user="",
            trusted=True,
            limits=None,
            lease_user="",
            claims=[affinity.request(pool, user, affinity.router.clock())],
        )
        try:
            with self._asking_redis():
                answer = await self.redis.login(request)
        except RedisUnavailable as e:
            self._down(e)
            return None
        self._take_claims(ticket, answer.claims)
        return answer.claims[0]

    def keep_claims(self, pool: str | None) -> None:
        """The login goes to `pool` (None: no affinity pool): other claims go back."""
        ticket = TICKET.get()
        if ticket is None or not ticket.held:
            return
        others = [key for key in ticket.held if key[0] != pool]
        if others and self.healthy:
            self.redis.drop_claims_later(ticket.id, others)
        ticket.held.difference_update(others)

    def drop_claim(self, pool: str, user: str) -> None:
        ticket = TICKET.get()
        if ticket is not None and (pool, user) in ticket.held:
            ticket.held.discard((pool, user))
            if self.healthy:
                self.redis.drop_claims_later(ticket.id, [(pool, user)])

    def _drop_claims(self, ticket: Ticket) -> None:
        if ticket.held and self.healthy:
            self.redis.drop_claims_later(ticket.id, list(ticket.held))
        ticket.held.clear()

    def session_started(self, pool: P.Pool, user: str, member: str) -> Callable[[], None]:
        """A relayed session began on an affinity member; call the result when it ends."""
        key = (pool.name, user, member)
        expire_ms = int(pool.settings.user_expire * 1000)
        self.sessions[key] += 1
        self._refreshed.setdefault(key, time.monotonic())
        ticket = TICKET.get()
        if self.healthy:
            tid = ticket.id if ticket is not None else ""
            held = list(ticket.held) if ticket is not None else []
            if ticket is not None:
                ticket.held.clear()
            self.redis.session_start_later(
                tid, pool.name, user, member, expire_ms, held, self._conflict
            )

        def ended() -> None:
            self.sessions[key] -= 1
            if self.sessions[key] <= 0:
                del self.sessions[key]
                self._refreshed.pop(key, None)
            if self.healthy:
                self.redis.session_end_later(pool.name, user, member, expire_ms)

        return ended

    def _conflict(self, pool: str, user: str, member: str, assigned: str) -> None:
        log.warning(
            "affinity: %s has sessions on %s/%s here but is assigned to %s: ending them",
            user,
            pool,
            member,
            assigned,
        )
        self.on_conflict(pool, user, member)

    # --- recovery -----------------------------------------------------------------------------

    def due_refresh(self, expires: dict[str, float]) -> list[tuple[str, str, str, int]]:
        """Affinity records of this worker's sessions that a heartbeat should keep alive."""
        now = time.monotonic()
        due = []
        for key, last in self._refreshed.items():
            expire = expires.get(key[0], 900.0)
            if now - last >= expire / 3:
                due.append((*key, int(expire * 1000)))
                self._refreshed[key] = now
                if len(due) >= REFRESH_BATCH:
                    break
        return due

    async def resync(self, expires: dict[str, float]) -> None:
        """Write what this worker holds again (Redis lost it, or was away), and count in Redis
        from then on.

        Redis is told the whole of it, replacing what it had of this owner, so what the worker
        holds must not change under the write: a session that ended while the snapshot was on
        its way would stay counted in Redis (its release went to the node), one that began
        would be missing. So leases wait at `_after_resync` meanwhile, the Redis calls and the
        batch already under way are let finish first, and the write is made again while the
        sessions that end or start anyway (their relays close whenever) changed it."""
        self.resyncing = True
        self._resynced.clear()
        moved: list[tuple[LeaseKey, int]] = []
        conflicts: list[tuple[str, str, str]] = []
        try:
            await self._calls_done()
            for _ in range(RESYNC_ROUNDS):
                leases, affinity = self._holdings(expires)
                conflicts = await self.redis.resync(self.lease_ms, leases, affinity)
                if self._holdings(expires) == (leases, affinity):
                    break
            # What was counted on the node during the outage is now counted in Redis.
            moved = list(self.held_node.items())
            self.held_node.clear()
            for key, n in moved:
                self.held_redis[key] += n
            self.healthy = True
        finally:
            self.resyncing = False
            self._resynced.set()
        for key, n in moved:
            for _ in range(n):
                await self.node.release(*key)
        for pool, user, assigned in conflicts:
            for p, u, member in list(self.sessions):
                if (p, u) == (pool, user):
                    self._conflict(pool, user, member, assigned)

    def _holdings(
        self, expires: dict[str, float]
    ) -> tuple[dict[str, int], list[tuple[str, str, str, int]]]:
        """This worker's leases and affinity records, as a resync writes them."""
        leases: Counter[str] = Counter()
        for held in (self.held_redis, self.held_node):
            for key, n in held.items():
                for lk in lease_keys(*key):
                    leases[lk] += n
        affinity = []
        for (pool, user, member), n in self.sessions.items():
            leases[f"a|{pool}|{user}"] += n
            affinity.append((pool, user, member, int(expires.get(pool, 900.0) * 1000)))
        return dict(leases), affinity

    async def _calls_done(self) -> None:
        """Until no login waits for Redis and no batch is queued or on its way (bounded: each
        is bounded by the client's timeout, and a stuck one must not stall recovery)."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.settings.cluster.timeout + 1.0
        while (self._asking or not self.redis.idle()) and loop.time() < give_up:
            await asyncio.sleep(0.005)

    async def _after_resync(self) -> None:
        while self.resyncing:
            await self._resynced.wait()


class WorkerCluster:
    """The cluster's part of one worker: its store, heartbeat and registry (module doc)."""

    def __init__(self, settings: Settings, node: Store) -> None:
        self.settings = settings
        target = redisconn.parse_url(settings.cluster.redis_url or "")
        self.where = target.describe()
        client = redisconn.client(target, settings.cluster.timeout)
        self.owner = owner_of(settings, os.getpid())
        self.redis = RedisState(client, settings.cluster.prefix, self.owner)
        self.store = ClusterStore(self.redis, node, settings)
        self.expires = {p.name: p.user_expire for p in settings.pools if p.affinity}
        self.sessions: Sessions | None = None
        self.router: BackendRouter | None = None
        self._published: dict[Any, str] = {}  # relay -> session id in the registry
        self._sids = itertools.count(1)
        self._replace_registry = True
        self._tasks: list[asyncio.Task[None]] = []
        self.reaped = 0

    async def start(self) -> None:
        """Say hello to Redis (bounded by `[cluster] timeout`): up, or degraded from the
        start; then keep the heartbeat."""
        await self._beat(starting=True)
        if self.store.healthy:
            log.debug("Redis (%s): connected as %s", self.where, self.owner)
        else:
            log.warning("Redis (%s) does not answer at start: counting on this node", self.where)
        self._tasks.append(asyncio.ensure_future(self._heartbeat_loop()))

    def attach(self, router: BackendRouter, sessions: Sessions) -> None:
        from mailgate.affinity import install

        self.router, self.sessions = router, sessions
        self.store.affinity = install(router, self.store)
        self.store.on_conflict = self._kick_split
        self._tasks.append(asyncio.ensure_future(self._registry_loop()))

    def _kick_split(self, pool: str, user: str, member: str) -> None:
        if self.sessions is not None:
            self.sessions.kick(user, f"{pool}/{member}")

    # --- the heartbeat ------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        interval = max(0.2, self.settings.cluster.lease / 4)
        while True:
            await asyncio.sleep(interval if self.store.healthy else PROBE_INTERVAL)
            with contextlib.suppress(Exception):
                await self._beat()

    async def _beat(self, starting: bool = False) -> None:
        store = self.store
        was_healthy = store.healthy
        if not store.healthy and not starting:
            await self.redis.reset()  # connections from before the outage are likely dead
        try:
            refresh = store.due_refresh(self.expires) if store.healthy else []
            unknown, reaped, leases = await self.redis.heartbeat(store.lease_ms, refresh)
            if unknown or not store.healthy:
                await store.resync(self.expires)
                self._replace_registry = True
        except RedisUnavailable as e:
            store._down(e)
            return
        if reaped:
            self.reaped += reaped
            log.info("cluster: %d owners stopped their heartbeat; %d leases freed", reaped, leases)
        if not was_healthy and not starting:
            log.warning("Redis (%s) is back: counting in the cluster again", self.where)
        store.healthy = True

    # --- the registry -------------------------------------------------------------------------

    async def _registry_loop(self) -> None:
        while True:
            await asyncio.sleep(REGISTRY_INTERVAL)
            with contextlib.suppress(Exception):
                await self.publish()

    async def publish(self) -> None:
        """Bring this worker's sessions in the registry up to date (one pipeline)."""
        if self.sessions is None or not self.store.healthy:
            return
        relays = self.sessions.relays
        replace = self._replace_registry
        if replace:
            self._published.clear()
        gone = [sid for relay, sid in self._published.items() if relay not in relays]
        for relay in [r for r in self._published if r not in relays]:
            del self._published[relay]
        added = {}
        node = node_name(self.settings)
        for relay, record in relays.items():
            if relay not in self._published:
                sid = f"{os.getpid()}.{next(self._sids)}"
                self._published[relay] = sid
                added[sid] = json.dumps({**record.describe(), "node": node}, separators=(",", ":"))
        if not (added or gone or replace):
            return
        try:
            await self.redis.publish_registry(added, gone, self.store.lease_ms, replace)
            self._replace_registry = False
        except RedisUnavailable as e:
            self.store._down(e)
            self._replace_registry = True

    # --- the supervisor's requests --------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        c = self.redis.counters
        return {
            "redis_up": int(self.store.healthy),
            "redis_logins": c.logins,
            "redis_round_trips": c.awaited,
            "redis_batches": c.batches,
            "redis_batched": c.batched,
            "redis_dropped": c.dropped,
        }

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        if self.store.healthy:
            with contextlib.suppress(Exception):
                await asyncio.sleep(0)  # the last sessions' releases are queued: send them
                await self.redis.reap(self.owner)  # what is left goes now, not in a lease
        await self.redis.close()


async def start_worker(settings: Settings, node: Store) -> WorkerCluster | None:
    """The worker's cluster part, started (None without `[cluster] redis_url`)."""
    if not settings.cluster.redis_url:
        return None
    cluster = WorkerCluster(settings, node)
    await cluster.start()
    return cluster


def attach(cluster: WorkerCluster | None, router: BackendRouter, sessions: Sessions) -> None:
    """After the worker's router exists: affinity pools get their hook (with the cluster's
    store, or this node alone without Redis), and the registry starts."""
    if cluster is not None:
        cluster.attach(router, sessions)
        return
    from mailgate.affinity import install

    install(router, None)


def worker_command(authenticator: object, op: str, args: list[Any]) -> Any:
    """`cluster.forget` from the supervisor: a user, domain or mailstore changed in the
    directory (published by the admin commands); the route cache forgets what it concerns."""
    if op != "cluster.forget":
        raise ValueError(f"unknown request {op!r}")
    scope = args[0] if args and isinstance(args[0], dict) else {}
    forget = getattr(authenticator, "forget", None)
    if callable(forget) and (scope.get("user") or scope.get("domain")):
        return forget(user=scope.get("user"), domain=scope.get("domain"))
    flush = getattr(authenticator, "flush", None)
    if callable(flush):
        flush()
    return True
