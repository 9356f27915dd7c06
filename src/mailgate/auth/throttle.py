"""Brute-force throttling: an Authenticator that wraps another one.

Failures are counted per client IP (IPv6 per /64, what one subscriber gets) and per user name
(normalised) within `window` seconds of the first failure. The first `free` failures cost
nothing; after that each rejected login is answered after a delay that doubles from
`base_delay` up to `max_delay` (`Reject.wait`: the session driver or nginx sleeps it). Above
`lockout_after` failures the IP or the user is refused for `lockout` seconds without asking the
inner authenticator, so a correct password cannot slip through a lock-out.

The wrapper never learns whether a user exists: it sees Reject, the same for an unknown user
and a wrong password, and it answers both the same way. TempFail (an outage) is not counted.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, Protocol, TypeVar

from mailgate import names
from mailgate.addresses import subscriber
from mailgate.auth import Authenticator
from mailgate.config import ThrottleSettings
from mailgate.values import ClientInfo, Credentials, Decision, Method, Reject, Route, TempFail

log = logging.getLogger("mailgate.throttle")

T = TypeVar("T")
Clock = Callable[[], float]

# Keys a MemoryFailureStore holds at most: an entry is ~150 bytes, so ~15 MB. A flood of fresh
# source addresses evicts the oldest windows first, i.e. the slowest guessers.
DEFAULT_MAX_KEYS = 100_000
# Redis answers in well under a millisecond on a LAN; past this a login goes on with the local
# counters rather than wait (the whole login has a few seconds).
REDIS_TIMEOUT = 0.5
MAX_DOUBLINGS = 60  # 2**60 * any sane base_delay is past max_delay; keeps the float finite


class FailureStore(Protocol):
    """Failure counters and lock-outs. `until` values are on the Throttled instance's clock."""

    async def record_failure(self, key: str) -> int:
        """Count one failure; return the failures in the current window, this one included."""
        ...

    async def count(self, key: str) -> int: ...

    async def reset(self, key: str) -> None: ...

    async def locked_until(self, key: str) -> float:
        """When the lock-out of `key` ends, or 0.0 when there is none."""
        ...

    async def lock(self, key: str, until: float) -> None: ...

    async def close(self) -> None: ...


class _Window:
    __slots__ = ("count", "start")

    def __init__(self, start: float) -> None:
        self.start = start
        self.count = 0


class MemoryFailureStore:
    """Counters in this process, in fixed windows that start at a key's first failure."""

    def __init__(
        self, window: float, max_keys: int = DEFAULT_MAX_KEYS, clock: Clock = time.monotonic
    ) -> None:
        self._window = window
        self._max_keys = max(1, max_keys)
        self._clock = clock
        # Oldest window first: expired windows and eviction victims are at the front.
        self._failures: OrderedDict[str, _Window] = OrderedDict()
        self._locks: OrderedDict[str, float] = OrderedDict()

    async def record_failure(self, key: str) -> int:
        now = self._clock()
        self._expire(now)
        entry = self._failures.get(key)
        if entry is None:
            entry = self._failures[key] = _Window(now)
            while len(self._failures) > self._max_keys:
                self._failures.popitem(last=False)
        entry.count += 1
        return entry.count

    async def count(self, key: str) -> int:
        self._expire(self._clock())
        entry = self._failures.get(key)
        return entry.count if entry is not None else 0

    async def reset(self, key: str) -> None:
        self._failures.pop(key, None)

    async def locked_until(self, key: str) -> float:
        until = self._locks.get(key, 0.0)
        if until and until <= self._clock():
            del self._locks[key]
            return 0.0
        return until

    async def lock(self, key: str, until: float) -> None:
        self._locks.pop(key, None)
        self._locks[key] = until
        while len(self._locks) > self._max_keys:
            self._locks.popitem(last=False)

    async def close(self) -> None:
        self._failures.clear()
        self._locks.clear()

    def __len__(self) -> int:
        return len(self._failures)

    def _expire(self, now: float) -> None:
        while self._failures:
            entry = next(iter(self._failures.values()))
            if now - entry.start < self._window:
                return
            self._failures.popitem(last=False)


class RedisFailureStore:
    """Counters shared by every host through Redis: INCR on a key that expires with the window.

    Lock-outs are keys with a TTL, read back as "now + TTL" on the caller's clock, so hosts need
    not agree on the time.
    """

    def __init__(
        self,
        url: str,
        window: float,
        clock: Clock = time.monotonic,
        prefix: str = "mailgate:throttle:",
    ) -> None:
        try:
            import redis.asyncio
        except ImportError:
            raise RuntimeError("throttle.redis_url needs the 'redis' Python package") from None
        self._redis: Any = redis.asyncio.from_url(
            url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT
        )
        self._window_ms = max(1, math.ceil(window * 1000))
        self._clock = clock
        self._prefix = prefix

    async def record_failure(self, key: str) -> int:
        name = self._prefix + "fail:" + key
        # SET NX PX then INCR in one transaction: the key always has its expiry, even if this
        # process dies between the two, and INCR keeps the TTL.
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(name, 0, px=self._window_ms, nx=True)
            pipe.incr(name)
            _, count = await pipe.execute()
        return int(count)

    async def count(self, key: str) -> int:
        value = await self._redis.get(self._prefix + "fail:" + key)
        return int(value) if value is not None else 0

    async def reset(self, key: str) -> None:
        await self._redis.delete(self._prefix + "fail:" + key)

    async def locked_until(self, key: str) -> float:
        ttl_ms = await self._redis.pttl(self._prefix + "lock:" + key)
        return self._clock() + ttl_ms / 1000 if ttl_ms > 0 else 0.0

    async def lock(self, key: str, until: float) -> None:
        ttl_ms = math.ceil((until - self._clock()) * 1000)
        if ttl_ms > 0:
            await self._redis.set(self._prefix + "lock:" + key, 1, px=ttl_ms)

    async def close(self) -> None:
        await self._redis.aclose()


