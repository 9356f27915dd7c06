"""What `serve` would fail on, found before it starts: `mailgate check` and serve's preflight.

config.py checks the shape of the settings; this checks them against the machine, without
binding or connecting anything:

- every certificate, key and CA file is readable by the user running this (under systemd
  that is the service's User=, so run `check` as that user: `runuser -u mailgate -- mailgate
  check ...`), and each key matches its certificate;
- the directory's database driver is installed and is an asyncio driver (SQLAlchemy would
  otherwise fail at the first login, which the client sees as `NO [UNAVAILABLE]`), and so is
  the redis client when cluster.redis_url (or throttle.redis_url) is set;
- log_file can be opened for appending.

A listener address that cannot be bound is not a problem here: the running server may hold
it. Every problem names its setting, the file and what to do, one line each.
"""

from __future__ import annotations

import errno
import importlib
import os
import ssl
import tempfile
from pathlib import Path

from mailgate.config import ConfigError, Settings

# Driver module -> the pip extra that installs it (pyproject.toml's optional-dependencies).
EXTRAS = {"asyncpg": "postgresql", "aiomysql": "mysql", "asyncmy": "mysql", "redis": "redis"}


def check(settings: Settings) -> None:
    """Raise ConfigError naming the first problem (and how many more there are)."""
    found = problems(settings)
    if found:
        more = f" (and {len(found) - 1} more: run mailgate check)" if len(found) > 1 else ""
        raise ConfigError(found[0] + more)


def problems(settings: Settings) -> list[str]:
    return [*_tls_files(settings), *_drivers(settings), *_log_file(settings)]


# --- files ------------------------------------------------------------------------------------


def _tls_files(settings: Settings) -> list[str]:
    found: list[str] = []
    tls = settings.tls
    pairs = [("tls", tls.certificate, tls.certificate_key)]
    pairs += [(f"tls.sni[{i}]", s.certificate, s.certificate_key) for i, s in enumerate(tls.sni)]
    for where, cert, key in pairs:
        if cert is None or key is None:
            continue
        unreadable = [
            p
            for p in (
                _unreadable(f"{where}.certificate", cert),
                _unreadable(f"{where}.certificate_key", key),
            )
            if p
        ]
        found += unreadable or [p for p in [_mismatch(where, cert, key)] if p]
    if tls.verify_client != "off" and tls.client_certificate is not None:
        found += [p for p in [_unreadable("tls.client_certificate", tls.client_certificate)] if p]
    if settings.backend.ca_file is not None:
        found += [p for p in [_unreadable("backend.ca_file", settings.backend.ca_file)] if p]
    return found


def _unreadable(key: str, path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as e:
        return f"{key}: {path} cannot be read by {_user()}: {e.strerror or e}"
    return None


def _mismatch(where: str, cert: Path, key: Path) -> str | None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            return f"{where}.certificate_key: {key} is not the key of the certificate {cert}"
        return f"{where}.certificate: {cert} / {key}: not a PEM certificate and key ({e.reason})"
    except OSError as e:
        return f"{where}.certificate: {cert} / {key}: {e.strerror or e}"
    return None


def _user() -> str:
    try:
        import pwd

        name = pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        name = "this user"
    return f"{name} (uid {os.geteuid()})"


def _log_file(settings: Settings) -> list[str]:
    path = settings.log_file
    if path is None:
        return []
    if path.exists():
        if not os.access(path, os.W_OK) or path.is_dir():
            return [f"log_file: {path} cannot be written by {_user()}"]
        return []
    try:  # can a file be created there? (os.access says nothing useful for root)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".mailgate-check-"):
            pass
    except OSError as e:
        reason = "no such directory" if e.errno == errno.ENOENT else e.strerror
        return [f"log_file: {path} cannot be created by {_user()}: {reason}"]
    return []


# --- drivers ----------------------------------------------------------------------------------


def _drivers(settings: Settings) -> list[str]:
    found: list[str] = []
    if settings.directory is not None:
        found += [p for p in [_database_driver(settings.directory.url)] if p]
    if settings.cluster.redis_url:
        try:
            importlib.import_module("redis.asyncio")
        except ImportError:
            found.append(f"cluster.redis_url: the redis client is not installed: {_pip('redis')}")
    return found


def _database_driver(url: str) -> str | None:
    """Build the engine as the admin CLI will, and the reader as the directory's lookups will
    (no connection is made): that imports the driver SQLAlchemy picks for this URL (refusing
    one that is not asyncio) and the one the lookups run on, whichever that is."""
    from sqlalchemy.exc import ArgumentError, InvalidRequestError

    from mailgate.auth.schema import make_engine
    from mailgate.auth.sqlread import open_reader, parse_url

    scheme = url.split("://", 1)[0]
    try:
        parse_url(url)  # its errors never show the URL (make_engine's may: the password)
        engine = make_engine(url, pool_size=1)
        open_reader(url, pool_size=1, query_timeout=1.0)  # nothing to close: nothing opened
    except ImportError as e:
        module = (e.name or str(e)).split(".")[0]
        return f"directory.url: {scheme}: the driver {module!r} is not installed: {_pip(module)}"
    except ValueError as e:
        return f"directory.url: {e}"
    except InvalidRequestError as e:  # a driver, but not an asyncio one (psycopg2, pymysql)
        return f"directory.url: {scheme}: not an asyncio driver ({e})"
    except ArgumentError as e:  # no such dialect or driver name
        return f"directory.url: {scheme}: unknown database or driver ({e})"
    engine.sync_engine.dispose(close=False)  # nothing was opened; drop the empty pool
    return None


def _pip(module: str) -> str:
    extra = EXTRAS.get(module)
    return f"pip install 'mailgate[{extra}]'" if extra else f"pip install {module}"
