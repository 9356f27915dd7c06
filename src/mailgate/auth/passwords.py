"""Dovecot-style password schemes: `{SCHEME}value`, verify and hash.

A stored password is `{SCHEME}value` or `{SCHEME.ENCODING}value` (ENCODING is `b64` or `hex`),
or a bare crypt string (`$6$...`, `$2y$...`), as Dovecot's passdb reads them; scheme names are
case-insensitive. The crypt family is verified with libpass (`passlib`), bcrypt and
argon2-cffi; the digests with hashlib. Every comparison of secret-derived bytes goes through
`_equal` (hmac.compare_digest); the crypt libraries compare in constant time themselves.

Errors carry the scheme name at most, never the hash or the password: they end up in logs.
Verifying is CPU work (ARGON2ID takes tens of milliseconds): async callers run `verify` in a
thread (`asyncio.to_thread`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import secrets
import struct
from collections.abc import Callable
from functools import cache

import argon2
import bcrypt
from passlib import hash as passlib_hash

from mailgate.values import Secret

_equal = hmac.compare_digest  # the one comparison of secret-derived bytes (tests spy on it)

# Salted digests: hashlib name. The value is base64(digest + salt), as Dovecot writes it.
SALTED = {"SSHA": "sha1", "SSHA256": "sha256", "SSHA512": "sha512", "SMD5": "md5"}
# Unsalted digests: hashlib name and the encoding Dovecot writes by default.
DIGESTS = {
    "SHA": ("sha1", "b64"),
    "SHA1": ("sha1", "b64"),
    "SHA256": ("sha256", "b64"),
    "SHA512": ("sha512", "b64"),
    "PLAIN-MD5": ("md5", "hex"),
    "LDAP-MD5": ("md5", "b64"),
}
CLEARTEXT = ("PLAIN", "CLEAR", "CLEARTEXT")
# The value is a crypt(3) string; which algorithm is told by its own prefix, as with libc.
CRYPT = ("CRYPT", "MD5-CRYPT", "SHA256-CRYPT", "SHA512-CRYPT", "BLF-CRYPT", "DES-CRYPT")
ARGON2 = ("ARGON2I", "ARGON2ID")
ENCODINGS = {"B64": "b64", "BASE64": "b64", "HEX": "hex"}

# Costs of new hashes. ARGON2ID: OWASP's recommended m=19 MiB, t=2, p=1 (p=1 because Dovecot
# verifies with libsodium, which only knows one lane). Dovecot 2.3's own m=64 MiB, t=3 cost
# 146 ms a check on the 2-core development box, which caps uncached logins at about a dozen
# a second (bench/directory.py); this costs about a fifth of that, and existing hashes keep
# their own parameters. SHA-crypt rounds: ten times glibc's default of 5000. bcrypt cost 10:
# pyca bcrypt's 12 is ~250 ms a login.
ARGON2_HASHERS = {
    "ARGON2ID": argon2.PasswordHasher(2, 19456, parallelism=1, type=argon2.Type.ID),
    "ARGON2I": argon2.PasswordHasher(4, 32768, parallelism=1, type=argon2.Type.I),
}
SHA_CRYPT_ROUNDS = 50_000
BCRYPT_COST = 10
BCRYPT_MAX = 72  # bcrypt reads this many bytes of a password and ignores the rest
SALT_BYTES = 16  # salt of new SSHA*/SMD5 values (Dovecot writes 4; longer costs nothing)


class UnknownScheme(ValueError):
    """The stored value names a scheme (or crypt format) this module cannot check."""


class MalformedHash(ValueError):
    """The stored value is not a valid value of its scheme."""


class NoCleartext(ValueError):
    """CRAM-MD5 or APOP needs the cleartext (or a {CRAM-MD5} context), and it is not stored."""


def verify(stored: str, password: Secret, *, default_scheme: str | None = None) -> bool:
    """Does `password` match `stored`? `default_scheme` is for values without `{SCHEME}`.

    Raises UnknownScheme or MalformedHash when `stored` cannot be checked at all.
    """
    scheme, encoding, value = _split(stored, default_scheme)
    pw = _bytes(password)
    if scheme in CLEARTEXT:
        return _equal(_decode(scheme, value, encoding or "none"), pw)
    if scheme in CRYPT or scheme in ARGON2:
        return _verify_crypt(scheme, value, pw)
    if scheme in DIGESTS:
        algorithm, default = DIGESTS[scheme]
        expected = _decode_digest(scheme, value, encoding, default, algorithm)
        return _equal(hashlib.new(algorithm, pw).digest(), expected)
    if scheme in SALTED:
        return _verify_salted(scheme, value, encoding, pw)
    special = _SPECIAL.get(scheme)
    if special is None:
        raise UnknownScheme(f"unknown password scheme {scheme!r}")
    return special(scheme, value, encoding, pw)


def cleartext(stored: str, *, default_scheme: str | None = None) -> str | None:
    """The cleartext if `stored` keeps it ({PLAIN}, {CLEAR}, {CLEARTEXT}), else None."""
    scheme, encoding, value = _split(stored, default_scheme)
    if scheme not in CLEARTEXT:
        return None
    return _decode(scheme, value, encoding or "none").decode("utf-8", "surrogateescape")


def verify_cram_md5(
    stored: str, salt: str, digest: Secret, *, default_scheme: str | None = None
) -> bool:
    """RFC 2195: is `digest` hex(HMAC-MD5(key=password, msg=salt))?

    Works from the cleartext or from a {CRAM-MD5} HMAC context; else raises NoCleartext.
    """
    scheme, encoding, value = _split(stored, default_scheme)
    message = salt.encode("utf-8", "surrogateescape")
    if scheme == "CRAM-MD5":
        inner, outer = _cram_context(scheme, value, encoding)
        expected = _md5_resume(outer, _md5_resume(inner, message))
    else:
        key = _bytes_cleartext(stored, default_scheme)
        expected = hmac.new(key, message, hashlib.md5).digest()
    return _equal(expected.hex().encode(), _bytes(digest).lower())


def verify_apop(
    stored: str, salt: str, digest: Secret, *, default_scheme: str | None = None
) -> bool:
    """RFC 1939: is `digest` hex(MD5(timestamp + password))? Needs the cleartext."""
    key = _bytes_cleartext(stored, default_scheme)
    expected = hashlib.md5(salt.encode("utf-8", "surrogateescape") + key).hexdigest()  # noqa: S324  APOP is MD5
    return _equal(expected.encode(), _bytes(digest).lower())


def hash_password(password: Secret, scheme: str = "ARGON2ID") -> str:
    """A new `{SCHEME}value` for `password`, e.g. "{ARGON2ID}$argon2id$v=19$...".

    Raises UnknownScheme for a scheme this module only verifies (CRYPT, MD5, SCRAM-*...).
    """
    name, _, suffix = scheme.upper().partition(".")
    encoding = ENCODINGS.get(suffix) if suffix else None
    if suffix and encoding is None:
        raise UnknownScheme(f"unknown encoding {suffix!r}")
    pw = _bytes(password)
    prefix = "{" + scheme.upper() + "}"
    if name in _CRYPT_MAKERS:
        if suffix:
            raise UnknownScheme(f"{name} values are crypt strings: no {suffix} encoding")
        return prefix + _CRYPT_MAKERS[name](pw)
    if name in CLEARTEXT:
        return prefix + _encode(pw, encoding or "none")
    if name in DIGESTS:
        algorithm, default = DIGESTS[name]
        return prefix + _encode(hashlib.new(algorithm, pw).digest(), encoding or default)
    if name in SALTED:
        salt = secrets.token_bytes(SALT_BYTES)
        raw = hashlib.new(SALTED[name], pw + salt).digest() + salt
        return prefix + _encode(raw, encoding or "b64")
    if name == "CRAM-MD5":
        inner, outer = _hmac_md5_states(pw)
        return prefix + _encode(_pack_states(outer, inner), encoding or "hex")
    raise UnknownScheme(f"cannot make {scheme!r} hashes")


# --- values sharing a salt: app passwords -----------------------------------------------------
#
# A user's app passwords are tried one after another when the main password does not match.
# With a salt of its own each, N of them would cost N ARGON2ID hashes, so a wrong password
# would cost more for users with many (and tell who has some). mailgate writes all of one
# user's app passwords with one salt and cost (`hash_like`), so one hash of the presented
# password is compared with every one of them (`verify_group`).


def salt_group(stored: str) -> str | None:
    """What the hash of an {ARGON2ID}/{ARGON2I} value depends on besides the password (its
    type, version, cost, salt and length): values with the same group are checked with one
    hash. None for any other scheme or a value that does not parse."""
    scheme, _, value = stored.partition("}")
    if scheme.upper() not in ("{ARGON2ID", "{ARGON2I") or value.count("$") != 5:
        return None
    head, _, digest = value.rpartition("$")
    return f"{scheme.upper()}}}{head}${len(digest)}"


def verify_group(values: list[str], password: Secret) -> int | None:
    """The index of the value `password` matches among `values`, None if none. Values of
    one `salt_group` take one hash; other values are verified one by one."""
    group = salt_group(values[0])
    if group is None or any(salt_group(v) != group for v in values):
        return next((i for i, v in enumerate(values) if verify(v, password)), None)
    params, salt, _ = _argon2_parts(values[0])
    computed = _argon2_hash(argon2.low_level.hash_secret_raw, params, salt, password)
    found = None
    for index, value in enumerate(values):  # compare with all: no early exit to time
        if _equal(computed, _argon2_parts(value)[2]) and found is None:
            found = index
    return found


def hash_like(template: str, password: Secret) -> str:
    """A new value for `password` in `template`'s salt group (the same ARGON2 type, cost
    and salt), so `verify_group` checks both with one hash. MalformedHash if `template`
    is not an ARGON2 value."""
    if salt_group(template) is None:
        raise MalformedHash("hash_like: the template is not an ARGON2 value")
    params, salt, _ = _argon2_parts(template)
    encoded = _argon2_hash(argon2.low_level.hash_secret, params, salt, password)
    return template[: template.index("}") + 1] + encoded.decode("ascii")


def _argon2_hash(
    hasher: Callable[..., bytes], params: argon2.Parameters, salt: bytes, password: Secret
) -> bytes:
    """`password` hashed by argon2's low-level `hasher` (raw digest or encoded value) with
    the parameters and salt of a stored value."""
    return hasher(
        _bytes(password),
        salt,
        time_cost=params.time_cost,
        memory_cost=params.memory_cost,
        parallelism=params.parallelism,
        hash_len=params.hash_len,
        type=params.type,
        version=params.version,
    )


def _argon2_parts(stored: str) -> tuple[argon2.Parameters, bytes, bytes]:
    """(parameters, salt, digest) of an {ARGON2...}$argon2...$ value; MalformedHash."""
    value = stored[stored.index("}") + 1 :]
    try:
        params = argon2.extract_parameters(value)
        salt, digest = (_unpadded_b64(part) for part in value.split("$")[4:6])
    except (argon2.exceptions.InvalidHashError, ValueError):
        raise MalformedHash("ARGON2: not a valid argon2 hash") from None
    return params, salt, digest


def _unpadded_b64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


@cache
def dummy_hash() -> str:
    """An ARGON2ID hash of a random value: verify against it for unknown users, so a login for a
    user that does not exist costs as much as one with a wrong password."""
    return hash_password(Secret(secrets.token_urlsafe(32)), "ARGON2ID")


DUMMY_HASH: str  # computed on first access by __getattr__ below (hashing costs ~50 ms)


def __getattr__(name: str) -> str:
    if name == "DUMMY_HASH":
        return dummy_hash()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- parsing and encodings --------------------------------------------------------------------


def _split(stored: str, default_scheme: str | None) -> tuple[str, str | None, str]:
    """'{SHA512.b64}...' -> ('SHA512', 'b64', '...'); '$6$...' -> ('CRYPT', None, '$6$...')."""
    if stored.startswith("{"):
        end = stored.find("}")
        if end < 0:
            raise MalformedHash("'{' without '}' in a stored password")
        scheme, value = stored[1:end], stored[end + 1 :]
    elif stored.startswith("$"):
        scheme, value = "CRYPT", stored
    elif default_scheme is not None:
        scheme, value = default_scheme, stored
    else:
        raise UnknownScheme("stored password has no {SCHEME} prefix")
    name, _, suffix = scheme.upper().partition(".")
    if not suffix:
        return name, None, value
    encoding = ENCODINGS.get(suffix)
    if encoding is None:
        raise UnknownScheme(f"unknown encoding {suffix!r} in scheme {scheme!r}")
    return name, encoding, value


def _bytes(secret: Secret) -> bytes:
    # surrogateescape restores the exact bytes of a non-UTF-8 password (see protocols/sasl.py).
    return secret.reveal().encode("utf-8", "surrogateescape")


def _bytes_cleartext(stored: str, default_scheme: str | None) -> bytes:
    text = cleartext(stored, default_scheme=default_scheme)
    if text is None:
        raise NoCleartext("the stored password is hashed: CRAM-MD5 and APOP need the cleartext")
    return text.encode("utf-8", "surrogateescape")


def _decode(scheme: str, value: str, encoding: str) -> bytes:
    try:
        if encoding == "b64":
            return base64.b64decode(value.strip(), validate=True)
        if encoding == "hex":
            return bytes.fromhex(value.strip())
    except (binascii.Error, ValueError):
        raise MalformedHash(f"{scheme}: not valid {encoding} data") from None
    return value.encode("utf-8", "surrogateescape")


def _encode(raw: bytes, encoding: str) -> str:
    if encoding == "b64":
        return base64.b64encode(raw).decode("ascii")
    if encoding == "hex":
        return raw.hex()
    return raw.decode("utf-8", "surrogateescape")


def _decode_digest(
    scheme: str, value: str, encoding: str | None, default: str, algorithm: str
) -> bytes:
    size = hashlib.new(algorithm).digest_size
    if encoding is None:
        # Dovecot's guess for fixed-size digests: hex if the length fits, else base64.
        encoding = "hex" if len(value.strip()) == 2 * size else "b64"
    raw = _decode(scheme, value, encoding)
    if len(raw) != size:
        raise MalformedHash(f"{scheme}: digest has the wrong length")
    return raw


# --- verifiers ----------------------------------------------------------------------------------


def _verify_crypt(scheme: str, value: str, pw: bytes) -> bool:
    value = value.strip()
    if value.startswith(("!", "*")):
        return False  # shadow(5): a locked account; crypt(3) matches nothing either
    if value.startswith(("$argon2i$", "$argon2id$")):
        return _verify_argon2(value, pw)
    is_bcrypt = value.startswith(("$2a$", "$2b$", "$2y$"))
    handler = None
    if not is_bcrypt:
        handler = _PASSLIB.get(value[:3]) or (passlib_hash.des_crypt if len(value) == 13 else None)
        if handler is None:
            raise UnknownScheme(f"{scheme}: crypt format {_crypt_id(value)} is not supported")
    try:
        if handler is None:
            # bcrypt hashes what its C implementations read: the first 72 bytes.
            return bcrypt.checkpw(pw[:BCRYPT_MAX], value.encode("ascii"))
        return bool(handler.verify(pw, value))
    except (ValueError, TypeError, UnicodeEncodeError):
        raise MalformedHash(f"{scheme}: not a valid crypt string") from None


def _crypt_id(value: str) -> str:
    """'$y$j9T$...' -> '$y$': the algorithm's name, which is no secret; never more."""
    ident = value.split("$")[1] if value.startswith("$") and value.count("$") >= 2 else ""
    return f"${ident}$" if ident.isalnum() and len(ident) <= 8 else "(unrecognised)"


