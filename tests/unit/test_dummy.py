"""Dummy password checks: one cost class per scheme and parameters, a dummy for each."""

from __future__ import annotations

import asyncio
import gc
from collections import Counter

import pytest
from passlib import hash as passlib_hash

from mailgate.auth import passwords
from mailgate.auth.dummy import Dummies, cost_class, make_dummy
from mailgate.values import Secret

PASSWORD = "the-users-password"


def stored(scheme: str) -> str:
    return passwords.hash_password(Secret(PASSWORD), scheme)


# (stored value, its cost class): the parameters that set the cost, never the hash.
CLASSES = [
    ("{PLAIN}" + PASSWORD, "{PLAIN}"),
    ("{plain}" + PASSWORD, "{plain}"),  # the tag as stored: it decides loop or thread
    ("{CLEARTEXT}" + PASSWORD, "{CLEARTEXT}"),
    (stored("SSHA"), "{SSHA}"),
    (stored("SSHA512"), "{SSHA512}"),
    (stored("SHA256.HEX"), "{SHA256.HEX}"),
    (stored("PLAIN-MD5"), "{PLAIN-MD5}"),
    (stored("CRAM-MD5"), "{CRAM-MD5}"),
    (stored("SHA512-CRYPT"), "{SHA512-CRYPT}$6$rounds=50000"),
    ("{SHA512-CRYPT}" + passlib_hash.sha512_crypt.using(rounds=1000).hash(PASSWORD),
     "{SHA512-CRYPT}$6$rounds=1000"),
    (passlib_hash.sha512_crypt.using(rounds=5000).hash(PASSWORD), "$6$rounds=5000"),  # bare
    (stored("MD5-CRYPT"), "{MD5-CRYPT}$1$"),
    ("{MD5}" + passlib_hash.md5_crypt.hash(PASSWORD), "{MD5}$1$"),
    (stored("BLF-CRYPT"), "{BLF-CRYPT}$2y$10$"),
    (stored("ARGON2ID"), "{ARGON2ID}$argon2id$m=19456,t=2,p=1"),
    ("{CRYPT}" + passlib_hash.des_crypt.hash(PASSWORD[:8]), "{CRYPT}des"),
    ("{CRYPT}!locked", "{CRYPT}!"),
    ("{SCRAM-SHA-256}4096,c2FsdA==,AAAA,AAAA", "{SCRAM-SHA-256}4096"),
    ("{PBKDF2}$1$abcd$1000$00ff", "{PBKDF2}1000"),
]  # fmt: skip


@pytest.mark.parametrize(("value", "cls"), CLASSES)
def test_a_dummy_has_the_class_of_the_stored_value_and_matches_nothing(
    value: str, cls: str
) -> None:
    assert cost_class(value) == cls
    dummy = make_dummy(cls)
    assert cost_class(dummy) == cls
    assert dummy != value and PASSWORD not in dummy
    assert passwords.verify(dummy, Secret(PASSWORD)) is False


@pytest.mark.parametrize("value", ["{ROT13}x", "no tag at all", "$9$unknown", "{SCRAM-SHA-1}x"])
def test_values_of_unknown_cost_have_no_class(value: str) -> None:
    assert cost_class(value) is None


def test_unknown_users_cost_what_their_domain_has_else_any_domain_else_the_default() -> None:
    async def go() -> None:
        dummies = Dummies("ARGON2ID")
        assert (await dummies.stored_for("x@a.example", "a.example")).startswith("{ARGON2ID}")
        dummies.remember("a.example", "{PLAIN}" + PASSWORD)
        dummies.remember("b.example", stored("SSHA"))
        assert (await dummies.stored_for("x@a.example", "a.example")).startswith("{PLAIN}")
        assert (await dummies.stored_for("x@b.example", "b.example")).startswith("{SSHA}")
        never_seen = await dummies.stored_for("x@c.example", "c.example")
        assert never_seen.startswith(("{PLAIN}", "{SSHA}"))

    asyncio.run(go())


def test_a_mixed_domain_gives_each_name_a_stable_class_weighted_like_its_users() -> None:
    async def go() -> None:
        dummies = Dummies("ARGON2ID")
        for _ in range(3):
            dummies.remember("example.com", "{PLAIN}a")
        dummies.remember("example.com", stored("SSHA"))
        assert dummies.classes("example.com") == {"{PLAIN}": 3, "{SSHA}": 1}
        picks = [
            (await dummies.stored_for(f"u{i}@example.com", "example.com")).split("}")[0]
            for i in range(2000)
        ]
        again = await dummies.stored_for("u7@example.com", "example.com")
        assert again.split("}")[0] == picks[7]  # the same name always costs the same
        share = Counter(picks)["{PLAIN"] / len(picks)
        assert 0.70 < share < 0.80  # 3 in 4, as the users

    asyncio.run(go())


def test_dummies_keep_classes_never_the_stored_values() -> None:
    async def go() -> Dummies:
        dummies = Dummies("PLAIN")
        dummies.remember("example.com", "{PLAIN}" + PASSWORD)
        await dummies.stored_for("x@example.com", "example.com")
        return dummies

    dummies = asyncio.run(go())
    seen, stack = set(), [dummies]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, type):
            continue
        seen.add(id(obj))
        assert not (isinstance(obj, str) and PASSWORD in obj)
        stack.extend(gc.get_referents(obj))
