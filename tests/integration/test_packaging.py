"""packaging/: the systemd unit passes `systemd-analyze verify` and says what the docs say;
the logrotate file rotates a real log that a mailgate process then reopens."""

from __future__ import annotations

import getpass
import grp
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mailgate.config import Settings
from mailgate.server import KILL_GRACE

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "packaging" / "systemd" / "mailgate.service"
LOGROTATE = ROOT / "packaging" / "logrotate" / "mailgate"
SRC = ROOT / "src"
REQUIRE = os.environ.get("MAILGATE_REQUIRE_PEERS") == "1"


def need(tool: str) -> str:
    path = shutil.which(tool) or (
        f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists() else None
    )
    if path is None:
        if REQUIRE:
            pytest.fail(f"{tool} is not installed (scripts/install-deps installs it)")
        pytest.skip(f"{tool} is not installed (scripts/install-deps installs it)")
    return path


def directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def test_the_unit_has_what_the_runbook_promises() -> None:
    unit = directives(UNIT.read_text())
    expected = {
        "Type": ["notify"],
        "ExecStart": ["mailgate serve -c /etc/mailgate/mailgate.toml"],
        "ExecReload": ["mailgate reload -c /etc/mailgate/mailgate.toml"],
        "KillSignal": ["SIGTERM"],
        "User": ["mailgate"],
        "AmbientCapabilities": ["CAP_NET_BIND_SERVICE"],
        "CapabilityBoundingSet": ["CAP_NET_BIND_SERVICE"],
        "NoNewPrivileges": ["yes"],
        "ProtectSystem": ["strict"],
        "ProtectHome": ["yes"],
        "PrivateTmp": ["yes"],
        "PrivateDevices": ["yes"],
        "RuntimeDirectory": ["mailgate"],
        "Restart": ["on-failure"],
    }
    assert {key: unit.get(key) for key in expected} == expected
    assert int(unit["LimitNOFILE"][0]) >= 65536
    # systemd must not SIGKILL a shutdown that is still within its own bounds.
    default_shutdown = Settings.__dataclass_fields__["shutdown_timeout"].default
    stop = re.fullmatch(r"(\d+)s", unit["TimeoutStopSec"][0])
    assert stop is not None and int(stop[1]) > default_shutdown + KILL_GRACE


def test_systemd_analyze_verify_finds_nothing(tmp_path: Path) -> None:
    analyze = need("systemd-analyze")
    # verify checks that the command exists in systemd's own search path (not $PATH), where
    # a test cannot install one: point the Exec lines at a real mailgate here instead.
    command = tmp_path / "mailgate"
    command.write_text(f'#!/bin/sh\nPYTHONPATH={SRC} exec {sys.executable} -m mailgate "$@"\n')
    command.chmod(0o755)
    unit = tmp_path / "mailgate.service"
    text = re.sub(r"^(Exec\w+=)mailgate ", rf"\1{command} ", UNIT.read_text(), flags=re.M)
    assert text.count(str(command)) == 2
    unit.write_text(text)
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=120
    )
    # Unknown keys and bad values are only warnings (exit 0): any output is a finding.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    broken = tmp_path / "broken.service"
    broken.write_text(text.replace("ProtectHome=yes", "ProtectHme=yes"))
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(broken)], capture_output=True, text=True, timeout=120
    )
    assert "Unknown key 'ProtectHme'" in result.stderr  # the check above can fail


LOGGER = """
import logging, signal, sys
from pathlib import Path
from mailgate import logsetup
logsetup.configure("info", Path(sys.argv[1]))
signal.signal(signal.SIGUSR2, lambda *_: logsetup.reopen())  # the lead's handler, in short
print("ready", flush=True)
for line in sys.stdin:
    logging.getLogger("mailgate.test").info(line.strip())
    print("logged", flush=True)
"""


def test_logrotate_rotates_and_mailgate_reopens(tmp_path: Path) -> None:
    logrotate = need("logrotate")
    logs = tmp_path / "log"
    logs.mkdir()
    log = logs / "mailgate.log"
    proc = subprocess.Popen(
        [sys.executable, "-c", LOGGER, str(log)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline() == "ready\n"

        def say(text: str) -> None:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(text + "\n")
            proc.stdin.flush()
            assert proc.stdout.readline() == "logged\n"

        say("before rotation")
        # The shipped file, with this test's directory, owner and process put in.
        user, group = getpass.getuser(), grp.getgrgid(os.getgid()).gr_name
        config = LOGROTATE.read_text()
        config = config.replace("/var/log/mailgate/", f"{logs}/")
        config = config.replace("create 0640 mailgate mailgate", f"create 0640 {user} {group}")
        config = re.sub(r"systemctl kill .*", f"kill -USR2 {proc.pid}", config)
        assert f"kill -USR2 {proc.pid}" in config and f"{logs}/*.log" in config
        (tmp_path / "logrotate.conf").write_text(config)
        result = subprocess.run(
            [
                logrotate,
                "--force",
                "--state",
                str(tmp_path / "state"),
                str(tmp_path / "logrotate.conf"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        rotated = logs / "mailgate.log.1"  # delaycompress: the newest stays plain
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the signal arrives asynchronously
            say("after rotation")
            if log.exists() and "after rotation" in log.read_text():
                break
            time.sleep(0.1)
        assert "before rotation" in rotated.read_text()
        assert "before rotation" not in log.read_text()
        assert "after rotation" in log.read_text()
        assert oct(log.stat().st_mode & 0o777) == "0o640"
    finally:
        proc.stdin.close()
        proc.wait(10)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
