"""The session driver: one coroutine per client from accept to login, then a relay.

It owns the socket, the timeouts and the TLS upgrade; it feeds bytes to the protocol core and
performs the events the core returns (send, start TLS, authenticate, close). After a successful
login it hands both transports to a `Relay` and the coroutine ends, so an idle logged-in
session costs no coroutine frame. Exactly one log line is written per session, at its end.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from mailgate import metrics
from mailgate.auth import Authenticator
from mailgate.backend.connect import (
    BackendConnection,
    BackendError,
    BackendOptions,
    SmtpSession,
    login,
    make_core,
)
from mailgate.backend.smtp import SmtpLogin
from mailgate.config import ListenerSettings, ProtocolSettings
from mailgate.netio import Channel
from mailgate.protocols.events import (
    Authenticate,
    Close,
    Event,
    LoggedIn,
    LoginOutcome,
    Rejected,
    Send,
    StartTLS,
    Unavailable,
)
from mailgate.protocols.farewell import Farewell
from mailgate.protocols.imap import ImapCore
from mailgate.protocols.policy import PreAuthPolicy
from mailgate.protocols.pop3 import Pop3Core
from mailgate.protocols.smtp import SmtpCore
from mailgate.relay import Relay
from mailgate.tls import tls_info
from mailgate.values import ClientInfo, Credentials, Method, Reject, Route, TempFail

log = logging.getLogger("mailgate.session")

Core = ImapCore | Pop3Core | SmtpCore
CORES: dict[str, Callable[[PreAuthPolicy, str], Core]] = {
    "imap": ImapCore,
    "pop3": Pop3Core,
    "smtp": SmtpCore,
}
# CRAM-MD5 challenges and APOP timestamps must be unique (RFC 2195, RFC 1939): a serial from
# a random start per process, plus the time and the host name (nginx: pid, msec and host).
_SALT_SERIAL = itertools.count(secrets.randbits(48))
# An auth service may ask for a long Auth-Wait; the client is not held longer than this.
MAX_AUTH_WAIT = 30.0


@dataclass(frozen=True, slots=True)
class ListenerContext:
    """Everything the sessions of one listener share, built once at start."""

    listener: ListenerSettings
    protocol: ProtocolSettings
    policy: PreAuthPolicy
    farewell: Farewell
    server_tls: ssl.SSLContext | None
    handshake_timeout: float
    backend: BackendOptions
    authenticator: Authenticator
    hostname: str
    sessions: Sessions


class Sessions:
    """The live sessions of one worker, for graceful shutdown."""

    def __init__(self) -> None:
        self.preauth: set[Session] = set()
        self.relays: set[Relay] = set()


class Session:
    __slots__ = (
        "attempts",
        "backend",
        "chan",
        "client",
        "core",
        "ctx",
        "outcome",
        "started",
        "user",
    )

    def __init__(self, ctx: ListenerContext, chan: Channel) -> None:
        self.ctx = ctx
        self.chan = chan
        self.started = time.monotonic()
        self.user = ""
        self.backend = "-"
        self.outcome = "closed"
        self.attempts = 0
        salt = f"<{next(_SALT_SERIAL)}.{int(time.time())}@{ctx.hostname}>"
        self.core = CORES[ctx.listener.protocol](ctx.policy, salt)
        self.client = _client_info(chan, ctx.listener.protocol)

    async def run(self) -> None:
        sessions = self.ctx.sessions
        sessions.preauth.add(self)
        metrics.ACTIVE_PREAUTH.inc()
        relay_started = False
        try:
            deadline = asyncio.get_running_loop().time() + self.ctx.protocol.login_timeout
            relay_started = await self._preauth(deadline)
        except TimeoutError:
            self.outcome = "timeout"
            self.chan.write(self.ctx.farewell.idle)
        except OSError as e:  # a failed TLS handshake, a reset: the client's doing, no trace
            self.outcome = f"connection error ({type(e).__name__})"
        except asyncio.CancelledError:
            self.outcome = "shutdown"
            self.chan.write(self.ctx.farewell.shutdown)
            raise
        except Exception:
            self.outcome = "internal error"
            log.exception("session %s: internal error", self.client.ip)
            self.chan.write(self.ctx.farewell.unavailable)
        finally:
            sessions.preauth.discard(self)
            metrics.ACTIVE_PREAUTH.dec()
            if not relay_started:
                self.chan.close()
                metrics.count(metrics.SESSIONS, self.ctx.listener.protocol, self.outcome)
                _log_session(_RelayRecord(self), self.outcome)

    async def _preauth(self, deadline: float) -> bool:
        """Run the core until login or close. True when a relay took over the connection."""
        loop = asyncio.get_running_loop()
        pending = await self._greeting()
        while True:
            if not pending:
                read_by = min(deadline, loop.time() + self.ctx.protocol.client_timeout)
                pending = self.core.receive(await self.chan.recv(read_by))
                continue
            event = pending.pop(0)
            match event:
                case Send(data=out):
                    self.chan.write(out)
                case StartTLS():
                    await self._start_tls()
                    pending = self.core.tls_started()
                case Authenticate(credentials=creds):
                    async with asyncio.timeout_at(deadline):
                        outcome, backend = await self._login(creds)
                    pending = self.core.finish_login(outcome)
                    if backend is not None:
                        for ev in pending:  # the success reply, with the client's tag
                            if isinstance(ev, Send):
                                self.chan.write(ev.data)
                        self._start_relay(backend)
                        return True
                case Close(reason=reason):
                    self.outcome = reason
                    return False

    async def _greeting(self) -> list[Event]:
        """The greeting; with SMTP's greeting_delay, first check the client waits for it."""
        delay = self.ctx.protocol.greeting_delay
        if not delay or not isinstance(self.core, SmtpCore):
            return self.core.greet()
        try:
            async with asyncio.timeout(delay):
                early = await self.chan.recv()
        except TimeoutError:
            return self.core.greet()
        return self.core.early_talker() if early else self.core.receive(b"")

    async def _start_tls(self) -> None:
        ctx = self.ctx.server_tls
        assert ctx is not None  # the core only asks when the listener offers STARTTLS
        await self.chan.start_tls(ctx, server_side=True, timeout=self.ctx.handshake_timeout)
        self.client = _client_info(self.chan, self.ctx.listener.protocol)

    async def _login(self, creds: Credentials) -> tuple[LoginOutcome, BackendConnection | None]:
        self.attempts += 1
        self.user = creds.user
        if creds.attempt != self.attempts:
            creds = replace(creds, attempt=self.attempts)
        try:
            decision = await self.ctx.authenticator.authenticate(creds, self.client)
        except Exception as e:  # an authenticator must not raise; treat it as an outage
            log.error("authenticator raised %s for %s", type(e).__name__, _safe(creds.user))
            decision = TempFail("authenticator raised")
        match decision:
            case Route():
                return await self._backend_login(decision, creds)
            case Reject(message=message, wait=wait, error_code=code):
                metrics.count(metrics.LOGINS, self.ctx.listener.protocol, "rejected")
                await asyncio.sleep(min(wait, MAX_AUTH_WAIT))
                return Rejected(message, code), None
            case TempFail(reason=reason, wait=wait):
                metrics.count(metrics.LOGINS, self.ctx.listener.protocol, "tempfail")
                log.warning(
                    "auth temporary failure for %s from %s: %s",
                    _safe(creds.user),
                    self.client.ip,
                    reason,
                )
                await asyncio.sleep(min(wait, MAX_AUTH_WAIT))
                return Unavailable(), None
        raise AssertionError(f"unknown decision {type(decision).__name__}")

    async def _backend_login(
        self, route: Route, creds: Credentials
    ) -> tuple[LoginOutcome, BackendConnection | None]:
        self.backend = f"{route.host}:{route.port}"
        client = self.client
        smtp = None
        if isinstance(self.core, SmtpCore):
            smtp = SmtpSession(creds.method is Method.NONE, self.core.helo, self.core.envelope)
        core = make_core(self.ctx.listener.protocol, route, self.ctx.backend, client, smtp)
        try:
            conn = await login(route, self.ctx.backend, core)
        except BackendError as e:
            metrics.count(metrics.LOGINS, self.ctx.listener.protocol, "backend_error")
            log.warning(
                "backend login failed for %s from %s: %s",
                _safe(self.user),
                self.client.ip,
                e.detail,
            )
            # An SMTP backend refusing a relayed recipient has the last word, code and all.
            refusal = core.envelope_rejection() if isinstance(core, SmtpLogin) else None
            return refusal or Unavailable(), None
        metrics.count(metrics.LOGINS, self.ctx.listener.protocol, "ok")
        return LoggedIn(conn.reply), conn

    def _start_relay(self, backend: BackendConnection) -> None:
        client_transport, backend_transport = self.chan.transport, backend.channel.transport
        assert client_transport is not None and backend_transport is not None
        to_backend = self.core.trailing + self.chan.take_buffer()
        record = _RelayRecord(self)
        relay = Relay(
            client_transport,
            backend_transport,
            idle_timeout=self.ctx.protocol.proxy_timeout,
            farewell=self.ctx.farewell,
            on_done=record.done,
        )
        self.ctx.sessions.relays.add(relay)
        metrics.ACTIVE_RELAY.inc()
        relay.start(to_backend, backend.trailing)


