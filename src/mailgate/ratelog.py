"""Log lines that an attacker can trigger at will, at most one per interval."""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    """Logs the first event, then at most one line per `interval` seconds, saying how many
    were left out in between. A flood of refused connections costs one line a minute."""

    __slots__ = ("_interval", "_logger", "_next", "_suppressed")

    def __init__(self, logger: logging.Logger, interval: float = 60.0) -> None:
        self._logger = logger
        self._interval = interval
        self._next = 0.0
        self._suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return
        if self._suppressed:
            message += " (and %d more like it since the last such line)"
            args = (*args, self._suppressed)
        self._logger.warning(message, *args)
        self._suppressed = 0
        self._next = now + self._interval
