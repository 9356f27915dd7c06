#!/usr/bin/env python3
"""A small nginx-compatible auth_http service: the seed's Perl handler, done right.

It answers the GET requests that nginx (or mailgate) sends for every mail login, from a SQLite
file with two tables:

    users(email, password)                    password is "{SCHEME}value"
    transport(domain, destination_mailstore)  Postfix-style, e.g. "smtp:[mail1.internal]:10143"

Compared with the Perl script it started from, it
- refuses requests without the shared secret header (HTTP 403),
- percent-decodes Auth-User and Auth-Pass (nginx escapes space, "%" and control bytes),
- stores hashed passwords ({ARGON2ID}; {SHA512-CRYPT} when passlib is installed) and compares
  everything in constant time; {PLAIN} passwords also allow CRAM-MD5 and APOP, which need the
  clear text to check the client's digest and to log in to the backend,
- answers "Auth-Wait: 3" on failures, so password guessing is slowed down,
- opens the database per request (SQLite is cheap), so there is no dead connection to ping.

Run it:
    python examples/auth_service.py --db auth.sqlite --init
    echo 'secret' | python examples/auth_service.py --db auth.sqlite --add-user alice@example.com
    python examples/auth_service.py --db auth.sqlite --add-route example.com smtp:127.0.0.1
    python examples/auth_service.py --db auth.sqlite --listen 127.0.0.1:9000 \
        --secret-header X-NGX-Auth-Key --secret 'some secret' --port-map imap=10143,pop3=10110
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import hashlib
import hmac
import logging
import os
import re
import sqlite3
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from urllib.parse import unquote_to_bytes

from aiohttp import web

try:
    import argon2
except ImportError:  # pragma: no cover - argon2-cffi is optional
    argon2 = None  # type: ignore[assignment]
try:
    from passlib.hash import sha512_crypt
except ImportError:  # pragma: no cover - passlib/libpass is optional
    sha512_crypt = None

log = logging.getLogger("auth_service")

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (email TEXT PRIMARY KEY, password TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS transport (domain TEXT PRIMARY KEY, destination_mailstore TEXT NOT NULL);
"""
DEFAULT_PORTS = {"imap": 143, "pop3": 110, "smtp": 25}  # as in the seed script
FAILURE = "Invalid login or password"  # the seed's text: the same whether or not the user exists
FAILURE_WAIT = "3"  # seconds nginx (and mailgate) make the client wait after a failure
MAX_FIELD = 1024  # longer user names or passwords are refused before any work is done


@dataclass(frozen=True)
class Config:
    db: str
    secret_header: str
    secret: str
    ports: dict[str, int]


CONFIG = web.AppKey("config", Config)


# --- passwords -----------------------------------------------------------------------------


def split_scheme(stored: str) -> tuple[str, str]:
    """ "{ARGON2ID}$argon2id$..." -> ("ARGON2ID", "$argon2id$..."); no prefix is unknown."""
    if stored.startswith("{") and "}" in stored:
        scheme, _, value = stored[1:].partition("}")
        return scheme.upper(), value
    return "", stored


def verify_password(stored: str, password: bytes) -> bool:
    scheme, value = split_scheme(stored)
    if scheme == "PLAIN":
        return hmac.compare_digest(value.encode(), password)
    if scheme in ("ARGON2ID", "ARGON2I") and argon2 is not None:
        try:
            return bool(argon2.PasswordHasher().verify(value, password))
        except argon2.exceptions.VerificationError:
            return False
        except argon2.exceptions.InvalidHashError:
            log.error("malformed %s hash in the users table", scheme)
            return False
    if scheme == "SHA512-CRYPT" and sha512_crypt is not None:
        return bool(sha512_crypt.verify(password, value))
    log.error("unsupported password scheme %r", scheme)
    return False


def hash_password(password: str, scheme: str) -> str:
    if scheme == "PLAIN":
        return "{PLAIN}" + password
    if scheme == "ARGON2ID" and argon2 is not None:
        return "{ARGON2ID}" + argon2.PasswordHasher().hash(password)
    raise SystemExit(f"cannot hash with {scheme} (is argon2-cffi installed?)")


