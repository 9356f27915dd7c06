"""Process lifecycle: bind listeners, run one or more workers, shut down in bounded steps.

With `workers = 1` everything runs in this process. With more, the supervisor binds each
address once (so port 0 and bad addresses fail early, in one place), then forks workers; each
worker opens its own SO_REUSEPORT socket on the same address, so the kernel spreads new
connections across workers. Signal handlers only record the signal; the loop acts on it.
Shutdown: stop accepting, say goodbye to sessions still logging in, give relays
`shutdown_timeout` to finish, then cut the rest and log how many.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import resource
import signal
import socket
import ssl
import sys
import time
from collections.abc import Iterable

from mailgate import metrics, tls
from mailgate.auth.factory import build_authenticator
from mailgate.backend.connect import BackendOptions
from mailgate.config import ConfigError, ListenerSettings, Settings
from mailgate.netio import Channel
from mailgate.protocols.policy import PreAuthPolicy
from mailgate.protocols.spec import SPECS
from mailgate.ratelog import RateLimitedLog
from mailgate.session import Handshakes, ListenerContext, Session, Sessions

log = logging.getLogger("mailgate.server")
_refusals = RateLimitedLog(log)

# A listen backlog large enough for a login storm after a network blip (nginx uses 511).
BACKLOG = 511
# How long the supervisor waits for a worker to exit after SIGTERM before SIGKILL, beyond
# the workers' own shutdown_timeout.
KILL_GRACE = 5.0
# A worker that dies is restarted, but not in a tight loop: more than this many deaths, each
# within RESTART_WINDOW seconds of the previous one, means something is broken for good.
MAX_QUICK_RESTARTS = 5
RESTART_WINDOW = 10.0


def bind(listener: ListenerSettings, port: int | None = None, *, reuse_port: bool) -> socket.socket:
    host = listener.host or "::"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
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
    """One event loop serving every listener."""

    def __init__(
        self, settings: Settings, sockets: list[socket.socket], *, handle_signals: bool = True
    ) -> None:
        self.settings = settings
        self.handle_signals = handle_signals
        self.sockets = sockets
        self.sessions = Sessions()
        self.handshakes = Handshakes(settings.limits)
        self.tasks: set[asyncio.Task[None]] = set()
        self.stop = asyncio.Event()
        self.ready = False  # True once every listener accepts
        self.max_sessions = settings.max_sessions or session_capacity()
        # Client connections whose descriptor is open, from accept to close: pre-auth,
        # relayed, refused and lingering ones alike.
        self.connections = 0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        authenticator = build_authenticator(self.settings)
        if self.handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop.set)
            loop.add_signal_handler(signal.SIGUSR1, lambda: _flush(authenticator))
            loop.add_signal_handler(signal.SIGHUP, _reload_unsupported)
        server_tls = tls.server_context(self.settings.tls)
        backend = backend_options(self.settings)
        servers: list[asyncio.Server | TlsListener] = []
        for listener, sock in zip(self.settings.listeners, self.sockets, strict=True):
            ctx = ListenerContext(
                listener=listener,
                protocol=self.settings.protocols[listener.protocol],
                spec=SPECS[listener.protocol],
                policy=policy_for(self.settings, listener),
                server_tls=server_tls,
                handshake_timeout=self.settings.tls.handshake_timeout,
                backend=backend,
                authenticator=authenticator,
                hostname=self.settings.hostname,
                sessions=self.sessions,
                handshakes=self.handshakes,
            )
            if listener.tls == "implicit":
                servers.append(TlsListener(self, ctx, sock))
                continue
            servers.append(
                await loop.create_server(
                    functools.partial(Channel, functools.partial(self._accept, ctx)),
                    sock=sock,
                    backlog=BACKLOG,
                )
            )
        self.ready = True
        await self.stop.wait()
        await self._shutdown(servers)
        await authenticator.close()

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

    async def _shutdown(self, servers: Iterable[asyncio.Server | TlsListener]) -> None:
        for server in servers:
            server.close()  # stop accepting; open connections live on
        for task in list(self.tasks):
            task.cancel()  # pre-auth sessions get their goodbye in Session.run
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=2.0)
        deadline = time.monotonic() + self.settings.shutdown_timeout
        while self.sessions.relays and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        cut = len(self.sessions.relays)
        for relay in list(self.sessions.relays):
            relay.shutdown()
        if cut:
            log.warning(
                "shutdown: cut %d relayed sessions after %.0fs", cut, self.settings.shutdown_timeout
            )
            await asyncio.sleep(0.1)  # let the goodbyes flush


class TlsListener:
    """An implicit-TLS listener (993, 995, 465) that accepts by itself, so that a connection
    is counted from accept and its handshake is bounded, in all and per client address, before
    any TLS work is done for it. (With create_server(ssl=...) the session would exist only
    once the handshake is over: stalled handshakes were counted nowhere.)"""

    def __init__(self, worker: Worker, ctx: ListenerContext, sock: socket.socket) -> None:
        self.worker = worker
        self.ctx = ctx
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        sock.listen(BACKLOG)
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

    def _admit(self, conn: socket.socket, ip: str) -> None:
        worker, ctx = self.worker, self.ctx
        if worker.connections >= worker.max_sessions:
            conn.close()  # a client expecting a handshake can only be closed
            worker.refused_busy(ctx)
            return
        if not ctx.handshakes.begin(ip):
            conn.close()
            _refusals.warning("refusing a TLS handshake from %s: too many in progress", ip)
            metrics.count(metrics.SESSIONS, ctx.listener.protocol, "too many tls handshakes")
            return
        worker.connections += 1
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = self.loop.create_task(self._handshake(conn, ip))
        worker.tasks.add(task)
        task.add_done_callback(worker.tasks.discard)

    async def _handshake(self, conn: socket.socket, ip: str) -> None:
        worker, ctx = self.worker, self.ctx
        started = False

        def made(chan: Channel) -> None:
            nonlocal started
            started = True
            ctx.handshakes.end(ip)
            chan.on_lost = worker._closed
            worker._start(ctx, chan)

        try:
            await self.loop.connect_accepted_socket(
                functools.partial(Channel, made),
                sock=conn,
                ssl=ctx.server_tls,
                ssl_handshake_timeout=ctx.handshake_timeout,
            )
        except (OSError, ssl.SSLError, ConnectionError, TimeoutError) as e:
            log.debug("TLS handshake with %s failed: %s", ip, type(e).__name__)
            metrics.count(metrics.SESSIONS, ctx.listener.protocol, "tls handshake failed")
        finally:
            if not started:  # the handshake failed, timed out or was cancelled
                ctx.handshakes.end(ip)
                worker.connections -= 1
                conn.close()


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


def _reload_unsupported() -> None:
    log.warning("SIGHUP: reloading is not supported yet; carrying on with the running config")


def _flush(authenticator: object) -> None:
    flush = getattr(authenticator, "flush", None)
    if callable(flush):
        flush()
        log.info("auth cache flushed")


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


def run_worker(settings: Settings, sockets: list[socket.socket]) -> None:
    loop = _new_loop()
    try:
        loop.run_until_complete(Worker(settings, sockets).run())
    finally:
        loop.close()


def preflight(settings: Settings) -> None:
    """Load everything a worker loads at start, so a mistake stops us here, once, with a
    message naming the setting, rather than in every worker. Raises ConfigError."""
    tls.server_context(settings.tls)
    tls.backend_context(settings.backend)
    try:
        build_authenticator(settings)  # constructors validate; no I/O happens here
    except ValueError as e:
        raise ConfigError(f"authentication: {e}") from None


def bind_all(settings: Settings, *, reuse_port: bool) -> list[socket.socket]:
    sockets: list[socket.socket] = []
    for i, listener in enumerate(settings.listeners):
        try:
            sockets.append(bind(listener, reuse_port=reuse_port))
        except OSError as e:
            for sock in sockets:
                sock.close()
            reason = e.strerror or str(e)
            raise OSError(f"listener[{i}] {listener.address}: cannot listen: {reason}") from None
    return sockets


def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT. Returns the process exit code."""
    preflight(settings)
    # A cache flush (SIGUSR1) or a reload (SIGHUP) may come as soon as the pid file exists,
    # before the handlers are in place: neither may kill us (their default action).
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if settings.metrics_listen:
        metrics.serve(settings.metrics_listen)
    if settings.pid_file is not None:
        settings.pid_file.write_text(f"{os.getpid()}\n")
    try:
        return _serve(settings)
    finally:
        if settings.pid_file is not None:
            with contextlib.suppress(OSError):
                settings.pid_file.unlink()