def _verify_argon2(value: str, pw: bytes) -> bool:
    try:
        return argon2.PasswordHasher().verify(value, pw)
    except argon2.exceptions.VerifyMismatchError:
        return False
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        raise MalformedHash("ARGON2: not a valid argon2 hash") from None


_PASSLIB = {
    "$1$": passlib_hash.md5_crypt,
    "$5$": passlib_hash.sha256_crypt,
    "$6$": passlib_hash.sha512_crypt,
}


def _verify_salted(scheme: str, value: str, encoding: str | None, pw: bytes) -> bool:
    algorithm = SALTED[scheme]
    raw = _decode(scheme, value, encoding or "b64")
    size = hashlib.new(algorithm).digest_size
    if len(raw) <= size:
        raise MalformedHash(f"{scheme}: too short for a digest and a salt")
    digest, salt = raw[:size], raw[size:]
    return _equal(hashlib.new(algorithm, pw + salt).digest(), digest)


def _verify_md5(scheme: str, value: str, encoding: str | None, pw: bytes) -> bool:
    # Dovecot's {MD5} is MD5-CRYPT when it looks like one, else PLAIN-MD5.
    if value.startswith("$1$"):
        return _verify_crypt(scheme, value, pw)
    expected = _decode_digest(scheme, value, encoding, "hex", "md5")
    return _equal(hashlib.md5(pw).digest(), expected)  # noqa: S324  the stored scheme is MD5


