"""The directory's write path: mailstores, domains and users in mailgate's own schema.

`mailgate.cli_admin` calls these; each opens one transaction, checks what it can first so the
error names the problem ("unknown domain", "mailstore in use", ...), and raises `AdminError`
with a message meant for the operator. The read path (`auth/directory.py`) never imports this.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

from sqlalchemy import ColumnElement, Table, func, literal, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from mailgate import names
from mailgate.auth import passwords, schema
from mailgate.auth.directory import scheme_of
from mailgate.auth.schema import app_passwords, domains, mailstores, users
from mailgate.values import Secret

DEFAULT_SCHEME = "ARGON2ID"
# App password labels show in the session log as app_password=<label>: one word.
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$")
# Generated app passwords: 5 groups of 4 from 32 symbols that cannot be misread (no 0/o, 1/l),
# 100 bits in all, typed on a phone as easily as read from a screen.
_APP_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"
_APP_GROUPS, _APP_GROUP = 5, 4
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Letters (any script), digits, dots and dashes; no leading/trailing dot or dash, no "..".
# No "_" or "%" either: list_domains counts users with LIKE.
_DOMAIN = re.compile(r"^(?!.*\.\.)[^\W_](?:(?:[^\W_]|[.-])*[^\W_])?$")


class AdminError(Exception):
    """An operation was refused; the message says why, for the operator."""


@dataclass(frozen=True, slots=True)
class MailstoreInfo:
    name: str
    host: str
    imap_port: int | None
    pop3_port: int | None
    smtp_port: int | None
    tls: str
    master_user: str | None
    active: bool
    domains: int
    users: int  # users moved here (not counting the domains' users)
    smtp_login: str | None = None  # None: [backend] smtp_mode
    pool: str | None = None  # a [[pool]] that chooses the host (schema version 5)
    oauth_login: str | None = None  # None: master if there is a master user, else token


@dataclass(frozen=True, slots=True)
class DomainInfo:
    name: str
    mailstore: str
    active: bool
    users: int


@dataclass(frozen=True, slots=True)
class UserInfo:
    address: str
    mailstore: str | None  # where the user's logins go
    moved: bool  # True when the user's own mailstore overrides the domain's
    active: bool
    scheme: str  # of the stored password, e.g. {ARGON2ID}
    created_at: dt.datetime | None
    updated_at: dt.datetime | None
    oauth_only: bool = False


@dataclass(frozen=True, slots=True)
class AppPasswordInfo:
    """One app password as `user app-password list` shows it: never the hash."""

    label: str
    protocols: tuple[str, ...]
    expires_at: dt.datetime | None  # UTC
    created_at: dt.datetime | None
    last_used_at: dt.datetime | None

    @property
    def expired(self) -> bool:
        return self.expires_at is not None and self.expires_at <= dt.datetime.now(dt.UTC)


# --- schema ----------------------------------------------------------------------------------


async def init_schema(engine: AsyncEngine) -> int:
    async with engine.begin() as conn:
        try:
            return await schema.create(conn)
        except schema.SchemaError as e:
            raise AdminError(str(e)) from None


async def upgrade_schema(engine: AsyncEngine) -> tuple[int, int]:
    async with engine.begin() as conn:
        try:
            return await schema.upgrade(conn)
        except schema.SchemaError as e:
            raise AdminError(str(e)) from None


@asynccontextmanager
async def _transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """One transaction on a database whose schema is current; IntegrityError is explained."""
    async with engine.begin() as conn:
        found = await schema.version(conn)
        if found is None:
            raise AdminError("the database has no mailgate schema: run `directory init` first")
        if found != schema.SCHEMA_VERSION:
            raise AdminError(
                f"the database schema is version {found}, this mailgate needs "
                f"{schema.SCHEMA_VERSION}: run `directory upgrade`"
            )
        try:
            yield conn
        except IntegrityError:
            # Another admin got there between our check and our write.
            raise AdminError("the change conflicts with a concurrent one; try again") from None


# --- mailstores -------------------------------------------------------------------------------


async def add_mailstore(
    engine: AsyncEngine,
    name: str,
    host: str,
    *,
    imap_port: int | None = None,
    pop3_port: int | None = None,
    smtp_port: int | None = None,
    tls: str = "none",
    master_user: str | None = None,
    master_password: Secret | None = None,
    smtp_login: str | None = None,
    pool: str | None = None,
    oauth_login: str | None = None,
) -> None:
    _check_name(name)
    _check_host(host)
    if pool is not None:
        _check_pool(pool)
    if smtp_login is not None and smtp_login not in schema.SMTP_LOGINS:
        raise AdminError(f"smtp login must be one of {', '.join(schema.SMTP_LOGINS)}")
    _check_oauth_login(oauth_login, master_user)
    for port in (imap_port, pop3_port, smtp_port):
        if port is not None and not 0 < port < 65536:
            raise AdminError(f"port {port} is not from 1 to 65535")
    if tls not in schema.TLS_MODES:
        raise AdminError(f"tls must be one of {', '.join(schema.TLS_MODES)}, not {tls!r}")
    if (master_user is None) != (master_password is None):
        raise AdminError("a master user needs a master password, and the other way round")
    if master_user is not None and (not master_user or not master_user.isprintable()):
        raise AdminError("the master user name must be printable and not empty")
    if master_password is not None:
        _check_password(master_password)
    async with _transaction(engine) as conn:
        if await _id(conn, mailstores, name) is not None:
            raise AdminError(f"mailstore {name!r} already exists")
        await conn.execute(
            mailstores.insert().values(
                name=name,
                host=host,
                imap_port=imap_port,
                pop3_port=pop3_port,
                smtp_port=smtp_port,
                tls=tls,
                master_user=master_user,
                # The backend needs it in clear to log in; the database is the secret store.
                master_password=master_password.reveal() if master_password else None,
                active=True,
                smtp_login=smtp_login,
                pool=pool,
                oauth_login=oauth_login,
            )
        )


async def list_mailstores(engine: AsyncEngine) -> list[MailstoreInfo]:
    n_domains = (
        select(func.count()).where(domains.c.mailstore_id == mailstores.c.id).scalar_subquery()
    )
    n_users = select(func.count()).where(users.c.mailstore_id == mailstores.c.id).scalar_subquery()
    query = select(mailstores, n_domains.label("n_domains"), n_users.label("n_users"))
    async with _transaction(engine) as conn:
        rows = (await conn.execute(query.order_by(mailstores.c.name))).mappings().all()
    return [
        MailstoreInfo(
            r["name"],
            r["host"],
            r["imap_port"],
            r["pop3_port"],
            r["smtp_port"],
            r["tls"],
            r["master_user"],
            bool(r["active"]),
            int(r["n_domains"]),
            int(r["n_users"]),
            r["smtp_login"],
            r["pool"],
            r["oauth_login"],
        )
        for r in rows
    ]


async def set_mailstore_pool(engine: AsyncEngine, name: str, pool: str | None) -> None:
    """Send the mailstore's logins to the [[pool]] `pool` (None: to its host again)."""
    if pool is not None:
        _check_pool(pool)
    async with _transaction(engine) as conn:
        ms_id = await _require(conn, mailstores, name, "mailstore")
        await conn.execute(mailstores.update().where(mailstores.c.id == ms_id).values(pool=pool))


