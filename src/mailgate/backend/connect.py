"""Backend logins over the network: open TCP (and TLS), run a sans-I/O login core with the
one driver loop (netio.exchange), hand back the open connection or raise `BackendError`.

Every wait is under a deadline: connect has its own timeout, then greeting, STARTTLS, ID or
XCLIENT and the login itself share `login_timeout`.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from mailgate.backend.imap import ImapLogin
from mailgate.backend.pop3 import Pop3Login
from mailgate.backend.smtp import SmtpLogin
from mailgate.netio import Channel, Deadline, exchange
from mailgate.protocols.events import BackendFailed, BackendReady, Rejected
from mailgate.values import BackendTLS, ClientInfo, Credentials, Method, Route

LoginCore = ImapLogin | Pop3Login | SmtpLogin


class BackendError(Exception):
    """The backend could not be reached or refused the login. `detail` is for the log.

    `temporary`: the backend is in trouble (counts against its health) rather than refusing
    the credentials; `client_reply`: the backend's own answer, where it is the client's too;
    `stage`: "connect" (no connection), "login" (connected), or "loop" (the connection
    reached one of mailgate's own listeners: refused before a byte was sent).
    """

    def __init__(
        self,
        detail: str,
        *,
        temporary: bool,
        client_reply: Rejected | None = None,
        stage: str = "login",
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.temporary = temporary
        self.client_reply = client_reply
        self.stage = stage


@dataclass(frozen=True, slots=True)
class BackendOptions:
    """The [backend] settings as the driver needs them, built once at start."""

    tls: BackendTLS
    tls_context: ssl.SSLContext
    server_name: str | None
    forward_client: bool
    imap_auth: str
    pop3_auth: str
    smtp_mode: str  # "xclient" | "auth"
    helo_name: str  # our EHLO name towards SMTP backends
    connect_timeout: float
    login_timeout: float


@dataclass(slots=True)
class BackendConnection:
    channel: Channel
    reply: bytes  # the backend's success line (no tag, no CRLF)
    trailing: bytes  # bytes the backend sent after it


def make_core(
    protocol: str,
    route: Route,
    opts: BackendOptions,
    client: ClientInfo,
    creds: Credentials,
    proxy_ttl: int | None = None,
) -> LoginCore:
    """The login core for this route; an SMTP login replays what the client said (`creds`).
    `proxy_ttl`: the hops left for the backend (IMAP ID "x-proxy-ttl", with forward_client).

    A token route (`route.backend_auth` XOAUTH2 / OAUTHBEARER) logs in with that mechanism,
    and on SMTP with AUTH whatever the mode: the point is that the backend sees the token.
    Master-user and password routes log in with the [backend] mechanism."""
    starttls = (route.tls or opts.tls) is BackendTLS.STARTTLS
    forward = client if opts.forward_client else None
    token = route.backend_auth.value if route.backend_auth.is_token else None
    if protocol == "imap":
        mechanism = token or opts.imap_auth
        return ImapLogin(
            route.user,
            route.secret,
            starttls=starttls,
            mechanism=mechanism,
            forward=forward,
            proxy_ttl=proxy_ttl,
        )
    if protocol == "pop3":
        mechanism = token or opts.pop3_auth
        return Pop3Login(
            route.user, route.secret, starttls=starttls, mechanism=mechanism, forward=forward
        )
    if protocol == "smtp":
        relay = creds.method is Method.NONE  # "auth none": no password, the envelope decides
        mode = route.smtp_mode or opts.smtp_mode
        if relay and mode == "auth":
            mode = "none"  # a relay client has no password to AUTH with
        if token is not None:
            mode = "auth"
        return SmtpLogin(
            helo_name=opts.helo_name,
            user="" if relay else route.user,
            secret=route.secret,
            mode=mode,
            starttls=starttls,
            # XCLIENT exists to pass the client on; it is the point of that mode.
            forward=client if mode == "xclient" else forward,
            client_helo=creds.smtp_helo,
            envelope=creds.envelope if relay else (),
            token_mechanism=token,
        )
    raise ValueError(f"no backend login core for {protocol}")


async def login(
    route: Route,
    opts: BackendOptions,
    core: LoginCore,
    peer_guard: Callable[[object], str | None] | None = None,
) -> BackendConnection:
    """Log in at route.host:route.port by driving `core` (built by make_core).

    `peer_guard(peer address)` says why the connected address must not be used (the loop
    guard: a host name that resolved to one of our own listeners), or None."""
    mode = route.tls or opts.tls
    server_name = opts.server_name or route.host
    loop = asyncio.get_running_loop()
    where = f"{route.host}:{route.port}"
    try:
        with Deadline(loop, loop.time() + opts.connect_timeout):
            _, channel = await loop.create_connection(
                functools.partial(Channel, None, loop),
                route.host,
                route.port,
                ssl=opts.tls_context if mode is BackendTLS.IMPLICIT else None,
                server_hostname=server_name if mode is BackendTLS.IMPLICIT else None,
            )
    except TimeoutError:
        raise BackendError(
            f"connect to {where} timed out", temporary=True, stage="connect"
        ) from None
    except (OSError, ssl.SSLError) as e:
        raise BackendError(
            f"connect to {where} failed: {e}", temporary=True, stage="connect"
        ) from None
    if peer_guard is not None and channel.transport is not None:
        loop_reason = peer_guard(channel.transport.get_extra_info("peername"))
        if loop_reason:
            channel.abort()
            raise BackendError(f"{where}: {loop_reason}", temporary=True, stage="loop")
    deadline = loop.time() + opts.login_timeout

    async def start_tls() -> None:
        await channel.start_tls(
            opts.tls_context, server_side=False, server_hostname=server_name, deadline=deadline
        )

    try:
        event = await exchange(
            channel,
            core,
            [],
            read_timeout=opts.login_timeout,
            send_timeout=opts.login_timeout,
            deadline=deadline,
            start_tls=start_tls,
        )
    except TimeoutError:
        channel.abort()
        raise BackendError(f"login at {where} timed out", temporary=True) from None
    except (OSError, ssl.SSLError) as e:
        channel.abort()
        raise BackendError(f"login at {where} failed: {e}", temporary=True) from None
    except BaseException:  # cancelled (shutdown, client gone): never leak the connection
        channel.abort()
        raise
    if isinstance(event, BackendReady):
        return BackendConnection(channel, event.reply, event.trailing + channel.take())
    assert isinstance(event, BackendFailed)
    channel.finish()
    raise BackendError(
        f"{where}: {event.detail}", temporary=event.temporary, client_reply=event.client_reply
    )