def _verify_cram_context(scheme: str, value: str, encoding: str | None, pw: bytes) -> bool:
    stored_inner, stored_outer = _cram_context(scheme, value, encoding)
    inner, outer = _hmac_md5_states(pw)
    return _equal(_pack_states(outer, inner), _pack_states(stored_outer, stored_inner))


def _verify_scram(scheme: str, value: str, encoding: str | None, pw: bytes) -> bool:
    # Dovecot: "iterations,base64(salt),base64(StoredKey),base64(ServerKey)" (RFC 5802).
    algorithm = "sha1" if scheme == "SCRAM-SHA-1" else "sha256"
    try:
        rounds_text, salt_b64, stored_b64, _server = value.split(",")
        rounds, salt = int(rounds_text), base64.b64decode(salt_b64, validate=True)
        stored_key = base64.b64decode(stored_b64, validate=True)
    except (ValueError, binascii.Error):
        raise MalformedHash(f"{scheme}: not iterations,salt,storedkey,serverkey") from None
    salted = hashlib.pbkdf2_hmac(algorithm, pw, salt, rounds)
    client_key = hmac.new(salted, b"Client Key", algorithm).digest()
    return _equal(hashlib.new(algorithm, client_key).digest(), stored_key)


def _verify_pbkdf2(scheme: str, value: str, encoding: str | None, pw: bytes) -> bool:
    # Dovecot: "$1$salt$rounds$hex(PBKDF2-HMAC-SHA1)".
    try:
        empty, version, salt, rounds_text, digest_hex = value.split("$")
        if empty or version != "1":
            raise ValueError
        rounds, expected = int(rounds_text), bytes.fromhex(digest_hex)
    except ValueError:
        raise MalformedHash(f"{scheme}: not $1$salt$rounds$hex") from None
    actual = hashlib.pbkdf2_hmac("sha1", pw, salt.encode("ascii", "surrogateescape"), rounds)
    return _equal(actual[: len(expected)], expected)


