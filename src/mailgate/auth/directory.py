"""The SQL directory: an `Authenticator` that checks passwords and finds routes in a database.

This is the read path and stays short: one query per login on mailgate's own schema (two on
an operator's schema), a password check off the event loop, and a `Decision`. Writes live in
`mailgate.admin`. Rules that matter to a client:

- Names are normalised once (`mailgate.names`: trimmed, NFC, no invisible characters, domain
  lower-cased in U-labels; the local part lower-cased on mailgate's own schema), and the
  decision carries the `identity` the database matched, so counters key on the stored user.
- Unknown user, wrong password and disabled user/domain/mailstore give the same `Reject`,
  and an unknown user's password is still checked, against a dummy of the same scheme and
  cost as the users of its domain (`auth/dummy.py`), so the answer takes as long.
- An outage is never a wrong password: any database error or a query over `query_timeout`
  is a `TempFail`. The queries run on connections kept open (`auth/sqlread.py`), which
  reconnect by themselves when the database comes back.
- The reason of every refusal goes to the log (never the password or the stored hash).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import re
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from mailgate import names
from mailgate.auth import passwords, schema
from mailgate.auth.dummy import Dummies
from mailgate.auth.oauth import TokenInvalid, TokenUnavailable, TokenValidator
from mailgate.auth.schema import engine_url
from mailgate.auth.sqlread import Reader, ReadError, Row, describe, open_reader, parse_url
from mailgate.config import DirectorySettings, OAuthSettings
from mailgate.names import BadName
from mailgate.values import (
    BackendAuth,
    BackendTLS,
    ClientInfo,
    Credentials,
    Decision,
    Method,
    Reject,
    Route,
    Secret,
    TempFail,
    TokenChallenge,
)

__all__ = [
    "BadUserName",
    "DirectoryUnavailable",
    "SqlDirectory",
    "UserRecord",
    "Verdict",
    "engine_url",
    "normalise_user",
    "scheme_of",
]

log = logging.getLogger("mailgate.auth.directory")

# Lookups given up on (no answer in query_timeout) and writes in the background, which a
# closing directory waits for: at most this long.
CLOSE_TIMEOUT = 4.0
# Schemes cheap enough to check on the event loop; everything else (argon2, bcrypt, crypt)
# costs milliseconds and runs in a worker thread so other sessions are not stalled.
FAST_SCHEMES = ("{PLAIN}", "{CLEARTEXT}", "{PLAIN-MD5}", "{LDAP-MD5}", "{SHA}", "{SHA256}")

# An existing schema's value is already tagged when it starts with {SCHEME} (Dovecot) or is
# a modular crypt string ($2b$..., $argon2id$..., $6$...); anything else is `default_scheme`.
_TAGGED = re.compile(r"^(\{[A-Za-z0-9._-]+\}|\$[A-Za-z0-9-]+\$)")
_FALSE = frozenset({"0", "n", "no", "f", "false", "off", ""})
# What `mailgate user add` hashes with: unknown users cost this until a real user was seen.
BUILTIN_SCHEME = "ARGON2ID"
# Users whose stored schemes are sampled at the first login (the newest): enough to see every
# scheme a directory uses, cheap to read once.
PRIME_USERS = 1000


# Relay refusals, as Postfix words them (RFC 3463): not ours to relay / not an address.
RELAY_DENIED = "554 5.7.1"
BAD_RECIPIENT = "501 5.1.3"
_RCPT = re.compile(r"^RCPT TO:\s*<([^<>]*)>", re.IGNORECASE)

T = TypeVar("T")


def _recipient(rcpt_line: str) -> str | None:
    """The address in a whole "RCPT TO:<a@b> ..." line, as nginx passes it in Auth-SMTP-To."""
    m = _RCPT.match(rcpt_line)
    return m.group(1) if m else None


# A login name we refuse before any lookup; the message is safe to log.
BadUserName = BadName


class DirectoryUnavailable(Exception):
    """The database could not answer (outage, timeout, broken query): a temporary failure."""


@dataclass(frozen=True, slots=True)
class UserRecord:
    """What the directory knows about one user, for one protocol."""

    user: str  # who the database matched, normalised: the identity counters key on
    login: str  # the name to log in with on the backend
    password: Secret | None  # the stored "{SCHEME}..." string, never printed
    refused: str | None = None  # why a correct password is still refused (disabled ...)
    problem: str | None = None  # why no route can be built (bad data: a temporary failure)
    mailstore: str | None = None
    host: str | None = None
    port: int | None = None
    tls: BackendTLS | None = None
    master_user: str | None = None
    master_password: Secret | None = None
    smtp_mode: str | None = None  # the mailstore's smtp_login
    pool: str | None = None  # the mailstore's [[pool]], which then chooses the host
    oauth_only: bool = False  # the main password is refused (tokens and app passwords only)
    app_passwords: int = 0  # how many the user has (built-in schema only)
    oauth_login: str | None = None  # the mailstore's: "master" | "token" | None
    protocol: str = ""  # the protocol the record was looked up for


@dataclass(frozen=True, slots=True)
class Verdict:
    """A decision plus the reason for it, for the log and `mailgate auth test`."""

    decision: Decision
    reason: str
    user: str = "-"  # the normalised name, "-" when the name itself was refused
    level: int = logging.INFO


def normalise_user(raw: str, *, lower_local: bool) -> tuple[str, str]:
    """(user, domain) by `mailgate.names.normalise`; raises BadUserName (= names.BadName)."""
    user = names.normalise(raw, lower_local=lower_local)
    return user, names.split(user)[1]


def scheme_of(stored: str) -> str:
    """The scheme name of a stored password, for logs: never any of the hash itself."""
    tagged = _TAGGED.match(stored)
    return tagged.group(1)[:32] if tagged else "(none)"


class SqlDirectory:
    """`Authenticator` over mailgate's schema or an operator's queries (settings.queries)."""

    def __init__(self, settings: DirectorySettings, oauth: OAuthSettings | None = None) -> None:
        self.settings = settings
        parse_url(settings.url)  # a bad URL fails at start, not at the first login
        q = settings.queries
        self._custom = schema.custom_queries(q.password, q.route) if q is not None else None
        # Not in DirectorySettings yet; an existing schema usually stores clear text.
        self._default_scheme = settings.default_scheme
        self._builtin = schema.builtin_login_query()
        self._domain = schema.builtin_domain_query()
        self._app_passwords = schema.builtin_app_passwords_query()
        self._touch = schema.builtin_touch_app_password()
        self._sample_query = schema.builtin_password_sample(PRIME_USERS)
        self._any_app_password = schema.builtin_any_app_password()
        # [oauth]: None when tokens cannot be validated (XOAUTH2/OAUTHBEARER are refused).
        self.tokens = TokenValidator(oauth) if oauth is not None and oauth.validates else None
        # What the error challenge to a refused token says (protocols/sasl.py writes it).
        self._token_challenge = (
            TokenChallenge(oauth.scope, oauth.openid_configuration) if oauth is not None else None
        )
        self._reader: Reader | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._background: set[asyncio.Future[Any]] = set()
        self._dummies = Dummies(BUILTIN_SCHEME if q is None else settings.default_scheme)
        # App passwords are always checked with one hash (they share a salt per user), and
        # a wrong password of anyone costs that hash once any user is seen to have one:
        # against a real app password, or a dummy of the same class (`_app_passwords`).
        self._app_dummies = Dummies(BUILTIN_SCHEME)
        self._app_passwords_seen = False
        # Master passwords by mailstore, from the last lookup of each: a cached master-user
        # route gets its secret here (`master_secret`), since the route cache keeps none.
        self._masters: dict[str, Secret] = {}
        self._primed = self._custom is not None  # an operator's schema cannot be listed
        self._priming: asyncio.Future[None] | None = None

    # --- Authenticator ---------------------------------------------------------------------

    async def authenticate(self, creds: Credentials, client: ClientInfo) -> Decision:
        verdict = await self.explain(creds, client)
        log.log(
            verdict.level,
            "directory: %s: %s (%s, %s from %s)",
            verdict.user,
            verdict.reason,
            creds.method.value,
            client.protocol,
            client.ip,
        )
        return verdict.decision

    async def close(self) -> None:
        if self._background:  # abandoned queries and writes: bounded wait
            await asyncio.wait(set(self._background), timeout=CLOSE_TIMEOUT)
        reader, self._reader = self._reader, None
        if reader is not None:
            await reader.close()
        if self.tokens is not None:
            await self.tokens.close()

    # --- the decision ------------------------------------------------------------------------

    async def explain(self, creds: Credentials, client: ClientInfo) -> Verdict:
        """The decision and its reason (`authenticate` logs it; `auth test` prints it)."""
        if creds.method is Method.NONE:  # SMTP relay: no user, the recipient decides
            return await self._relay(creds)
        if creds.method.is_oauth:  # the token names the user; creds.user may be ""
            return await self._oauth(creds, client)
        try:
            user, _ = normalise_user(creds.user, lower_local=self._custom is None)
        except BadUserName as e:
            return Verdict(Reject(), f"refused: {e}")  # the name is not logged: it may be hostile
        verdict = await self._explain(user, creds, client)
        return dataclasses.replace(verdict, user=user)

    async def _explain(self, user: str, creds: Credentials, client: ClientInfo) -> Verdict:
        if creds.method is Method.NONE:
            return await self._relay(creds)
        if creds.method not in _CHECKS:
            return Verdict(Reject(), f"method {creds.method.value} is not for the directory")
        if not creds.secret:
            return Verdict(Reject(), "empty password")  # never valid, whatever is stored
        if creds.method in _SALTED and not creds.salt:
            return Verdict(Reject(), "challenge missing", level=logging.ERROR)
        await self._prime_dummies()
        try:
            record = await self._lookup(user, client.protocol)
        except DirectoryUnavailable as e:
            reason = f"directory unavailable: {e}"
            return Verdict(TempFail(reason), reason, level=logging.WARNING)
        return await self._decide(record, user, creds, client.protocol)

    async def _decide(
        self, record: UserRecord | None, user: str, creds: Credentials, protocol: str
    ) -> Verdict:
        stored = record.password.reveal() if record and record.password else None
        if record is None or stored is None:
            await self._check_dummy(user, creds)
            if self._app_passwords_due(creds):  # what a wrong password costs, as below
                with contextlib.suppress(DirectoryUnavailable):
                    await self._check_app_passwords(user, creds, protocol)
            if record is None:
                return Verdict(Reject(), "unknown user")
            return Verdict(Reject(identity=record.user), "no password stored")
        self._dummies.remember(names.split(user)[1], stored)
        refused = Reject(identity=record.user)
        try:
            ok = await _run_check(creds, stored)
        except passwords.NoCleartext:
            method = creds.method.value
            return Verdict(
                refused,
                f"{method} needs a cleartext password for {user}; use PLAIN or store {{PLAIN}}",
                level=logging.WARNING,
            )
        except (passwords.UnknownScheme, passwords.MalformedHash) as e:
            scheme = scheme_of(stored)
            if isinstance(e, passwords.UnknownScheme):
                reason = f"stored password of {user} uses unknown scheme {scheme}"
            else:
                reason = f"stored password of {user} is not a valid {scheme} value"
            return Verdict(refused, reason, level=logging.ERROR)
        if not ok or record.oauth_only:
            return await self._app_password(record, creds, main_matched=ok)
        if record.refused:  # checked after the password, so a disabled user costs the same
            return Verdict(refused, record.refused)
        return self._route(record, stored, creds)

    async def _check_dummy(self, user: str, creds: Credentials) -> None:
        """A real user's work for a user without a stored password: the same scheme and cost
        as the users of the domain, on the same path (loop or thread). The result is moot."""
        stored = await self._dummies.stored_for(user, names.split(user)[1])
        with contextlib.suppress(ValueError):  # NoCleartext, as a hashed user's CRAM-MD5 gets
            await _run_check(creds, stored)

    async def _prime_dummies(self) -> None:
        """Learn the schemes and costs of the stored passwords before the first check, so an
        unknown user costs right from the first login after a start. Own schema only: an
        operator's cannot be listed (its unknown users cost `default_scheme` until real users
        of the same domain were seen). One query, once; the logins meanwhile wait for it."""
        if self._primed:
            return
        if self._priming is None or self._priming.get_loop() is not asyncio.get_running_loop():
            self._priming = asyncio.ensure_future(self._prime())
        await asyncio.shield(self._priming)  # a client that leaves does not cancel it

    async def _prime(self) -> None:
        with contextlib.suppress(DirectoryUnavailable):  # then the logins teach it instead
            sample, app_passwords = await self._guarded(self._sample, {})
            for address, stored in sample:
                self._dummies.remember(names.split(address)[1], stored)
            self._app_passwords_seen = self._app_passwords_seen or app_passwords
        self._primed = True  # once, even after an outage: no login waits for it twice

    async def _sample(
        self, reader: Reader, _: dict[str, str]
    ) -> tuple[list[tuple[str, str]], bool]:
        """Stored passwords of the newest users, and whether any user has an app password."""
        rows = await reader.fetch(self._sample_query, {})
        app_passwords = bool(await reader.fetch(self._any_app_password, {}))
        return [(str(row["address"]), str(row["password"])) for row in rows], app_passwords

    def canonical_name(self, raw: str) -> str:
        """The name as this directory looks it up (the route cache keys on it); BadName."""
        return normalise_user(raw, lower_local=self._custom is None)[0]

    def master_secret(self, route: Route) -> Secret | None:
        """The master password a cached master-user `route` logs in with, held here (outside
        the route cache) from the last lookup of its mailstore; None if there is none now."""
        if self._custom is not None:
            s = self.settings
            return s.master_password if s.master_user else None
        return self._masters.get(route.mailstore or "")

    def _route(self, record: UserRecord, stored: str, creds: Credentials) -> Verdict:
        if record.problem or record.host is None or record.port is None:
            problem = record.problem or "no route"
            return Verdict(TempFail(problem), problem, level=logging.ERROR)
        backend_auth = BackendAuth.PASSWORD
        if record.master_user and record.master_password is not None:
            login = f"{record.login}{self.settings.master_separator}{record.master_user}"
            secret, backend_auth = record.master_password, BackendAuth.MASTER
            self._masters[record.mailstore or ""] = secret
        elif creds.method in _SALTED:
            clear = passwords.cleartext(stored)
            if clear is None:
                problem = f"{creds.method.value} ok but no cleartext to log in to the backend"
                reason = problem + "; set a master user"
                return Verdict(TempFail(problem), reason, level=logging.ERROR)
            login, secret = record.login, Secret(clear)
        else:
            login, secret = record.login, creds.secret
        if not record.master_user:
            self._masters.pop(record.mailstore or "", None)  # the master user was removed
        route = self._mailstore_route(record, login, secret, backend_auth)
        # DEBUG: the session already logs one line per login; refusals are worth a line more.
        return Verdict(route, f"ok: {record.host}:{record.port} as {login}", level=logging.DEBUG)

    async def _relay(self, creds: Credentials) -> Verdict:
        """SMTP without AUTH (port 25): accept mail for the domains we host, to the domain's
        mailstore; refuse relaying anywhere else."""
        recipient = _recipient(creds.smtp_to or "") or ""
        try:
            if "@" not in recipient:
                raise BadUserName("no domain")
            user, domain = normalise_user(recipient, lower_local=self._custom is None)
        except BadUserName:
            return Verdict(Reject("Bad recipient address", error_code=BAD_RECIPIENT), "bad RCPT")
        params = {"user": user, "domain": domain, "protocol": "smtp"}
        try:
            host, port, tls, mailstore, mode, pool = await self._guarded(self._query_domain, params)
        except DirectoryUnavailable as e:
            reason = f"directory unavailable: {e}"
            return Verdict(TempFail(reason), reason, user=user, level=logging.WARNING)
        if host is None or port is None:
            reject = Reject("Relay access denied", error_code=RELAY_DENIED)
            return Verdict(reject, f"relay to {domain} refused: not a hosted domain", user=user)
        route = Route(host, port, "", Secret(""), tls, mailstore, mode, pool=pool)
        return Verdict(route, f"relay ok: {host}:{port}", user=user, level=logging.DEBUG)

    async def _query_domain(
        self, reader: Reader, params: dict[str, str]
    ) -> tuple[str | None, int | None, BackendTLS | None, str | None, str | None, str | None]:
        if self._custom is not None:
            q = self._custom.route
            row = _first(await reader.fetch(q.clause, q.params(params)))
            host, port, problem = self._custom_route(row, "smtp")
            return (None,) * 6 if problem else (host, port, None, host, None, None)
        row = _first(await reader.fetch(self._domain, params))
        if row is None or not row["domain_active"] or not row["ms_active"]:
            return (None,) * 6
        port = row["ms_smtp_port"] or self.settings.ports.get("smtp")
        tls = BackendTLS(row["ms_tls"]) if row["ms_tls"] else None
        return row["ms_host"], port, tls, row["ms_name"], row["ms_smtp_login"], row["ms_pool"]

    # --- OAuth tokens -----------------------------------------------------------------------------

    async def _oauth(self, creds: Credentials, client: ClientInfo) -> Verdict:
        """XOAUTH2 / OAUTHBEARER: the token's username claim names a directory user, who must
        exist and be active, and be the user the client named (if it named one)."""
        named = creds.user or "-"
        refused = Reject(token_challenge=self._token_challenge)
        if self.tokens is None:
            return Verdict(
                refused, "token login, but [oauth] is not set up", named, logging.WARNING
            )
        check = await self.tokens.validate(creds.secret)
        if isinstance(check, TokenUnavailable):
            return Verdict(TempFail(check.reason), check.reason, named, logging.WARNING)
        if isinstance(check, TokenInvalid):
            return Verdict(refused, f"token refused: {check.reason}", named)
        lower = self._custom is None
        try:
            user, _ = normalise_user(check.user, lower_local=lower)
            given = normalise_user(creds.user, lower_local=lower)[0] if creds.user else user
        except BadUserName as e:
            return Verdict(refused, f"token refused: its user name is refused: {e}", named)
        if given != user:
            return Verdict(refused, f"token is for {user}, the client logged in as {given}", given)
        try:
            record = await self._lookup(user, client.protocol)
        except DirectoryUnavailable as e:
            reason = f"directory unavailable: {e}"
            return Verdict(TempFail(reason), reason, user, logging.WARNING)
        if record is None:
            return Verdict(refused, f"token ok ({check.via}) but no such user", user)
        if record.refused:
            return Verdict(dataclasses.replace(refused, identity=record.user), record.refused, user)
        return dataclasses.replace(self._oauth_route(record, creds), user=user)

    def _oauth_route(self, record: UserRecord, creds: Credentials) -> Verdict:
        """The mailstore's oauth_login: "master" logs in as user*master, "token" passes the
        client's token on with the client's mechanism. Unset: master if there is one."""
        has_master = bool(record.master_user) and record.master_password is not None
        mode = record.oauth_login or ("master" if has_master else "token")
        if mode == "master":
            if not has_master:
                problem = f"mailstore {record.mailstore} has oauth_login master but no master user"
                return Verdict(TempFail(problem), problem, level=logging.ERROR)
            return self._backend_route(record, BackendAuth.MASTER)
        return self._backend_route(record, BackendAuth(creds.method.value), creds.secret)

    def _backend_route(
        self,
        record: UserRecord,
        how: BackendAuth,
        token: Secret | None = None,
        label: str | None = None,
    ) -> Verdict:
        """A route that logs in with the master user (how = MASTER) or the token."""
        if record.problem or record.host is None or record.port is None:
            problem = record.problem or "no route"
            return Verdict(TempFail(problem), problem, level=logging.ERROR)
        if how is BackendAuth.MASTER:
            assert record.master_user and record.master_password is not None
            login = f"{record.login}{self.settings.master_separator}{record.master_user}"
            secret = record.master_password
            self._masters[record.mailstore or ""] = secret  # for a cached app-password route
        else:
            assert token is not None
            login, secret = record.login, token
        route = self._mailstore_route(record, login, secret, how, label)
        what = f" (app password {label!r})" if label else ""
        reason = f"ok{what}: {record.host}:{record.port} as {login} by {how.value}"
        return Verdict(route, reason, level=logging.DEBUG)

    @staticmethod
    def _mailstore_route(
        record: UserRecord, login: str, secret: Secret, how: BackendAuth, label: str | None = None
    ) -> Route:
        """The route to `record`'s mailstore, logging in as `login` with `secret`."""
        assert record.host is not None and record.port is not None
        return Route(
            record.host,
            record.port,
            login,
            secret,
            record.tls,
            record.mailstore,
            record.smtp_mode,
            identity=record.user,
            pool=record.pool,
            backend_auth=how,
            credential_label=label,
        )

    # --- app passwords ----------------------------------------------------------------------------

    def _app_passwords_due(self, creds: Credentials) -> bool:
        """Whether a wrong password costs an app-password check: for PLAIN and LOGIN, once any
        user was seen to have an app password (a directory without any pays nothing)."""
        return self._app_passwords_seen and creds.method in _APP_PASSWORD_METHODS

    async def _app_password(
        self, record: UserRecord, creds: Credentials, *, main_matched: bool
    ) -> Verdict:
        """The main password did not match, or may not be used: try the user's app passwords
        for this protocol that have not expired (at most schema.MAX_APP_PASSWORDS)."""
        refusal = (
            "main password refused: the user is oauth-only" if main_matched else "wrong password"
        )
        refused = Reject(identity=record.user)
        if record.app_passwords:
            self._app_passwords_seen = True
        if not self._app_passwords_due(creds):
            return Verdict(refused, refusal)
        protocol = record.protocol
        try:
            matched = await self._check_app_passwords(record.user, creds, protocol)
        except DirectoryUnavailable as e:
            reason = f"directory unavailable: {e}"
            return Verdict(TempFail(reason), reason, level=logging.WARNING)
        if matched is None:
            return Verdict(refused, f"{refusal}, and no app password for {protocol} matched")
        app_id, label, last_used = matched
        if record.refused:
            return Verdict(refused, record.refused)
        if not record.master_user or record.master_password is None:
            problem = f"app password ok, but mailstore {record.mailstore} has no master user"
            return Verdict(TempFail(problem), problem, level=logging.ERROR)
        self._touch_app_password(app_id, last_used)
        return self._backend_route(record, BackendAuth.MASTER, label=label)

    async def _check_app_passwords(
        self, user: str, creds: Credentials, protocol: str
    ) -> tuple[int, str, dt.datetime | None] | None:
        """The app password of `user` that `creds` match, if any: one query and, for
        mailgate's own values (one salt per user), one hash whatever their number; a dummy
        of the same class when the user has none for `protocol`, or is unknown. Raises
        DirectoryUnavailable."""
        rows = await self._guarded(self._query_app_passwords, {"user": user})
        domain = names.split(user)[1]
        for row in rows:
            self._app_dummies.remember(domain, str(row["password"]))
        dummy = await self._app_dummies.stored_for(user, domain)
        return await asyncio.to_thread(_match_app_password, rows, creds.secret, protocol, dummy)

    async def _query_app_passwords(self, reader: Reader, params: dict[str, str]) -> list[Row]:
        return await reader.fetch(self._app_passwords, params)

    def _touch_app_password(self, app_id: int, last_used: dt.datetime | None) -> None:
        """Record when an app password was last used, at most every LAST_USED_STEP: a write
        per login would cost more than the login. In the background; a failure is ignored."""
        now = dt.datetime.now(dt.UTC)
        if last_used is not None and now - _utc(last_used) < LAST_USED_STEP:
            return
        reader = self._current_reader()
        values = {"app_id": app_id, "used_at": now}

        async def write() -> None:
            async with asyncio.timeout(self.settings.query_timeout):
                await reader.write(self._touch, values)

        self._track(asyncio.ensure_future(write()))

    # --- the lookup ------------------------------------------------------------------------------

    async def lookup(self, user: str, protocol: str) -> UserRecord | None:
        """The user's record for `protocol`, or None. Raises DirectoryUnavailable."""
        try:
            user, _ = normalise_user(user, lower_local=self._custom is None)
        except BadUserName:
            return None
        return await self._lookup(user, protocol)

    async def _lookup(self, user: str, protocol: str) -> UserRecord | None:
        """`lookup` for a name normalised already (by `explain`: not twice per login)."""
        params = {"user": user, "domain": names.split(user)[1], "protocol": protocol}
        return await self._guarded(self._query, params)

    async def _guarded(
        self,
        query: Callable[[Reader, dict[str, str]], Coroutine[Any, Any, T]],
        params: dict[str, str],
    ) -> T:
        """Run one lookup under query_timeout; any failure is DirectoryUnavailable."""
        reader = self._current_reader()
        # The lookup runs in its own task so that giving up on it is instant: a cancelled
        # query closes its connection, or leaves a SQLite thread to finish its step, and that
        # must not hold the client. Its clean-up finishes in the background.
        task = asyncio.ensure_future(query(reader, params))
        try:
            done, _ = await asyncio.wait((task,), timeout=self.settings.query_timeout)
        except asyncio.CancelledError:  # the client went away: the other connections are fine
            task.cancel()
            self._track(task)
            raise
        if not done:
            task.cancel()
            self._track(task)
            reader.abandoned(task)
            raise DirectoryUnavailable(f"no answer in {self.settings.query_timeout:g} s")
        try:
            return task.result()
        except (DirectoryUnavailable, ReadError) as e:
            raise DirectoryUnavailable(str(e)) from None
        except Exception as e:  # an error of unknown kind is temporary (design rule 5)
            raise DirectoryUnavailable(describe(e)) from None

    async def _query(self, reader: Reader, params: dict[str, str]) -> UserRecord | None:
        if self._custom is not None:
            return await self._lookup_custom(reader, params)
        row = _first(await reader.fetch(self._builtin, params))
        if row is None:  # not even the empty row: the query is not schema.py's
            raise DirectoryUnavailable("the login query returned no row")
        # Built for an unknown user too (from NULLs and the domain's mailstore): the work
        # must not tell the two apart.
        record = self._builtin_record(row, params["protocol"])
        return None if row["address"] is None else record

    def _builtin_record(self, row: Mapping[Any, Any], protocol: str) -> UserRecord:
        refused = next(
            (why for flag, why in _ACTIVE_FLAGS if row[flag] is not None and not row[flag]), None
        )
        problem, port, tls = None, None, None
        if row["ms_host"] is None:
            problem = "no mailstore: the user's domain is missing and no mailstore is set"
        else:
            port = row.get(f"ms_{protocol}_port") or self.settings.ports.get(protocol)
            problem = None if port else f"no port for protocol {protocol!r}"
            tls = BackendTLS(row["ms_tls"]) if row["ms_tls"] else None
        master = row["ms_master_password"]
        return UserRecord(
            user=row["address"] or "",
            login=row["address"] or "",
            password=Secret(row["password"]) if row["password"] is not None else None,
            refused=refused,
            problem=problem,
            mailstore=row["ms_name"],
            host=row["ms_host"],
            port=port,
            tls=tls,
            master_user=row["ms_master_user"],
            master_password=Secret(master) if master is not None else None,
            smtp_mode=row["ms_smtp_login"],
            pool=row["ms_pool"],
            oauth_only=bool(row["oauth_only"]),
            app_passwords=int(row["app_passwords"] or 0),
            oauth_login=row["ms_oauth_login"],
            protocol=protocol,
        )

    async def _lookup_custom(self, reader: Reader, params: dict[str, str]) -> UserRecord | None:
        assert self._custom is not None
        q = self._custom
        found = _first(await reader.fetch(q.password.clause, q.password.params(params)))
        # The route is queried and read for an unknown user too: less work would tell.
        route = _first(await reader.fetch(q.route.clause, q.route.params(params)))
        host, port, problem = self._custom_route(route, params["protocol"])
        # An unknown user's record is built too, from no columns: the same work either way.
        row = found if found is not None else _NO_USER
        if "password" not in row:
            raise DirectoryUnavailable("directory.queries.password returns no 'password' column")
        raw = _text(row["password"])
        refused = None if _truthy(_column(row, "active", True)) else "user disabled"
        login = _text(_column(row, "user")) or params["user"]
        s = self.settings
        record = UserRecord(
            user=_identity(_column(row, "user"), params["user"]),
            login=login,
            password=Secret(self._tag(raw)) if raw else None,
            refused=refused,
            problem=problem,
            mailstore=host,
            host=host,
            port=port,
            master_user=s.master_user,
            master_password=s.master_password if s.master_user else None,
            protocol=params["protocol"],
        )
        return record if found is not None else None

    def _custom_route(
        self, row: Mapping[Any, Any] | None, protocol: str
    ) -> tuple[str | None, int | None, str | None]:
        if row is None or not _text(_column(row, "host")):
            return None, None, "directory.queries.route found no host for this user"
        try:
            host, port = schema.parse_host(_text(row["host"]))
            if _column(row, "port") is not None:
                port = int(row["port"])
        except (schema.BadRoute, ValueError, TypeError) as e:
            return None, None, f"directory.queries.route: {e}"
        port = port or self.settings.ports.get(protocol)
        if not port or not 0 < port < 65536:
            return None, None, f"no valid port for protocol {protocol!r}"
        return host, port, None

    def _tag(self, stored: str) -> str:
        return stored if _TAGGED.match(stored) else f"{{{self._default_scheme}}}{stored}"

    # --- the connections --------------------------------------------------------------------------

    def _current_reader(self) -> Reader:
        # Made in the running loop: asyncio drivers bind their sockets to it.
        loop = asyncio.get_running_loop()
        if self._reader is None or self._loop is not loop:
            s = self.settings
            self._reader = open_reader(s.url, s.pool_size, s.query_timeout)
            self._loop = loop
        return self._reader

    def _track(self, task: asyncio.Future[Any]) -> None:
        self._background.add(task)
        task.add_done_callback(_forget(self._background))


def _forget(tasks: set[asyncio.Future[Any]]) -> Callable[[asyncio.Future[Any]], None]:
    def done(task: asyncio.Future[Any]) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: the failure was already turned into a TempFail

    return done


# --- password checks per method --------------------------------------------------------------


def _check_plain(stored: str, creds: Credentials) -> bool:
    return passwords.verify(stored, creds.secret)


def _check_cram(stored: str, creds: Credentials) -> bool:
    return passwords.verify_cram_md5(stored, creds.salt or "", creds.secret)


def _check_apop(stored: str, creds: Credentials) -> bool:
    return passwords.verify_apop(stored, creds.salt or "", creds.secret)


_CHECKS: dict[Method, Callable[[str, Credentials], bool]] = {
    Method.PLAIN: _check_plain,
    Method.LOGIN: _check_plain,
    Method.CRAM_MD5: _check_cram,
    Method.APOP: _check_apop,
}
_SALTED = frozenset({Method.CRAM_MD5, Method.APOP})
# App passwords are stored hashed, so only methods that carry the password itself can use them.
_APP_PASSWORD_METHODS = frozenset({Method.PLAIN, Method.LOGIN})
# How stale an app password's last_used_at may get before a login writes it again.
LAST_USED_STEP = dt.timedelta(minutes=5)
# What an operator's password query "returns" for an unknown user (see _lookup_custom).
_NO_USER: Mapping[str, Any] = {"password": None}
# (column, reason) in the order a refusal is explained.
_ACTIVE_FLAGS = (
    ("user_active", "user disabled"),
    ("domain_active", "domain disabled"),
    ("ms_active", "mailstore disabled"),
)


def _match_app_password(
    rows: Sequence[Mapping[str, Any]], password: Secret, protocol: str, dummy: str
) -> tuple[int, str, dt.datetime | None] | None:
    """(id, label, last used) of an app password that is for `protocol`, has not expired
    and matches. Values sharing a salt and cost (`passwords.salt_group`: all that mailgate
    writes for one user) are checked with one hash; with none to check, `dummy` is checked
    instead, so the work is the same. A worker-thread job: each hash is a full ARGON2ID."""
    now = dt.datetime.now(dt.UTC)
    groups: dict[str, list[Mapping[Any, Any]]] = {}
    for row in rows:
        expires = row["expires_at"]
        if protocol not in str(row["protocols"]).split():
            continue
        if expires is not None and _utc(expires) <= now:
            continue
        stored = str(row["password"])
        groups.setdefault(passwords.salt_group(stored) or f"row {row['id']}", []).append(row)
    if not groups:
        with contextlib.suppress(ValueError):
            passwords.verify(dummy, password)
        return None
    for group in groups.values():
        try:
            index = passwords.verify_group([str(row["password"]) for row in group], password)
        except (passwords.UnknownScheme, passwords.MalformedHash):
            labels = ", ".join(repr(row["label"]) for row in group)
            log.error("directory: app password %s has an unusable stored hash", labels)
            continue
        if index is not None:
            row = group[index]
            return int(row["id"]), str(row["label"]), row["last_used_at"]
    return None