def make_store(settings: ThrottleSettings, clock: Clock = time.monotonic) -> FailureStore:
    if settings.redis_url:
        return RedisFailureStore(settings.redis_url, settings.window, clock)
    return MemoryFailureStore(settings.window, clock=clock)


class Throttled:
    """Authenticator wrapper: delays after repeated failures, locks out past a limit."""

    def __init__(
        self,
        inner: Authenticator,
        settings: ThrottleSettings,
        store: FailureStore | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self._inner = inner
        self._settings = settings
        self._clock = clock
        self._store = store if store is not None else make_store(settings, clock)
        # Used while a shared store (Redis) is unreachable: throttling goes on per host.
        self._fallback = MemoryFailureStore(settings.window, clock=clock)
        self._degraded = False

    def flush(self) -> None:
        """Pass a cache flush (SIGUSR1) on to the wrapped authenticator; the counters stay."""
        flush = getattr(self._inner, "flush", None)
        if callable(flush):
            flush()

    async def authenticate(self, creds: Credentials, client: ClientInfo) -> Decision:
        # SMTP relay without AUTH guesses no password: the envelope decides, nothing to count.
        if not self._settings.enabled or creds.method is Method.NONE:
            return await self._inner.authenticate(creds, client)
        ip_key, user_key = _ip_key(client.ip), _user_key(creds.user)
        keys = [ip_key] if user_key is None else [ip_key, user_key]
        now = self._clock()
        for key in keys:
            if await self._locked_until(key) > now:
                return Reject(wait=self._delay(self._settings.lockout_after + 1))
        decision = await self._inner.authenticate(creds, client)
        if isinstance(decision, Route):
            if user_key is not None:
                await self._store_call(lambda s: s.reset(user_key))
            return decision
        if isinstance(decision, TempFail):
            return decision  # an outage is not the user's fault
        counts = [await self._record_failure(key) for key in keys]
        await self._lock_out(keys, counts, now)
        return replace(decision, wait=max(decision.wait, self._delay(max(counts))))

    async def close(self) -> None:
        try:
            await self._inner.close()
        finally:
            await self._store.close()
            await self._fallback.close()

    def _delay(self, failures: int) -> float:
        s = self._settings
        if failures <= s.free:
            return 0.0
        doublings = min(failures - s.free - 1, MAX_DOUBLINGS)
        return float(min(s.base_delay * 2.0**doublings, s.max_delay))

    async def _lock_out(self, keys: list[str], counts: list[int], now: float) -> None:
        limit = self._settings.lockout_after
        if limit <= 0:  # 0 turns lock-outs off
            return
        for key, count in zip(keys, counts, strict=True):
            if count > limit:
                await self._lock(key, now + self._settings.lockout)
                kind, _, name = key.partition(":")
                others = ", ".join(f"{k}={c}" for k, c in zip(keys, counts, strict=True))
                log.warning(
                    "throttle: locking out %s %r for %.0fs after %d failures (%s)",
                    kind,
                    name,
                    self._settings.lockout,
                    count,
                    others,
                )

    async def _locked_until(self, key: str) -> float:
        return await self._store_call(lambda store: store.locked_until(key))

    async def _record_failure(self, key: str) -> int:
        return await self._store_call(lambda store: store.record_failure(key))

    async def _lock(self, key: str, until: float) -> None:
        await self._store_call(lambda store: store.lock(key, until))

    async def _store_call(self, op: Callable[[FailureStore], Awaitable[T]]) -> T:
        """Run `op` on the store; if the store is down, on the local fallback."""
        try:
            result = await op(self._store)
        except Exception as e:  # the store's failure is never the client's problem
            if not self._degraded:
                log.warning("throttle: failure store unavailable (%s); counting locally", e)
                self._degraded = True
            return await op(self._fallback)
        if self._degraded:
            log.warning("throttle: failure store is back")
            self._degraded = False
        return result


def _ip_key(ip: str) -> str:
    return "ip:" + subscriber(ip)


# Every name `mailgate.names` refuses counts as this one user: no spelling the directory
# would refuse gets a budget of its own ("names" never starts a normalised user key).
REFUSED_NAMES_KEY = "names:refused"


def _user_key(user: str) -> str | None:
    """The per-user counter of a name: `names.normalise` (local part lower-cased, as Dovecot's
    %Lu), so "Victim@Example.COM " and "victim@example.com" count as one. Pass the identity the
    directory matched (Route/Reject.identity) when there is one, else the name the client sent.
    """
    if not user:
        return None
    try:
        return "user:" + names.normalise(user)
    except names.BadName:
        return REFUSED_NAMES_KEY
