"""Run `python -m mailgate serve -c FILE` as a real process for end-to-end tests.

The config is written from a dict (a small TOML writer: no TOML writer is installed), the
listeners get fixed free ports, and the process is ready once every port is listening. Its
stderr is the log; tests read it from a file. `stop()` sends SIGTERM and insists on exit 0.

    with running_mailgate(workdir, {"imap": {"protocol": "imap", "tls": "starttls"}},
                          {"auth_http": {"url": url}}) as mg:
        imaplib.IMAP4("127.0.0.1", mg.ports["imap"])
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peers  # on sys.path through tests/e2e/conftest.py

SRC = Path(__file__).resolve().parents[2] / "src"
# A cold start imports aiohttp, uvloop and ssl and loads certificates: well under a second
# here; 20 s means it hangs.
READY_TIMEOUT = 20.0
# SIGTERM: pre-auth sessions get their goodbye at once, relays get shutdown_timeout (tests set
# it small), then the loop closes. 15 s means the shutdown hangs.
STOP_TIMEOUT = 15.0
# mailgate writes a session line when the session ends; after the client's last read that is
# within milliseconds, unless the relay waits for the backend to close (Dovecot: at once).
LOG_WAIT = 5.0
POLL_INTERVAL = 0.05
# TCP state "0A" in /proc/net/tcp{,6}: LISTEN.
_TCP_LISTEN = "0A"
_SESSION = re.compile(r" INFO mailgate\.session\[\d+\]: (?P<message>\w+ client=\S+ .*)$")


_NOTIFY_SERIAL = itertools.count()


class MailgateError(RuntimeError):
    """mailgate did not start; the message carries the tail of its log."""


@dataclass
class SessionLine:
    """One end-of-session log line, split into its key=value fields."""

    protocol: str
    fields: dict[str, str]
    text: str

    def __getitem__(self, key: str) -> str:
        return self.fields[key]


@dataclass
class MailgateProcess:
    proc: subprocess.Popen[bytes]
    config_path: Path
    log_path: Path
    ports: dict[str, int]  # listener name -> port on 127.0.0.1
    returncode: int | None = field(default=None)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_size(self) -> int:
        """An offset into the log: pass it to `session_lines(since=...)`."""
        return self.log_path.stat().st_size

    def session_lines(self, since: int = 0) -> list[SessionLine]:
        with self.log_path.open("rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        return [parsed for line in text.splitlines() if (parsed := parse_session(line))]

    def wait_for_sessions(
        self, match: Callable[[SessionLine], bool], *, since: int = 0, timeout: float = LOG_WAIT
    ) -> list[SessionLine]:
        """Every session line after `since` that `match`es, once there is at least one."""
        deadline = time.monotonic() + timeout
        while True:
            found = [s for s in self.session_lines(since) if match(s)]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(POLL_INTERVAL)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def workers(self) -> set[int]:
        """The supervisor's worker processes now."""
        return children(self.proc.pid)

    def worker(self, timeout: float = READY_TIMEOUT) -> int:
        """The pid of the one worker (workers = 1): where sessions live, where RSS and
        descriptors are measured."""
        deadline = time.monotonic() + timeout
        while len(pids := self.workers()) != 1:
            if time.monotonic() > deadline:
                raise AssertionError(f"expected one worker, found {sorted(pids)}")
            time.sleep(POLL_INTERVAL)
        return pids.pop()

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, wait, and assert that mailgate exited with status 0."""
        if self.returncode is not None:
            return self.returncode
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout)
            raise AssertionError(
                f"mailgate ignored SIGTERM for {timeout} s:\n{self.log_tail()}"
            ) from None
        assert self.returncode == 0, f"mailgate exited {self.returncode}:\n{self.log_tail()}"
        return self.returncode

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def children(pid: int) -> set[int]:
    found: set[int] = set()
    with contextlib.suppress(FileNotFoundError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            found |= {int(c) for c in (task / "children").read_text().split()}
    return found


def parse_session(line: str) -> SessionLine | None:
    """'... INFO mailgate.session[7]: imap client=127.0.0.1:5 user=a ... outcome=logout'."""
    m = _SESSION.search(line)
    if m is None:
        return None
    protocol, _, rest = m.group("message").partition(" ")
    fields = dict(word.partition("=")[::2] for word in rest.split(" ") if "=" in word)
    # outcome is last and may hold spaces ("client closed").
    fields["outcome"] = rest.partition(" outcome=")[2]
    return SessionLine(protocol, fields, line)


# --- the config ----------------------------------------------------------------------------


def to_toml(config: Mapping[str, Any]) -> str:
    """Enough TOML for a mailgate config: scalars, lists of scalars, tables, arrays of tables.

    Strings go out as JSON strings, which are valid TOML basic strings for printable text.
    """
    lines: list[str] = []
    _table(config, [], lines)
    return "\n".join(lines) + "\n"


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | os.PathLike):
        return json.dumps(os.fspath(value))
    if isinstance(value, Sequence):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _is_table_array(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


def _table(table: Mapping[str, Any], path: list[str], lines: list[str]) -> None:
    nested = {k: v for k, v in table.items() if isinstance(v, Mapping) or _is_table_array(v)}
    for key, value in table.items():
        if key not in nested:
            lines.append(f"{json.dumps(key)} = {_value(value)}")
    for key, value in nested.items():
        name = ".".join(json.dumps(p) for p in [*path, key])
        for item in value if isinstance(value, list) else [value]:
            lines.append(f"\n[[{name}]]" if isinstance(value, list) else f"\n[{name}]")
            _table(item, [*path, key], lines)


# --- the process ---------------------------------------------------------------------------


def listening(port: int) -> bool:
    """Is something listening on 127.0.0.1:port? Read from /proc, so that probing leaves no
    session (and no session line) behind in mailgate's log; a connect elsewhere."""
    tables = [Path("/proc/net/tcp"), Path("/proc/net/tcp6")]
    if not tables[0].exists():
        return bool(peers.port_open(port))
    suffix = f":{port:04X}"
    for table in tables:
        with contextlib.suppress(OSError):
            for row in table.read_text().splitlines()[1:]:
                cols = row.split()
                if cols[1].endswith(suffix) and cols[3] == _TCP_LISTEN:
                    return True
    return False


