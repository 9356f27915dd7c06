"""The bench's workshop: processes started and stopped by PID, ports, waits, /proc readings.

Everything the bench starts goes through `Lab.start` (or is a scripts/peers.py Peer handed to
`Lab.adopt`), so `Lab.stop_all` can stop exactly those processes, by PID, at the end, on an
error and on Ctrl-C. CPU and memory are read from /proc for whole process trees, so a proxy
with a master and workers (nginx, mailgate with workers > 1, PostgreSQL's backends) is one
figure.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT = 20.0  # a cold mailgate start (imports, uvloop) takes 1-3 s on a busy 2-core box
STOP_TIMEOUT = 5.0
# The bench's self-signed certificates, one per key type, told apart by SNI.
CERT_NAMES = {"ec": "ec.bench.test", "rsa": "rsa.bench.test"}


class Stoppable(Protocol):
    def stop(self, timeout: float = ...) -> None: ...


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    stop_signal: int = signal.SIGTERM

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None


@dataclass
class Lab:
    tmp: Path
    procs: list[Proc] = field(default_factory=list)
    peers: list[Stoppable] = field(default_factory=list)
    closed: bool = False

    def start(self, name: str, argv: list[str], **kw: Any) -> Proc:
        log = self.tmp / f"{name}.log"
        with log.open("ab") as out:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **kw,
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def adopt(self, peer: Stoppable) -> None:
        """Stop `peer` with the rest; at once if everything was stopped already (a peer that
        a thread finished starting after Ctrl-C)."""
        self.peers.append(peer)
        if self.closed:
            peer.stop()

    def stop(self, proc: Proc) -> None:
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, proc.stop_signal)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(STOP_TIMEOUT)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: workers too
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(1)

    def stop_all(self) -> None:
        """Signal each process we started (by PID), then SIGKILL its own process group."""
        self.closed = True
        for proc in reversed(self.procs):
            if proc.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, proc.stop_signal)
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(1)
        for peer in reversed(self.peers):
            with contextlib.suppress(Exception):
                peer.stop()


def tail(path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


_handed_out: set[int] = set()


def free_port() -> int:
    """A port free on 127.0.0.1 now and not handed out before in this run."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def wait_for(check: Callable[[], bool], proc: Proc, what: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{tail(proc.log)}")
        if check():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name}: {what} not ready after {READY_TIMEOUT} s\n{tail(proc.log)}")


def greets(port: int, prefix: bytes = b"") -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            return sock.recv(256).startswith(prefix) if prefix else True
    except OSError:
        return False


# ---------------------------------------------------------------- /proc


def _stat(pid: int) -> list[str]:
    """Fields after the command name: [1] ppid, [11] utime, [12] stime, [13] cutime, [14] cstime."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def tree(roots: Iterable[int]) -> list[int]:
    """The roots and every descendant alive now."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def tree_cpu(roots: Iterable[int], exclude: frozenset[int] = frozenset()) -> tuple[float, float]:
    """(user, system) seconds of a process tree: each process's own time plus its reaped
    children's (cutime, cstime), so a child that exits between two readings keeps counting."""
    user = system = 0.0
    for pid in tree(roots):
        fields = _stat(pid)
        if fields and pid not in exclude:
            user += (int(fields[11]) + int(fields[13])) / CLK_TCK
            system += (int(fields[12]) + int(fields[14])) / CLK_TCK
    return user, system


def memory_kib(roots: Iterable[int]) -> dict[str, int]:
    """Pss and Pss_Anon summed over a process tree, in KiB (/proc/PID/smaps_rollup).

    Pss also counts a share of the shared libraries' pages, and that share moves whenever
    another process on the box maps or unmaps the same files (any Python process does for
    libpython): Pss_Anon is the part only these processes' own allocations can move.
    """
    total = {"pss": 0, "anon": 0}
    for pid in tree(roots):
        with contextlib.suppress(OSError):
            rollup = {}
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
                key, value = line.split(":", 1)
                rollup[key] = int(value.split()[0])
            total["pss"] += rollup["Pss"]
            total["anon"] += rollup["Pss_Anon"]
    return total


def children_of(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


def wait_children(proc: Proc, count: int) -> list[int]:
    found: list[int] = []

    def spawned() -> bool:
        found[:] = children_of(proc.pid)
        return len(found) >= count

    wait_for(spawned, proc, f"{count} worker process(es)")
    return found


# ---------------------------------------------------------------- tools


def compile_tools(tmp: Path) -> dict[str, Path]:
    cc = os.environ.get("CC", "cc")
    tools = {}
    for name, libs in (("imapd", []), ("loadgen", ["-lssl", "-lcrypto"])):
        out = tmp / name
        argv = [cc, "-O2", "-o", str(out), str(HERE / f"{name}.c"), *libs]
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode:
            hint = " (Debian: libssl-dev)" if "openssl" in done.stderr else ""
            raise RuntimeError(f"cc {name}.c failed{hint}:\n{done.stderr}")
        tools[name] = out
    return tools


def make_certificates(tmp: Path) -> dict[str, tuple[Path, Path]]:
    """Self-signed ECDSA P-256 and RSA-2048 certificates: kind -> (cert, key).

    Also writes KIND.pem (certificate and key in one file), which is what HAProxy loads."""
    keys = {
        "ec": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
        "rsa": ["-newkey", "rsa:2048"],
    }
    made = {}
    for kind, newkey in keys.items():
        cert, key = tmp / f"{kind}.crt", tmp / f"{kind}.key"
        argv = [
            "openssl",
            "req",
            "-x509",
            *newkey,
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            f"/CN={CERT_NAMES[kind]}",
            "-days",
            "2",
        ]
        subprocess.run(argv, check=True, capture_output=True)
        (tmp / f"{kind}.pem").write_text(cert.read_text() + key.read_text())
        made[kind] = (cert, key)
    return made


def python_env(src: Path) -> dict[str, str]:
    """The environment that runs mailgate from `src` (a checkout's src/), nothing installed."""
    extra = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(src), extra])))


PYTHON = sys.executable


# ---------------------------------------------------------------- loadgen


def run_json(argv: list[str], timeout: float) -> dict[str, float]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"{Path(argv[0]).name} {argv[1:]} printed nothing: {done.stderr}")
    result: dict[str, float] = json.loads(lines[-1])
    return result


def read_json_line(proc: subprocess.Popen[str], timeout: float) -> dict[str, float]:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if not line:
        raise RuntimeError(f"loadgen: no answer within {timeout} s")
    result: dict[str, float] = json.loads(line)
    return result
