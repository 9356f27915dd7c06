"""Backend logins: sans-I/O client cores that log in to a mailstore on the user's behalf.

`core.py` is the skeleton of the cores, `imap.py`, `pop3.py` and `smtp.py` the cores;
`connect.py` runs them. This module holds the one failure exception and the function that turns
a failure into log text with every secret removed.
"""

from __future__ import annotations

from mailgate.protocols.events import Rejected

# Backend text kept in BackendFailed.detail: enough for a status code and a sentence, short
# enough to stay one readable log line however long the backend's line was.
DETAIL_MAX = 300


class LoginFailure(Exception):
    """Raised inside a login core; the core turns it into `BackendFailed` in one place.

    `line` is the backend's offending line (may be empty). It is kept out of the exception's
    message: a backend may echo the command, password included, in a BAD reply. `client_reply`
    is set where the backend's answer is the client's answer too (see BackendFailed).
    """

    def __init__(
        self, temporary: bool, what: str, line: bytes = b"", client_reply: Rejected | None = None
    ) -> None:
        super().__init__(what)
        self.temporary = temporary
        self.what = what
        self.line = line
        self.client_reply = client_reply


def describe(failure: LoginFailure, secrets: tuple[bytes, ...]) -> str:
    """Log text for a failure: its summary plus the backend's line, with every secret masked."""
    line = failure.line
    for secret in secrets:
        if secret:
            line = line.replace(secret, b"***")
    text = line[:DETAIL_MAX].decode("utf-8", "replace")
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return f"{failure.what}: {text}" if text else failure.what


def forwardable(value: str) -> bool:
    """True if `value` can go into an ID string or XCLIENT attribute as it is.

    Addresses and ports are short printable tokens; anything else is not forwarded
    rather than escaped, so a strange value can never split or extend the command.
    """
    return 0 < len(value) <= 255 and all("!" <= ch <= "~" and ch not in '"\\' for ch in value)