def _serve(settings: Settings) -> int:
    if settings.workers == 1:
        sockets = bind_all(settings, reuse_port=False)
        _announce(settings, sockets)
        run_worker(settings, sockets)
        return 0
    return _supervise(settings)


def _announce(settings: Settings, sockets: list[socket.socket]) -> None:
    for listener, sock in zip(settings.listeners, sockets, strict=True):
        host, port = sock.getsockname()[:2]
        log.info(
            "listening: %s on %s port %d (tls=%s)", listener.protocol, host, port, listener.tls
        )


def _supervise(settings: Settings) -> int:
    # Bind once here to fail early and to learn the ports chosen for port 0; keep these
    # sockets (not listening) so the ports stay ours while workers come and go.
    reserved = bind_all(settings, reuse_port=True)
    ports = [s.getsockname()[1] for s in reserved]
    _announce(settings, reserved)
    stop = {"signal": 0}
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _f: stop.__setitem__("signal", s))
    signal.signal(signal.SIGUSR1, lambda _s, _f: _signal_children(children, signal.SIGUSR1))
    signal.signal(signal.SIGHUP, lambda _s, _f: _reload_unsupported())
    children: dict[int, int] = {}  # pid -> worker index
    for index in range(settings.workers):
        children[_fork_worker(settings, ports)] = index
    quick_deaths = 0
    last_death = 0.0
    code = 0
    while children:
        if stop["signal"]:
            _stop_children(children, settings.shutdown_timeout + KILL_GRACE)
            break
        with contextlib.suppress(ChildProcessError, InterruptedError):
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid:
                index = children.pop(pid)
                metrics.worker_died(pid)
                now = time.monotonic()
                quick_deaths = quick_deaths + 1 if now - last_death < RESTART_WINDOW else 1
                last_death = now
                if quick_deaths > MAX_QUICK_RESTARTS:
                    log.error("workers keep dying (%d in a row); giving up", quick_deaths)
                    _stop_children(children, settings.shutdown_timeout + KILL_GRACE)
                    code = 1
                    break
                log.error("worker %d (pid %d) died with status %d; restarting", index, pid, status)
                children[_fork_worker(settings, ports)] = index
        time.sleep(0.2)
    for sock in reserved:
        sock.close()
    return code


def _fork_worker(settings: Settings, ports: list[int]) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # until Worker.run handles it
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the supervisor's business
        sockets = [
            bind(lst, port, reuse_port=True)
            for lst, port in zip(settings.listeners, ports, strict=True)
        ]
        run_worker(settings, sockets)
    except BaseException:  # a worker must never return into the supervisor's loop
        log.exception("worker failed")
        code = 1
    finally:
        logging.shutdown()
        os._exit(code)


def _signal_children(children: dict[int, int], sig: int) -> None:
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _stop_children(children: dict[int, int], grace: float) -> None:
    _signal_children(children, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while children and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            pid, _ = os.waitpid(-1, os.WNOHANG)
            if pid:
                children.pop(pid, None)
                continue
        time.sleep(0.1)
    if children:
        log.error("killing %d workers that did not stop in time", len(children))
        _signal_children(children, signal.SIGKILL)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )
