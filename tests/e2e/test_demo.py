"""README's first command must stay true: the demo starts mailgate on its embedded default and
a real client lands on the right store. (scripts/demo is install-deps plus this script.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import peers
import pytest

from .conftest import require

ROOT = Path(__file__).resolve().parents[2]
DEMO_PORTS = (1143, 1993, 1110, 1995)


def curl(url: str, user: str) -> str:
    result = subprocess.run(
        ["curl", "-sk", "--max-time", "20", "--ssl-reqd", url, "-u", user],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return result.stdout


def test_demo_routes_users_to_their_stores(tmp_path: Path) -> None:
    require("dovecot", "curl", "openssl")
    if any(peers.port_open(p) for p in DEMO_PORTS):
        pytest.skip("the demo's ports are taken (a demo is running?)")
    env = dict(os.environ, MAILGATE_DEMO_DIR=str(tmp_path / "demo"), PYTHONPATH=str(ROOT / "src"))
    log = (tmp_path / "demo.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "demo.py")], env=env, stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 60
        while not all(peers.port_open(p) for p in DEMO_PORTS):
            assert proc.poll() is None, (tmp_path / "demo.log").read_text()
            assert time.monotonic() < deadline, "demo did not start in 60 s"
            time.sleep(0.2)
        alice = curl("imap://127.0.0.1:1143/INBOX;UID=1", "alice@example.com:alice-secret")
        assert "Subject: Welcome to store1" in alice
        bob = curl("pop3s://127.0.0.1:1995/1", "bob@example.org:bob-secret")
        assert "Subject: Welcome to store2" in bob
        assert curl("imaps://127.0.0.1:1993/INBOX;UID=1", "bob@example.org:wrong") == ""
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
        log.close()
    assert code == 0, (tmp_path / "demo.log").read_text()
    text = (tmp_path / "demo.log").read_text()
    assert "alice-secret" not in text.split("Ctrl-C stops everything.")[-1]  # not in the logs
    assert not any(peers.port_open(p) for p in (10143, 11143)), "stores left running"
