"""The one async driver for backend logins: open TCP (and TLS), run a sans-I/O login core,
hand back the open connection or raise `BackendError`.

Every wait is under one deadline: connect has its own timeout, then greeting, STARTTLS, ID or
XCLIENT and the login itself share `login_timeout`.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

from mailgate.backend.imap import ImapLogin
from mailgate.backend.pop3 import Pop3Login
from mailgate.backend.smtp import SmtpLogin
from mailgate.netio import Channel
from mailgate.protocols.events import BackendEvent, BackendFailed, BackendReady, Send, StartTLS
from mailgate.values import BackendTLS, ClientInfo, Route

LoginCore = ImapLogin | Pop3Login | SmtpLogin


class BackendError(Exception):
    """The backend could not be reached or refused the login. `detail` is for the log."""

    def __init__(self, detail: str, *, temporary: bool) -> None:
        super().__init__(detail)
        self.detail = detail
        self.temporary = temporary


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


@dataclass(frozen=True, slots=True)
class SmtpSession:
    """What an SMTP backend login needs from the client's pre-auth session."""

    relay: bool  # "auth none": no password, the envelope decides
    client_helo: str | None
    envelope: tuple[bytes, ...]


def make_core(
    protocol: str,
    route: Route,
    opts: BackendOptions,
    client: ClientInfo,
    smtp: SmtpSession | None = None,
) -> LoginCore:
    starttls = (route.tls or opts.tls) is BackendTLS.STARTTLS
    forward = client if opts.forward_client else None
    if protocol == "imap":
        return ImapLogin(
            route.user, route.secret, starttls=starttls, mechanism=opts.imap_auth, forward=forward
        )
    if protocol == "pop3":
        return Pop3Login(
            route.user, route.secret, starttls=starttls, mechanism=opts.pop3_auth, forward=forward
        )
    if protocol == "smtp" and smtp is not None:
        mode = route.smtp_mode or opts.smtp_mode
        if smtp.relay and mode == "auth":
            mode = "none"  # a relay client has no password to AUTH with
        return SmtpLogin(
            helo_name=opts.helo_name,
            user="" if smtp.relay else route.user,
            secret=route.secret,
            mode=mode,
            starttls=starttls,
            # XCLIENT exists to pass the client on; it is the point of that mode.
            forward=client if mode == "xclient" else forward,
            client_helo=smtp.client_helo,
            envelope=smtp.envelope,
        )
    raise ValueError(f"no backend login core for {protocol}")


async def login(route: Route, opts: BackendOptions, core: LoginCore) -> BackendConnection:
    """Log in at route.host:route.port by driving `core` (built by make_core)."""
    mode = route.tls or opts.tls
    server_name = opts.server_name or route.host
    loop = asyncio.get_running_loop()
    where = f"{route.host}:{route.port}"
    try:
        async with asyncio.timeout(opts.connect_timeout):
            _, channel = await loop.create_connection(
                Channel,
                route.host,
                route.port,
                ssl=opts.tls_context if mode is BackendTLS.IMPLICIT else None,
                server_hostname=server_name if mode is BackendTLS.IMPLICIT else None,
            )
    except TimeoutError:
        raise BackendError(f"connect to {where} timed out", temporary=True) from None
    except (OSError, ssl.SSLError) as e:
        raise BackendError(f"connect to {where} failed: {e}", temporary=True) from None
    try:
        deadline = loop.time() + opts.login_timeout
        return await _drive(channel, core, opts, server_name, deadline)
    except TimeoutError:
        channel.abort()
        raise BackendError(f"login at {where} timed out", temporary=True) from None
    except (OSError, ssl.SSLError) as e:
        channel.abort()
        raise BackendError(f"login at {where} failed: {e}", temporary=True) from None
    except BackendError as e:
        channel.close()
        raise BackendError(f"{where}: {e.detail}", temporary=e.temporary) from None
    except BaseException:  # cancelled (shutdown, client gone): never leak the connection
        channel.abort()
        raise


async def _drive(
    channel: Channel, core: LoginCore, opts: BackendOptions, server_name: str, deadline: float
) -> BackendConnection:
    pending: list[BackendEvent] = []
    while True:
        if not pending:
            pending = core.receive(await channel.recv(deadline))
            continue
        match pending.pop(0):
            case Send(data=out):
                channel.write(out)
            case StartTLS():
                await channel.start_tls(
                    opts.tls_context,
                    server_side=False,
                    server_hostname=server_name,
                    timeout=max(0.001, deadline - asyncio.get_running_loop().time()),
                )
                pending = core.tls_started()  # the core discards anything after its STARTTLS
            case BackendReady(reply=reply, trailing=trailing):
                return BackendConnection(channel, reply, trailing + channel.take_buffer())
            case BackendFailed(temporary=temporary, detail=detail):
                raise BackendError(detail, temporary=temporary)
