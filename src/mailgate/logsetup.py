"""Where log lines go and how they look: stderr, the journal, or a file logrotate rotates.

- stderr connected to the journal (systemd sets JOURNAL_STREAM to the device:inode of the
  stream it gave us, and it must match stderr's, as a child whose stderr was redirected
  inherits the variable too): no timestamp, since journald stamps every line, and a `<N>`
  syslog priority prefix, which journald reads as the line's priority (SyslogLevelPrefix=,
  on by default), so `journalctl -p warning` works.
- stderr elsewhere: the timestamped format mailgate has always used.
- `log_file`: the timestamped format, appended to the file; `reopen()` opens it again by
  name, so that after logrotate has moved it the next line goes to the new file (the lead's
  SIGUSR2 handler and `mailgate reopen-logs` call it, in every process that logs).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
JOURNAL_FORMAT = "%(levelname)s %(name)s[%(process)d]: %(message)s"
# sd-daemon(3) priorities (syslog's): what journald files each logging level under.
PRIORITIES = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}

_file_handler: _ReopenableFileHandler | None = None


class JournalFormatter(logging.Formatter):
    """`<N>` before each line; a multi-line record (a traceback) gets it on every line, as
    journald reads each line of a stream as its own entry."""

    def __init__(self) -> None:
        super().__init__(JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def priority(levelno: int) -> int:
    for level in sorted(PRIORITIES, reverse=True):
        if levelno >= level:
            return PRIORITIES[level]
    return PRIORITIES[logging.DEBUG]


class _ReopenableFileHandler(logging.StreamHandler[IO[str]]):
    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(self._open())

    def _open(self) -> IO[str]:
        return self.path.open("a", encoding="utf-8", errors="backslashreplace")

    def reopen(self) -> None:
        new = self._open()  # first, so a failure leaves the old file in use
        old = self.setStream(new)
        if old is not None:
            old.close()

    def close(self) -> None:
        self.acquire()
        try:
            self.flush()
            self.stream.close()
        finally:
            self.release()
            super().close()


def journal_stream(stream: IO[str], environ: Mapping[str, str] = os.environ) -> bool:
    """True when `stream` is the journal's stream systemd handed this service."""
    device, sep, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    if not sep or not device.isdigit() or not inode.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # closed, or not a real file
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


def configure(
    level: str,
    log_file: Path | None = None,
    *,
    stream: IO[str] | None = None,
    environ: Mapping[str, str] = os.environ,
) -> logging.Handler:
    """Send the root logger's records to `log_file`, or to `stream` (stderr), replacing
    whatever handlers it had. Raises OSError when the file cannot be opened."""
    global _file_handler
    handler: logging.Handler
    if log_file is not None:
        handler = _file_handler = _ReopenableFileHandler(log_file)
        handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
    else:
        out = stream if stream is not None else sys.stderr
        handler = logging.StreamHandler(out)
        _file_handler = None
        journal = journal_stream(out, environ)
        handler.setFormatter(JournalFormatter() if journal else logging.Formatter(PLAIN_FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler


def reopen() -> bool:
    """Open log_file again (after logrotate moved it). False when logging to stderr, where
    there is nothing to reopen. Raises OSError when the file cannot be opened; the old one
    stays in use."""
    if _file_handler is None:
        return False
    _file_handler.reopen()
    return True