def verify_digest(stored: str, method: str, salt: bytes, digest: bytes) -> tuple[bool, str]:
    """CRAM-MD5 / APOP: the client proves it knows the clear password. Returns (ok, clear)."""
    scheme, clear = split_scheme(stored)
    if scheme != "PLAIN":
        return False, ""  # a hash cannot check a digest
    key = clear.encode()
    if method == "cram-md5":  # RFC 2195: HMAC-MD5 keyed with the password over the challenge
        expected = hmac.new(key, salt, hashlib.md5).hexdigest()
    else:  # RFC 1939 APOP: MD5 over the greeting timestamp followed by the password
        expected = hashlib.md5(salt + key).hexdigest()  # noqa: S324 - the protocol's hash
    return hmac.compare_digest(expected.encode(), digest.lower()), clear


# --- the lookup ----------------------------------------------------------------------------


LOCK_WAIT = 2.0  # seconds a lookup waits for a writer's lock before it counts as an outage
RCPT_DOMAIN = re.compile(r"<[^<>@]*@([^<>@]+)>")  # "RCPT TO:<bob@example.com> ..." -> domain


def connect(db: str) -> sqlite3.Connection:
    """For the admin commands: creates the file and the tables when missing."""
    conn = sqlite3.connect(db, timeout=LOCK_WAIT)
    conn.executescript(SCHEMA)
    return conn


def open_readonly(db: str) -> sqlite3.Connection:
    """For lookups: a missing file is an error (a 500), not a new empty database."""
    uri = Path(db).absolute().as_uri() + "?mode=ro"
    return sqlite3.connect(uri, uri=True, timeout=LOCK_WAIT)


@cache
def dummy_hash() -> str:
    """Checked for unknown users, so they cost as much time as known ones."""
    if argon2 is not None:
        return "{ARGON2ID}" + argon2.PasswordHasher().hash("no such user")
    return "{PLAIN}\0no such user"


def find_mailstore(conn: sqlite3.Connection, domain: str) -> str | None:
    row = conn.execute(
        "SELECT destination_mailstore FROM transport WHERE domain = ? LIMIT 1", (domain.lower(),)
    ).fetchone()
    return row[0] if row else None


def split_destination(dest: str, protocol: str, ports: dict[str, int]) -> tuple[str, int]:
    """ "smtp:[mail1]:10143" -> ("mail1", 10143); "smtp:mail1" -> ("mail1", port by protocol)."""
    if dest.startswith("smtp:"):
        dest = dest[len("smtp:") :]
    host, port = dest, ports[protocol]
    if dest.startswith("["):  # Postfix brackets, also the way to write an IPv6 address
        host, _, rest = dest[1:].partition("]")
        if rest.startswith(":"):
            port = int(rest[1:])
    elif dest.count(":") == 1:
        host, _, port_text = dest.partition(":")
        port = int(port_text)
    return host, port


def check_login(cfg: Config, req: dict[str, str]) -> dict[str, str] | None:
    """Runs in a thread (argon2 takes tens of milliseconds). Returns the answer headers on
    success, None on failure."""
    method, protocol = req["method"], req["protocol"]
    user = unquote_to_bytes(req["user"]).decode("utf-8", "surrogateescape")
    password = unquote_to_bytes(req["pass"])
    if protocol not in cfg.ports or len(user) > MAX_FIELD or len(password) > MAX_FIELD:
        return None
    conn = open_readonly(cfg.db)
    try:
        if method == "none":  # SMTP relay: route by the recipient's domain, no password
            match = RCPT_DOMAIN.search(req["rcpt"])
            dest = find_mailstore(conn, match.group(1)) if match else None
            if dest is None:
                return None
            host, port = split_destination(dest, protocol, cfg.ports)
            return {"Auth-Status": "OK", "Auth-Server": host, "Auth-Port": str(port)}
        row = conn.execute(
            "SELECT password FROM users WHERE email = ? LIMIT 1", (user.lower(),)
        ).fetchone()
        stored = row[0] if row else dummy_hash()  # same work whether or not the user exists
        answer = {}
        if method == "plain":
            ok = verify_password(stored, password)
        elif method in ("cram-md5", "apop"):
            ok, clear = verify_digest(stored, method, req["salt"].encode(), password)
            answer["Auth-Pass"] = clear  # the backend needs the clear password
        else:
            return None
        if not ok or row is None:
            return None
        dest = find_mailstore(conn, user.rpartition("@")[2])
        if dest is None:
            log.warning("no transport for %r", user)
            return None
        host, port = split_destination(dest, protocol, cfg.ports)
        answer.update(
            {"Auth-Status": "OK", "Auth-Server": host, "Auth-Port": str(port), "Auth-User": user}
        )
        return answer
    finally:
        conn.close()


