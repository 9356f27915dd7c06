"""The session driver: one coroutine per client from accept to login, then a relay.

It owns the client's connection, the deadlines and the TLS handshakes; it runs the protocol
core through the one driver loop (`netio.exchange`), asks the authenticator, logs in at the
backend, and at success hands both transports to a `Relay` and returns, so an idle logged-in
session costs no coroutine frame. Every session ends with one log line, written when it ends.

Data moves forward only: the core hands credentials (the SMTP envelope and the attempt number
included) to the authenticator, the decision goes to the backend login, the backend's answer
(and, for a refused SMTP recipient, its words for the client) comes back as the outcome the
core turns into its reply. Nothing is read back out of a core after the fact.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import secrets
import ssl
import time
from dataclasses import dataclass

from mailgate import metrics
from mailgate.addresses import subscriber
from mailgate.auth import Authenticator
from mailgate.auth.throttle import user_key
from mailgate.backend.connect import BackendConnection, BackendError, BackendOptions, login
from mailgate.backend.connect import make_core as make_login_core
from mailgate.backend.routing import (
    BackendRouter,
    NoBackend,
    Plan,
    SessionCount,
    Target,
    affinity_key,
)
from mailgate.config import LimitsSettings, ListenerSettings, ProtocolSettings
from mailgate.netio import Channel, Deadline, exchange
from mailgate.networks import NetworkList
from mailgate.protocols.core import PreAuthCore
from mailgate.protocols.events import (
    Authenticate,
    Close,
    Event,
    Limited,
    LoggedIn,
    LoginOutcome,
    Rejected,
    Send,
    Unavailable,
)
from mailgate.protocols.policy import PreAuthPolicy
from mailgate.protocols.sasl import error_challenge
from mailgate.protocols.smtp import SmtpCore
from mailgate.protocols.spec import ProtocolSpec
from mailgate.ratelog import RateLimitedLog
from mailgate.relay import Relay
from mailgate.statestore import Store
from mailgate.tls import tls_info
from mailgate.values import (
    ClientInfo,
    CloseReason,
    Credentials,
    Reject,
    Route,
    TempFail,
    TlsInfo,
    TokenChallenge,
)

log = logging.getLogger("mailgate.session")
_refusals = RateLimitedLog(log)

# CRAM-MD5 challenges and APOP timestamps must be unique (RFC 2195, RFC 1939): a serial from
# a random start per process, plus the time and the host name (nginx: pid, msec and host).
_SALT_SERIAL = itertools.count(secrets.randbits(48))
# An auth service may ask for a long Auth-Wait; the client is not held longer than this.
MAX_AUTH_WAIT = 30.0
# Hops a login may still take through proxies (IMAP ID "x-proxy-ttl"): Dovecot's default
# proxy_ttl. A proxy in front may say fewer; a client cannot make it more.
PROXY_TTL = 5
# A session's backend until its login chose one (who lists it, the session line logs it).
NO_BACKEND = "-"


class Handshakes:
    """TLS handshakes in progress in this worker, in all and per client address."""

    __slots__ = ("_by_ip", "_limits", "total")

    def __init__(self, limits: LimitsSettings) -> None:
        self._limits = limits
        self._by_ip: dict[str, int] = {}
        self.total = 0

    def begin(self, ip: str) -> bool:
        """Count one more handshake from `ip`, unless a bound says no."""
        key = subscriber(ip)
        mine = self._by_ip.get(key, 0)
        if self.total >= self._limits.handshakes or mine >= self._limits.handshakes_per_ip:
            return False
        self._by_ip[key] = mine + 1
        self.total += 1
        return True

    def end(self, ip: str) -> None:
        key = subscriber(ip)
        left = self._by_ip.get(key, 1) - 1
        if left > 0:
            self._by_ip[key] = left
        else:
            self._by_ip.pop(key, None)
        self.total -= 1


class Sessions:
    """The live sessions of one worker: for shutdown, `mailgate who` and `kick`."""

    def __init__(self) -> None:
        self.preauth: set[Session] = set()
        self.relays: dict[Relay, SessionRecord] = {}

    def describe(
        self, user: str | None = None, backend: str | None = None
    ) -> list[dict[str, object]]:
        """The logged-in sessions, as `mailgate who` shows them (filtered, if asked)."""
        return [record.describe() for record in self.matching(user, backend)]

    def sweep_idle(self, now: float) -> None:
        """End the relayed sessions idle for their protocol's proxy_timeout."""
        for relay in list(self.relays):
            relay.check_idle(now)

    def kick(self, user: str | None = None, backend: str | None = None) -> int:
        """End the matching sessions with the protocol's goodbye; how many there were.

        A matching login still on its way (authenticated, at the backend) gets a temporary
        failure instead of its session: a move's kick must leave nothing on the old store.
        So does the user's login whose backend is not chosen yet (its password still being
        checked): its affinity member was given with its first round trip, before the move
        began, and would be the old one."""
        records = self.matching(user, backend)
        for record in records:
            if record.relay is not None:
                record.relay.kick()
        wanted = user_key(user) if user else None
        for session in self.preauth:
            unchosen = wanted is not None and session.backend == NO_BACKEND
            if session.user and _selected(session, wanted, None if unchosen else backend):
                session.kicked = True
        return len(records)

    def matching(self, user: str | None, backend: str | None) -> list[SessionRecord]:
        wanted = user_key(user) if user else None
        return [record for record in self.relays.values() if _selected(record, wanted, backend)]


