"""The cluster's shared state in Redis, as typed calls over the scripts of redislua.py.

`RedisState` is one per process (each worker, the supervisor, the CLI), over one redis-py
asyncio client and its connection pool. Two kinds of calls:

- awaited, one round trip each: `login` (the attempt's reservation, its session's leases and
  the user's affinity member, all in one script), `settle` of a failed attempt (the delay and
  the lock-out depend on the counts), the heartbeat, the operator's commands;
- batched, not waited for: the settlement of a successful attempt, the start and end of a
  session, a lease given back. They are queued for BATCH_DELAY and sent together, as one
  script (under load many logins share one), so they cost a login no wait and Redis one
  round trip per batch.

Every failure of Redis (down, slow, failing over, read-only) raises `RedisUnavailable`, or for
a batch calls `on_error`: the caller counts locally meanwhile (cluster.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mailgate.redisconn import Keys, unavailable_errors
from mailgate.redislua import SCRIPTS

log = logging.getLogger("mailgate.cluster")

# Operations one batch carries at most; more wait for the next (a pipeline of thousands of
# scripts would hold Redis for milliseconds, and the buffer here for as long).
MAX_BATCH = 500
# How long the first operation of a batch waits for others to join it: the batch's round trip
# costs a worker far more CPU (redis-py) than the Lua costs Redis, and nothing waits for it
# (a lease given back is seen this much later, which no client can tell).
BATCH_DELAY = 0.01
# Operations waiting at most, when Redis is slow: past this they are dropped (and the state
# written again once Redis answers: cluster.py's resync), never held without bound.
MAX_QUEUED = 20_000


class RedisUnavailable(Exception):
    """Redis did not answer (or answered with an error): count locally for now."""


@dataclass(frozen=True, slots=True)
class ThrottleParams:
    lockout_after: int
    lockout_ms: int
    window_ms: int
    concurrent_per_user: int
    concurrent_per_ip: int
    per_ip_users: int


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    """One affinity pool for one user: the members this node would assign the user to, best
    first, and the members still serving the users they have (not down)."""

    pool: str
    user: str
    expire_ms: int
    assignable: tuple[str, ...]
    serving: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Claim:
    pool: str
    user: str
    member: str  # "" when none
    status: str  # ok, moving (a move is under way), busy (held elsewhere), none (no member)


@dataclass(frozen=True, slots=True)
class LoginRequest:
    ticket: str
    deadline_ms: int  # how long the attempt's reservation and claims live at most
    throttle: ThrottleParams | None  # None: no reservation (throttle off, or already begun)
    ip: str
    user: str
    trusted: bool
    limits: tuple[int, int, int] | None  # per_user, per_user_ip, per_ip; None: no lease
    lease_user: str
    claims: Sequence[ClaimRequest] = ()


@dataclass(frozen=True, slots=True)
class LoginAnswer:
    verdict: str  # allowed, locked, budget, concurrent, moving
    ip_failures: int
    user_failures: int
    spraying: bool
    locked_for: float  # seconds
    lease: str  # "" not asked, "ok" taken, or the limit that refused it
    claims: tuple[Claim, ...] = ()


@dataclass(frozen=True, slots=True)
class SettleAnswer:
    ip_failures: int
    user_failures: int
    locked: tuple[str, ...]
    spraying: bool
    identity_locked: bool


@dataclass(slots=True)
class _Op:
    name: str  # an operation of the BATCH script
    args: list[Any]
    done: Callable[[Any], None] | None = None


@dataclass
class Counters:
    """What this process asked of Redis: the figures behind `mailgate stats` and the bench."""

    awaited: int = 0  # round trips something waited for
    batches: int = 0  # pipelines of batched operations
    batched: int = 0  # operations in them
    dropped: int = 0  # operations given up (Redis unavailable)
    logins: int = 0  # login scripts (the one round trip of a login)
    extra: dict[str, int] = field(default_factory=dict)


class RedisState:
    def __init__(
        self,
        client: Any,
        prefix: str,
        owner: str,
        *,
        clock: Callable[[], int | None] = lambda: None,
        on_error: Callable[[BaseException], None] = lambda e: None,
    ) -> None:
        self.client = client
        self.keys = Keys(prefix)
        self.owner = owner
        self.clock = clock  # tests: a fixed "now" in ms; None: Redis's own clock
        self.on_error = on_error
        self._errors = unavailable_errors()
        self._shas: dict[str, str] = {}
        self._queue: list[_Op] = []
        self._flushing = False
        self._scheduled = False
        self._background: set[asyncio.Future[Any]] = set()
        self.counters = Counters()

    # --- plumbing -----------------------------------------------------------------------------

    def _now(self) -> str:
        now = self.clock()
        return "" if now is None else str(now)

    async def load_scripts(self) -> None:
        """SCRIPT LOAD every script (a pipeline: one round trip). Callers that race here
        each load them: harmless, and `_shas` is only ever complete or empty."""
        try:
            if hasattr(self.client, "get_nodes"):  # Redis Cluster: loaded on every node
                shas = [await self.client.script_load(source) for source in SCRIPTS.values()]
            else:
                pipe = self.client.pipeline(transaction=False)
                for source in SCRIPTS.values():
                    pipe.script_load(source)
                shas = await pipe.execute()
        except self._errors as e:
            raise RedisUnavailable(f"{type(e).__name__}: {e}") from None
        self._shas = {name: _text(sha) for name, sha in zip(SCRIPTS, shas, strict=True)}

    async def run(self, script: str, *args: Any) -> Any:
        """One script, waited for: one round trip (two after Redis lost the scripts)."""
        from redis.exceptions import NoScriptError

        self.counters.awaited += 1
        argv = [self.keys.base, self._now(), *args]
        try:
            if not self._shas:
                await self.load_scripts()
            try:
                return await self.client.evalsha(self._shas[script], 1, self.keys.live, *argv)
            except NoScriptError:  # Redis restarted: load them again, once
                await self.load_scripts()
                return await self.client.evalsha(self._shas[script], 1, self.keys.live, *argv)
        except RedisUnavailable:
            raise
        except self._errors as e:
            raise RedisUnavailable(f"{type(e).__name__}: {e}") from None

    def later(self, op: str, *args: Any, done: Callable[[Any], None] | None = None) -> None:
        """Queue one operation of the BATCH script (redislua.py) for the next batch."""
        if len(self._queue) >= MAX_QUEUED:
            self.counters.dropped += 1
            return
        self._queue.append(_Op(op, list(args), done))
        if not self._scheduled and not self._flushing:
            self._scheduled = True
            asyncio.get_running_loop().call_later(BATCH_DELAY, self._start_flush)

    def idle(self) -> bool:
        """Nothing queued for a batch, and no batch on its way."""
        return not self._queue and not self._flushing and not self._scheduled

    def _start_flush(self) -> None:
        self._scheduled = False
        if self._flushing or not self._queue:
            return
        self._flushing = True
        task = asyncio.ensure_future(self._flush())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _flush(self) -> None:
        try:
            while self._queue:
                ops, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                try:
                    await self._send(ops)
                except RedisUnavailable as e:
                    self._give_up(ops, e)
                except self._errors as e:
                    self._give_up(ops, _unavailable(e))
        finally:
            self._flushing = False

    def _give_up(self, ops: list[_Op], error: RedisUnavailable) -> None:
        """Redis did not take a batch: what waits is dropped too (the worker writes what it
        holds again once Redis answers), and the worker counts on the node meanwhile."""
        self.counters.dropped += len(ops) + len(self._queue)
        self._queue.clear()
        self.on_error(error)

    async def _send(self, ops: list[_Op]) -> None:
        """One BATCH script for all of `ops`, in order: one round trip, not waited for."""
        from redis.exceptions import NoScriptError

        argv: list[Any] = [self.keys.base, self._now(), self.owner]
        for op in ops:
            argv += [op.name, len(op.args), *op.args]
        if not self._shas:
            await self.load_scripts()
        try:
            result = await self.client.evalsha(self._shas["batch"], 1, self.keys.live, *argv)
        except NoScriptError:
            await self.load_scripts()
            result = await self.client.evalsha(self._shas["batch"], 1, self.keys.live, *argv)
        self.counters.batches += 1
        self.counters.batched += len(ops)
        for i in range(0, len(result), 5):  # {op number, pool, user, member, assigned}
            op = ops[int(result[i]) - 1]
            if op.done is not None:
                op.done(tuple(_text(r) for r in result[i + 1 : i + 5]))

    async def close(self) -> None:
        if self._queue and not self._flushing:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._flush(), 1.0)
        for task in list(self._background):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 1.0)
        with contextlib.suppress(Exception):
            await self.client.aclose()

    # --- logins -------------------------------------------------------------------------------

    async def login(self, req: LoginRequest) -> LoginAnswer:
        self.counters.logins += 1
        t = req.throttle
        throttle_args: list[Any] = (
            ["1", t.lockout_after, t.lockout_ms, t.window_ms, t.concurrent_per_user,
             t.concurrent_per_ip, t.per_ip_users]
            if t is not None else ["0", 0, 0, 0, 0, 0, 0]
        )  # fmt: skip
        limits = req.limits
        lease_args: list[Any] = ["1", *limits] if limits is not None else ["0", 0, 0, 0]
        claim_args: list[Any] = [len(req.claims)]
        for c in req.claims:
            claim_args += [c.pool, c.expire_ms, c.user, len(c.assignable), *c.assignable]
            claim_args += [len(c.serving), *c.serving]
        answer = await self.run(
            "login",
            self.owner,
            req.ticket,
            req.deadline_ms,
            *throttle_args,
            req.ip,
            req.user,
            "1" if req.trusted else "0",
            *lease_args,
            req.lease_user,
            *claim_args,
        )
        verdict, ip_f, user_f, spray, locked_ms, lease = answer[:6]
        rest = answer[6:]
        claims = tuple(  # none when the attempt was refused
            Claim(c.pool, c.user, _text(rest[2 * i]), _text(rest[2 * i + 1]))
            for i, c in enumerate(req.claims)
            if 2 * i + 1 < len(rest)
        )
        return LoginAnswer(
            _text(verdict),
            int(ip_f),
            int(user_f),
            bool(int(spray)),
            int(locked_ms) / 1000.0,
            _text(lease),
            claims,
        )

    def _settle_args(
        self,
        ticket: str,
        t: ThrottleParams,
        ip: str,
        user: str,
        trusted: bool,
        outcome: str,
        identity: str,
        lease: tuple[str, str, bool] | None,
        claims: Sequence[tuple[str, str]],
    ) -> list[Any]:
        lease_user, lease_ip, lease_trusted = lease if lease is not None else ("", "", False)
        flat = [part for claim in claims for part in claim]
        return [
            self.owner, ticket, t.lockout_after, t.lockout_ms, t.window_ms, t.per_ip_users,
            ip, user, "1" if trusted else "0", outcome, identity,
            lease_user, lease_ip, "1" if lease_trusted else "0", len(claims), *flat,
        ]  # fmt: skip

    async def settle(self, *args: Any) -> SettleAnswer:
        """Settle an attempt and wait for the counts (see `_settle_args` for the arguments)."""
        ip_f, user_f, locked, spray, identity_locked = await self.run(
            "settle", *self._settle_args(*args)
        )
        text = _text(locked)
        return SettleAnswer(
            int(ip_f),
            int(user_f),
            tuple(text.split(",")) if text else (),
            bool(int(spray)),
            bool(int(identity_locked)),
        )

    def settle_later(
        self,
        ticket: str,
        ip: str,
        user: str,
        outcome: str,
        leases: Sequence[str] = (),
        claims: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Settle a login that succeeded ("ok": the user's failures are cleared) or failed
        temporarily ("tempfail": its leases and claims go back too), without waiting."""
        flat = [part for claim in claims for part in claim]
        self.later("settle", ticket, ip, user, outcome, len(leases), *leases, *flat)

    def settled_later(self, ticket: str, ip: str, user: str) -> None:
        """A successful login of a user without failures: only its reservation goes."""
        self.later("settle", ticket, ip, user, "kept", 0)

    def release_later(self, leases: Sequence[str]) -> None:
        if leases:
            self.later("release", *leases)

    def drop_claims_later(self, ticket: str, claims: Sequence[tuple[str, str]]) -> None:
        if claims:
            self.later("claims", ticket, *[part for claim in claims for part in claim])

    def session_start_later(
        self,
        ticket: str,
        pool: str,
        user: str,
        member: str,
        expire_ms: int,
        claims: Sequence[tuple[str, str]],
        conflict: Callable[[str, str, str, str], None],
    ) -> None:
        flat = [part for claim in claims for part in claim]

        def done(result: Any) -> None:
            conflict(*result)

        self.later("start", ticket, pool, user, member, expire_ms, *flat, done=done)

    def session_end_later(self, pool: str, user: str, member: str, expire_ms: int) -> None:
        self.later("end", pool, user, member, expire_ms)

    # --- the worker's life ----------------------------------------------------------------------

    async def heartbeat(
        self, lease_ms: int, refresh: Sequence[tuple[str, str, str, int]] = ()
    ) -> tuple[bool, int, int]:
        """(Redis did not know this owner, owners reaped, their leases)."""
        flat = [part for item in refresh for part in item]
        added, reaped, leases = await self.run(
            "heartbeat", self.owner, lease_ms, len(refresh), *flat
        )
        return bool(int(added)), int(reaped), int(leases)

    async def resync(
        self,
        lease_ms: int,
        leases: dict[str, int],
        affinity: Sequence[tuple[str, str, str, int]],
    ) -> list[tuple[str, str, str]]:
        """Write what this owner holds again; the affinity records that disagree."""
        flat_leases = [part for item in leases.items() for part in item]
        flat_aff = [part for item in affinity for part in item]
        result = await self.run(
            "resync", self.owner, lease_ms, len(leases), *flat_leases, len(affinity), *flat_aff
        )
        texts = [_text(r) for r in result]
        return [(texts[i], texts[i + 1], texts[i + 2]) for i in range(0, len(texts), 3)]

    async def reap(self, owner: str) -> int:
        return int(await self.run("reap", owner))

    async def publish_registry(
        self, added: dict[str, str], removed: Sequence[str], lease_ms: int, replace: bool = False
    ) -> None:
        """The sessions of this owner for `mailgate who` on other nodes (one pipeline)."""
        key = self.keys("s", self.owner)
        self.counters.awaited += 1
        try:
            pipe = self.client.pipeline(transaction=False)
            if replace:
                pipe.delete(key)
            if removed:
                pipe.hdel(key, *removed)
            if added:
                pipe.hset(key, mapping=added)
            pipe.pexpire(key, lease_ms)
            await pipe.execute()
        except self._errors as e:
            raise RedisUnavailable(f"{type(e).__name__}: {e}") from None

    async def call(self, *command: Any) -> Any:
        """One plain command, waited for."""
        self.counters.awaited += 1
        try:
            return await self.client.execute_command(*command)
        except self._errors as e:
            raise RedisUnavailable(f"{type(e).__name__}: {e}") from None

    async def ping(self) -> None:
        await self.call("PING")

    async def reset(self) -> None:
        """Drop every pooled connection (after an outage they may all be dead: a Redis that
        restarted closed them), so the next command connects afresh."""
        pool = getattr(self.client, "connection_pool", None)
        if pool is not None:
            with contextlib.suppress(Exception):
                await pool.disconnect()


def _unavailable(e: BaseException) -> RedisUnavailable:
    return RedisUnavailable(f"{type(e).__name__}: {e}")


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return "" if value is None else str(value)


def lease_keys(user: str | None, ip: str, trusted: bool) -> list[str]:
    """The lease names of one session, as NodeState and the scripts name them."""
    keys = [f"u:{user}", f"ui:{user}|{ip}"] if user else []
    if not trusted:
        keys.append(f"i:{ip}")
    return keys
