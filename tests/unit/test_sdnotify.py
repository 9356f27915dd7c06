"""sd_notify over a real Unix datagram socket, bound here as systemd would bind it."""

from __future__ import annotations

import os
import re
import secrets
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgate import sdnotify


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket at a file path, with NOTIFY_SOCKET pointing at it."""
    directory = tempfile.mkdtemp(prefix="mg-")  # short: sun_path holds 108 bytes
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    try:
        yield sock
    finally:
        sock.close()
        os.unlink(path)
        os.rmdir(directory)


def received(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_ready_with_status(notify_socket: socket.socket) -> None:
    assert sdnotify.ready("3 listeners")
    assert received(notify_socket) == ["READY=1", "STATUS=3 listeners"]
    assert sdnotify.ready()
    assert received(notify_socket) == ["READY=1"]


def test_reloading_carries_the_monotonic_time(notify_socket: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sdnotify.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = received(notify_socket)
    assert lines[0] == "RELOADING=1"
    match = re.fullmatch(r"MONOTONIC_USEC=(\d+)", lines[1])
    assert match is not None and before <= int(match[1]) <= after
    assert len(lines) == 2


def test_stopping_status_watchdog(notify_socket: socket.socket) -> None:
    assert sdnotify.stopping()
    assert received(notify_socket) == ["STOPPING=1"]
    assert sdnotify.status("draining 12 sessions")
    assert received(notify_socket) == ["STATUS=draining 12 sessions"]
    assert sdnotify.watchdog()
    assert received(notify_socket) == ["WATCHDOG=1"]


def test_the_abstract_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"mailgate-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready()
        assert received(sock) == ["READY=1"]


def test_not_under_systemd_or_nobody_listening_is_a_quiet_false(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert sdnotify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert sdnotify.ready() is False


def test_watchdog_interval() -> None:
    me = str(os.getpid())
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": me}) == 15.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert sdnotify.watchdog_interval({}) is None
