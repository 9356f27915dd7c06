"""examples/auth_service.py as its own process: the auth_http service the e2e tests log in through.

    with running_example_auth(workdir, {"alice@example.com": "pw"},
                              routes={"example.com": "smtp:127.0.0.1"},
                              port_map={"imap": 10143}, scheme="PLAIN") as auth:
        config = {"auth_http": {"url": auth.url, "header": {AUTH_HEADER: AUTH_SECRET}}}

The service reads its SQLite file per request, so `auth.cli("--add-route", ...)` takes effect
at the next login. With scheme PLAIN it can check CRAM-MD5 and APOP and hands the clear
password to mailgate for the backend login; with the default ARGON2ID it cannot.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import peers  # on sys.path through tests/e2e/conftest.py

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "auth_service.py"
AUTH_HEADER = "X-NGX-Auth-Key"
AUTH_SECRET = "e2e shared secret"  # test data, never a real credential
# One CLI call: a SQLite write, maybe an ARGON2ID hash; 20 s means it hangs.
CLI_TIMEOUT = 20.0
# The service imports aiohttp and binds in well under a second; 20 s means it hangs.
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


@dataclass
class ExampleAuth:
    db: Path
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/auth"

    @property
    def header(self) -> dict[str, str]:
        """The `[auth_http] header` table mailgate needs to be let in."""
        return {AUTH_HEADER: AUTH_SECRET}

    def cli(self, *args: str, stdin: str = "") -> None:
        subprocess.run(
            [sys.executable, str(EXAMPLE), "--db", str(self.db), *args],
            input=stdin.encode(), check=True, capture_output=True, timeout=CLI_TIMEOUT,
        )  # fmt: skip

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)


def start_example_auth(
    workdir: Path,
    users: Mapping[str, str],
    *,
    routes: Mapping[str, str],
    port_map: Mapping[str, int],
    scheme: str = "ARGON2ID",
) -> ExampleAuth:
    """The service over a fresh SQLite file in `workdir`, listening on a free port."""
    workdir.mkdir(parents=True, exist_ok=True)
    auth = ExampleAuth(workdir / "auth.sqlite", peers.free_port(), workdir / "auth_service.log")
    auth.cli("--init")
    for login, password in users.items():
        auth.cli("--add-user", login, "--scheme", scheme, stdin=password + "\n")
    for domain, destination in routes.items():
        auth.cli("--add-route", domain, destination)
    mapping = ",".join(f"{proto}={port}" for proto, port in port_map.items())
    with auth.log_path.open("ab") as log:
        auth.proc = subprocess.Popen(
            [sys.executable, str(EXAMPLE), "--db", str(auth.db),
             "--listen", f"127.0.0.1:{auth.port}", "--secret-header", AUTH_HEADER,
             *(["--port-map", mapping] if mapping else [])],
            env={**os.environ, "AUTH_SERVICE_SECRET": AUTH_SECRET},
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + READY_TIMEOUT
    while not peers.port_open(auth.port):
        if auth.proc.poll() is not None or time.monotonic() > deadline:
            auth.stop()
            raise RuntimeError(f"auth_service.py did not start:\n{auth.log_path.read_text()}")
        time.sleep(peers.POLL_INTERVAL)
    return auth


@contextlib.contextmanager
def running_example_auth(
    workdir: Path,
    users: Mapping[str, str],
    *,
    routes: Mapping[str, str],
    port_map: Mapping[str, int],
    scheme: str = "ARGON2ID",
) -> Iterator[ExampleAuth]:
    auth = start_example_auth(workdir, users, routes=routes, port_map=port_map, scheme=scheme)
    try:
        yield auth
    finally:
        auth.stop()
