"""A short-lived cache of successful logins: an Authenticator that wraps another one.

A mail client opens several connections at once and reconnects all day; each would cost a
database round trip and a password hash (tens of milliseconds of CPU for ARGON2ID). Route
decisions are kept for `ttl` seconds under a key made of the user, protocol, method and a
keyed BLAKE2b of the password, so the cache never holds a password or an unkeyed hash of one
(the key is random per instance and never leaves memory).

Only Route is cached: a Reject must reach the throttle every time, and a TempFail must be
retried. CRAM-MD5 and APOP are not cached at all: their challenge is new in every session, so
an entry could never be hit again. Concurrent misses with the same key share one lookup.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable

from mailgate.auth import Authenticator
from mailgate.values import ClientInfo, Credentials, Decision, Method, Route

Clock = Callable[[], float]
CacheKey = tuple[str, str, str, bytes]

# Methods whose secret can be presented again as it is: the others carry a one-time challenge.
CACHEABLE = frozenset({Method.PLAIN, Method.LOGIN})
DIGEST_SIZE = 32  # BLAKE2b-256: collisions are out of reach, and it is the keyed-MAC size


class Cached:
    """Authenticator wrapper: remembers Route decisions for `ttl` seconds, at most `size`."""

    def __init__(
        self, inner: Authenticator, ttl: float, size: int, clock: Clock = time.monotonic
    ) -> None:
        self._inner = inner
        self._ttl = ttl
        self._size = size
        self._clock = clock
        self._key = secrets.token_bytes(hashlib.blake2b.MAX_KEY_SIZE)
        # Least recently used first; values are (route, expiry on `clock`).
        self._entries: OrderedDict[CacheKey, tuple[Route, float]] = OrderedDict()
        self._pending: dict[tuple[int, CacheKey], asyncio.Future[Decision]] = {}
        self._generation = 0  # bumped by flush(), so a lookup in flight cannot refill

    async def authenticate(self, creds: Credentials, client: ClientInfo) -> Decision:
        if self._ttl <= 0 or self._size <= 0 or creds.method not in CACHEABLE:
            return await self._inner.authenticate(creds, client)
        key = self._cache_key(creds, client)
        hit = self._get(key)
        if hit is not None:
            return hit
        # Keyed by generation too: a login after flush() does not join a lookup from before it.
        slot = (self._generation, key)
        pending = self._pending.get(slot)
        if pending is None:
            pending = asyncio.ensure_future(self._fill(key, self._generation, creds, client))
            self._pending[slot] = pending
        # shield: one waiter giving up (its client left) does not cancel the others' lookup.
        return await asyncio.shield(pending)

    def flush(self) -> None:
        """Forget every entry (SIGHUP, an admin changed a password or a route)."""
        self._entries.clear()
        self._generation += 1

    def __len__(self) -> int:
        return len(self._entries)

    async def close(self) -> None:
        self.flush()
        await self._inner.close()

    def _get(self, key: CacheKey) -> Route | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        route, expires = entry
        if expires <= self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return route

    async def _fill(
        self, key: CacheKey, generation: int, creds: Credentials, client: ClientInfo
    ) -> Decision:
        try:
            decision = await self._inner.authenticate(creds, client)
        finally:
            self._pending.pop((generation, key), None)
        if isinstance(decision, Route) and generation == self._generation:
            self._entries[key] = (decision, self._clock() + self._ttl)
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)
        return decision

    def _cache_key(self, creds: Credentials, client: ClientInfo) -> CacheKey:
        mac = hashlib.blake2b(key=self._key, digest_size=DIGEST_SIZE)
        for part in (creds.secret.reveal(), creds.salt or ""):
            data = part.encode("utf-8", "surrogateescape")
            mac.update(len(data).to_bytes(8, "big"))  # length-prefixed: no ambiguous joins
            mac.update(data)
        return (creds.user, client.protocol, creds.method.value, mac.digest())
