"""Dovecot's imaptest through mailgate: its scripted compliance groups and a short stress run.

imaptest (github.com/dovecot/imaptest) is the IMAP compliance and stress tester of Dovecot's
authors. No package registry carries it, so this module runs only when IMAPTEST names an
imaptest binary, and IMAPTEST_TESTS its directory of scripted test groups (by default the
`tests` directory beside the binary, where a source tree has it). It is the one e2e module
exempt from MAILGATE_REQUIRE_PEERS (conftest.optional_tool): without IMAPTEST it skips.

The reference is Dovecot itself. Every group that passes against Dovecot directly must pass
through mailgate in front of that same Dovecot: with auth_http and with the SQL directory, over
plain IMAP and over implicit TLS. (The `id` group failed through mailgate until issue 7.)
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peers  # on sys.path through tests/e2e/conftest.py
import pytest

from .conftest import optional_tool
from .example_auth import ExampleAuth, running_example_auth
from .mailgate_proc import MailgateProcess, running_mailgate
from .test_directory_proxy import admin_here, write_config

USER = "imaptest@example.com"  # the scripted groups create, fill and delete its "imaptest" box
STRESS_USER = "stress@example.com"  # the stress run works on this user's INBOX
PASSWORD = "imaptest-secret"  # test data, never a real credential
USERS = {USER: PASSWORD, STRESS_USER: PASSWORD}
# A run of all scripted groups takes about 10 s here, through mailgate or not.
RUN_TIMEOUT = 300.0
# The stress run: a few clients for a few seconds, then imaptest waits for their last replies.
STRESS_CLIENTS = 5
STRESS_SECONDS = 5
# Dovecot installs libdovecot.so.0 here, off the linker's default path; an imaptest built
# against the installed Dovecot needs it at run time.
DOVECOT_LIBDIR = Path("/usr/lib/dovecot")
MODES = ("auth_http", "directory")
TRANSPORTS = ("plain", "tls")

_SUMMARY = re.compile(r"^(\d+) test groups: (\d+) failed, (\d+) skipped", re.MULTILINE)
_FAILED_GROUP = re.compile(r"^\*\*\* Test (\S+) ", re.MULTILINE)


@dataclass(frozen=True)
class Imaptest:
    binary: Path
    tests: Path  # the directory of scripted groups (test=...)

    def run(self, port: int, tls: bool, *args: str) -> subprocess.CompletedProcess[str]:
        # ssl=any-cert: imaptest takes no CA file; the handshake and the relay are what count.
        argv = [str(self.binary), "host=127.0.0.1", f"port={port}", *(["ssl=any-cert"] * tls)]
        env = dict(os.environ)
        if DOVECOT_LIBDIR.is_dir():
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                filter(None, [str(DOVECOT_LIBDIR), env.get("LD_LIBRARY_PATH")])
            )
        return subprocess.run(
            [*argv, *args], capture_output=True, text=True, errors="replace",
            timeout=RUN_TIMEOUT, env=env, check=False,
        )  # fmt: skip


@dataclass(frozen=True)
class GroupRun:
    """One run of every scripted group: how many ran, which failed, and what imaptest said."""

    groups: int
    failed: frozenset[str]
    output: str

    @classmethod
    def parse(cls, done: subprocess.CompletedProcess[str]) -> GroupRun:
        output = done.stdout + done.stderr
        summary = _SUMMARY.search(output)
        assert summary, f"imaptest printed no summary (exit {done.returncode}):\n{output[-3000:]}"
        failed = frozenset(_FAILED_GROUP.findall(output))
        assert len(failed) == int(summary.group(2)), output[-3000:]
        return cls(int(summary.group(1)), failed, output)

    def explain(self, groups: set[str]) -> str:
        """imaptest's own account of these groups: its errors and expected-versus-got blocks,
        each line cut short (one ID command is 31 KB)."""
        keep, lines = [], self.output.splitlines()
        for i, line in enumerate(lines):
            wanted = line.startswith("Error:") or any(
                line.startswith(f"*** Test {g} ") for g in groups
            )
            if wanted:
                block = [line, *lines[i + 1 : i + 4]] if line.startswith("***") else [line]
                keep += [text[:300] for text in block if text.strip()]
        return "\n".join(keep)


@dataclass
class Results:
    """Runs are slow (seconds), so each one happens once per module, when a test first asks."""

    imaptest: Imaptest
    store: peers.Peer
    mailgates: dict[str, MailgateProcess]
    runs: dict[tuple[str, str], GroupRun] = field(default_factory=dict)

    def _groups(self, port: int, transport: str) -> GroupRun:
        done = self.imaptest.run(port, transport == "tls", f"user={USER}", f"pass={PASSWORD}",
                                 f"test={self.imaptest.tests}")  # fmt: skip
        return GroupRun.parse(done)

    def direct(self, transport: str) -> GroupRun:
        if ("dovecot", transport) not in self.runs:
            port = self.store.ports["imaps" if transport == "tls" else "imap"]
            self.runs["dovecot", transport] = self._groups(port, transport)
        return self.runs["dovecot", transport]

    def proxied(self, mode: str, transport: str) -> GroupRun:
        if (mode, transport) not in self.runs:
            port = self.mailgates[mode].ports["imaps" if transport == "tls" else "imap"]
            self.runs[mode, transport] = self._groups(port, transport)
        return self.runs[mode, transport]


# --- the peers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imaptest() -> Imaptest:
    binary = optional_tool("IMAPTEST", "Dovecot's imaptest")
    tests = Path(os.environ.get("IMAPTEST_TESTS") or binary.parent / "tests")
    if not (tests / "id").is_file():
        pytest.fail(f"no imaptest scripted groups in {tests}: set IMAPTEST_TESTS", pytrace=False)
    return Imaptest(binary, tests)


@pytest.fixture(scope="module")
def store(
    imaptest: Imaptest,
    server_cert: tuple[Path, Path, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[peers.Peer]:
    """A Dovecot of its own: imaptest empties and refills boxes the other modules rely on.

    peers.DOVECOT_CONF already allows 1000 connections per user and IP and gives a failed
    login no penalty, which imaptest's parallel clients need."""
    cert, key, _ = server_cert
    port = peers.free_port
    dovecot = peers.start_dovecot(
        tmp_path_factory.mktemp("imaptest-store"), "imaptest-store", imap_port=port(),
        pop3_port=port(), imaps_port=port(), users=USERS, tls_cert=cert, tls_key=key,
    )  # fmt: skip
    yield dovecot
    dovecot.stop()


