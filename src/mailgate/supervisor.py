"""The supervisor: the one process that owns the listening sockets, the workers, the node's
shared state, the control socket and reloads (nginx's master process, and more).

- It binds every listener once; workers are forked and inherit the sockets.
- It keeps the node's `NodeState` (login budgets, session counts) and answers the workers'
  requests for it over their links, so a limit is one limit across all workers.
- It serves the control socket (`control.py`): who, kick, stats, reload, throttle, backends.
- Reload (SIGHUP, `mailgate reload`): the configuration is read and checked first; if it is
  wrong the running one stays and the error is logged and returned. Otherwise a new generation
  of workers starts on the same sockets (new listeners are bound, removed ones closed), and
  once it is ready the old workers are told to drain: they stop accepting at once, their
  sessions go on, for `reload_drain_timeout` at most.
- A worker that dies is restarted (its leases go with it); one that keeps dying stops mailgate.
- SIGTERM/SIGINT: every worker shuts down (`shutdown_timeout`), then the supervisor exits.

Signal handlers only record: the loop acts on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import shutil
import signal
import socket
import ssl
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mailgate import config, logsetup, metrics, sdnotify, tls
from mailgate.backend.pools import HealthEvent
from mailgate.backend.routing import BackendRouter
from mailgate.config import ConfigError, ListenerSettings, Settings
from mailgate.link import Link, LinkError, pair
from mailgate.link import connect as link_connect
from mailgate.nodestate import NodeState
from mailgate.statestore import admission_to, attempt_from, settled_to

if TYPE_CHECKING:
    from mailgate.clusternode import NodeCluster
    from mailgate.healthz import HealthEndpoint

log = logging.getLogger("mailgate.supervisor")

# How long a worker may take to start (imports, certificates, listening) before a reload that
# waits for it gives up; a cold start takes well under a second here.
READY_TIMEOUT = 30.0
# How long the supervisor waits for a worker to exit after SIGTERM before SIGKILL, beyond
# the workers' own shutdown_timeout.
KILL_GRACE = 5.0
# A worker that dies is restarted, but not in a tight loop: more than this many deaths, each
# within RESTART_WINDOW seconds of the previous one, means something is broken for good.
MAX_QUICK_RESTARTS = 5
RESTART_WINDOW = 10.0
# How often exited workers are looked for beyond their links' closing.
REAP_INTERVAL = 1.0
# A request fanned out to every worker (who, kick, stats) waits this long for each answer.
FANOUT_TIMEOUT = 2.0


@dataclass(eq=False)
class WorkerProcess:
    pid: int
    index: int
    generation: int
    link: Link
    settings: Settings
    ready: asyncio.Future[None]
    # The listeners' TLS context, made once per generation before the forks: every worker
    # then has the same session-ticket keys, so a client resumes on whichever worker.
    server_tls: ssl.SSLContext | None = None
    draining: bool = False
    started: float = field(default_factory=time.monotonic)


def _same_node_services(old: Settings, new: Settings) -> None:
    """[cluster] and health_listen belong to the supervisor, made at start: a reload that
    changes them is refused (restart instead). Raises ConfigError."""
    if old.cluster != new.cluster or old.health_listen != new.health_listen:
        raise ConfigError("[cluster] and health_listen changes need a restart, not a reload")


def listener_key(listener: ListenerSettings) -> tuple[str, int]:
    return (listener.host, listener.port)


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state = NodeState(settings.throttle, settings.limits)
        self.generation = 0
        self.workers: dict[int, WorkerProcess] = {}  # pid -> worker
        self.sockets: dict[tuple[str, int], socket.socket] = {}
        self.stopping = False
        self.reloading: asyncio.Lock | None = None
        self.control: asyncio.Server | None = None
        self._quick_deaths = 0
        self._last_death = 0.0
        self._exit_code = 0
        self._stop: asyncio.Event | None = None
        self._background: set[asyncio.Future[Any]] = set()
        self._metrics_dir: str | None = None  # multiprocess metrics, removed at exit
        # Backend health, one truth for the node: the active checks run here, the workers'
        # passive events come here, and every change goes out to every worker.
        self.router: BackendRouter | None = None
        # [cluster]: the node's part of the cluster (clusternode.py); health_listen: the load
        # balancer's health endpoint (healthz.py).
        self.cluster: NodeCluster | None = None
        self.health: HealthEndpoint | None = None

    # --- running ------------------------------------------------------------------------------

    def run(self) -> int:
        """Run until SIGTERM/SIGINT (or until workers keep dying). Returns the exit code."""
        from mailgate.server import new_loop

        loop = new_loop()
        try:
            return loop.run_until_complete(self._run())
        finally:
            loop.close()

    async def _run(self) -> int:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.reloading = asyncio.Lock()
        if self.settings.metrics_listen:
            self._metrics_dir = metrics.use_multiprocess()
        self._bind(self.settings)
        self._announce(self.settings)
        self.router = self._router(self.settings)
        await self._start_node_services()  # cluster hook
        if self.settings.metrics_listen:
            metrics.serve(self.settings.metrics_listen)
        metrics.flush_every(loop)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn_task(self.reload()))
        loop.add_signal_handler(signal.SIGUSR1, lambda: self._spawn_task(self.fanout("flush")))
        loop.add_signal_handler(signal.SIGUSR2, lambda: self._spawn_task(self.reopen_logs()))
        # uvloop keeps SIGCHLD for itself: a worker's death shows as its link closing, and a
        # slow poll reaps whatever that missed.
        self._spawn_task(self._reap_every(REAP_INTERVAL))
        await self._start_generation(self.settings)
        await self._serve_control()
        if self.settings.pid_file is not None:
            self.settings.pid_file.write_text(f"{os.getpid()}\n")
        sdnotify.ready(f"{len(self.workers)} workers")
        log.info("ready: %d workers (pid %d)", len(self.workers), os.getpid())
        self._serving(True)  # cluster hook: the balancer may send clients now
        try:
            await self._stop.wait()
        finally:
            sdnotify.stopping()
            await self._drain_for_balancer()  # cluster hook: unhealthy first, then close
            self.stopping = True
            await self._stop_all()
            await self._close_node_services()  # cluster hook
            if self.router is not None:
                await self.router.close()
            self._close_control()
            for sock in self.sockets.values():
                sock.close()
            if self._metrics_dir is not None:
                shutil.rmtree(self._metrics_dir, ignore_errors=True)
            if self.settings.pid_file is not None:
                with contextlib.suppress(OSError):
                    self.settings.pid_file.unlink()
        return self._exit_code

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- the cluster and the load balancer ------------------------------------------------------

    async def _start_node_services(self) -> None:
        """[cluster] (clusternode.py) and health_listen (healthz.py), before any worker."""
        from mailgate import cluster, clusternode, healthz

        cluster.new_boot()  # the workers' owner names in Redis are this boot's
        self.cluster = clusternode.start(self.settings, self)
        if self.settings.health_listen:
            self.health = healthz.HealthEndpoint(self.settings.health_listen, self._health_detail)
            await self.health.start()

    def _health_detail(self) -> str:
        if self.cluster is None:
            return ""
        return "redis=up" if self.cluster.subscribed else "redis=down"

    def _serving(self, serving: bool) -> None:
        from mailgate.healthz import Phase

        if self.health is not None:
            self.health.phase = Phase.SERVING if serving else Phase.DRAINING

    async def _drain_for_balancer(self) -> None:
        """Shutting down: the health endpoint says so at once, and the node goes on serving
        for drain_delay, so the balancer stops sending clients before the listeners close."""
        if self.health is None:
            return
        self._serving(False)
        delay = self.settings.drain_delay
        if delay > 0:
            log.info("health: draining; listeners close in %.1f s", delay)
            await asyncio.sleep(delay)

    async def _close_node_services(self) -> None:
        if self.cluster is not None:
            await self.cluster.close()
        if self.health is not None:
            await self.health.close()

    # --- listeners ------------------------------------------------------------------------------

    def _bind(self, settings: Settings) -> dict[tuple[str, int], socket.socket]:
        """Bind what `settings` listens on and is not bound yet; returns the new ones. On an
        error nothing new stays bound (OSError names the listener)."""
        from mailgate.server import BACKLOG, bind

        fresh: dict[tuple[str, int], socket.socket] = {}
        for i, listener in enumerate(settings.listeners):
            key = listener_key(listener)
            if key in self.sockets or key in fresh:
                continue
            try:
                sock = bind(listener)
                sock.listen(BACKLOG)
            except OSError as e:
                for made in fresh.values():
                    made.close()
                reason = e.strerror or str(e)
                raise OSError(
                    f"listener[{i}] {listener.address}: cannot listen: {reason}"
                ) from None
            fresh[key] = sock
        self.sockets.update(fresh)
        return fresh

    def _announce(self, settings: Settings) -> None:
        for listener in settings.listeners:
            host, port = self.sockets[listener_key(listener)].getsockname()[:2]
            log.info(
                "listening: %s on %s port %d (tls=%s)", listener.protocol, host, port, listener.tls
            )

    def _router(self, settings: Settings) -> BackendRouter:
        router = BackendRouter.from_settings(
            settings,
            listening=[
                (lst.host, self.sockets[listener_key(lst)].getsockname()[1])
                for lst in settings.listeners
            ],
            publish=lambda event: self._broadcast_health(event, None),
        )
        if self.router is not None:
            router.state.restore(self.router.state.snapshot())
        router.start()
        return router

    def _broadcast_health(self, event: HealthEvent, source: WorkerProcess | None) -> None:
        data = event.to_json()
        for worker in self.workers.values():
            if worker is not source:
                worker.link.notify("health", data)

    def _sockets_for(self, settings: Settings) -> list[socket.socket]:
        return [self.sockets[listener_key(listener)] for listener in settings.listeners]

    # --- workers --------------------------------------------------------------------------------

    async def _start_generation(self, settings: Settings) -> list[WorkerProcess]:
        self.generation += 1
        server_tls = tls.server_context(settings.tls)
        started = [
            await self._fork(index, settings, server_tls) for index in range(settings.workers)
        ]
        await asyncio.wait_for(asyncio.gather(*(w.ready for w in started)), timeout=READY_TIMEOUT)
        return started

    async def _fork(
        self, index: int, settings: Settings, server_tls: ssl.SSLContext | None
    ) -> WorkerProcess:
        ours, theirs = pair()
        sockets = self._sockets_for(settings)
        sys.stdout.flush()
        sys.stderr.flush()
        # What the supervisor holds (modules, config) goes to the collector's permanent
        # generation: a worker's collections then never touch it, so they stay cheap and do
        # not copy the shared pages on write.
        gc.freeze()
        pid = os.fork()
        if pid == 0:  # the worker: it never returns into the supervisor's loop
            ours.close()
            snapshot = self.router.state.snapshot() if self.router is not None else {}
            self._become_worker(settings, sockets, theirs, index, snapshot, server_tls)
        theirs.close()
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        worker: WorkerProcess | None = None

        def handle(op: str, args: list[Any]) -> Any:
            return self._from_worker(worker, op, args)

        link = await link_connect(ours, handle, f"worker {pid}")
        link.closed_callback = self._reap_soon
        worker = WorkerProcess(pid, index, self.generation, link, settings, ready, server_tls)
        self.workers[pid] = worker
        return worker

    def _become_worker(
        self,
        settings: Settings,
        sockets: list[socket.socket],
        link: socket.socket,
        index: int,
        health: dict[str, Any],
        server_tls: ssl.SSLContext | None,
    ) -> None:
        from mailgate.server import run_worker

        code = 0
        try:
            signal.set_wakeup_fd(-1)  # the supervisor's loop owns the inherited wakeup pipe
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
                signal.signal(sig, signal.SIG_IGN)  # the supervisor's business
            asyncio.events._set_running_loop(None)  # a fresh loop of its own
            self._close_inherited(sockets, link)
            run_worker(settings, sockets, link, index, health, server_tls)
        except BaseException:  # a worker must never return into the supervisor's loop
            log.exception("worker failed")
            code = 1
        finally:
            logging.shutdown()
            os._exit(code)

    def _close_inherited(self, keep: list[socket.socket], link: socket.socket) -> None:
        """Close what the worker must not hold: other workers' links, the control socket."""
        for other in self.workers.values():
            transport = other.link.transport
            sock = transport.get_extra_info("socket") if transport is not None else None
            if sock is not None and not other.link.lost:
                with contextlib.suppress(OSError):
                    os.close(sock.fileno())
        if self.control is not None:
            for sock in self.control.sockets:
                with contextlib.suppress(OSError):
                    os.close(sock.fileno())
        kept = {s.fileno() for s in keep} | {link.fileno()}
        for sock in self.sockets.values():
            if sock.fileno() not in kept:
                sock.close()

    def _reap_soon(self) -> None:
        """A link closed: its worker is exiting; reap it as soon as it has."""
        loop = asyncio.get_running_loop()
        for delay in (0.0, 0.05, 0.2, 1.0):
            loop.call_later(delay, self._reap)

    async def _reap_every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self._reap()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return
            self._worker_exited(pid, os.waitstatus_to_exitcode(status))

    def _worker_exited(self, pid: int, code: int) -> None:
        worker = self.workers.pop(pid, None)
        if worker is None:
            return
        gone = self.state.forget_worker(pid)
        if self.cluster is not None:  # cluster hook: its leases in Redis go now
            self.cluster.worker_gone(pid)
        metrics.worker_died(pid)
        worker.link.close()
        if not worker.ready.done():
            worker.ready.set_exception(RuntimeError(f"worker {pid} exited with {code}"))
        if worker.draining or self.stopping:
            log.info("worker %d (generation %d) exited", pid, worker.generation)
            return
        if worker.generation != self.generation:
            return
        now = time.monotonic()
        self._quick_deaths = (
            self._quick_deaths + 1 if now - self._last_death < RESTART_WINDOW else 1
        )
        self._last_death = now
        if self._quick_deaths > MAX_QUICK_RESTARTS:
            log.error("workers keep dying (%d in a row); giving up", self._quick_deaths)
            self._exit_code = 1
            assert self._stop is not None
            self._stop.set()
            return
        log.error(
            "worker %d (pid %d) died with status %d; %d sessions went with it; restarting",
            worker.index,
            pid,
            code,
            gone,
        )
        self._spawn_task(self._fork(worker.index, worker.settings, worker.server_tls))

    async def _stop_all(self) -> None:
        for worker in list(self.workers.values()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_timeout + KILL_GRACE
        while self.workers and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            self._reap()
        if self.workers:
            log.error("killing %d workers that did not stop in time", len(self.workers))
            for worker in list(self.workers.values()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)

    # --- what workers ask ------------------------------------------------------------------------

    def _from_worker(self, worker: WorkerProcess | None, op: str, args: list[Any]) -> Any:
        now = time.monotonic()
        pid = worker.pid if worker is not None else 0
        if op == "begin":
            return admission_to(self.state.begin(attempt_from(args), now))
        if op == "end":
            settled = self.state.end(attempt_from(args), args[3], now, args[4])
            return settled_to(settled)
        if op == "acquire":
            user, ip, trusted = args
            refusal = self.state.acquire(pid, user, ip, trusted)
            return refusal.value if refusal is not None else None
        if op == "release":
            user, ip, trusted = args
            self.state.release(pid, user, ip, trusted)
            return None
        if op == "ready":
            if worker is not None and not worker.ready.done():
                worker.ready.set_result(None)
            return None
        if op == "health":  # a worker's passive observation: apply it, tell the others
            event = HealthEvent.from_json(args[0])
            if self.router is not None:
                self.router.apply_remote(event)
            self._broadcast_health(event, worker)
            return None
        raise ValueError(f"unknown request {op!r}")

    async def fanout(self, op: str, *args: Any) -> list[Any]:
        """Ask every live worker (draining ones too); the answers of those that answered."""
        workers = list(self.workers.values())
        results = await asyncio.gather(
            *(w.link.request(op, *args, timeout=FANOUT_TIMEOUT) for w in workers),
            return_exceptions=True,
        )
        return [r for r in results if not isinstance(r, BaseException)]

    # --- reload ----------------------------------------------------------------------------------

    async def reload(self) -> tuple[bool, str]:
        """Read the configuration again and, if it is sound, switch to it. (ok, message)"""
        assert self.reloading is not None
        async with self.reloading:
            sdnotify.reloading()
            try:
                ok, message = await self._reload()
            finally:
                sdnotify.ready(f"{len(self.workers)} workers")
            (log.info if ok else log.error)("reload: %s", message)
            metrics.count(metrics.RELOADS, "ok" if ok else "failed")
            return ok, message

    async def _reload(self) -> tuple[bool, str]:
        from mailgate.server import preflight

        source = self.settings.source
        if source is None:
            return False, "this mailgate was not started from a configuration file"
        try:
            settings = config.load(source)
            preflight(settings)
            _same_node_services(self.settings, settings)  # cluster hook
            fresh = self._bind(settings)
        except (ConfigError, OSError) as e:
            return False, f"the new configuration was not applied: {e}"
        old = [w for w in self.workers.values() if not w.draining]
        # The new pools' health (what still exists keeps its state) before the new workers
        # fork, for them to start from it.
        old_router, self.router = self.router, self._router(settings)
        try:
            started = await self._start_generation(settings)
        except Exception as e:  # a worker of the new generation died or did not get ready
            await self.router.close()
            self.router = old_router
            for worker in list(self.workers.values()):
                if worker.generation == self.generation:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(worker.pid, signal.SIGKILL)
            for key in fresh:
                self.sockets.pop(key).close()
            self.generation -= 1
            return False, f"the new workers did not start ({e}); the old configuration stays"
        held = await asyncio.gather(
            *(self._drain(w, settings.reload_drain_timeout) for w in old), return_exceptions=True
        )
        self._close_unused(settings)
        if old_router is not None:
            await old_router.close()
        self.settings = settings
        self.state.configure(settings.throttle, settings.limits)
        self._announce(settings)
        relayed = sum(h.get("relayed", 0) for h in held if isinstance(h, dict))
        return True, (
            f"generation {self.generation} is live ({len(started)} workers); "
            f"{len(old)} old workers drain {relayed} relayed sessions"
        )

    async def _drain(self, worker: WorkerProcess, limit: float) -> dict[str, Any]:
        worker.draining = True
        try:
            held: dict[str, Any] = await worker.link.request("drain", limit, timeout=FANOUT_TIMEOUT)
        except LinkError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGTERM)
            return {}
        log.info(
            "worker %d (generation %d) drains: %d relayed sessions, %d logging in",
            worker.pid,
            worker.generation,
            held.get("relayed", 0),
            held.get("logging_in", 0),
        )
        return held

    def _close_unused(self, settings: Settings) -> None:
        wanted = {listener_key(listener) for listener in settings.listeners}
        for key in [k for k in self.sockets if k not in wanted]:
            self.sockets.pop(key).close()

    async def reopen_logs(self) -> None:
        with contextlib.suppress(OSError):
            logsetup.reopen()
        await self.fanout("reopen")

    # --- the control socket ----------------------------------------------------------------------

    async def _serve_control(self) -> None:
        from mailgate.control import serve_control

        path = config.control_socket_path(self.settings)
        if path is None:
            return
        try:
            self.control = await serve_control(path, self)
        except OSError as e:
            if self.settings.control_socket is not None:
                raise  # the operator named it: a socket that cannot be had is an error
            # The default beside the configuration file is taken (another mailgate started
            # from the same directory): run without one rather than not at all.
            log.warning("no control socket: %s", e)

    def _close_control(self) -> None:
        if self.control is not None:
            self.control.close()
            path = config.control_socket_path(self.settings)
            if path is not None:
                with contextlib.suppress(OSError):
                    path.unlink()