async def remove_mailstore(engine: AsyncEngine, name: str) -> None:
    async with _transaction(engine) as conn:
        ms_id = await _require(conn, mailstores, name, "mailstore")
        n_domains = await _count(conn, domains, domains.c.mailstore_id == ms_id)
        n_users = await _count(conn, users, users.c.mailstore_id == ms_id)
        if n_domains or n_users:
            raise AdminError(
                f"mailstore {name!r} is in use by {_plural(n_domains, 'domain')} and "
                f"{_plural(n_users, 'moved user')}; move them first"
            )
        await conn.execute(mailstores.delete().where(mailstores.c.id == ms_id))


async def set_mailstore_oauth_login(engine: AsyncEngine, name: str, mode: str | None) -> None:
    """How OAuth logins reach this mailstore: "master", "token", or None (the default)."""
    async with _transaction(engine) as conn:
        ms_id = await _require(conn, mailstores, name, "mailstore")
        master = (
            await conn.execute(select(mailstores.c.master_user).where(mailstores.c.id == ms_id))
        ).scalar()
        _check_oauth_login(mode, master)
        await conn.execute(
            mailstores.update().where(mailstores.c.id == ms_id).values(oauth_login=mode)
        )


async def set_mailstore_active(engine: AsyncEngine, name: str, active: bool) -> None:
    async with _transaction(engine) as conn:
        ms_id = await _require(conn, mailstores, name, "mailstore")
        await conn.execute(
            mailstores.update().where(mailstores.c.id == ms_id).values(active=active)
        )


# --- domains ----------------------------------------------------------------------------------


async def add_domain(engine: AsyncEngine, name: str, mailstore: str) -> None:
    name = _domain(name)
    async with _transaction(engine) as conn:
        ms_id = await _require(conn, mailstores, mailstore, "mailstore")
        if await _id(conn, domains, name) is not None:
            raise AdminError(f"domain {name!r} already exists")
        await conn.execute(domains.insert().values(name=name, mailstore_id=ms_id, active=True))


async def list_domains(engine: AsyncEngine) -> list[DomainInfo]:
    # Domain names hold no LIKE wildcards (_check_domain), so this pattern is exact.
    n_users = (
        select(func.count())
        .where(users.c.address.like(literal("%@") + domains.c.name))
        .scalar_subquery()
    )
    query = (
        select(domains.c.name, mailstores.c.name, domains.c.active, n_users)
        .join(mailstores, mailstores.c.id == domains.c.mailstore_id)
        .order_by(domains.c.name)
    )
    async with _transaction(engine) as conn:
        rows = (await conn.execute(query)).all()
    return [DomainInfo(n, ms, bool(a), int(c)) for n, ms, a, c in rows]


async def remove_domain(engine: AsyncEngine, name: str) -> None:
    name = _domain(name)
    async with _transaction(engine) as conn:
        d_id = await _require(conn, domains, name, "domain")
        n_users = await _count(conn, users, users.c.address.endswith("@" + name, autoescape=True))
        if n_users:
            raise AdminError(f"domain {name!r} has {_plural(n_users, 'user')}; remove them first")
        await conn.execute(domains.delete().where(domains.c.id == d_id))


async def set_domain_active(engine: AsyncEngine, name: str, active: bool) -> None:
    name = _domain(name)
    async with _transaction(engine) as conn:
        d_id = await _require(conn, domains, name, "domain")
        await conn.execute(domains.update().where(domains.c.id == d_id).values(active=active))


# --- users ------------------------------------------------------------------------------------


async def add_user(
    engine: AsyncEngine,
    address: str,
    password: Secret,
    *,
    mailstore: str | None = None,
    scheme: str = DEFAULT_SCHEME,
) -> None:
    address, domain = _address(address)
    stored = _hash(password, scheme)
    async with _transaction(engine) as conn:
        row = (
            await conn.execute(select(domains.c.mailstore_id).where(domains.c.name == domain))
        ).first()
        if row is None:
            raise AdminError(f"unknown domain {domain!r}: add it with `domain add` first")
        ms_id = None
        if mailstore is not None:
            ms_id = await _require(conn, mailstores, mailstore, "mailstore")
            ms_id = None if ms_id == row.mailstore_id else ms_id  # the domain's: no override
        if await _user_id(conn, address) is not None:
            raise AdminError(f"user {address!r} already exists")
        await conn.execute(
            users.insert().values(address=address, password=stored, active=True, mailstore_id=ms_id)
        )


async def set_password(
    engine: AsyncEngine, address: str, password: Secret, *, scheme: str = DEFAULT_SCHEME
) -> None:
    address, _ = _address(address)
    stored = _hash(password, scheme)
    async with _transaction(engine) as conn:
        user_id = await _require_user(conn, address)
        await conn.execute(users.update().where(users.c.id == user_id).values(password=stored))


async def set_user_active(engine: AsyncEngine, address: str, active: bool) -> None:
    address, _ = _address(address)
    async with _transaction(engine) as conn:
        user_id = await _require_user(conn, address)
        await conn.execute(users.update().where(users.c.id == user_id).values(active=active))


async def move_user(engine: AsyncEngine, address: str, mailstore: str) -> None:
    """Send the user's logins to `mailstore`; moving to the domain's own one clears the override.

    Only the route changes: copying the mailbox is the mailstores' business (dsync, imapsync).
    """
    address, domain = _address(address)
    async with _transaction(engine) as conn:
        user_id = await _require_user(conn, address)
        ms_id = await _require(conn, mailstores, mailstore, "mailstore")
        domain_ms = (
            await conn.execute(select(domains.c.mailstore_id).where(domains.c.name == domain))
        ).scalar()
        override = None if ms_id == domain_ms else ms_id
        await conn.execute(
            users.update().where(users.c.id == user_id).values(mailstore_id=override)
        )


async def check_move(engine: AsyncEngine, address: str, mailstore: str) -> None:
    """What move_user would refuse, refused before anything else is done (the cluster's
    move ends the user's sessions first)."""
    address, _ = _address(address)
    async with _transaction(engine) as conn:
        await _require_user(conn, address)
        await _require(conn, mailstores, mailstore, "mailstore")


async def remove_user(engine: AsyncEngine, address: str) -> None:
    address, _ = _address(address)
    async with _transaction(engine) as conn:
        user_id = await _require_user(conn, address)
        # Explicitly: SQLite enforces no foreign keys unless asked to, so no cascade either.
        await conn.execute(app_passwords.delete().where(app_passwords.c.user_id == user_id))
        await conn.execute(users.delete().where(users.c.id == user_id))


async def list_users(engine: AsyncEngine, domain: str | None = None) -> list[UserInfo]:
    effective = mailstores.alias("effective")
    query = (
        select(
            users.c.address,
            effective.c.name,
            users.c.mailstore_id.is_not(None),
            users.c.active,
            users.c.password,
            users.c.created_at,
            users.c.updated_at,
            users.c.oauth_only,
        )
        .outerjoin(domains, users.c.address.like(literal("%@") + domains.c.name))
        .outerjoin(
            effective,
            effective.c.id == func.coalesce(users.c.mailstore_id, domains.c.mailstore_id),
        )
        .order_by(users.c.address)
    )
    if domain is not None:
        query = query.where(users.c.address.endswith("@" + _domain(domain), autoescape=True))
    async with _transaction(engine) as conn:
        if domain is not None and await _id(conn, domains, _domain(domain)) is None:
            raise AdminError(f"unknown domain {_domain(domain)!r}")
        rows = (await conn.execute(query)).all()
    return [
        UserInfo(a, ms, bool(moved), bool(active), scheme_of(pw), created, updated, bool(oauth))
        for a, ms, moved, active, pw, created, updated, oauth in rows
    ]


async def set_oauth_only(engine: AsyncEngine, address: str, on: bool) -> None:
    """With `on`, the user's main password no longer logs in: OAuth and app passwords do."""
    address, _ = _address(address)
    async with _transaction(engine) as conn:
        user_id = await _require_user(conn, address)
        await conn.execute(users.update().where(users.c.id == user_id).values(oauth_only=on))


# --- app passwords ----------------------------------------------------------------------------


def generate_app_password() -> Secret:
    """A random app password such as "k7dq-2mxe-pa9r-tf3w-hn6c" (100 bits)."""
    groups = (
        "".join(secrets.choice(_APP_ALPHABET) for _ in range(_APP_GROUP))
        for _ in range(_APP_GROUPS)
    )
    return Secret("-".join(groups))