class _RelayRecord:
    """What the end-of-session log line needs. The Session, its core, its buffers and the
    credentials are dropped when the relay starts; only this small record stays."""

    __slots__ = ("backend", "client", "protocol", "sessions", "started", "user")

    def __init__(self, session: Session) -> None:
        self.protocol = session.ctx.listener.protocol
        self.sessions = session.ctx.sessions
        self.client = session.client
        self.user = session.user
        self.backend = session.backend
        self.started = session.started

    def done(self, relay: Relay) -> None:
        self.sessions.relays.discard(relay)
        metrics.ACTIVE_RELAY.dec()
        metrics.count(metrics.SESSIONS, self.protocol, relay.ended)
        metrics.count(metrics.BYTES, self.protocol, "in", amount=relay.bytes_in)
        metrics.count(metrics.BYTES, self.protocol, "out", amount=relay.bytes_out)
        _log_session(self, relay.ended, relay)


def _log_session(rec: _RelayRecord, outcome: str, relay: Relay | None = None) -> None:
    if not log.isEnabledFor(logging.INFO):  # skip the formatting work, once per session
        return
    c = rec.client
    traffic = f" in={relay.bytes_in} out={relay.bytes_out}" if relay else ""
    log.info(
        "%s client=%s:%d user=%s backend=%s tls=%s%s duration=%.3f outcome=%s",
        rec.protocol,
        c.ip,
        c.port,
        _safe(rec.user) or "-",
        rec.backend,
        c.tls.protocol if c.tls else "no",
        traffic,
        time.monotonic() - rec.started,
        outcome,
    )


def _client_info(chan: Channel, protocol: str) -> ClientInfo:
    transport = chan.transport
    assert transport is not None
    peer = transport.get_extra_info("peername") or ("", 0)
    local = transport.get_extra_info("sockname") or ("", 0)
    return ClientInfo(
        ip=str(peer[0]),
        port=int(peer[1]),
        protocol=protocol,
        local_ip=str(local[0]),
        local_port=int(local[1]),
        tls=tls_info(transport),
    )


def _safe(text: str) -> str:
    """A client-supplied name made safe for a log line (no control bytes, bounded length)."""
    if len(text) <= 128 and text.isprintable() and " " not in text:
        return text  # the common case, without building a new string
    clean = "".join(c if c.isprintable() and c != " " else "?" for c in text[:128])
    return clean + ("..." if len(text) > 128 else "")
