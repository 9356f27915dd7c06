"""Dummy password checks: an unknown user costs what a wrong password costs.

A login for a name the directory does not know must take as long as a login with a wrong
password, or an attacker can list the users by timing. One dummy ARGON2ID hash is not enough:
with the seed's cleartext column, `{PLAIN}`, `{SSHA}` or SHA512-CRYPT with few rounds, a real
user's check takes microseconds and the dummy tens of milliseconds, and the other way round
for a directory of bcrypt users.

So the directory tells `Dummies` the stored value of every user it looks up (`remember`), and
`Dummies` keeps only its *cost class*: the scheme tag as stored and the parameters that set the
cost (crypt rounds, bcrypt cost, argon2 m/t/p, SCRAM/PBKDF2 iterations), never the hash. For an
unknown user it picks a class among those seen in the user's domain (else in any domain, else
the directory's default scheme) and returns a dummy value of that class: a hash of a random
password made once per class. Checking a password against it does the same work, on the same
path (the event loop for cheap schemes, a thread for the rest), as checking a real user's.

When a domain mixes classes (users moving from SHA512-CRYPT to ARGON2ID), the class is chosen
by a keyed hash of the name, weighted by how often each class was seen: a name that does not
exist always costs the same, and the unknown names cost like the known ones on average.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import re
import secrets
from collections import Counter, OrderedDict

import argon2
import bcrypt
from passlib import hash as passlib_hash

from mailgate.auth import passwords
from mailgate.values import Secret

__all__ = ["Dummies", "cost_class", "make_dummy"]

# Domains remembered at most (least recently seen forgotten first) and classes per domain: a
# directory has a handful of schemes; the caps only bound what a strange database can cost.
MAX_DOMAINS = 10_000
MAX_CLASSES = 8
# Counts are halved past this many logins of a domain, so the weights follow recent logins.
DECAY_AT = 1024
MAX_CLASS_LEN = 80  # a class is a tag and a few numbers; anything longer is not one
_TAG = re.compile(r"^\{[A-Za-z0-9._-]{1,32}\}")
_ARGON2 = re.compile(r"^\$argon2(id|i)\$(?:v=\d+\$)?m=(\d+),t=(\d+),p=(\d+)")
_BCRYPT = re.compile(r"^\$2[aby]\$(\d\d)\$")
_SHA_CRYPT = re.compile(r"^\$([56])\$(?:rounds=(\d{1,9})\$)?")
_SHA_CRYPT_DEFAULT_ROUNDS = 5000  # glibc's, when a $5$/$6$ string names none
_SHA_CRYPT_MIN_ROUNDS = 1000  # glibc and passlib clamp lower counts to this
# Schemes whose check costs the same whatever the stored value (a digest or a comparison).
_FIXED_COST = frozenset(
    {*passwords.CLEARTEXT, *passwords.DIGESTS, *passwords.SALTED, "MD5", "CRAM-MD5", "HMAC-MD5"}
)


def cost_class(stored: str) -> str | None:
    """The scheme tag and cost parameters of a stored password, e.g. "{SHA512-CRYPT}$6$r=5000".

    None for a value whose cost cannot be told (an unknown scheme): it is not remembered.
    """
    tagged = _TAG.match(stored)
    tag = tagged.group(0) if tagged else ""
    value = stored[len(tag) :].strip()
    if not tag and not value.startswith("$"):
        return None  # neither {SCHEME} nor a crypt string: no check would run either
    name = tag[1:-1].upper().partition(".")[0] if tag else "CRYPT"
    md5_crypt = name == "MD5" and value.startswith("$1$")  # Dovecot's {MD5} may be either
    if name in passwords.CRYPT or name in passwords.ARGON2 or md5_crypt:
        params = _crypt_params(value)
        return None if params is None else tag + params
    if name in ("SCRAM-SHA-1", "SCRAM-SHA-256"):
        iterations = value.partition(",")[0]
        return f"{tag}{iterations}" if iterations.isdigit() and len(iterations) < 10 else None
    if name == "PBKDF2":
        parts = value.split("$")
        return f"{tag}{parts[3]}" if len(parts) == 5 and parts[3].isdigit() else None
    if tag and name in _FIXED_COST:
        return tag  # cleartext, digests, salted digests, CRAM-MD5: the cost does not vary
    return None


def _crypt_params(value: str) -> str | None:
    if value.startswith(("!", "*")):
        return "!"  # a locked account: refused without hashing, by the real check too
    argon = _ARGON2.match(value)
    if argon:
        kind, m, t, p = argon.groups()
        return f"$argon2{kind}$m={int(m)},t={int(t)},p={int(p)}"
    blowfish = _BCRYPT.match(value)
    if blowfish:
        return value[:7]  # "$2y$10$": the variant and the cost
    sha = _SHA_CRYPT.match(value)
    if sha:
        rounds = int(sha.group(2) or _SHA_CRYPT_DEFAULT_ROUNDS)
        return f"${sha.group(1)}$rounds={max(rounds, _SHA_CRYPT_MIN_ROUNDS)}"
    if value.startswith("$1$"):
        return "$1$"
    if len(value) == 13:
        return "des"
    return None


def make_dummy(cls: str) -> str:
    """A stored value of class `cls` for a random password: checking against it costs the same.

    Slow for the costly classes (it hashes once): call it off the event loop.
    """
    tagged = _TAG.match(cls)
    tag = tagged.group(0) if tagged else ""
    params = cls[len(tag) :]
    name = tag[1:-1].upper().partition(".")[0] if tag else "CRYPT"
    password = secrets.token_urlsafe(18)
    if params == "!":
        return tag + "!" + password
    if params.startswith("$") or params == "des":
        return tag + _crypt_dummy(params, password.encode())
    if name in ("SCRAM-SHA-1", "SCRAM-SHA-256"):
        size = 20 if name == "SCRAM-SHA-1" else 32
        keys = (secrets.token_bytes(16), secrets.token_bytes(size), secrets.token_bytes(size))
        return tag + ",".join([params, *(base64.b64encode(k).decode() for k in keys)])
    if name == "PBKDF2":
        return f"{tag}$1${secrets.token_hex(8)}${params}${secrets.token_hex(20)}"
    if name in ("MD5", "HMAC-MD5"):  # read-only schemes: a random digest of the right size
        return tag + secrets.token_hex(16 if name == "MD5" else 32)
    made = passwords.hash_password(Secret(password), tag[1:-1])
    return tag + made[made.index("}") + 1 :]  # the tag as stored: it decides fast or slow


def _crypt_dummy(params: str, pw: bytes) -> str:
    argon = re.match(r"^\$argon2(id|i)\$m=(\d+),t=(\d+),p=(\d+)$", params)
    if argon:
        kind, m, t, p = argon.groups()
        kinds = {"id": argon2.Type.ID, "i": argon2.Type.I}
        hasher = argon2.PasswordHasher(int(t), int(m), int(p), type=kinds[kind])
        return hasher.hash(pw)
    if params.startswith("$2"):
        made = bcrypt.hashpw(pw, bcrypt.gensalt(int(params[4:6]))).decode("ascii")
        return params[:4] + made[4:]
    sha = re.match(r"^\$([56])\$rounds=(\d+)$", params)
    if sha:
        handler = passlib_hash.sha512_crypt if sha.group(1) == "6" else passlib_hash.sha256_crypt
        return str(handler.using(rounds=int(sha.group(2))).hash(pw))
    if params == "$1$":
        return str(passlib_hash.md5_crypt.hash(pw))
    return str(passlib_hash.des_crypt.hash(pw[:8]))


class Dummies:
    """The cost classes a directory's users have, and a dummy stored value for each."""

    def __init__(self, default_scheme: str) -> None:
        # Before any user was seen: what admin writes (ARGON2ID), or a custom schema's
        # default_scheme (the seed's PLAIN).
        self._default = "{" + default_scheme.upper() + "}"
        self._key = secrets.token_bytes(16)
        self._domains: OrderedDict[str, Counter[str]] = OrderedDict()
        self._everywhere: Counter[str] = Counter()
        self._values: dict[str, str] = {}  # class -> dummy stored value
        self._making: dict[str, asyncio.Future[str]] = {}

    def remember(self, domain: str, stored: str) -> None:
        """A real user of `domain` has `stored`: count its class (never the value itself)."""
        cls = cost_class(stored)
        if cls is None or len(cls) > MAX_CLASS_LEN:
            return
        counts = self._domains.pop(domain, None) or Counter()
        self._domains[domain] = counts  # most recently seen last
        while len(self._domains) > MAX_DOMAINS:
            self._domains.popitem(last=False)
        for table in (counts, self._everywhere):
            _count(table, cls)
        if cls not in self._values:
            with contextlib.suppress(RuntimeError):  # no running loop: made when first needed
                self._start(cls)  # in the background: the next unknown user need not wait

    async def stored_for(self, name: str, domain: str) -> str:
        """The dummy stored value to check an unknown `name` against."""
        cls = self._choose(name, domain)
        value = self._values.get(cls)
        if value is not None:
            return value
        # shield: a client that hangs up must not cancel the making others wait for.
        return await asyncio.shield(self._start(cls))

    def classes(self, domain: str) -> dict[str, int]:
        """The classes seen in `domain` and their weights (for tests and `auth test`)."""
        return dict(self._domains.get(domain, {}))

    def _choose(self, name: str, domain: str) -> str:
        counts = self._domains.get(domain) or self._everywhere
        total = sum(counts.values())
        if not total:
            return self._default
        digest = hashlib.blake2b(name.encode("utf-8", "surrogateescape"), key=self._key)
        pick = int.from_bytes(digest.digest()[:8], "big") % total
        for cls, weight in sorted(counts.items()):  # sorted: the same pick for the same name
            if pick < weight:
                return cls
            pick -= weight
        return self._default  # not reached: the weights sum to total

    def _start(self, cls: str) -> asyncio.Future[str]:
        loop = asyncio.get_running_loop()
        pending = self._making.get(cls)
        if pending is None or pending.get_loop() is not loop:
            pending = loop.run_in_executor(None, _make_or_default, cls, self._default)
            pending.add_done_callback(lambda done: self._made(cls, done))
            self._making[cls] = pending
        return pending

    def _made(self, cls: str, done: asyncio.Future[str]) -> None:
        if self._making.get(cls) is done:
            del self._making[cls]
        if not done.cancelled() and done.exception() is None:
            self._values[cls] = done.result()


def _make_or_default(cls: str, default: str) -> str:
    for candidate in (cls, default):  # a class we cannot reproduce: the default's cost
        try:
            return make_dummy(candidate)
        except (ValueError, TypeError):  # UnknownScheme is a ValueError
            continue
    return passwords.dummy_hash()


def _count(counts: Counter[str], cls: str) -> None:
    if cls not in counts and len(counts) >= MAX_CLASSES:
        del counts[min(counts, key=counts.__getitem__)]  # the rarest class makes room
    counts[cls] += 1
    if counts.total() > DECAY_AT:
        for key in list(counts):
            counts[key] //= 2
            if not counts[key]:
                del counts[key]
