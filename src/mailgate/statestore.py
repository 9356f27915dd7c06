"""Where a worker keeps what all workers of a node share: login budgets and session counts.

- `LocalStore`: a `NodeState` in this process (one process: tests, `mailgate auth-server`,
  and every worker's fallback);
- `RemoteStore`: the supervisor's `NodeState`, over the worker's link: one budget for all
  workers of the node and for both generations during a reload;
- `Fallback`: a shared store (the supervisor, Redis) with a local one behind it. While the
  shared store does not answer, counting goes on locally, logged once, so an outage of the
  shared store is never a refused or a "bad password" login; it recovers by itself.

Every call answers within STORE_TIMEOUT or falls back: a login never waits on a stuck store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from mailgate.link import Link, LinkError
from mailgate.nodestate import (
    Admission,
    Attempt,
    LeaseRefusal,
    NodeState,
    Settled,
    Verdict,
)

log = logging.getLogger("mailgate.state")

# The supervisor answers in microseconds; past this the store counts as unavailable and the
# local fallback decides (a login has seconds, and must never hang on the store).
STORE_TIMEOUT = 0.5


class Store(Protocol):
    async def begin(self, attempt: Attempt) -> Admission: ...

    async def end(self, attempt: Attempt, outcome: str, identity: str | None) -> Settled: ...

    async def acquire(self, user: str | None, ip: str, trusted: bool) -> LeaseRefusal | None: ...

    async def release(self, user: str | None, ip: str, trusted: bool) -> None: ...


class LocalStore:
    """The node's state in this process (worker number `worker` for its leases)."""

    def __init__(
        self, state: NodeState, worker: int = 0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.state = state
        self.worker = worker
        self.clock = clock

    async def begin(self, attempt: Attempt) -> Admission:
        return self.state.begin(attempt, self.clock())

    async def end(self, attempt: Attempt, outcome: str, identity: str | None) -> Settled:
        return self.state.end(attempt, outcome, self.clock(), identity)

    async def acquire(self, user: str | None, ip: str, trusted: bool) -> LeaseRefusal | None:
        return self.state.acquire(self.worker, user, ip, trusted)

    async def release(self, user: str | None, ip: str, trusted: bool) -> None:
        self.state.release(self.worker, user, ip, trusted)


class RemoteStore:
    """The supervisor's NodeState over this worker's link (see supervisor.py for the other
    end). The end of a successful login whose identity the directory did not change is not
    waited for: one round trip per login on the path users take; failures wait for the
    counts (a refused login is answered after a delay anyway)."""

    def __init__(self, link: Link) -> None:
        self.link = link

    async def begin(self, attempt: Attempt) -> Admission:
        answer = await self.link.request("begin", *_attempt(attempt), timeout=STORE_TIMEOUT)
        verdict, ip_failures, user_failures, spraying, locked_for = answer
        return Admission(Verdict(verdict), ip_failures, user_failures, spraying, locked_for)

    async def end(self, attempt: Attempt, outcome: str, identity: str | None) -> Settled:
        if outcome != "failed" and identity is None:
            self.link.notify("end", *_attempt(attempt), outcome, None)
            return Settled(0, 0)
        answer = await self.link.request(
            "end", *_attempt(attempt), outcome, identity, timeout=STORE_TIMEOUT
        )
        return settled_from(answer)

    async def acquire(self, user: str | None, ip: str, trusted: bool) -> LeaseRefusal | None:
        answer = await self.link.request("acquire", user, ip, trusted, timeout=STORE_TIMEOUT)
        return LeaseRefusal(answer) if answer else None

    async def release(self, user: str | None, ip: str, trusted: bool) -> None:
        self.link.notify("release", user, ip, trusted)


class Fallback:
    """`primary` while it answers, `local` while it does not; see the module docstring."""

    def __init__(self, primary: Store, local: LocalStore, name: str) -> None:
        self.primary = primary
        self.local = local
        self.name = name
        self.degraded = False

    async def begin(self, attempt: Attempt) -> Admission:
        try:
            admission = await self.primary.begin(attempt)
        except (LinkError, OSError, ConnectionError, TimeoutError) as e:
            self._down(e)
            return await self.local.begin(attempt)
        self._up()
        return admission

    async def end(self, attempt: Attempt, outcome: str, identity: str | None) -> Settled:
        try:
            return await self.primary.end(attempt, outcome, identity)
        except (LinkError, OSError, ConnectionError, TimeoutError) as e:
            self._down(e)
            return await self.local.end(attempt, outcome, identity)

    async def acquire(self, user: str | None, ip: str, trusted: bool) -> LeaseRefusal | None:
        try:
            refusal = await self.primary.acquire(user, ip, trusted)
        except (LinkError, OSError, ConnectionError, TimeoutError) as e:
            self._down(e)
            return await self.local.acquire(user, ip, trusted)
        self._up()
        return refusal

    async def release(self, user: str | None, ip: str, trusted: bool) -> None:
        try:
            await self.primary.release(user, ip, trusted)
        except (LinkError, OSError, ConnectionError, TimeoutError) as e:
            self._down(e)
        await self.local.release(user, ip, trusted)  # a no-op unless it was counted here

    def _down(self, error: BaseException) -> None:
        if not self.degraded:
            log.warning("%s unavailable (%s); counting in this process", self.name, error)
            self.degraded = True

    def _up(self) -> None:
        if self.degraded:
            log.warning("%s is back", self.name)
            self.degraded = False


def _attempt(attempt: Attempt) -> tuple[str, str | None, bool]:
    return attempt.ip, attempt.user, attempt.trusted


def attempt_from(args: list[Any]) -> Attempt:
    ip, user, trusted = args[:3]
    return Attempt(str(ip), str(user) if user is not None else None, bool(trusted))


def admission_to(admission: Admission) -> list[Any]:
    return [
        admission.verdict.value,
        admission.ip_failures,
        admission.user_failures,
        admission.spraying,
        admission.locked_for,
    ]


def settled_to(settled: Settled) -> list[Any]:
    return [
        settled.ip_failures,
        settled.user_failures,
        list(settled.locked),
        settled.spraying,
        settled.identity_locked,
    ]


def settled_from(answer: list[Any]) -> Settled:
    ip_failures, user_failures, locked, spraying, identity_locked = answer
    return Settled(ip_failures, user_failures, tuple(locked), spraying, identity_locked)