# --- HTTP ------------------------------------------------------------------------------------


async def handle_auth(request: web.Request) -> web.Response:
    cfg = request.app[CONFIG]
    given = request.headers.get(cfg.secret_header, "")
    if not hmac.compare_digest(given.encode(), cfg.secret.encode()):
        return web.Response(status=403)
    h = request.headers
    req = {
        "method": h.get("Auth-Method", ""),
        "protocol": h.get("Auth-Protocol", ""),
        "user": h.get("Auth-User", ""),
        "pass": h.get("Auth-Pass", ""),
        "salt": h.get("Auth-Salt", ""),
        "rcpt": h.get("Auth-SMTP-To", ""),
    }
    try:
        answer = await asyncio.to_thread(check_login, cfg, req)
    except (sqlite3.Error, ValueError) as exc:  # an outage, not a wrong password
        log.error("lookup failed: %s", type(exc).__name__)
        return web.Response(status=500)
    if answer is None:
        log.info("login failed for %r from %s", req["user"], h.get("Client-IP"))
        answer = {"Auth-Status": FAILURE, "Auth-Wait": FAILURE_WAIT}
    return web.Response(headers=answer)


def make_app(cfg: Config) -> web.Application:
    app = web.Application()
    app[CONFIG] = cfg
    app.router.add_get("/{tail:.*}", handle_auth)  # any path: nginx sends the configured one
    return app


# --- command line ---------------------------------------------------------------------------


def parse_port_map(text: str) -> dict[str, int]:
    ports = dict(DEFAULT_PORTS)
    for item in filter(None, text.split(",")):
        proto, _, port = item.partition("=")
        if proto not in ports or not port.isdigit():
            raise argparse.ArgumentTypeError(f"bad port mapping {item!r}")
        ports[proto] = int(port)
    return ports


def read_password() -> str:
    if sys.stdin.isatty():
        return getpass.getpass("Password: ")
    return sys.stdin.readline().rstrip("\r\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", required=True, help="SQLite file")
    p.add_argument("--listen", default="127.0.0.1:9000", help="host:port to serve on")
    p.add_argument("--secret-header", default="X-NGX-Auth-Key")
    p.add_argument("--secret", default=os.environ.get("AUTH_SERVICE_SECRET"))
    p.add_argument("--port-map", type=parse_port_map, default=dict(DEFAULT_PORTS))
    p.add_argument("--init", action="store_true", help="create the tables and exit")
    p.add_argument("--add-user", metavar="EMAIL", help="read the password from stdin")
    p.add_argument("--scheme", default="ARGON2ID", choices=("ARGON2ID", "PLAIN"))
    p.add_argument("--add-route", nargs=2, metavar=("DOMAIN", "DEST"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    if args.init or args.add_user or args.add_route:
        conn = connect(args.db)
        with conn:  # one transaction, committed on success
            if args.add_user:
                conn.execute(
                    "INSERT OR REPLACE INTO users VALUES (?, ?)",
                    (args.add_user.lower(), hash_password(read_password(), args.scheme)),
                )
            if args.add_route:
                domain, dest = args.add_route
                conn.execute(
                    "INSERT OR REPLACE INTO transport VALUES (?, ?)", (domain.lower(), dest)
                )
        conn.close()
        return 0

    if not args.secret:
        p.error("--secret (or AUTH_SERVICE_SECRET) is required to serve")
    host, _, port = args.listen.rpartition(":")
    cfg = Config(args.db, args.secret_header, args.secret, args.port_map)
    web.run_app(make_app(cfg), host=host.strip("[]"), port=int(port), print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