async def add_app_password(
    engine: AsyncEngine,
    address: str,
    label: str,
    protocols: Sequence[str],
    *,
    password: Secret | None = None,
    expires_at: dt.datetime | None = None,
    scheme: str = DEFAULT_SCHEME,
) -> Secret:
    """Give the user another password for some protocols, until `expires_at` (UTC) if set.

    Without `password` a random one is made. Returns the password: the caller shows it once,
    only its hash is stored. At most schema.MAX_APP_PASSWORDS per user, labels unique.
    """
    address, _ = _address(address)
    _check_label(label)
    wanted = _protocols(protocols)
    if expires_at is not None:
        if expires_at.tzinfo is None:
            raise AdminError("the expiry needs a time zone (UTC is assumed by the CLI)")
        if expires_at <= dt.datetime.now(dt.UTC):
            raise AdminError(f"the expiry {expires_at:%Y-%m-%d %H:%M} UTC is in the past")
    password = password if password is not None else generate_app_password()
    stored = _hash(password, scheme)
    async with _transaction(engine) as conn:
        user_id = await _require_user(conn, address)
        mine = app_passwords.c.user_id == user_id
        template = await _salt_template(conn, user_id, scheme_of(stored))
        if template is not None:
            # The salt and cost of the user's other app passwords: a login then checks all
            # of them with one hash (passwords.verify_group, directory._match_app_password).
            stored = passwords.hash_like(template, password)
        if await _count(conn, app_passwords, mine & (app_passwords.c.label == label)):
            raise AdminError(f"{address} already has an app password labelled {label!r}")
        if await _count(conn, app_passwords, mine) >= schema.MAX_APP_PASSWORDS:
            raise AdminError(
                f"{address} has {schema.MAX_APP_PASSWORDS} app passwords, the most allowed:"
                " revoke one first"
            )
        await conn.execute(
            app_passwords.insert().values(
                user_id=user_id,
                label=label,
                password=stored,
                protocols=" ".join(wanted),
                expires_at=expires_at,
            )
        )
    return password


async def _salt_template(conn: AsyncConnection, user_id: int, scheme: str) -> str | None:
    """The user's oldest app password of `scheme` ({ARGON2ID}) that new ones can share a
    salt with, if any."""
    query = (
        select(app_passwords.c.password)
        .where(app_passwords.c.user_id == user_id)
        .order_by(app_passwords.c.id)
    )
    for (stored,) in (await conn.execute(query)).all():
        if scheme_of(str(stored)) == scheme and passwords.salt_group(str(stored)) is not None:
            return str(stored)
    return None


async def list_app_passwords(engine: AsyncEngine, address: str) -> list[AppPasswordInfo]:
    address, _ = _address(address)
    ap = app_passwords
    query = select(ap.c.label, ap.c.protocols, ap.c.expires_at, ap.c.created_at, ap.c.last_used_at)
    async with _transaction(engine) as conn:
        user_id = await _require_user(conn, address)
        rows = (await conn.execute(query.where(ap.c.user_id == user_id).order_by(ap.c.id))).all()
    return [
        AppPasswordInfo(label, tuple(protos.split()), _utc(exp), _utc(created), _utc(used))
        for label, protos, exp, created, used in rows
    ]


async def revoke_app_password(engine: AsyncEngine, address: str, label: str) -> None:
    address, _ = _address(address)
    async with _transaction(engine) as conn:
        user_id = await _require_user(conn, address)
        mine = (app_passwords.c.user_id == user_id) & (app_passwords.c.label == label)
        if not await _count(conn, app_passwords, mine):
            raise AdminError(f"{address} has no app password labelled {label[:80]!r}")
        await conn.execute(app_passwords.delete().where(mine))


# --- checks and look-ups ----------------------------------------------------------------------


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise AdminError(f"mailstore name {name[:80]!r}: use 1-64 letters, digits, '.', '_' or '-'")


def _check_pool(pool: str) -> None:
    """A [[pool]] name as config.py accepts it (whether the config has it is seen at login:
    the directory does not read the config file)."""
    if not (0 < len(pool) <= schema.MAX_NAME) or not pool.isprintable() or " " in pool:
        raise AdminError(f"pool name {pool[:80]!r}: a word of 1-64 printable characters")
    if "/" in pool:
        raise AdminError(f"pool name {pool[:80]!r}: must not contain '/'")