_SPECIAL: dict[str, Callable[[str, str, str | None, bytes], bool]] = {
    "MD5": _verify_md5,
    "CRAM-MD5": _verify_cram_context,
    "HMAC-MD5": _verify_cram_context,
    "SCRAM-SHA-1": _verify_scram,
    "SCRAM-SHA-256": _verify_scram,
    "PBKDF2": _verify_pbkdf2,
}


def _make_bcrypt(pw: bytes) -> str:
    if len(pw) > BCRYPT_MAX:
        raise ValueError(f"BLF-CRYPT reads only {BCRYPT_MAX} bytes of a password: use ARGON2ID")
    made = bcrypt.hashpw(pw, bcrypt.gensalt(BCRYPT_COST)).decode("ascii")
    return "$2y$" + made[4:]  # same algorithm; $2y$ is what Dovecot and PHP write and accept


_CRYPT_MAKERS: dict[str, Callable[[bytes], str]] = {
    "ARGON2ID": ARGON2_HASHERS["ARGON2ID"].hash,
    "ARGON2I": ARGON2_HASHERS["ARGON2I"].hash,
    "SHA512-CRYPT": lambda pw: str(
        passlib_hash.sha512_crypt.using(rounds=SHA_CRYPT_ROUNDS).hash(pw)
    ),
    "SHA256-CRYPT": lambda pw: str(
        passlib_hash.sha256_crypt.using(rounds=SHA_CRYPT_ROUNDS).hash(pw)
    ),
    "MD5-CRYPT": lambda pw: str(passlib_hash.md5_crypt.hash(pw)),
    "BLF-CRYPT": _make_bcrypt,
}


