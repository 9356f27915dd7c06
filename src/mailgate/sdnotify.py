"""sd_notify(3) over $NOTIFY_SOCKET, with the standard library: no libsystemd, no dependency.

systemd (Type=notify) starts mailgate with NOTIFY_SOCKET set to a Unix datagram socket, a
path or, with a leading "@", a name in the abstract namespace. Each message is one datagram
of newline-separated VAR=value lines. Without NOTIFY_SOCKET (not under systemd) every call
is a no-op that returns False, and so is a failure to send: telling systemd is never worth
failing a start or a reload for. Only the main process may notify (NotifyAccess=main), so
the supervisor calls these, not the workers.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping


def notify(*lines: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Send `lines` (e.g. "READY=1", "STATUS=...") in one datagram; True if it was sent."""
    address = environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    elif not address.startswith("/"):
        return False  # unset, or a transport we do not speak (vsock)
    message = "\n".join(lines).encode("utf-8", errors="replace")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message)
    except OSError:
        return False
    return True


def ready(status: str | None = None) -> bool:
    """Start-up (or a reload) is complete: systemd moves the unit to active."""
    return notify("READY=1", *([f"STATUS={status}"] if status else []))


def reloading() -> bool:
    """A reload has begun; send ready() when it is done (systemd's notify-reload protocol
    wants the CLOCK_MONOTONIC time of the start, in microseconds)."""
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={now}")


def stopping() -> bool:
    return notify("STOPPING=1")


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def watchdog_interval(environ: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec=, as sd_watchdog_enabled(3)
    advises), or None when the watchdog is off or meant for another process."""
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000