def _check_oauth_login(mode: str | None, master_user: str | None) -> None:
    if mode is None:
        return
    if mode not in schema.OAUTH_LOGINS:
        raise AdminError(f"oauth login must be one of {', '.join(schema.OAUTH_LOGINS)}")
    if mode == "master" and not master_user:
        raise AdminError("oauth login 'master' needs a master user on the mailstore")


def _check_label(label: str) -> None:
    if not _LABEL.match(label):
        raise AdminError(
            f"label {label[:80]!r}: use 1-64 letters, digits, '.', '_', '@', '+' or '-'"
        )


def _protocols(names: Sequence[str]) -> tuple[str, ...]:
    wanted = {n.strip().lower() for n in names if n.strip()}
    unknown = sorted(wanted - set(schema.APP_PASSWORD_PROTOCOLS))
    if unknown or not wanted:
        raise AdminError(
            f"protocols must be some of {', '.join(schema.APP_PASSWORD_PROTOCOLS)}"
            + (f", not {unknown[0]!r}" if unknown else "")
        )
    return tuple(p for p in schema.APP_PASSWORD_PROTOCOLS if p in wanted)


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    """SQLite and MariaDB give naive datetimes back; they were written in UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=dt.UTC)


def _check_host(host: str) -> None:
    try:
        parsed, port = schema.parse_host(host)
    except schema.BadRoute:
        parsed, port = "", None
    if parsed != host.strip("[]") or port is not None:
        raise AdminError(f"host {host[:80]!r}: give a host name or an IP address, no port")


def _domain(name: str) -> str:
    """Stored as the directory looks it up: `names.normalise_domain` (U-labels, lower case)."""
    try:
        name = names.normalise_domain(name)
    except names.BadName as e:
        raise AdminError(f"domain refused: {e}") from None
    if len(name) > schema.MAX_DOMAIN or not _DOMAIN.match(name):
        raise AdminError(f"domain {name[:80]!r} is not a valid domain name")
    return name


def _address(address: str) -> tuple[str, str]:
    """Stored normalised (`names.normalise`, local part lower-cased), as logins are looked up."""
    try:
        address = names.normalise(address)
    except names.BadName as e:
        raise AdminError(f"address refused: {e}") from None
    domain = names.split(address)[1]
    if not domain or any(c.isspace() for c in address):
        raise AdminError(f"address {address[:80]!r}: expected local-part@domain")
    return address, _domain(domain)


def _check_password(password: Secret) -> None:
    value = password.reveal()
    if not value:
        raise AdminError("empty password: an empty password never logs in")
    if any(c in value for c in "\r\n\0"):
        raise AdminError("the password contains CR, LF or NUL, which no mail client can send")


def _hash(password: Secret, scheme: str) -> str:
    _check_password(password)
    try:
        stored = passwords.hash_password(password, scheme.upper())
    except passwords.UnknownScheme:
        raise AdminError(f"unknown password scheme {scheme!r}") from None
    if len(stored) > schema.MAX_PASSWORD:
        raise AdminError(f"password too long: stored, it exceeds {schema.MAX_PASSWORD} characters")
    return stored


async def _id(conn: AsyncConnection, table: Table, name: str) -> int | None:
    """The id of the mailstore or domain called `name`."""
    value = (await conn.execute(select(table.c.id).where(table.c.name == name))).scalar()
    return int(value) if value is not None else None


async def _require(conn: AsyncConnection, table: Table, name: str, what: str) -> int:
    found = await _id(conn, table, name)
    if found is None:
        raise AdminError(f"unknown {what} {name!r}")
    return found


async def _user_id(conn: AsyncConnection, address: str) -> int | None:
    value = (await conn.execute(select(users.c.id).where(users.c.address == address))).scalar()
    return int(value) if value is not None else None


async def _require_user(conn: AsyncConnection, address: str) -> int:
    found = await _user_id(conn, address)
    if found is None:
        raise AdminError(f"unknown user {address!r}")
    return found


async def _count(conn: AsyncConnection, table: Table, condition: ColumnElement[bool]) -> int:
    query = select(func.count()).select_from(table).where(condition)
    return int((await conn.execute(query)).scalar() or 0)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
