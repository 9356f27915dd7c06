"""Authentication: the authenticators that turn credentials into decisions.

`http` asks an nginx-compatible auth_http service, `directory` the built-in SQL directory;
`throttle` and `cache` wrap either one. The values they trade in live in `mailgate.values`.
"""

from __future__ import annotations

from typing import Protocol

from mailgate.values import ClientInfo, Credentials, Decision


class Authenticator(Protocol):
    """Decides whether a login is valid and where it goes.

    Implementations never raise for an outage: a timeout, a dropped connection or a garbled
    answer is a `TempFail`.
    """

    async def authenticate(self, creds: Credentials, client: ClientInfo) -> Decision: ...

    async def close(self) -> None: ...