# --- CRAM-MD5 contexts ----------------------------------------------------------------------------
# Dovecot's {CRAM-MD5} stores the MD5 states after HMAC's first block, outer then inner, each as
# four little-endian words: enough to answer CRAM-MD5 without the password. hashlib cannot resume
# from a state, so the MD5 compression function is here (RFC 1321); it runs on a few blocks.

_MASK = 0xFFFFFFFF
_SHIFTS = [7, 12, 17, 22] * 4 + [5, 9, 14, 20] * 4 + [4, 11, 16, 23] * 4 + [6, 10, 15, 21] * 4
_SINES = [int(abs(math.sin(i + 1)) * 2**32) & _MASK for i in range(64)]
_MD5_IV = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)
State = tuple[int, int, int, int]


def _md5_block(state: State, block: bytes) -> State:
    x = struct.unpack("<16I", block)
    a, b, c, d = state
    for i in range(64):
        if i < 16:
            f, g = (b & c) | (~b & d), i
        elif i < 32:
            f, g = (d & b) | (~d & c), (5 * i + 1) % 16
        elif i < 48:
            f, g = b ^ c ^ d, (3 * i + 5) % 16
        else:
            f, g = c ^ (b | ~d), (7 * i) % 16
        f = (f + a + _SINES[i] + x[g]) & _MASK
        a, d, c = d, c, b
        b = (b + ((f << _SHIFTS[i]) | (f >> (32 - _SHIFTS[i])))) & _MASK
    return (
        (state[0] + a) & _MASK,
        (state[1] + b) & _MASK,
        (state[2] + c) & _MASK,
        (state[3] + d) & _MASK,
    )


