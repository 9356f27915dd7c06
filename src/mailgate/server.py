"""Workers: one event loop each, serving every listener, and what they share.

`mailgate serve` runs a supervisor (supervisor.py) that binds every listener once and forks
`workers` worker processes, which inherit the listening sockets and share them (as nginx's
workers do: a reload starts new workers on the same sockets and lets the old ones drain, and
no connection waiting in a listen queue is lost). A worker talks to its supervisor over a
link: the node's shared state (login budgets, session counts) lives there, and the operator's
commands (who, kick, drain, flush) arrive from there.

Shutdown of a worker: stop accepting, say goodbye to sessions still logging in, give relays
their time (`shutdown_timeout`, or `reload_drain_timeout` when draining after a reload), then
cut the rest and log how many.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import resource
import signal
import socket
import ssl
import time
from collections.abc import Iterable
from typing import Any

from mailgate import logsetup, metrics, tls
from mailgate import preflight as preflight_checks
from mailgate.auth import Authenticator
from mailgate.auth.factory import build_authenticator
from mailgate.backend.connect import BackendOptions
from mailgate.backend.pools import HealthEvent
from mailgate.backend.routing import BackendRouter
from mailgate.cluster import WorkerCluster, attach, start_worker, worker_command
from mailgate.config import ConfigError, ListenerSettings, Settings
from mailgate.link import Link
from mailgate.link import connect as link_connect
from mailgate.netio import Channel, expire_waiter
from mailgate.nodestate import NodeState
from mailgate.protocols.policy import PreAuthPolicy
from mailgate.protocols.proxy_protocol import (
    MAX_V2_HEADER,
    HeaderParsed,
    ProxyHeader,
    ProxyProtocolError,
    parse_header,
)
from mailgate.protocols.sasl import MAX_TOKEN
from mailgate.protocols.spec import SPECS
from mailgate.ratelog import RateLimitedLog
from mailgate.session import Handshakes, ListenerContext, Session, Sessions
from mailgate.statestore import Fallback, LocalStore, RemoteStore, Store

log = logging.getLogger("mailgate.server")
_refusals = RateLimitedLog(log)

# A listen backlog large enough for a login storm after a network blip (nginx uses 511).
BACKLOG = 511


def bind(listener: ListenerSettings, port: int | None = None) -> socket.socket:
    host = listener.host or "::"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and not listener.host:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # "*" means v4 and v6
        sock.bind((host, listener.port if port is None else port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def policy_for(settings: Settings, listener: ListenerSettings) -> PreAuthPolicy:
    proto = settings.protocols[listener.protocol]
    return PreAuthPolicy(
        mechanisms=listener.auth,
        capabilities=proto.capabilities,
        starttls=listener.tls == "starttls",
        tls_active=listener.tls == "implicit",
        starttls_only=listener.starttls_only,
        greeting=proto.greeting,
        hostname=settings.hostname,
        max_errors=proto.max_errors,
        max_line=proto.max_line,
        max_token=settings.oauth.max_token if settings.oauth else MAX_TOKEN,
    )


def backend_options(settings: Settings) -> BackendOptions:
    b = settings.backend
    return BackendOptions(
        tls=b.tls,
        tls_context=tls.backend_context(b),
        server_name=b.server_name,
        forward_client=b.forward_client,
        imap_auth=b.imap_auth,
        pop3_auth=b.pop3_auth,
        smtp_mode=b.smtp_mode,
        helo_name=settings.hostname,
        connect_timeout=b.connect_timeout,
        login_timeout=b.login_timeout,
    )


class Worker:
    """One event loop serving every listener.

    `link` is the worker's end of its supervisor link (None: a worker alone, as the tests run
    it in a thread, counting in this process); `index` numbers it for its leases."""

    def __init__(
        self,
        settings: Settings,
        sockets: list[socket.socket],
        *,
        handle_signals: bool = True,
        link: socket.socket | None = None,
        index: int = 0,
        health: dict[str, Any] | None = None,
        server_tls: ssl.SSLContext | None = None,
    ) -> None:
        self.settings = settings
        # Made by the supervisor for all the workers of a generation (shared ticket keys);
        # None: made here (a worker run on its own, as the tests do).
        self.server_tls = server_tls
        self.handle_signals = handle_signals
        self.sockets = sockets
        self.link_socket = link
        self.index = index
        self.health = health  # the supervisor's backend health when this worker was forked
        self.link: Link | None = None
        self.sessions = Sessions()
        self.handshakes = Handshakes(settings.limits)
        self.tasks: set[asyncio.Task[None]] = set()
        self.stop = asyncio.Event()
        self.drain_for: float | None = None  # set by the supervisor after a reload
        self.ready = False  # True once every listener accepts
        self.max_sessions = settings.max_sessions or session_capacity()
        # Client connections whose descriptor is open, from accept to close: pre-auth,
        # relayed, refused and lingering ones alike.
        self.connections = 0
        self.authenticator: Authenticator | None = None
        self.router: BackendRouter
        self.cluster: WorkerCluster | None = None  # [cluster]: Redis (cluster.py)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        store = await self._store()
        self.cluster = await start_worker(self.settings, store)  # cluster hook: Redis first
        if self.cluster is not None:
            store = self.cluster.store
        self.authenticator = authenticator = build_authenticator(self.settings, store)
        if self.handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop.set)
            loop.add_signal_handler(signal.SIGUSR1, lambda: _flush(authenticator))
        # Under a supervisor, it runs the active checks and keeps the node's health; this
        # worker reports what its logins see and applies what the supervisor sends.
        supervised = self.link is not None
        self.router = BackendRouter.from_settings(
            self.settings,
            listening=[
                (lst.host, sock.getsockname()[1])
                for lst, sock in zip(self.settings.listeners, self.sockets, strict=True)
            ],
            run_checks=not supervised,
            publish=self._report_health if supervised else None,
        )
        if self.health:
            self.router.state.restore(self.health)
        self.router.start()
        attach(self.cluster, self.router, self.sessions)  # cluster hook: affinity, registry
        servers = await self._listen(store)
        metrics.flush_every(loop)
        self._sweep_every(loop, sweep_interval(self.settings))
        # Everything made so far lives as long as the worker: out of the collector's way (a
        # full collection over the modules' objects was a pause of tens of milliseconds).
        # Garbage of the start-up goes first: frozen, it could never be collected.
        gc.collect()
        gc.freeze()
        self.ready = True
        if self.link is not None:
            self.link.notify("ready", os.getpid())
        await self.stop.wait()
        if self.drain_for is not None:
            await self._drain(servers, self.drain_for)
        else:
            await self._shutdown(servers, self.settings.shutdown_timeout)
        await self.router.close()
        await authenticator.close()
        if self.cluster is not None:  # cluster hook: its leases go now, not in a lease
            await self.cluster.close()
        metrics.flush()
        if self.link is not None:
            self.link.close()

    async def _store(self) -> Store:
        local = LocalStore(NodeState(self.settings.throttle, self.settings.limits), self.index)
        if self.link_socket is None:
            return local
        self.link = await link_connect(self.link_socket, self._from_supervisor, "supervisor")
        self.link.closed_callback = self._supervisor_gone
        return Fallback(RemoteStore(self.link), local, "the supervisor's state")

    async def _listen(self, store: Store) -> list[asyncio.Server | Acceptor]:
        loop = asyncio.get_running_loop()
        assert self.authenticator is not None
        server_tls = self.server_tls or tls.server_context(self.settings.tls)
        backend = backend_options(self.settings)
        servers: list[asyncio.Server | Acceptor] = []
        for listener, sock in zip(self.settings.listeners, self.sockets, strict=True):
            ctx = ListenerContext(
                listener=listener,
                protocol=self.settings.protocols[listener.protocol],
                spec=SPECS[listener.protocol],
                policy=policy_for(self.settings, listener),
                server_tls=server_tls,
                handshake_timeout=self.settings.tls.handshake_timeout,
                backend=backend,
                authenticator=self.authenticator,
                hostname=self.settings.hostname,
                sessions=self.sessions,
                handshakes=self.handshakes,
                store=store,
                limits=self.settings.limits,
                trusted=self.settings.trusted_networks,
                router=self.router,
            )
            if listener.tls == "implicit" or listener.proxy_protocol:
                servers.append(Acceptor(self, ctx, sock))
                continue
            servers.append(
                await loop.create_server(
                    functools.partial(Channel, functools.partial(self._accept, ctx), loop),
                    sock=sock,
                    backlog=BACKLOG,
                )
            )
        return servers

    def _sweep_every(self, loop: asyncio.AbstractEventLoop, interval: float) -> None:
        def sweep() -> None:
            self.sessions.sweep_idle(loop.time())
            loop.call_later(interval, sweep)

        loop.call_later(interval, sweep)

    def _accept(self, ctx: ListenerContext, chan: Channel) -> None:
        """A plaintext connection (STARTTLS listeners included) is made."""
        self.connections += 1
        chan.on_lost = self._closed
        if self.connections > self.max_sessions:
            # Refuse promptly rather than run out of descriptors, which would fail the
            # backend connections of sessions already logging in.
            chan.write(ctx.spec.goodbyes.busy)
            chan.finish()
            self.refused_busy(ctx)
            return
        self._start(ctx, chan)

    def _start(self, ctx: ListenerContext, chan: Channel) -> None:
        task = chan.loop.create_task(Session(ctx, chan).run())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _closed(self) -> None:
        self.connections -= 1

    def refused_busy(self, ctx: ListenerContext) -> None:
        _refusals.warning(
            "max_sessions (%d) reached: refusing connections on %s",
            self.max_sessions,
            ctx.listener.address,
        )

    # --- the supervisor's requests ----------------------------------------------------------

    def _from_supervisor(self, op: str, args: list[Any]) -> Any:
        if op == "who":
            return self.sessions.describe(*args)
        if op == "kick":
            if self.router.affinity is not None:
                self.router.affinity.forget(*args)
            return self.sessions.kick(*args)
        if op == "stats":
            return self.stats()
        if op == "drain":
            self.drain_for = float(args[0])
            self.stop.set()
            return self.stats()
        if op == "flush" and self.authenticator is not None:
            _flush(self.authenticator)
            return True
        if op == "reopen":
            return logsetup.reopen()
        if op == "backend":
            action, name = args
            return self.router.command(action, name or "")
        if op == "health":
            self.router.apply_remote(HealthEvent.from_json(args[0]))
            return None
        if op.startswith("cluster."):  # cluster hook: cache invalidation from Redis
            return worker_command(self.authenticator, op, args)
        raise ValueError(f"unknown request {op!r}")

    def _report_health(self, event: HealthEvent) -> None:
        if self.link is not None:
            self.link.notify("health", event.to_json())

    def _supervisor_gone(self) -> None:
        if not self.stop.is_set():
            log.error("worker %d: the supervisor is gone; shutting down", os.getpid())
            self.stop.set()

    def stats(self) -> dict[str, int]:
        stats = {
            "pid": os.getpid(),
            "relayed": len(self.sessions.relays),
            "logging_in": len(self.sessions.preauth),
            "connections": self.connections,
            "handshakes": self.handshakes.total,
        }
        if self.cluster is not None:  # cluster hook: Redis round trips, up or not
            stats.update(self.cluster.stats())
        return stats

    # --- the end -----------------------------------------------------------------------------

    async def _drain(self, servers: Iterable[asyncio.Server | Acceptor], limit: float) -> None:
        """After a reload: stop accepting and let every session finish, for `limit` at most."""
        for server in servers:
            server.close()  # the new workers accept on the same sockets
        held = self.stats()
        log.info(
            "worker %d draining: %d relayed sessions, %d logging in (at most %.0fs)",
            os.getpid(),
            held["relayed"],
            held["logging_in"],
            limit,
        )
        deadline = time.monotonic() + limit
        while (self.tasks or self.sessions.relays) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await self._shutdown((), 0.0)

    async def _shutdown(self, servers: Iterable[asyncio.Server | Acceptor], grace: float) -> None:
        for server in servers:
            server.close()  # stop accepting; open connections live on
        for task in list(self.tasks):
            task.cancel()  # pre-auth sessions get their goodbye in Session.run
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=2.0)
        deadline = time.monotonic() + grace
        while self.sessions.relays and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        cut = len(self.sessions.relays)
        for relay in list(self.sessions.relays):
            relay.shutdown()
        if cut:
            log.warning("worker %d: cut %d relayed sessions", os.getpid(), cut)
            await asyncio.sleep(0.1)  # let the goodbyes flush


class Acceptor:
    """A listener that accepts by itself: implicit TLS (993, 995, 465) and PROXY protocol
    listeners. A connection is counted from accept; a PROXY header is read (and its sender
    checked against `trusted_proxies`) before anything else; a TLS handshake is bounded, in all
    and per client address, before any TLS work is done for it. (With create_server(ssl=...)
    the session would exist only once the handshake was over: stalled handshakes were counted
    nowhere.) Plaintext listeners without PROXY protocol use create_server, the fast path."""

    def __init__(self, worker: Worker, ctx: ListenerContext, sock: socket.socket) -> None:
        self.worker = worker
        self.ctx = ctx
        self.sock = sock
        self.tls = ctx.listener.tls == "implicit"
        self.proxied = ctx.listener.proxy_protocol
        self.loop = asyncio.get_running_loop()
        sock.listen(BACKLOG)  # the supervisor's socket listens already; a test's may not yet
        self.loop.add_reader(sock.fileno(), self._accept_ready)

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())

    def _accept_ready(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE, ENFILE, ENOBUFS: try again on the next wakeup
                _refusals.warning("accept on %s failed: %s", self.ctx.listener.address, e)
                return
            self._admit(conn, str(peer[0]))

    def _admit(self, conn: socket.socket, peer: str) -> None:
        worker, ctx = self.worker, self.ctx
        if worker.connections >= worker.max_sessions:
            if not self.tls:
                with contextlib.suppress(OSError):
                    conn.send(ctx.spec.goodbyes.busy)
            conn.close()  # a client expecting a handshake can only be closed
            worker.refused_busy(ctx)
            return
        if self.proxied and peer not in ctx.listener.trusted_proxies:
            conn.close()
            _refusals.warning(
                "refusing a connection to %s from %s: not in trusted_proxies",
                ctx.listener.address,
                peer,
            )
            metrics.count(metrics.SESSIONS, ctx.listener.protocol, "untrusted proxy")
            return
        if self.tls and not self.proxied and not self._begin_handshake(peer):
            conn.close()
            return
        worker.connections += 1
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = self.loop.create_task(
            self._serve(conn, peer, handshaking=self.tls and not self.proxied)
        )
        worker.tasks.add(task)
        task.add_done_callback(worker.tasks.discard)

    def _begin_handshake(self, ip: str) -> bool:
        if self.ctx.handshakes.begin(ip):
            return True
        _refusals.warning("refusing a TLS handshake from %s: too many in progress", ip)
        metrics.count(metrics.SESSIONS, self.ctx.listener.protocol, "too many tls handshakes")
        return False

    async def _serve(self, conn: socket.socket, peer: str, *, handshaking: bool) -> None:
        worker, ctx = self.worker, self.ctx
        started = False
        ip = peer
        origin: ProxyHeader | None = None

        def made(chan: Channel) -> None:
            nonlocal started
            started = True
            if handshaking:
                ctx.handshakes.end(ip)
            chan.origin = origin
            chan.on_lost = worker._closed
            worker._start(ctx, chan)

        try:
            if self.proxied:
                origin = await self._proxy_header(conn, peer)
                if origin is None:
                    return
                ip = origin.client[0] if origin.client else peer
                if self.tls:
                    if not self._begin_handshake(ip):
                        return
                    handshaking = True
            await self.loop.connect_accepted_socket(
                functools.partial(Channel, made, self.loop),
                sock=conn,
                ssl=ctx.server_tls if self.tls else None,
                ssl_handshake_timeout=ctx.handshake_timeout if self.tls else None,
            )
        except (OSError, ssl.SSLError, ConnectionError, TimeoutError) as e:
            log.debug("TLS handshake with %s failed: %s", ip, type(e).__name__)
            metrics.count(metrics.SESSIONS, ctx.listener.protocol, "tls handshake failed")
            if self.tls:
                metrics.count(metrics.TLS_HANDSHAKE_FAILURES, ctx.listener.protocol, "implicit")
        finally:
            if not started:  # the header or the handshake failed, timed out or was cancelled
                if handshaking:
                    ctx.handshakes.end(ip)
                worker.connections -= 1
                conn.close()

    async def _proxy_header(self, conn: socket.socket, peer: str) -> ProxyHeader | None:
        """The PROXY header, read without consuming a byte past it (the TLS handshake or the
        mail protocol's first bytes stay in the socket); None when it is missing or bad."""
        limit = self.ctx.listener.proxy_protocol_timeout
        try:
            return await read_proxy_header(self.loop, conn, self.loop.time() + limit)
        except ProxyProtocolError as e:
            reason = e.log_text
        except TimeoutError:
            reason = f"no header within {limit:g} s"
        except (ConnectionError, OSError):
            reason = "closed before its header"
        _refusals.warning(
            "PROXY protocol from %s on %s: %s", peer, self.ctx.listener.address, reason
        )
        metrics.count(metrics.SESSIONS, self.ctx.listener.protocol, "bad proxy header")
        return None


# The most of a connection's first bytes a PROXY header can take: a v1 line or a v2 header
# with every TLV mailgate accepts (protocols/proxy_protocol.py has the limits).
PROXY_PEEK = MAX_V2_HEADER + 16
# A header that arrives in pieces (the spec asks proxies to send it at once) is looked at
# again this often rather than on every wakeup of a socket that stays readable.
PROXY_POLL = 0.01


async def read_proxy_header(
    loop: asyncio.AbstractEventLoop, conn: socket.socket, deadline: float
) -> ProxyHeader:
    """Peek until a whole header is there, then consume exactly it. Raises ProxyProtocolError,
    TimeoutError (past `deadline`) or ConnectionError."""
    seen = -1
    while True:
        if loop.time() >= deadline:
            raise TimeoutError
        await _readable(loop, conn, deadline)
        data = conn.recv(PROXY_PEEK, socket.MSG_PEEK)
        if not data:
            raise ConnectionError("closed")
        result = parse_header(data)
        if isinstance(result, HeaderParsed):
            taken = 0
            while taken < result.length:  # it is all there: the peek saw it
                taken += len(conn.recv(result.length - taken))
            return result.header
        if len(data) == seen:
            await asyncio.sleep(PROXY_POLL)
        seen = len(data)


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


async def _readable(loop: asyncio.AbstractEventLoop, conn: socket.socket, deadline: float) -> None:
    ready: asyncio.Future[None] = loop.create_future()
    fd = conn.fileno()
    loop.add_reader(fd, _wake, ready)
    timer = loop.call_at(deadline, expire_waiter, ready)
    try:
        await ready
    finally:
        loop.remove_reader(fd)
        timer.cancel()


# Connections taken per wakeup of a TLS listener before other work gets a turn.
ACCEPT_BATCH = 64
# Descriptors kept for everything but sessions: listeners, the auth service's pool, the
# database pool, log files, the event loop's own.
RESERVED_FDS = 256


def session_capacity() -> int:
    """How many proxied sessions (two descriptors each) the open-file limit allows. The soft
    limit is raised to the hard one first, as nginx's worker_rlimit_nofile would."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return max(1, (soft - RESERVED_FDS) // 2)


def _flush(authenticator: object) -> None:
    flush = getattr(authenticator, "flush", None)
    if callable(flush):
        flush()
        log.info("auth cache flushed")


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


# Idle relayed sessions are looked for this often: a quarter of the shortest proxy_timeout,
# within these bounds. A session is ended between proxy_timeout and that much later.
SWEEP_MIN, SWEEP_MAX = 0.25, 30.0


def sweep_interval(settings: Settings) -> float:
    shortest = min(p.proxy_timeout for p in settings.protocols.values())
    return min(max(shortest / 4, SWEEP_MIN), SWEEP_MAX)


def run_worker(
    settings: Settings,
    sockets: list[socket.socket],
    link: socket.socket | None,
    index: int,
    health: dict[str, Any] | None = None,
    server_tls: ssl.SSLContext | None = None,
) -> None:
    loop = new_loop()
    try:
        worker = Worker(
            settings, sockets, link=link, index=index, health=health, server_tls=server_tls
        )
        loop.run_until_complete(worker.run())
    finally:
        loop.close()


def preflight(settings: Settings) -> None:
    """Load everything a worker loads at start, so a mistake stops us here, once, with a
    message naming the setting, rather than in every worker. Raises ConfigError."""
    preflight_checks.check(settings)
    tls.server_context(settings.tls)
    tls.backend_context(settings.backend)
    try:
        build_authenticator(settings)  # constructors validate; no I/O happens here
    except ValueError as e:
        raise ConfigError(f"authentication: {e}") from None


def bind_all(settings: Settings) -> list[socket.socket]:
    sockets: list[socket.socket] = []
    for i, listener in enumerate(settings.listeners):
        try:
            sockets.append(bind(listener))
        except OSError as e:
            for sock in sockets:
                sock.close()
            reason = e.strerror or str(e)
            raise OSError(f"listener[{i}] {listener.address}: cannot listen: {reason}") from None
    return sockets


def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT. Returns the process exit code."""
    from mailgate.supervisor import Supervisor

    preflight(settings)
    return Supervisor(settings).run()
