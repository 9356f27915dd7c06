"""A short-lived cache of successful logins: an Authenticator that wraps another one.

A mail client opens several connections at once and reconnects all day; each would cost a
database round trip and a password hash (tens of milliseconds of CPU for ARGON2ID). Route
decisions are kept for `ttl` seconds under a key made of the normalised user name (as the
wrapped directory normalises it: `canonical_name`), protocol, method and a keyed BLAKE2b of the
password; the MAC key is random per instance and never leaves memory.

An entry holds no secret, neither the password nor an unkeyed hash of it: the route is kept
with an empty secret and a note of where its secret comes from. On a hit, the backend login
gets the password the client has just sent (its MAC matched, so it is the one the directory
accepted), or for a master-user route the mailstore's master password, which the wrapped
directory holds outside the cache (`master_secret`); if it has none now, the hit is a miss.

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
from dataclasses import dataclass, replace
from enum import Enum

from mailgate import names
from mailgate.auth import Authenticator
from mailgate.values import ClientInfo, Credentials, Decision, Method, Route, Secret

Clock = Callable[[], float]
CacheKey = tuple[str, str, str, bytes]

# Methods whose secret can be presented again as it is: the others carry a one-time challenge.
CACHEABLE = frozenset({Method.PLAIN, Method.LOGIN})
DIGEST_SIZE = 32  # BLAKE2b-256: collisions are out of reach, and it is the keyed-MAC size
NO_SECRET = Secret("")  # what a cached route holds instead of its secret


class SecretFrom(Enum):
    """Where a cached route's backend secret comes from on a hit."""

    CLIENT = "client"  # the password the client sent (checked by the key's MAC)
    MASTER = "master"  # the mailstore's master password, from the directory


@dataclass(frozen=True, slots=True)
class _Entry:
    route: Route  # with NO_SECRET
    secret_from: SecretFrom
    expires: float  # on the Cached instance's clock


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
        # Optional abilities of the wrapped directory (SqlDirectory has both): its own name
        # normalisation, so two spellings it matches as one user share an entry and two it
        # keeps apart never do; and the master passwords it keeps for master-user routes.
        self._name: Callable[[str], str] = getattr(inner, "canonical_name", names.normalise)
        self._master: Callable[[Route], Secret | None] | None = getattr(
            inner, "master_secret", None
        )
        # Least recently used first.
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()
        self._pending: dict[tuple[int, CacheKey], asyncio.Future[Decision]] = {}
        self._generation = 0  # bumped by flush(), so a lookup in flight cannot refill

    async def authenticate(self, creds: Credentials, client: ClientInfo) -> Decision:
        if self._ttl <= 0 or self._size <= 0 or creds.method not in CACHEABLE:
            return await self._inner.authenticate(creds, client)
        try:
            key = self._cache_key(creds, client)
        except names.BadName:  # refused by the directory anyway: nothing to remember
            return await self._inner.authenticate(creds, client)
        hit = self._get(key, creds)
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

    def forget(self, user: str | None = None, domain: str | None = None) -> int:
        """Forget the entries of one user, or of every user of a domain (a change published
        by the admin commands, cluster-wide); how many went. A lookup in flight for them
        does not refill."""
        if user is None and domain is None:
            return 0
        try:
            name = self._name(user) if user is not None else None
        except names.BadName:
            return 0
        suffix = "@" + domain.lower() if domain is not None else None
        gone = [
            key
            for key in self._entries
            if key[0] == name or (suffix is not None and key[0].endswith(suffix))
        ]
        for key in gone:
            del self._entries[key]
        if gone or self._pending:
            self._generation += 1
        return len(gone)

    def __len__(self) -> int:
        return len(self._entries)

    async def close(self) -> None:
        self.flush()
        await self._inner.close()

    def _get(self, key: CacheKey, creds: Credentials) -> Route | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        secret = self._secret(entry, creds) if entry.expires > self._clock() else None
        if secret is None:  # expired, or the master password is gone: look it up again
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry.route.with_secret(secret)

    def _secret(self, entry: _Entry, creds: Credentials) -> Secret | None:
        if entry.secret_from is SecretFrom.CLIENT:
            return creds.secret
        return self._master(entry.route) if self._master is not None else None

    def _secret_from(self, route: Route, creds: Credentials) -> SecretFrom | None:
        """Where a hit will get `route`'s secret; None: from nowhere we know, so not cached."""
        if route.secret.equals(creds.secret):
            return SecretFrom.CLIENT
        master = self._master(route) if self._master is not None else None
        if master is not None and route.secret.equals(master):
            return SecretFrom.MASTER
        return None

    async def _fill(
        self, key: CacheKey, generation: int, creds: Credentials, client: ClientInfo
    ) -> Decision:
        try:
            decision = await self._inner.authenticate(creds, client)
        finally:
            self._pending.pop((generation, key), None)
        if isinstance(decision, Route) and generation == self._generation:
            self._store(key, decision, creds)
        return decision

    def _store(self, key: CacheKey, route: Route, creds: Credentials) -> None:
        secret_from = self._secret_from(route, creds)
        if secret_from is None:
            return
        expires = self._clock() + self._ttl
        self._entries[key] = _Entry(replace(route, secret=NO_SECRET), secret_from, expires)
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def _cache_key(self, creds: Credentials, client: ClientInfo) -> CacheKey:
        """Raises names.BadName for a name the directory would refuse."""
        name = self._name(creds.user)
        mac = hashlib.blake2b(key=self._key, digest_size=DIGEST_SIZE)
        for part in (creds.secret.reveal(), creds.salt or ""):
            data = part.encode("utf-8", "surrogateescape")
            mac.update(len(data).to_bytes(8, "big"))  # length-prefixed: no ambiguous joins
            mac.update(data)
        return (name, client.protocol, creds.method.value, mac.digest())
