"""`mailgate check` and `mailgate serve` as an operator runs them: a subprocess, its exit code,
what it prints, the sessions it serves and how it stops. The fake auth service and backend run
in this test process."""

from __future__ import annotations

import contextlib
import imaplib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness import FakeAuth, free_port, imap_backend, route_to, running_auth, running_backend

SRC = Path(__file__).resolve().parents[2] / "src"
PASSWORD = "s3cret"
SHUTDOWN_TIMEOUT = 2.0
# The supervisor's own grace after shutdown_timeout (server.KILL_GRACE) plus start-up slack.
EXIT_SLACK = 8.0

GOOD = """
hostname = "mail.example.com"
[[listener]]
protocol = "imap"
listen = "127.0.0.1:1143"
[[listener]]
protocol = "pop3"
listen = "127.0.0.1:1110"
[auth_http]
url = "http://127.0.0.1:9000/auth"
"""


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), e.get("PYTHONPATH")) if p)
    return e


def mailgate(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailgate", *args],
        capture_output=True,
        text=True,
        env=env(),
        timeout=timeout,
    )


def write(tmp_path: Path, text: str, name: str = "mailgate.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- check ---------------------------------------------------------------------------------


def test_check_accepts_a_good_config(tmp_path: Path) -> None:
    result = mailgate("check", "-c", str(write(tmp_path, GOOD)))
    assert result.returncode == 0, result.stderr
    assert "imap on 127.0.0.1:1143" in result.stdout
    assert "pop3 on 127.0.0.1:1110" in result.stdout
    assert result.stdout.rstrip().endswith("ok (2 listeners, auth_http)")
    assert result.stderr == ""


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (("[auth_http]", "[auth_http]\nretries = 3"), "auth_http.retries: unknown setting"),
        (('listen = "127.0.0.1:1143"', 'listen = "127.0.0.1"'), "listener[0].listen"),
        (('listen = "127.0.0.1:1143"', 'listen = "127.0.0.1:70000"'), "listener[0].listen"),
        (('listen = "127.0.0.1:1143"', "listen = 1143"), "listener[0].listen: must be str"),
        (('protocol = "pop3"', 'protocol = "pop3"\ntls = "implicit"'), "[tls] certificate"),
        (('[auth_http]\nurl = "http://127.0.0.1:9000/auth"', ""), "[auth_http] or [directory]"),
        (('hostname = "mail.example.com"', "workers = 'two'"), "workers"),
        (('hostname = "mail.example.com"', "[backend]\nverify = 'yes'"), "backend.verify"),
        (('hostname = "mail.example.com"', "[imap]\nauth = 'login'"), "imap.auth: must be list"),
        (('hostname = "mail.example.com"', "shutdown_timeout = -1"), "shutdown_timeout"),
    ],
    ids=[
        "unknown key",
        "listen without port",
        "listen port out of range",
        "listen not a string",
        "tls without certificate",
        "no auth source",
        "workers not a number",
        "verify not a bool",
        "auth not a list",
        "negative timeout",
    ],
)
def test_check_rejects_a_bad_config_naming_the_key(
    tmp_path: Path, change: tuple[str, str], key: str
) -> None:
    old, new = change
    assert old in GOOD
    result = mailgate("check", "-c", str(write(tmp_path, GOOD.replace(old, new, 1))))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("mailgate: configuration error: ")
    assert key in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_check_reports_unreadable_and_invalid_toml(tmp_path: Path) -> None:
    missing = mailgate("check", "-c", str(tmp_path / "absent.toml"))
    assert missing.returncode == 2
    assert "absent.toml: cannot read" in missing.stderr
    broken = mailgate("check", "-c", str(write(tmp_path, "[[listener]\n")))
    assert broken.returncode == 2
    assert "not valid TOML" in broken.stderr
    assert "Traceback" not in missing.stderr + broken.stderr


def test_check_rejects_a_zero_auth_http_timeout(tmp_path: Path) -> None:
    text = GOOD.replace('/auth"', '/auth"\ntimeout = 0')
    result = mailgate("check", "-c", str(write(tmp_path, text)))
    assert result.returncode == 2
    assert "auth_http.timeout" in result.stderr


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ('[tls]\ncertificate = "absent.pem"\ncertificate_key = "absent.key"', "tls.certificate"),
        ('[backend]\ntls = "implicit"\nca_file = "absent-ca.pem"', "backend.ca_file"),
    ],
    ids=["tls.certificate", "backend.ca_file"],
)
def test_check_names_a_missing_certificate_file(tmp_path: Path, section: str, key: str) -> None:
    result = mailgate("check", "-c", str(write(tmp_path, GOOD + section + "\n")))
    assert result.returncode == 2
    assert key in result.stderr
    assert "absent" in result.stderr


# --- serve ---------------------------------------------------------------------------------


def serve_config(imap_port: int, auth_url: str, workers: int = 2) -> str:
    return f"""
workers = {workers}
shutdown_timeout = {SHUTDOWN_TIMEOUT}
log_level = "info"
[[listener]]
protocol = "imap"
listen = "127.0.0.1:{imap_port}"
[auth_http]
url = "{auth_url}"
timeout = 2.0
[backend]
connect_timeout = 1.0
login_timeout = 2.0
[throttle]
enabled = false
"""