def _selected(session: Session | SessionRecord, user: str | None, backend: str | None) -> bool:
    """Whether who/kick for `user` (user_key'd) and `backend` (None: any) mean `session`."""
    return (user is None or user_key(session.user) == user) and (
        backend is None or backend in (session.backend, session.mailstore)
    )


@dataclass(frozen=True, slots=True)
class ListenerContext:
    """Everything the sessions of one listener share, built once at start."""

    listener: ListenerSettings
    protocol: ProtocolSettings
    spec: ProtocolSpec
    policy: PreAuthPolicy
    server_tls: ssl.SSLContext | None
    handshake_timeout: float
    backend: BackendOptions
    authenticator: Authenticator
    hostname: str
    sessions: Sessions
    handshakes: Handshakes
    store: Store  # the node's (or cluster's) session counts, for [limits] per_user ...
    limits: LimitsSettings
    trusted: NetworkList  # trusted_networks: their clients' own address counts no limit
    router: BackendRouter  # pools, health and the loop guard (backend/routing.py)


class Session:
    __slots__ = (
        "attempts",
        "backend",
        "chan",
        "client",
        "core",
        "ctx",
        "kicked",
        "label",
        "lease",
        "mailstore",
        "peer",
        "reason",
        "started",
        "target",
        "user",
    )

    def __init__(self, ctx: ListenerContext, chan: Channel) -> None:
        self.ctx = ctx
        self.chan = chan
        self.started = time.monotonic()
        self.user = ""
        self.backend = NO_BACKEND
        self.reason = CloseReason.EOF
        self.attempts = 0
        self.lease: tuple[str | None, str, bool] | None = None  # the session counted in [limits]
        self.mailstore: str | None = None
        self.target: Target | None = None  # where the backend login succeeded
        self.label: str | None = None  # the app password that logged in (its label)
        self.kicked = False  # Sessions.kick matched this login while it was on its way
        salt = f"<{next(_SALT_SERIAL)}.{int(time.time())}@{ctx.hostname}>"
        # The connection's own client; `client` becomes what a trusted peer claims, if it does.
        self.peer = self.client = _client_info(chan, ctx.listener.protocol)
        policy = ctx.policy
        if self.client.tls is not None and not policy.tls_active:  # TLS ended at the proxy
            policy = dataclasses.replace(policy, tls_active=True, starttls=False)
        if ctx.trusted and self.client.ip in ctx.trusted:
            policy = dataclasses.replace(policy, trusted=True)
        self.core: PreAuthCore = ctx.spec.core(policy, salt)

    async def run(self) -> None:
        ctx, chan = self.ctx, self.chan
        ctx.sessions.preauth.add(self)
        metrics.add(metrics.ACTIVE_PREAUTH, 1)
        relayed = False
        try:
            deadline = chan.loop.time() + ctx.protocol.login_timeout
            with Deadline(chan.loop, deadline):  # the whole login phase, whatever it waits on
                relayed = await self._preauth(deadline)
        except _Refused:
            pass  # the reason is set, the refusal logged
        except TimeoutError:
            self.reason = CloseReason.TIMEOUT
            chan.write(ctx.spec.goodbyes.idle)
        except (OSError, ssl.SSLError) as e:  # a reset, a broken TLS record: the client's doing
            self.reason = CloseReason.CONNECTION_ERROR
            log.debug("session %s: %s", self.client.ip, type(e).__name__)
        except asyncio.CancelledError:
            self.reason = CloseReason.SHUTDOWN
            chan.write(ctx.spec.goodbyes.shutdown)
            raise
        except Exception:
            self.reason = CloseReason.INTERNAL_ERROR
            log.exception("session %s: internal error", self.client.ip)
            chan.write(ctx.spec.goodbyes.unavailable)
        finally:
            ctx.sessions.preauth.discard(self)
            metrics.add(metrics.ACTIVE_PREAUTH, -1)
            if not relayed:
                if self.core.claim_ignored:
                    self._take_claim()  # only to log it: the session ends
                if self.lease is not None:  # counted, but the session never got relayed
                    _release_soon(ctx.store, self.lease)
                    self.lease = None
                chan.finish()
                metrics.count(metrics.SESSIONS, ctx.listener.protocol, self.reason.value)
                # A load balancer's health check (PROXY LOCAL) is not worth a line each.
                health_check = chan.origin is not None and chan.origin.client is None
                level = logging.DEBUG if health_check else logging.INFO
                _log_session(SessionRecord(self), self.reason, level=level)

    # --- the phases ---------------------------------------------------------------------------

    async def _preauth(self, deadline: float) -> bool:
        """Run the core until login or close. True when a relay took over the connection."""
        ctx, chan, core = self.ctx, self.chan, self.core
        events = await self._greeting()
        while True:
            event = await exchange(
                chan,
                core,
                events,
                read_timeout=ctx.protocol.client_timeout,
                send_timeout=ctx.protocol.send_timeout,
                deadline=deadline,
                start_tls=self._start_tls,
            )
            if isinstance(event, Close):
                self.reason = event.reason
                return False
            assert isinstance(event, Authenticate)
            # Like nginx, read nothing more while the login is decided: what the client sends
            # meanwhile waits in the kernel and is relayed after a successful login.
            chan.hold()
            self.kicked = False
            outcome, backend = await self._login(event.credentials)
            if self.kicked and backend is not None:  # kicked on its way: no session after all
                self._abandon(backend)
                await self._release()
                log.info("session %s: %s kicked while logging in", self.client.ip, _safe(self.user))
                outcome, backend = Unavailable(), None
            pipelined = chan.take()
            if pipelined:
                core.feed(pipelined)
            if chan.closed:
                core.feed(b"")  # EOF
            ended = core.next_events()  # the client left, or flooded us, meanwhile
            if ended:
                if backend is not None:
                    self._abandon(backend)
                events = ended
                continue
            events = core.finish_login(outcome)
            if backend is not None:
                for reply in events:  # the success reply, with the client's tag
                    if isinstance(reply, Send):
                        chan.write(reply.data)
                self._start_relay(backend)
                return True
            chan.release()

    def _abandon(self, backend: BackendConnection) -> None:
        """A backend login that will not be relayed."""
        backend.channel.abort()
        if self.target is not None:
            self.ctx.router.abandoned(self.target)

    async def _greeting(self) -> list[Event]:
        """The greeting; with SMTP's greeting_delay, first check the client waits for it."""
        delay = self.ctx.protocol.greeting_delay
        if not delay or not isinstance(self.core, SmtpCore):
            return self.core.greet()
        try:
            early = await self.chan.recv(self.chan.loop.time() + delay)
        except TimeoutError:
            return self.core.greet()
        if early:
            return self.core.early_talker()
        self.core.feed(b"")
        return self.core.next_events()

    async def _start_tls(self) -> None:
        """STARTTLS / STLS, after the core's go-ahead: a handshake, counted against the
        worker's handshake bounds like those of implicit-TLS listeners."""
        ctx, ip = self.ctx, self.client.ip
        if ctx.server_tls is None or not ctx.handshakes.begin(ip):
            self.reason = CloseReason.HANDSHAKE_LIMIT
            _refusals.warning("refusing a TLS handshake from %s: too many in progress", ip)
            raise _Refused
        try:
            deadline = self.chan.loop.time() + ctx.handshake_timeout
            await self.chan.start_tls(ctx.server_tls, server_side=True, deadline=deadline)
        except (TimeoutError, OSError, ssl.SSLError) as e:  # no goodbye into a broken handshake
            self.reason = CloseReason.HANDSHAKE_FAILED
            metrics.count(metrics.TLS_HANDSHAKE_FAILURES, ctx.listener.protocol, "starttls")
            log.debug("STARTTLS with %s failed: %s", ip, type(e).__name__)
            raise _Refused from None
        finally:
            ctx.handshakes.end(ip)
        self.peer = self.client = _client_info(self.chan, ctx.listener.protocol)

    async def _login(self, creds: Credentials) -> tuple[LoginOutcome, BackendConnection | None]:
        self._take_claim()
        self.attempts = creds.attempt
        self.user = creds.user
        loop = self.chan.loop
        asked = loop.time()
        try:
            decision = await self.ctx.authenticator.authenticate(creds, self.client)
        except Exception as e:  # an authenticator must not raise; treat it as an outage
            log.error("authenticator raised %s for %s", type(e).__name__, _safe(creds.user))
            decision = TempFail("authenticator raised")
        protocol = self.ctx.listener.protocol
        result = _RESULTS.get(type(decision), "tempfail")
        metrics.observe(metrics.AUTH_DURATION, loop.time() - asked, protocol, result)
        if isinstance(decision, Route):
            if not await self._lease(decision):
                return Limited(), None
            outcome, connection = await self._backend_login(decision, creds)
            if connection is None:
                await self._release()
            return outcome, connection
        if isinstance(decision, Reject):
            metrics.count(metrics.LOGINS, protocol, "rejected")
            await asyncio.sleep(min(decision.wait, MAX_AUTH_WAIT))
            challenge = _token_challenge(creds, decision)
            return Rejected(decision.message, decision.error_code, challenge), None
        metrics.count(metrics.LOGINS, protocol, "tempfail")
        log.warning(
            "auth temporary failure for %s from %s: %s",
            _safe(creds.user),
            self.client.ip,
            decision.reason,
        )
        await asyncio.sleep(min(decision.wait, MAX_AUTH_WAIT))
        return Unavailable(), None

    def _take_claim(self) -> None:
        """From this login on, the client is who a trusted peer says it is (for the auth
        request, the throttle, the limits, the logs and the backend); a claim from anywhere
        else changed nothing, and is logged once."""
        core, peer = self.core, self.peer
        if core.claim_ignored:
            core.claim_ignored = False
            _refusals.warning(
                "ignoring the client address %s claimed: not in trusted_networks", peer.ip
            )
        claim = core.claim
        if claim is not None:
            self.client = dataclasses.replace(
                peer, ip=claim.ip, port=claim.port or 0, host=None, via=peer.ip
            )

    async def _lease(self, route: Route) -> bool:
        """Count this session against the [limits], before any backend is touched."""
        limits = self.ctx.limits
        if not (limits.per_user or limits.per_user_ip or limits.per_ip):
            return True
        user = user_key(route.identity or self.user)
        trusted = self.client.ip in self.ctx.trusted
        refusal = await self.ctx.store.acquire(user, subscriber(self.client.ip), trusted)
        if refusal is not None:
            metrics.count(metrics.LOGINS, self.ctx.listener.protocol, "limited")
            _refusals.warning(
                "limits: refusing %s from %s: %s reached", user, self.client.ip, refusal.value
            )
            return False
        self.lease = (user, subscriber(self.client.ip), trusted)
        return True

    async def _release(self) -> None:
        lease, self.lease = self.lease, None
        if lease is not None:
            await self.ctx.store.release(*lease)

    async def _backend_login(
        self, route: Route, creds: Credentials
    ) -> tuple[LoginOutcome, BackendConnection | None]:
        """Log in where the route says: through its pool's members in order (each admitted
        when tried; a shared-storage pool's next member after a temporary failure), never
        at one of our own listeners. Nothing to try is a fast temporary failure."""
        ctx, protocol = self.ctx, self.ctx.listener.protocol
        self.label = route.credential_label
        self.user = self.user or route.identity or ""  # OAUTHBEARER may name nobody itself
        router = ctx.router
        hops = PROXY_TTL if creds.proxy_ttl is None else min(creds.proxy_ttl, PROXY_TTL)
        plan: Plan | NoBackend
        if hops <= 1:  # proxies in front of us used up the hops: a loop between proxies
            reason = f"x-proxy-ttl {creds.proxy_ttl} from the client: no hop left (a loop?)"
            plan = NoBackend(reason, "loop")
        else:
            plan = await router.plan_login(route, protocol, affinity_key(route, self.client.ip))
        failure: BackendError | None = None
        while not isinstance(plan, NoBackend) and (target := plan.next()) is not None:
            self.backend = target.name
            self.mailstore = target.route.mailstore or route.mailstore
            core = make_login_core(
                protocol, target.route, ctx.backend, self.client, creds, proxy_ttl=hops - 1
            )
            try:
                conn = await login(target.route, ctx.backend, core, router.guard.refuses_peer)
            except BackendError as e:
                reason = router.failed(target, e)
                log.warning(
                    "backend login failed for %s from %s (%s): %s",
                    _safe(self.user),
                    self.client.ip,
                    reason,
                    e.detail,
                )
                failure = e
                if e.temporary and e.client_reply is None:
                    continue  # a shared-storage pool's next member, if any
                break
            router.succeeded(target)
            self.target = target
            metrics.count(metrics.LOGINS, protocol, "ok")
            return LoggedIn(conn.reply), conn
        metrics.count(metrics.LOGINS, protocol, "backend_error")
        if failure is None:  # nothing was tried: no member takes logins, or a loop
            refusal = plan if isinstance(plan, NoBackend) else plan.refusal()
            router.refused(refusal)
            self.backend = f"{refusal.pool}/-" if refusal.pool else self.backend
            log.warning(
                "no backend for %s from %s: %s", _safe(self.user), self.client.ip, refusal.reason
            )
            return Unavailable(), None
        return failure.client_reply or Unavailable(), None

    def _start_relay(self, backend: BackendConnection) -> None:
        ctx, chan = self.ctx, self.chan
        client_transport, backend_transport = chan.transport, backend.channel.transport
        assert client_transport is not None and backend_transport is not None
        record = SessionRecord(self)
        self.lease = None  # the record gives it back when the relay ends
        if self.target is not None:
            record.counted = ctx.router.session_started(self.target)
        relay = Relay(
            client_transport,
            backend_transport,
            idle_timeout=ctx.protocol.proxy_timeout,
            goodbyes=ctx.spec.goodbyes,
            boundary=ctx.spec.boundary(),
            normal_end=ctx.spec.normal_end,
            on_done=record.done,
            on_client_lost=chan.detach(),
            loop=chan.loop,
        )
        record.relay = relay
        ctx.sessions.relays[relay] = record
        metrics.add(metrics.ACTIVE_RELAY, 1)
        relay.start(self.core.trailing, backend.trailing)