def _md5_resume(state: State, data: bytes) -> bytes:
    """MD5 of (one 64-byte block that led to `state`) + data."""
    length = (64 + len(data)) * 8
    padded = data + b"\x80" + b"\0" * ((55 - len(data)) % 64) + struct.pack("<Q", length)
    for i in range(0, len(padded), 64):
        state = _md5_block(state, padded[i : i + 64])
    return struct.pack("<4I", *state)


def _hmac_md5_states(key: bytes) -> tuple[State, State]:
    if len(key) > 64:
        key = hashlib.md5(key).digest()  # noqa: S324  RFC 2104 with MD5, as CRAM-MD5 is
    key = key.ljust(64, b"\0")
    inner = _md5_block(_MD5_IV, bytes(k ^ 0x36 for k in key))
    outer = _md5_block(_MD5_IV, bytes(k ^ 0x5C for k in key))
    return inner, outer


def _pack_states(outer: State, inner: State) -> bytes:
    return struct.pack("<8I", *outer, *inner)


def _cram_context(scheme: str, value: str, encoding: str | None) -> tuple[State, State]:
    raw = _decode(scheme, value, encoding or ("hex" if len(value.strip()) == 64 else "b64"))
    if len(raw) != 32:
        raise MalformedHash(f"{scheme}: an HMAC-MD5 context is 32 bytes")
    words = struct.unpack("<8I", raw)
    return (words[4], words[5], words[6], words[7]), (words[0], words[1], words[2], words[3])