@contextlib.contextmanager
def serving(config: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`mailgate serve` in the background, stderr to `log`; killed if the test leaves it."""
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mailgate", "serve", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env(),
            start_new_session=True,  # so cleanup can reach the workers too
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def wait_greeting(port: int, proc: subprocess.Popen[bytes], limit: float = 20.0) -> bytes:
    """Connect until mailgate greets; one session (closed at once) when it answers."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert proc.poll() is None, "mailgate serve exited early"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                return sock.recv(1024)
        except OSError:
            time.sleep(0.1)
    raise AssertionError("mailgate did not start listening")


def children(pid: int) -> list[int]:
    """Live (non-zombie) processes whose parent is `pid`, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] != "Z" and int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def session_lines(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if " mailgate.session[" in line]


def wait_for(condition: Callable[[], bool], limit: float = 10.0) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def read_until(sock: socket.socket, marker: bytes, limit: float) -> bytes:
    data = b""
    deadline = time.monotonic() + limit
    sock.settimeout(limit)
    while marker not in data and time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


@needs_proc
def test_serve_with_two_workers_logs_in_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "stderr.log"
    with (
        running_backend(imap_backend(PASSWORD)) as backend,
        running_auth(FakeAuth(route_to(backend.port))) as auth,
        serving(write(tmp_path, serve_config(port, auth.url)), log) as proc,
    ):
        assert wait_greeting(port, proc).startswith(b"* OK ")
        assert wait_for(lambda: len(children(proc.pid)) == 2)
        workers = children(proc.pid)
        logins = 3
        for _ in range(logins):
            imap = imaplib.IMAP4("127.0.0.1", port, timeout=10)
            assert imap.login("alice@example.com", PASSWORD)[0] == "OK"
            assert imap.noop() == ("OK", [b"NOOP completed (fake backend)"])
            imap.logout()
        # One line per session: the greeting probe and each login, each written at its end.
        assert wait_for(lambda: len(session_lines(log)) == 1 + logins)
        lines = session_lines(log)
        relayed = [line for line in lines if "user=alice@example.com" in line]
        assert len(relayed) == logins
        assert all(f"backend=127.0.0.1:{backend.port}" in line for line in relayed)
        assert all(re.search(r" in=\d+ out=\d+ ", line) for line in relayed)
        assert len(auth.requests) == logins

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(SHUTDOWN_TIMEOUT + EXIT_SLACK) == 0
    assert wait_for(lambda: not any(alive(pid) for pid in workers), limit=5)
    text = log.read_text()
    assert f"listening: imap on 127.0.0.1 port {port}" in text
    assert "Traceback" not in text
    assert PASSWORD not in text
    assert len(session_lines(log)) == 1 + logins  # nothing logged twice at shutdown


@needs_proc
def test_sigterm_gives_relayed_sessions_shutdown_timeout_then_bye(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "stderr.log"
    with (
        running_backend(imap_backend(PASSWORD)) as backend,
        running_auth(FakeAuth(route_to(backend.port))) as auth,
        serving(write(tmp_path, serve_config(port, auth.url)), log) as proc,
    ):
        wait_greeting(port, proc)
        workers = children(proc.pid)
        relayed = socket.create_connection(("127.0.0.1", port), timeout=10)
        read_until(relayed, b"\r\n", 10)
        relayed.sendall(b'a LOGIN alice "' + PASSWORD.encode() + b'"\r\n')
        assert b"a OK" in read_until(relayed, b"a OK", 10)
        waiting = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert read_until(waiting, b"\r\n", 10).startswith(b"* OK")  # not logged in

        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        # A session still logging in is told at once; a relayed one gets shutdown_timeout.
        assert b"* BYE Server shutting down" in read_until(waiting, b"BYE", 10)
        preauth_bye = time.monotonic() - signalled
        bye = read_until(relayed, b"BYE", SHUTDOWN_TIMEOUT + EXIT_SLACK)
        relay_bye = time.monotonic() - signalled
        assert b"* BYE Server shutting down" in bye
        assert relay_bye >= SHUTDOWN_TIMEOUT * 0.9
        assert preauth_bye < relay_bye
        assert read_until(relayed, b"never", 5) == b""  # then cut
        assert proc.wait(SHUTDOWN_TIMEOUT + EXIT_SLACK) == 0
    assert wait_for(lambda: not any(alive(pid) for pid in workers), limit=5)
    text = log.read_text()
    assert "cut 1 relayed sessions" in text
    assert any("outcome=shutdown" in line and "user=alice" in line for line in session_lines(log))
    assert "Traceback" not in text


@needs_proc
def test_serve_exits_when_workers_cannot_start(tmp_path: Path) -> None:
    port = free_port()
    text = serve_config(port, "http://127.0.0.1:9/auth")
    text = text.replace('protocol = "imap"', 'protocol = "imap"\ntls = "implicit"')
    text += '[tls]\ncertificate = "absent.pem"\ncertificate_key = "absent.key"\n'
    log = tmp_path / "stderr.log"
    with serving(write(tmp_path, text), log) as proc:
        try:
            code = proc.wait(10)
        except subprocess.TimeoutExpired:
            code = None
    assert code not in (None, 0)
    assert log.read_text().count("Traceback") <= 1