def start_mailgate(
    workdir: Path, listeners: Mapping[str, Mapping[str, Any]], config: Mapping[str, Any]
) -> MailgateProcess:
    """Write workdir/mailgate.toml, start mailgate, return once it says every worker is
    ready (its sockets listen before: the kernel queues connections until a worker takes them).

    `listeners` maps a name of your choice to a [[listener]] table without `listen`; each gets
    a free port on 127.0.0.1, found in `.ports[name]`.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    ports = {name: peers.free_port() for name in listeners}
    tables = [{**table, "listen": f"127.0.0.1:{ports[name]}"} for name, table in listeners.items()]
    config_path, log_path = workdir / "mailgate.toml", workdir / "mailgate.log"
    config_path.write_text(to_toml({**config, "listener": tables}))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
    }
    # Ready is when the supervisor says so, as systemd hears it (sd_notify READY=1, once
    # every worker is): its sockets listen before, the kernel queueing until a worker is up.
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(f"\0mailgate-test-{os.getpid()}-{next(_NOTIFY_SERIAL)}")
    env["NOTIFY_SOCKET"] = "@" + notify.getsockname()[1:].decode()
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mailgate", "serve", "-c", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            start_new_session=True,  # a Ctrl-C in the terminal is for pytest, not for mailgate
        )
    mg = MailgateProcess(proc, config_path, log_path, ports)
    deadline = time.monotonic() + READY_TIMEOUT

    with notify:
        while not _told_ready(notify):
            if not mg.alive() or time.monotonic() > deadline:
                if mg.alive():
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(STOP_TIMEOUT)
                raise MailgateError(
                    f"mailgate did not start (exit {proc.poll()}):\n{mg.log_tail()}"
                )
    assert all(listening(p) for p in ports.values()), mg.log_tail()
    return mg


def _told_ready(notify: socket.socket) -> bool:
    """Whether a datagram saying READY=1 came within a poll interval."""
    notify.settimeout(POLL_INTERVAL)
    try:
        return b"READY=1" in notify.recv(4096).split(b"\n")
    except TimeoutError:
        return False


@contextlib.contextmanager
def running_mailgate(
    workdir: Path, listeners: Mapping[str, Mapping[str, Any]], config: Mapping[str, Any]
) -> Iterator[MailgateProcess]:
    mg = start_mailgate(workdir, listeners, config)
    try:
        yield mg
    finally:
        mg.stop()