class _Refused(Exception):
    """The session cannot go on and there is nothing to say; `Session.reason` says why."""


class SessionRecord:
    """A logged-in session as the worker keeps it: what `mailgate who` lists and the end-of-
    session log line needs. The Session, its core, its buffers and the credentials are dropped
    when the relay starts; only this small record stays."""

    __slots__ = (
        "attempts",
        "backend",
        "client",
        "counted",
        "label",
        "lease",
        "mailstore",
        "protocol",
        "relay",
        "router",
        "sessions",
        "since",
        "started",
        "store",
        "user",
    )

    def __init__(self, session: Session) -> None:
        self.protocol = session.ctx.listener.protocol
        self.client = session.client
        self.user = session.user
        self.backend = session.backend
        self.mailstore = session.mailstore
        self.started = session.started
        self.since = time.time() - (time.monotonic() - session.started)
        self.attempts = session.attempts
        self.lease = session.lease
        self.store = session.ctx.store
        self.relay: Relay | None = None
        self.router = session.ctx.router
        self.sessions = session.ctx.sessions
        self.counted: SessionCount | None = None  # counted on its backend (routing.py)
        self.label = session.label

    def describe(self) -> dict[str, object]:
        relay = self.relay
        return {
            "user": self.user,
            "protocol": self.protocol,
            "client": f"{self.client.ip}:{self.client.port}",
            "backend": self.backend,
            "mailstore": self.mailstore,
            "tls": self.client.tls.protocol if self.client.tls else None,
            "since": round(self.since, 3),
            "bytes_in": relay.bytes_in if relay else 0,
            "bytes_out": relay.bytes_out if relay else 0,
            "pid": os.getpid(),
        }

    def done(self, relay: Relay) -> None:
        self.sessions.relays.pop(relay, None)
        if self.counted is not None:
            self.router.session_ended(self.counted)
            self.counted = None
        metrics.add(metrics.ACTIVE_RELAY, -1)
        if self.lease is not None:
            lease, self.lease = self.lease, None
            _release_soon(self.store, lease)
        reason = relay.ended or CloseReason.CLIENT_CLOSED
        metrics.count(metrics.SESSIONS, self.protocol, reason.value)
        metrics.count(metrics.BYTES, self.protocol, "in", amount=relay.bytes_in)
        metrics.count(metrics.BYTES, self.protocol, "out", amount=relay.bytes_out)
        _log_session(self, reason, relay)