@pytest.fixture(scope="module")
def auth(store: peers.Peer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExampleAuth]:
    with running_example_auth(
        tmp_path_factory.mktemp("imaptest-auth"), USERS, routes={"example.com": "smtp:127.0.0.1"},
        port_map={"imap": store.ports["imap"]}, scheme="PLAIN",
    ) as service:  # fmt: skip
        yield service


def _mailgate_config(server_cert: tuple[Path, Path, Path]) -> dict[str, Any]:
    cert, key, _ = server_cert
    return {
        "shutdown_timeout": 2,
        "tls": {"certificate": str(cert), "certificate_key": str(key)},
        "backend": {"connect_timeout": 2, "login_timeout": 5},
        # Every login here is right; a delay after a stray failure would only blur the results.
        "throttle": {"enabled": False},
    }


LISTENERS = {"imap": {"protocol": "imap"}, "imaps": {"protocol": "imap", "tls": "implicit"}}


@pytest.fixture(scope="module")
def mailgate_auth_http(
    auth: ExampleAuth,
    server_cert: tuple[Path, Path, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[MailgateProcess]:
    config = {**_mailgate_config(server_cert),
              "auth_http": {"url": auth.url, "timeout": 5, "header": auth.header}}  # fmt: skip
    with running_mailgate(tmp_path_factory.mktemp("mailgate-http"), LISTENERS, config) as mg:
        yield mg
    assert "Traceback" not in mg.log_text(), mg.log_tail()


@pytest.fixture(scope="module")
def mailgate_directory(
    store: peers.Peer,
    server_cert: tuple[Path, Path, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[MailgateProcess]:
    workdir = tmp_path_factory.mktemp("mailgate-directory")
    config = {**_mailgate_config(server_cert), "directory": {"url": "sqlite:///directory.db"}}
    path = write_config(workdir, config)
    admin_here(path, "directory", "init")
    admin_here(path, "mailstore", "add", "store", "--host", "127.0.0.1",
               "--imap-port", str(store.ports["imap"]))  # fmt: skip
    admin_here(path, "domain", "add", "example.com", "--mailstore", "store")
    for login, password in USERS.items():
        # PLAIN: an ARGON2ID check per login costs CPU this 2-core machine needs for imaptest.
        admin_here(path, "user", "add", login, "--password-stdin", "--scheme", "PLAIN",
                   stdin=f"{password}\n")  # fmt: skip
    with running_mailgate(workdir, LISTENERS, config) as mg:
        yield mg
    assert "Traceback" not in mg.log_text(), mg.log_tail()


@pytest.fixture(scope="module")
def results(
    imaptest: Imaptest,
    store: peers.Peer,
    mailgate_auth_http: MailgateProcess,
    mailgate_directory: MailgateProcess,
) -> Results:
    mailgates = {"auth_http": mailgate_auth_http, "directory": mailgate_directory}
    return Results(imaptest, store, mailgates)


# --- the scripted compliance groups -------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("mode", MODES)
def test_every_group_passing_on_dovecot_passes_through_mailgate(
    results: Results, mode: str, transport: str
) -> None:
    direct = results.direct(transport)
    assert direct.groups > 10, f"imaptest ran only {direct.groups} groups:\n{direct.output}"
    through = results.proxied(mode, transport)
    assert through.groups == direct.groups, through.output[-3000:]
    broken = set(through.failed - direct.failed)
    assert not broken, f"fail only through mailgate: {sorted(broken)}\n{through.explain(broken)}"


# --- the stress run ------------------------------------------------------------------------------


def totals(output: str) -> dict[str, int]:
    """imaptest's closing table: state names ("Logi", "Sele", ...) over their command counts."""
    lines = output.partition("Totals:")[2].strip().splitlines()
    assert len(lines) >= 2, f"imaptest printed no totals:\n{output[-3000:]}"
    names, counts = lines[0].split(), lines[-1].split()
    return dict(zip(names, map(int, counts), strict=False))


@pytest.mark.parametrize(
    ("transport", "profile"),
    [("plain", "logout=0"), ("tls", "logout=0"), ("plain", "relogin")],
)
@pytest.mark.parametrize("mode", MODES)
def test_stress_run_through_mailgate_has_no_errors(
    results: Results, mode: str, transport: str, profile: str
) -> None:
    """Random commands from parallel clients, with imaptest tracking the mailbox state: with
    logout=0 each client stays in one relayed session; "relogin" logs out and in again and
    again, through mailgate's login path."""
    port = results.mailgates[mode].ports["imaps" if transport == "tls" else "imap"]
    mbox = results.imaptest.tests / "default.mbox"  # the messages its clients APPEND
    args = [f"user={STRESS_USER}", f"pass={PASSWORD}", f"mbox={mbox}",
            f"clients={STRESS_CLIENTS}", f"secs={STRESS_SECONDS}"]  # fmt: skip
    if profile != "relogin":  # imaptest's default: LOGOUT at random, then a new login
        args.append(profile)
    done = results.imaptest.run(port, transport == "tls", *args)
    output = done.stdout + done.stderr
    errors = [line[:300] for line in output.splitlines() if line.startswith(("Error:", "Panic:"))]
    assert done.returncode == 0 and not errors, "\n".join(errors) or output[-3000:]
    counts = totals(output)
    assert counts["Logi"] >= STRESS_CLIENTS, counts
    assert counts["Fetc"] > 0, counts  # the clients got past SELECT and worked on the mailbox