def _utc(value: dt.datetime) -> dt.datetime:
    """SQLite and MariaDB hand back naive datetimes; mailgate writes them in UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


async def _run_check(creds: Credentials, stored: str) -> bool:
    """Check the password: cheap schemes on the loop, the rest in a thread (dummies too)."""
    if creds.method in _SALTED or stored.startswith(FAST_SCHEMES):
        return _CHECKS[creds.method](stored, creds)
    return await asyncio.to_thread(_CHECKS[creds.method], stored, creds)


def _first(rows: list[Row]) -> Row | None:
    return rows[0] if rows else None


def _identity(returned: object, queried: str) -> str:
    """The user an operator's password query matched: its `user` column, normalised (case
    kept, as the database judges it), else the name it was asked for."""
    try:
        return names.normalise(_text(returned), lower_local=False) if returned else queried
    except BadName:  # the database holds a name we would refuse: count by the asked name
        return queried


def _column(row: Mapping[Any, Any], name: str, default: object = None) -> object:
    """An optional column: `row.get` raises and catches an exception inside SQLAlchemy for a
    missing one (tens of microseconds a login, which only known users would pay)."""
    return row[name] if name in row else default  # noqa: SIM401  (the reason above)


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "surrogateescape")
    return str(value)


def _truthy(value: object) -> bool:
    if isinstance(value, str | bytes):
        return _text(value).strip().lower() not in _FALSE
    return bool(value)