_releases: set[asyncio.Future[None]] = set()


def _release_soon(store: Store, lease: tuple[str | None, str, bool]) -> None:
    """Give a session's lease back from a callback (the relay's end runs in one)."""
    task = asyncio.ensure_future(store.release(*lease))
    _releases.add(task)
    task.add_done_callback(_releases.discard)


def _log_session(
    rec: SessionRecord, reason: CloseReason, relay: Relay | None = None, level: int = logging.INFO
) -> None:
    if not log.isEnabledFor(level):  # skip the formatting work, once per session
        return
    c = rec.client
    traffic = f" in={relay.bytes_in} out={relay.bytes_out}" if relay else ""
    label = f" app_password={_safe(rec.label)}" if rec.label else ""
    via = f" via={c.via}" if c.via else ""
    log.log(
        level,
        "%s client=%s:%d%s user=%s%s backend=%s tls=%s attempts=%d%s duration=%.3f outcome=%s",
        rec.protocol,
        c.ip,
        c.port,
        via,
        _safe(rec.user) or "-",
        label,
        rec.backend,
        c.tls.protocol if c.tls else "no",
        rec.attempts,
        traffic,
        time.monotonic() - rec.started,
        reason.value,
    )


_RESULTS: dict[type, str] = {Route: "ok", Reject: "rejected", TempFail: "tempfail"}


def _token_challenge(creds: Credentials, reject: Reject) -> bytes | None:
    """An OAuth login's refusal starts with the error challenge (RFC 7628 3.2.2), with what
    the authenticator says of it ([oauth] scope and issuer), a bare one when it says nothing
    (a throttle's lockout)."""
    if not creds.method.is_oauth:
        return None
    said = reject.token_challenge or TokenChallenge()
    return error_challenge(
        creds.method, scope=said.scope, openid_configuration=said.openid_configuration
    )


def _client_info(chan: Channel, protocol: str) -> ClientInfo:
    """Who the client is: the connection's peer, or what a trusted proxy's PROXY header says
    (address, and TLS when the proxy terminated it)."""
    transport = chan.transport
    assert transport is not None
    peer = transport.get_extra_info("peername") or ("", 0)
    local = transport.get_extra_info("sockname") or ("", 0)
    tls = tls_info(transport)
    origin = chan.origin
    if origin is not None:
        if origin.client is not None:
            peer = origin.client
        if origin.destination_ip is not None and origin.destination_port is not None:
            local = (origin.destination_ip, origin.destination_port)
        if tls is None and origin.ssl is not None and origin.ssl.tls:
            tls = TlsInfo(
                protocol=origin.ssl.version or "",
                cipher=origin.ssl.cipher or "",
                client_verify="SUCCESS" if origin.ssl.cert_verified else "NONE",
                client_subject=f"CN={origin.ssl.cn}" if origin.ssl.cn else None,
            )
    return ClientInfo(
        ip=str(peer[0]),
        port=int(peer[1]),
        protocol=protocol,
        local_ip=str(local[0]),
        local_port=int(local[1]),
        tls=tls,
    )


def _safe(text: str) -> str:
    """A client-supplied name made safe for a log line (no control bytes, bounded length)."""
    if len(text) <= 128 and text.isprintable() and " " not in text:
        return text  # the common case, without building a new string
    clean = "".join(c if c.isprintable() and c != " " else "?" for c in text[:128])
    return clean + ("..." if len(text) > 128 else "")
