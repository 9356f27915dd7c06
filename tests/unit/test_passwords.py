"""Password schemes: Dovecot's vectors, round trips, bad values, CRAM-MD5/APOP, the dummy hash."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from typing import Any

import bcrypt
import pytest

from mailgate.auth import passwords
from mailgate.auth.passwords import (
    MalformedHash,
    NoCleartext,
    UnknownScheme,
    cleartext,
    hash_password,
    verify,
    verify_apop,
    verify_cram_md5,
)
from mailgate.values import Secret

# Made with `doveadm pw -s SCHEME -p secret` (Dovecot 2.3.19.1).
SECRET_VECTORS = [
    "{PLAIN}secret",
    "{CLEAR}secret",
    "{CLEARTEXT}secret",
    "{PLAIN.B64}c2VjcmV0",
    "{CRYPT}$2y$05$wrQfQWE2As1nDsmb9K1hzO8RwAxmMUc2sfuSy02Rxe5ifjDcg1pDS",
    "{MD5-CRYPT}$1$1IKDa4l9$CO/n07xwlMPbGhw30degy/",
    "{SHA256-CRYPT}$5$RmOlyy4.q/EqzCpl$ihQgpmt7fr15ZdJztKiJMlJ6W4zs7pk/okmXAnEaTp9",
    "{SHA512-CRYPT}$6$F4SL/VoJrtKK11sE$htt6YuQNlQ/cWU4d6tqrQGsPFfvdF0NA.wq0mpLFMaN8kQBUMnowGQnQ7f8f"
    ".IcgwASzob5oNc/bkNND32/Tm.",
    "{SHA512-CRYPT}$6$rounds=10000$C623ptOFyaCIwtLU$EN7hMLZPHPnKWltgLExsM4oqKlV4I51o66wd7oPj/RScB"
    "Of1Z5hDOs71Befn6IQh8VKAuRRwBn5mZyv1g3jr80",
    "{BLF-CRYPT}$2y$05$hV1zq/ZwzJsiWMx3.kabPuhcEJSzw5..5PdZJ7tWZ/7Jzh158gO/i",
    "{DES-CRYPT}/2E5Mi7L.6gpA",
    "{ARGON2I}$argon2i$v=19$m=32768,t=4,p=1$HxuXCveCi2QQDWM6LH0z8A$mskZnWz2ZO6Um7ueb6TSgv917W5BFKu"
    "VfCsigfxrjDc",
    "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$nLADr1hvuxA6yJ0+4QqgFQ$Eg2O2VnXxVU3mN805FHG0KiAMcPpTR"
    "hJ3Mk+3OKkNnE",
    "{SSHA}TqgmPg9LZxBTQfacs7Ju7EMPQM+6bQ3e",
    "{SSHA256}CW3RcTFPBgF2I+XviIs8IfhK97MNObyJuoJ/Z48IHkVrVcMr",
    "{SSHA512}uzMptz/aPGVpJdmPiGdU3h2PG9zbCd9P8XjuuDrfQ1WLHA4dIDMfPDvdfTDlyhffgRstpKVf7vFqmMO506X7"
    "7w9AU+E=",
    "{SSHA.HEX}e756ea5bead66d0b299b06cf294dea7dfceb451b140c4e7a",
    "{SMD5}LlA4aILfa8QxniPT+aXvEC8wfQc=",
    "{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=",
    "{SHA1}5en6G6MezRroT3XKqkdPOmY/BfQ=",
    "{SHA256}K7gNU3sdo+OL0wNhqoVWhr3g6s1xYv72ol/pe/Unols=",
    "{SHA256.HEX}2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b",
    "{SHA512}vSsar3708Jvp9Szi2NWZZ02Bqp1qRCFpbcTZPdBhnWgs5WtNZKnvCXdhztmeD2cmW192CF5bDufKRpayrW/isg==",
    "{SHA512.B64}vSsar3708Jvp9Szi2NWZZ02Bqp1qRCFpbcTZPdBhnWgs5WtNZKnvCXdhztmeD2cmW192CF5bDufKRpayrW"
    "/isg==",
    "{PLAIN-MD5}5ebe2294ecd0e0f08eab7690d2a6ee69",
    "{LDAP-MD5}Xr4ilOzQ4PCOq3aQ0qbuaQ==",
    "{MD5}$1$4V/Wjcju$aXYuiemw1KrhFPnnp8F77/",
    "{MD5}5ebe2294ecd0e0f08eab7690d2a6ee69",
    "{CRAM-MD5}cd3ba7deaad6e5ca23448ba42e379747a9e0f7f1fbc00c8a81bbaac395731b56",
    "{SCRAM-SHA-1}4096,rWVjANYs8Eh30JqHkBSx/w==,V/767wXnTDQum8ad0Jy7tH7K2kY=,1hUExqmbYDdX1w/yGq90Ng3"
    "mpvg=",
    "{SCRAM-SHA-256}4096,Yg4xb7ZrnXVS1e8xfILxwQ==,XOh6PSlQ1r4EH5VU4348u9b9LqujYZhkoUDk74fbMT0=,H/x+H"
    "jTMuGM9QEVbUBH+0kaZKyu6WjCLes1wo1TverU=",
    "{PBKDF2}$1$lAHO6Q14MM6EHwOJ$5000$0fc99795b11839358413e5cff835209e3d843eee",
    # Bare crypt strings, as a passdb without {SCHEME} and default_pass_scheme = CRYPT has them.
    "$1$1IKDa4l9$CO/n07xwlMPbGhw30degy/",
    "$6$F4SL/VoJrtKK11sE$htt6YuQNlQ/cWU4d6tqrQGsPFfvdF0NA.wq0mpLFMaN8kQBUMnowGQnQ7f8f.IcgwASzob5oNc"
    "/bkNND32/Tm.",
    "$2y$05$wrQfQWE2As1nDsmb9K1hzO8RwAxmMUc2sfuSy02Rxe5ifjDcg1pDS",
]

# Other passwords, same tool: (password, stored).
OTHER_VECTORS = [
    (
        "my little p%ony",
        "{SHA512-CRYPT}$6$bnMF5JQLhfOGjAiq$d8J0o0I/rOxgCcCgRDp4df8nfo8.lrDDFHaJz6HRdjdGvFciUZvhJjh/Xnl"
        ".V8wNs4GaVwEZiiuIr.cKUq4aO.",
    ),
    ("my little p%ony", "{BLF-CRYPT}$2y$05$OillwkZPbx3/fHuD90dqy.kIHQvuw2WaJ3kko5RMyFAWeQDIxj6Xi"),
    (
        "my little p%ony",
        "{ARGON2I}$argon2i$v=19$m=32768,t=4,p=1$vdN9nUZEtB3UIrAH6nembA$1dIYJQjybhxoUwNu+kqhXj9WxBllTO5"
        "Atk0HV9hc12Y",
    ),
    (
        "my little p%ony",
        "{CRAM-MD5}c211de9b9d058961ab15d1649b5b69787a7ec5f2c2fae0a748f298b36289a7b9",
    ),
    ("k" * 70, "{CRAM-MD5}48841cb6af67d6831ff5f85da70033ee0e938840e352117c89783e8f640ea6ac"),
    ("pässwörd", "{SSHA256}kMkQmR1NYxYZywc7f6TB+p1xEkAzXV7B789gnm5R3HgJEx08"),
    (
        "pässwörd",
        "{SSHA512}d/uz0QaULMG20XFgrXYf2uPoqPd4mz5MjhbXblMm+tI8VfucuHtsq3NXIj9LBWuXGp0jXbwBDKoOdx/Ntj1"
        "+rjxTXR8=",
    ),
    ("pässwörd", "{SHA256-CRYPT}$5$PkpNuTEiCFvMnIMl$D72v3ylIhWpU8GC6wf6Hg6bKcFywaGKGvrmhPD5/UKA"),
    ("pässwörd", "{PBKDF2}$1$P3YYllOa3nHORARn$5000$fec4125e2d02dc389258b4addf7afac6d02f82f8"),
    ("pässwörd", "{SMD5}WM/63gOyrQMO9Cm3SuC2eqfk0s4="),
]

HASHABLE = [
    "ARGON2ID",
    "ARGON2I",
    "BLF-CRYPT",
    "SHA512-CRYPT",
    "SHA256-CRYPT",
    "MD5-CRYPT",
    "SSHA512",
    "SSHA256",
    "SSHA",
    "SMD5",
    "SHA512",
    "SHA256",
    "SHA",
    "SHA512.HEX",
    "SSHA256.HEX",
    "PLAIN-MD5",
    "LDAP-MD5",
    "PLAIN",
    "CLEAR",
    "PLAIN.B64",
    "CRAM-MD5",
]

# RFC 2195 section 2 and RFC 1939 section 7.
CRAM_SALT = "<1896.697170952@postoffice.reston.mci.net>"
CRAM_DIGEST = "b913a602c7eda7a495b4e6e7334d3890"
APOP_SALT = "<1896.697170952@dbc.mtview.ca.us>"
APOP_DIGEST = "c4c9334bac560ecc979e58001b3e22fb"


@pytest.mark.parametrize("stored", SECRET_VECTORS)
def test_dovecot_vectors(stored: str) -> None:
    assert verify(stored, Secret("secret"))
    for wrong in ("Secret", "secret ", "secre", "", "secretsecret"):
        assert not verify(stored, Secret(wrong)), wrong


@pytest.mark.parametrize(("password", "stored"), OTHER_VECTORS)
def test_dovecot_vectors_other_passwords(password: str, stored: str) -> None:
    assert verify(stored, Secret(password))
    assert not verify(stored, Secret(password.upper()))


def test_scheme_names_are_case_insensitive() -> None:
    assert verify(
        "{sha256.hex}2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b",
        Secret("secret"),
    )
    assert verify("{Ssha}TqgmPg9LZxBTQfacs7Ju7EMPQM+6bQ3e", Secret("secret"))
    assert verify("{plain}secret", Secret("secret"))


def test_bare_bcrypt_variants() -> None:
    for prefix in (b"2a", b"2b"):
        made = bcrypt.hashpw(b"secret", bcrypt.gensalt(4, prefix=prefix)).decode()
        assert verify(made, Secret("secret"))
        assert not verify(made, Secret("secrets"))


@pytest.mark.parametrize("scheme", HASHABLE)
def test_hash_round_trip(scheme: str) -> None:
    for password in ("secret", 'pässwörd "quoted" %41', "raw\udcff\udcfebytes"):
        stored = hash_password(Secret(password), scheme)
        assert stored.upper().startswith("{" + scheme + "}")
        assert verify(stored, Secret(password))
        assert not verify(stored, Secret(password + "x"))


def test_hashes_are_salted() -> None:
    for scheme in ("ARGON2ID", "BLF-CRYPT", "SHA512-CRYPT", "SSHA512"):
        assert hash_password(Secret("secret"), scheme) != hash_password(Secret("secret"), scheme)


def test_default_scheme_is_argon2id_with_dovecot_compatible_lanes() -> None:
    stored = hash_password(Secret("secret"))
    assert stored.startswith("{ARGON2ID}$argon2id$v=19$m=19456,t=2,p=1$")  # OWASP; one lane


def test_bcrypt_reads_72_bytes() -> None:
    long = "x" * 72
    stored = hash_password(Secret(long), "BLF-CRYPT")
    assert stored.startswith("{BLF-CRYPT}$2y$")
    assert verify(stored, Secret(long + "ignored"))  # as every bcrypt implementation does
    with pytest.raises(ValueError, match="72"):
        hash_password(Secret(long + "y"), "BLF-CRYPT")


def test_default_scheme_for_values_without_prefix() -> None:
    assert verify("secret", Secret("secret"), default_scheme="PLAIN")
    assert verify("5ebe2294ecd0e0f08eab7690d2a6ee69", Secret("secret"), default_scheme="plain-md5")
    assert cleartext("secret", default_scheme="CLEARTEXT") == "secret"
    with pytest.raises(UnknownScheme):
        verify("secret", Secret("secret"))


@pytest.mark.parametrize(
    "stored",
    [
        "{NOPE}abc",
        "{SHA512.ROT13}abc",
        "$y$j9T$F5Jx5fExrKuPp53xLKQ..1$X3DX6M94c7o.9agCG9G317fhZg9SqC.5i5rd.RhAtQ7",  # yescrypt
        "$7$CU..../....MvmAGp4pUVrOXNiX",  # scrypt
        "{CRYPT}not-a-crypt-string",
    ],
)
def test_unknown_schemes(stored: str) -> None:
    with pytest.raises(UnknownScheme) as e:
        verify(stored, Secret("secret"))
    assert stored.rpartition("$")[2] not in str(e.value)


@pytest.mark.parametrize(
    "stored", ["{CRYPT}*", "{SHA512-CRYPT}!$6$F4SL/VoJrtKK11sE$x", "{BLF-CRYPT}!"]
)
def test_locked_crypt_values_match_nothing(stored: str) -> None:
    assert not verify(stored, Secret("secret"))
    assert not verify(stored, Secret(""))


@pytest.mark.parametrize(
    "stored",
    [
        "{SHA512-CRYPT}$6$abcdefgh$tooshort",
        "{SHA512-CRYPT}$6$garbage",
        "{BLF-CRYPT}$2y$05$wrQfQWE2As1n",
        "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$nLADr1hvuxA6yJ0",
        "{SHA256}notbase64!!",
        "{SHA256}c2VjcmV0",  # valid base64, wrong length
        "{SSHA}c2VjcmV0",  # shorter than a digest
        "{PLAIN-MD5}5ebe2294ecd0e0f08eab7690d2a6ee6",
        "{SHA256.HEX}zz",
        "{CRAM-MD5}abcd",
        "{SCRAM-SHA-256}4096,onlytwo",
        "{PBKDF2}$1$salt$notanumber$00",
        "{SHA512-CRYPT",
    ],
)
def test_malformed_values(stored: str) -> None:
    with pytest.raises(MalformedHash) as e:
        verify(stored, Secret("hunter2-the-password"))
    message = str(e.value)
    assert "hunter2" not in message
    value = stored.partition("}")[2]
    assert len(value) < 4 or value not in message


def test_cleartext() -> None:
    assert cleartext("{PLAIN}my little p%ony") == "my little p%ony"
    assert cleartext("{clear}x") == "x"
    assert cleartext("{CLEARTEXT}") == ""
    assert cleartext("{PLAIN.B64}c2VjcmV0") == "secret"
    assert cleartext("{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=") is None
    assert cleartext("$1$1IKDa4l9$CO/n07xwlMPbGhw30degy/") is None


def test_cram_md5_rfc2195_vector() -> None:
    assert verify_cram_md5("{PLAIN}tanstaaftanstaaf", CRAM_SALT, Secret(CRAM_DIGEST))
    assert verify_cram_md5("{PLAIN}tanstaaftanstaaf", CRAM_SALT, Secret(CRAM_DIGEST.upper()))
    assert not verify_cram_md5("{PLAIN}tanstaaftanstaaX", CRAM_SALT, Secret(CRAM_DIGEST))
    assert not verify_cram_md5("{PLAIN}tanstaaftanstaaf", CRAM_SALT + "x", Secret(CRAM_DIGEST))
    assert not verify_cram_md5("{PLAIN}tanstaaftanstaaf", CRAM_SALT, Secret(""))


def test_cram_md5_from_stored_context() -> None:
    # doveadm pw -s CRAM-MD5 -p tanstaaftanstaaf: the HMAC state, no cleartext.
    stored = "{CRAM-MD5}d06d4e1b26fccaa4b0b61801132340a354b21152711fb604ca3e035e7015116b"
    assert verify_cram_md5(stored, CRAM_SALT, Secret(CRAM_DIGEST))
    assert not verify_cram_md5(stored, CRAM_SALT + "x", Secret(CRAM_DIGEST))
    made = hash_password(Secret("tanstaaftanstaaf"), "CRAM-MD5")
    assert made == stored
    # A key over 64 bytes is hashed first (RFC 2104); long salts take more than one block.
    long_key = hash_password(Secret("k" * 70), "CRAM-MD5")
    salt = "<" + "9" * 150 + "@host>"
    import hashlib
    import hmac

    digest = hmac.new(b"k" * 70, salt.encode(), hashlib.md5).hexdigest()
    assert verify_cram_md5(long_key, salt, Secret(digest))
    assert verify_cram_md5("{PLAIN}" + "k" * 70, salt, Secret(digest))


def test_apop_rfc1939_vector() -> None:
    assert verify_apop("{PLAIN}tanstaaf", APOP_SALT, Secret(APOP_DIGEST))
    assert verify_apop("{CLEAR.B64}dGFuc3RhYWY=", APOP_SALT, Secret(APOP_DIGEST))
    assert not verify_apop("{PLAIN}tanstaaX", APOP_SALT, Secret(APOP_DIGEST))
    assert not verify_apop(
        "{PLAIN}tanstaaf", APOP_SALT.replace("1896", "1897"), Secret(APOP_DIGEST)
    )


@pytest.mark.parametrize("stored", ["{SHA512-CRYPT}$6$F4SL/VoJrtKK11sE$x", "{SSHA}abc", "$2y$05$x"])
def test_cram_and_apop_need_cleartext(stored: str) -> None:
    with pytest.raises(NoCleartext):
        verify_cram_md5(stored, CRAM_SALT, Secret(CRAM_DIGEST))
    with pytest.raises(NoCleartext):
        verify_apop(stored, APOP_SALT, Secret(APOP_DIGEST))


def test_apop_cannot_use_a_cram_context() -> None:
    with pytest.raises(NoCleartext):
        verify_apop(hash_password(Secret("tanstaaf"), "CRAM-MD5"), APOP_SALT, Secret(APOP_DIGEST))


@pytest.mark.parametrize(
    ("call", "args"),
    [
        (verify, ("{PLAIN}secret", Secret("secret"))),
        (verify, ("{SHA256}K7gNU3sdo+OL0wNhqoVWhr3g6s1xYv72ol/pe/Unols=", Secret("secret"))),
        (verify, ("{SSHA}TqgmPg9LZxBTQfacs7Ju7EMPQM+6bQ3e", Secret("secret"))),
        (verify, ("{PLAIN-MD5}5ebe2294ecd0e0f08eab7690d2a6ee69", Secret("secret"))),
        (verify_cram_md5, ("{PLAIN}tanstaaftanstaaf", CRAM_SALT, Secret(CRAM_DIGEST))),
        (verify_apop, ("{PLAIN}tanstaaf", APOP_SALT, Secret(APOP_DIGEST))),
    ],
)
def test_comparisons_are_constant_time(
    monkeypatch: pytest.MonkeyPatch, call: Callable[..., bool], args: tuple[Any, ...]
) -> None:
    import hmac

    calls: list[int] = []

    def spy(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return hmac.compare_digest(a, b)

    monkeypatch.setattr(passwords, "_equal", spy)
    assert call(*args)
    assert calls == [1]


def test_dummy_hash() -> None:
    dummy = passwords.DUMMY_HASH
    assert dummy.startswith("{ARGON2ID}$argon2id$")
    assert passwords.DUMMY_HASH is dummy  # computed once
    from mailgate.auth.passwords import DUMMY_HASH

    assert DUMMY_HASH is dummy
    assert not verify(dummy, Secret("secret"))
    assert not verify(dummy, Secret(""))
    with pytest.raises(AttributeError):
        _ = passwords.NO_SUCH_NAME


def test_errors_do_not_show_the_secret() -> None:
    secret = Secret("hunter2")
    assert "hunter2" not in repr(secret)
    for stored in ("{SHA256}hunter2hunter2", "{SHA512-CRYPT}$6$hunter2"):
        with pytest.raises(ValueError) as e:
            verify(stored, secret)
        assert "hunter2" not in str(e.value)


DOVEADM = shutil.which("doveadm")


def need_doveadm() -> None:
    """Skip without Dovecot, or fail when CI says every real peer must be there."""
    if DOVEADM is not None:
        return
    if os.environ.get("MAILGATE_REQUIRE_PEERS") == "1":
        pytest.fail("doveadm (Dovecot) is not installed (MAILGATE_REQUIRE_PEERS=1)")
    pytest.skip("doveadm (Dovecot) is not installed")


@pytest.mark.parametrize("scheme", [s for s in HASHABLE if s != "CLEAR"])
def test_dovecot_accepts_our_hashes(scheme: str) -> None:
    need_doveadm()
    password = 'my little p%ony "quoted"'
    stored = hash_password(Secret(password), scheme)
    done = subprocess.run(
        [DOVEADM, "pw", "-t", stored, "-p", password],  # type: ignore[list-item]
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "(verified)" in done.stdout, done.stderr


@pytest.mark.parametrize(
    "scheme", ["SHA512-CRYPT", "BLF-CRYPT", "ARGON2ID", "SSHA512", "CRAM-MD5", "SCRAM-SHA-256"]
)
def test_we_accept_dovecots_fresh_hashes(scheme: str) -> None:
    need_doveadm()
    password = "pässwörd 100%"
    done = subprocess.run(
        [DOVEADM, "pw", "-s", scheme, "-p", password],  # type: ignore[list-item]
        capture_output=True,
        text=True,
        timeout=60,
    )
    stored = done.stdout.strip()
    assert stored.startswith("{" + scheme + "}"), done.stderr
    assert verify(stored, Secret(password))
    assert not verify(stored, Secret(password + "!"))
