"""Run the real mutt (Debian's, linked with GNU SASL) against an IMAP server, without a human.

mutt reads mail only in its full-screen interface, so it runs on a pseudo-terminal: it opens
the folder, its first keystrokes (`-e 'push ...'`) pipe the first message to a file and quit.
Its debug log (`-d 5`, Debian builds have it) holds the protocol lines it sent and received,
which is how a test sees the wire without capturing packets.

    run = run_mutt(tmp_path, "imaps://localhost:993/", user, password, ca, "cram-md5")
    assert "Subject: on store2" in run.message, run.transcript()
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import termios
import time
from dataclasses import dataclass
from pathlib import Path

# mutt connects, logs in, fetches one message and quits in well under a second here; a login
# it cannot complete leaves it waiting in its index, which RUN_TIMEOUT bounds.
RUN_TIMEOUT = 20.0
POLL_INTERVAL = 0.1
# mutt's debug lines for protocol traffic: "[time] 4> a0000 LOGIN ..." (4 is the socket).
_WIRE = re.compile(r"^\[[^]]*\] \d+([<>]) (.*)$")
# What mutt logs when its pushed keys find no open folder, i.e. every login attempt it makes
# has failed: no need to wait out RUN_TIMEOUT.
_GAVE_UP = "No mailbox is open"


@dataclass(frozen=True)
class MuttRun:
    message: str | None  # the first message of the folder as mutt piped it, or None
    wire: list[str]  # "C: ..." and "S: ..." lines from mutt's debug log
    debug: str  # the whole debug log, for assertion messages

    def sent(self, prefix: str) -> bool:
        """Did mutt send a line starting with `prefix` (after its tag)?"""
        return any(line.startswith("C: ") and prefix in line for line in self.wire)

    def transcript(self) -> str:
        return "\n".join(self.wire[:40]) or self.debug[-3000:]


def _quote(value: str) -> str:
    """A muttrc double-quoted string."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _muttrc(
    home: Path, url: str, user: str, password: str, ca: Path, authenticators: str | None
) -> str:
    settings = {
        "folder": url,
        "spoolfile": "+INBOX",
        "imap_user": user,
        "imap_pass": password,
        "ssl_ca_certificates_file": str(ca),
        "certificate_file": str(home / "certificates"),
        "ssl_starttls": "yes",
        "header_cache": "",
        "message_cachedir": "",
        "imap_check_subscribed": "no",
        "wait_key": "no",
        "pipe_decode": "no",
        "quit": "yes",
        "move": "no",
        "mark_old": "no",
        "record": "",
    }
    if authenticators is not None:  # None: mutt's default, every mechanism the server offers
        settings["imap_authenticators"] = authenticators
    return "".join(f"set {key}={_quote(value)}\n" for key, value in settings.items())


def run_mutt(
    workdir: Path,
    url: str,
    user: str,
    password: str,
    ca: Path,
    authenticators: str | None,
) -> MuttRun:
    """Open `url` (e.g. "imaps://localhost:993/") as `user` and pipe its first message out."""
    home = workdir / "mutt-home"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    rc, out = home / "muttrc", home / "message.txt"
    rc.write_text(_muttrc(home, url, user, password, ca, authenticators))
    keys = f"<pipe-message>cat > {out}<enter><exit>"
    argv = [str(shutil.which("mutt")), "-n", "-F", str(rc), "-d", "5", "-e", f'push "{keys}"']
    _run_on_pty(argv, home, give_up=home / ".muttdebug0")
    debug = _read(home / ".muttdebug0")
    return MuttRun(out.read_text(errors="replace") if out.exists() else None, _wire(debug), debug)


def _run_on_pty(argv: list[str], home: Path, give_up: Path) -> None:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    env = {"HOME": str(home), "PATH": os.environ.get("PATH", ""), "TERM": "xterm",
           "LANG": "C.UTF-8"}  # fmt: skip
    proc = subprocess.Popen(
        argv, stdin=slave, stdout=slave, stderr=slave, cwd=home, env=env, start_new_session=True
    )
    os.close(slave)
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], POLL_INTERVAL)
            if ready:
                try:
                    os.read(master, 65536)  # drain the screen, or mutt blocks writing it
                except OSError:  # EIO: the terminal's other side is gone
                    break
            if _GAVE_UP in _read(give_up):
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(RUN_TIMEOUT)
        os.close(master)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _wire(debug: str) -> list[str]:
    lines = []
    for line in debug.splitlines():
        m = _WIRE.match(line)
        if m:
            lines.append(("C: " if m.group(1) == ">" else "S: ") + m.group(2))
    return lines
