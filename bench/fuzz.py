"""Long fuzz runs of the sans-I/O cores: millions of inputs per target, bounded in time.

    python bench/fuzz.py                       # every target, 60 s each
    python bench/fuzz.py --seconds 600 proxy imap
    python bench/fuzz.py --engine random       # without atheris

Targets: the PROXY protocol parser, the three pre-auth client cores (IMAP, POP3, SMTP) and the
three backend login cores. Each input is `options byte, chunk byte, payload`: the options pick
the policy and the login outcomes, the chunk byte how the payload is split into reads. A
target must turn any input into events (or, for the PROXY parser, a header, "need more" or
ProxyProtocolError) and never raise anything else; the invariants it checks are in `check`.

Engines: `atheris` (coverage-guided libFuzzer, `pip install mailgate[fuzz]`) when it imports,
otherwise `random`, a mutation loop over the seeds with the same dictionary. Each target runs
in its own process (libFuzzer exits when done); the script prints inputs and inputs/s per
target and exits 1 if any target found an input that raised: the input and the traceback are
kept in the artifacts directory (printed).
"""

from __future__ import annotations

import argparse
import base64
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SALT = "<1.2@fuzz>"
MAX_LEN = 4096  # longer inputs only repeat what shorter ones reach


class Broken(AssertionError):
    """An invariant does not hold: reported like any unexpected exception."""


def check(condition: bool, what: str) -> None:
    if not condition:
        raise Broken(what)


def chunks(payload: bytes, size: int) -> list[bytes]:
    """`payload` in reads of `size` bytes (0: one read), never an empty read (that is EOF)."""
    if size == 0:
        return [payload] if payload else []
    return [payload[i : i + size] for i in range(0, len(payload), size)]


# --- the adapters: how each core is built and driven. The lead is reshaping these APIs; all
# --- knowledge of them is in this block, a few lines per core.


def load_targets() -> dict[str, Callable[[int, bytes, int], None]]:
    """name -> run(options, payload, chunk). Imported late so atheris can instrument mailgate."""
    from mailgate.backend.imap import ImapLogin
    from mailgate.backend.pop3 import Pop3Login
    from mailgate.backend.smtp import SmtpLogin
    from mailgate.protocols import events as ev
    from mailgate.protocols.imap import ImapCore
    from mailgate.protocols.policy import PreAuthPolicy
    from mailgate.protocols.pop3 import Pop3Core
    from mailgate.protocols.proxy_protocol import (
        NEED_MORE,
        HeaderParsed,
        ProxyHeaderParser,
        ProxyProtocolError,
    )
    from mailgate.protocols.smtp import SmtpCore
    from mailgate.values import ClientInfo, Secret

    client = ClientInfo("192.0.2.1", 40000, "imap", "10.0.0.1", 143)
    mechanisms = {
        "imap": ("login", "plain", "cram-md5"),
        "pop3": ("user", "apop", "plain", "login", "cram-md5"),
        "smtp": ("plain", "login", "cram-md5", "none"),
    }
    success = {"imap": b"OK Logged in", "pop3": b"+OK Logged in.", "smtp": b"235 2.7.0 Ok"}
    # Bit 2 turns the OAuth mechanisms on, with a short or the default max_token: the
    # long-token paths (line limit, SASL lines, the RFC 7628 failure flow). Bit 1 makes the
    # client trusted: its ID and XCLIENT claims of an address count.
    oauth = ("xoauth2", "oauthbearer")

    def policy(protocol: str, o: int) -> PreAuthPolicy:
        mechs = mechanisms[protocol]
        return PreAuthPolicy(
            mechanisms=mechs[: 1 + o % len(mechs)] + (oauth if o & 4 else ()),
            capabilities=("IDLE", "SIZE 1000"),
            starttls=bool(o & 8), tls_active=bool(o & 16), starttls_only=bool(o & 32),
            greeting="fuzz", max_errors=1 + (o >> 6), max_line=(64, 8192)[o & 1],
            max_token=(1024, 16384)[o >> 7], trusted=bool(o & 2),
        )  # fmt: skip

    def client_core(make: Callable[[PreAuthPolicy], Any], protocol: str) -> Callable[..., None]:
        outcomes = [
            ev.LoggedIn(success[protocol]),
            ev.Rejected("Authentication failed."),
            ev.Unavailable(),
            ev.Rejected("Authentication failed.", challenge=b'{"status":"invalid_token"}'),
        ]

        def run(o: int, payload: bytes, chunk: int) -> None:
            core = make(policy(protocol, o))
            answers = iter(outcomes[(o >> 1) % 4 :] + outcomes * 4)
            drive_client(core, payload, chunk, lambda: next(answers, ev.Unavailable()), ev)

        return run

    def backend(make: Callable[[int], Any]) -> Callable[..., None]:
        return lambda o, payload, chunk: drive_backend(make(o), payload, chunk, ev)

    def proxy(o: int, payload: bytes, chunk: int) -> None:
        parser, fed = ProxyHeaderParser(), 0
        try:
            for piece in chunks(payload, chunk) + [b""] * (o & 1):  # odd options: then EOF
                result = parser.receive(piece)
                fed += len(piece)
                if isinstance(result, HeaderParsed):
                    size = fed - len(result.trailing)
                    check(size == result.length, "length is not what was consumed")
                    check(result.trailing == payload[size:fed], "trailing bytes changed")
                    alone = ProxyHeaderParser().receive(payload[:size])
                    check(isinstance(alone, HeaderParsed), "the header alone does not parse")
                    check(alone.header == result.header, "the header read past itself")
                    return
                check(result is NEED_MORE and piece != b"", "EOF did not end the header")
        except ProxyProtocolError as e:
            check(isinstance(e.log_text, str) and bool(e.log_text), "empty log text")

    secret = Secret("Pw-7x!secret")
    token = Secret("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1In0." + "t" * 6000)
    return {
        "proxy": proxy,
        "imap": client_core(lambda p: ImapCore(p, SALT), "imap"),
        "pop3": client_core(lambda p: Pop3Core(p, SALT), "pop3"),
        "smtp": client_core(lambda p: SmtpCore(p, SALT), "smtp"),
        # Options 64 and up: a token route (XOAUTH2 / OAUTHBEARER passed on), its refusal flow.
        "backend-imap": backend(lambda o: ImapLogin(
            "user", token if o & 64 else secret, starttls=bool(o & 1),
            mechanism=(("login", "plain"), ("xoauth2", "oauthbearer"))[o >> 6 & 1][o >> 1 & 1],
            forward=client if o & 4 else None)),
        "backend-pop3": backend(lambda o: Pop3Login(
            "user", token if o & 64 else secret, starttls=bool(o & 1),
            mechanism=(("user", "plain"), ("xoauth2", "oauthbearer"))[o >> 6 & 1][o >> 1 & 1],
            forward=client if o & 4 else None)),
        "backend-smtp": backend(lambda o: SmtpLogin(
            helo_name="mx.fuzz", user="user", secret=token if o & 64 else secret,
            mode="auth" if o & 64 else ("xclient", "auth", "none")[o % 3], starttls=bool(o & 4),
            forward=client if o & 8 else None, client_helo="c.fuzz" if o & 16 else None,
            envelope=(b"MAIL FROM:<a@fuzz>", b"RCPT TO:<b@fuzz>") if o & 32 else (),
            token_mechanism=("xoauth2", "oauthbearer")[o >> 7] if o & 64 else None)),
    }  # fmt: skip


def drive_client(core: Any, payload: bytes, chunk: int, answer: Any, ev: Any) -> None:
    """As the session driver: perform StartTLS and Authenticate, stop at a Close or a login."""
    closed = False

    def perform(events: list[Any]) -> None:
        nonlocal closed
        for event in events:
            check(not closed, "an event after Close")
            check(isinstance(event, ev.Send | ev.StartTLS | ev.Authenticate | ev.Close), "type")
            if isinstance(event, ev.Send):
                check(event.data.endswith(b"\r\n"), "a reply without CRLF")
            elif isinstance(event, ev.Close):
                closed = True
            elif isinstance(event, ev.StartTLS):
                perform(core.tls_started())
            elif isinstance(event, ev.Authenticate):
                perform(core.finish_login(answer()))

    perform(core.greet())
    for piece in chunks(payload, chunk):
        if closed or core.state.value == "logged-in":
            return
        perform(core.receive(piece))
    if not closed and core.state.value != "logged-in":
        perform(core.receive(b""))


def drive_backend(core: Any, payload: bytes, chunk: int, ev: Any) -> None:
    """As backend/connect.py: feed server bytes, finish TLS, stop at the verdict."""
    kinds = ev.Send | ev.StartTLS | ev.BackendReady | ev.BackendFailed
    for piece in [*chunks(payload, chunk), b""]:
        events = core.receive(piece)
        while events:
            event = events.pop(0)
            check(isinstance(event, kinds), "type")
            if isinstance(event, ev.BackendReady | ev.BackendFailed):
                check(not events, "an event after the verdict")
                return
            if isinstance(event, ev.StartTLS):
                events += core.tls_started()


# --- seeds and dictionary ---------------------------------------------------------------------

# Client messages with a 3 KB token, base64 as on the wire (the fuzzers lengthen them further).
XOAUTH2_MESSAGE = base64.b64encode(b"user=u\x01auth=Bearer " + b"t" * 3000 + b"\x01\x01")
OAUTHBEARER_MESSAGE = base64.b64encode(b"n,a=u,\x01auth=Bearer " + b"t" * 3000 + b"\x01\x01")
TOKENS = [
    b"PROXY ", b"TCP4 ", b"TCP6 ", b"UNKNOWN", b"127.0.0.1 ", b"::1 ", b"65535", b"\r\n",
    b"\r\n\r\n\x00\r\nQUIT\n", b"\x21\x11\x00\x0c", b"\x20\x00\x00\x00", b"\x20\x00\x00\x07",
    b"a1 ", b"LOGIN ", b"AUTHENTICATE ", b"PLAIN", b"CRAM-MD5", b"STARTTLS", b"CAPABILITY",
    b"ID ", b"{3}", b"{5+}", b'"', b"USER ", b"PASS ", b"APOP ", b"AUTH ", b"STLS", b"CAPA",
    b"EHLO ", b"HELO ", b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>", b"QUIT", b"=", b"*",
    b"AGFsaWNlAHNlY3JldA==", b"* OK ", b"mg1 OK", b"mg3 NO [UNAVAILABLE]", b"+OK", b"-ERR",
    b"220 ", b"250-", b"250 ", b"334 ", b"235 ", b"535 ", b"+ ", b"* CAPABILITY ",
    b"XOAUTH2", b"OAUTHBEARER", b"AQ==", b"AUTH=XOAUTH2", b"SASL-IR", XOAUTH2_MESSAGE,
    OAUTHBEARER_MESSAGE, b"+ eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIn0=\r\n", b"A" * 4096,
]  # fmt: skip
SEEDS = {
    "proxy": [
        b"PROXY TCP4 192.0.2.1 198.51.100.2 40000 143\r\na1 CAPABILITY\r\n",
        b"PROXY TCP6 2001:db8::1 ::ffff:10.0.0.1 1 993\r\n",
        b"PROXY UNKNOWN\r\n",
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c\xc0\x00\x02\x01\x0a\x00\x00\x01\x9c\x40\x00\x8f",
        b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00",
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x00\x00\x19\x02\x00\x02ab\x20\x00\x0e\x07\x00\x00\x00\x00"
        b"\x22\x00\x02cn\x21\x00\x01x",
    ],
    "imap": [
        b"a1 CAPABILITY\r\na2 LOGIN user pass\r\n",
        b"a1 AUTHENTICATE XOAUTH2 " + XOAUTH2_MESSAGE + b"\r\n\r\n",
        b"a1 AUTHENTICATE OAUTHBEARER\r\n" + OAUTHBEARER_MESSAGE + b"\r\nAQ==\r\n",
        b"a1 AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n",
        b"a1 STARTTLS\r\na2 LOGIN {4}\r\nuser {4+}\r\npass\r\n",
        b'a ID ("name" "x")\r\na1 AUTHENTICATE CRAM-MD5\r\ndXNlciAwMTIz\r\n',
        b'a ID ("x-originating-ip" "192.0.2.7" "x-originating-port" "1")\r\na1 LOGIN u p\r\n',
    ],
    "pop3": [b"CAPA\r\nUSER u\r\nPASS p\r\n", b"STLS\r\nAUTH PLAIN\r\nAGFsaWNlAHNlY3JldA==\r\n",
             b"AUTH XOAUTH2 " + XOAUTH2_MESSAGE + b"\r\n*\r\n",
             b"APOP u 0123456789abcdef0123456789abcdef\r\nQUIT\r\n",
             b"XCLIENT ADDR=IPV6:2001:db8::1 PORT=1 NAME=x+2E\r\nUSER u\r\nPASS p\r\n"],
    "smtp": [b"EHLO c\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n", b"EHLO c\r\nSTARTTLS\r\n",
             b"EHLO c\r\nAUTH OAUTHBEARER " + OAUTHBEARER_MESSAGE + b"\r\nAQ==\r\n",
             b"HELO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n",
             b"EHLO c\r\nXCLIENT ADDR=192.0.2.7 PORT=[UNAVAILABLE]\r\nEHLO c\r\nAUTH LOGIN\r\n"],
    "backend-imap": [
        b"* OK ready\r\nmg1 OK go\r\nmg2 OK id\r\nmg3 OK [CAPABILITY IMAP4rev1] in\r\n",
        b"* OK [CAPABILITY IMAP4rev1 STARTTLS] x\r\n+ go\r\nmg3 NO [UNAVAILABLE] x\r\n",
        b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2 AUTH=OAUTHBEARER] x\r\n"
        b"+ eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIn0=\r\nmg3 NO [AUTHENTICATIONFAILED] x\r\n",
    ],
    "backend-pop3": [b"+OK ready\r\n+OK\r\n+OK\r\n+OK in\r\n", b"+OK\r\n+ \r\n-ERR [AUTH] no\r\n",
                     b"+OK\r\n+ \r\n+ eyJzdGF0dXMiOiI0MDEifQ==\r\n-ERR [AUTH] no\r\n"],
    "backend-smtp": [b"220 mx\r\n250-mx\r\n250-XCLIENT ADDR NAME HELO\r\n250 AUTH PLAIN\r\n"
                     b"220 go\r\n250 ok\r\n235 2.7.0 ok\r\n250 ok\r\n250 ok\r\n",
                     b"220 mx\r\n250 AUTH PLAIN XOAUTH2 OAUTHBEARER\r\n334 \r\n"
                     b"334 eyJzdGF0dXMiOiI0MDEifQ==\r\n535 5.7.8 no\r\n"],
}  # fmt: skip


def decode(data: bytes) -> tuple[int, bytes, int]:
    """An input as (options, payload, chunk size)."""
    if len(data) < 2:
        return 0, data, 0
    return data[0], data[2:], data[1] % 64


def seed_inputs(name: str) -> list[bytes]:
    return [bytes([o, c]) + s for s in SEEDS[name] for o in (0, 0x5B, 0xFF) for c in (0, 1, 7)]


# --- engines ----------------------------------------------------------------------------------


def run_random(name: str, seconds: float, artifacts: Path) -> int:
    """A mutation loop over the seeds; prints the count as atheris's child does."""
    target = load_targets()[name]
    rng = random.Random(name)
    corpus = seed_inputs(name)
    count, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(500):
            data = mutate(rng, rng.choice(corpus), corpus)
            try:
                target(*decode(data))
            except Exception:
                crash = artifacts / f"crash-{name}-{count}"
                crash.write_bytes(data)
                print(f"crash input written to {crash}", file=sys.stderr)
                raise
            count += 1
            if rng.random() < 0.001 and len(corpus) < 5000:
                corpus.append(data)
    print(f"Done {count} runs in {int(seconds)} second(s)", file=sys.stderr)
    return 0


def mutate(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randint(0, len(buf))
        choice = rng.randrange(6)
        if choice == 0 and buf:
            buf[at % len(buf)] = rng.randrange(256)
        elif choice == 1:
            buf[at:at] = rng.choice(TOKENS)
        elif choice == 2:
            del buf[at : at + rng.randint(1, 16)]
        elif choice == 3:
            buf[at:at] = rng.randbytes(rng.randint(1, 8))
        elif choice == 4:
            other = rng.choice(corpus)
            buf[at:] = other[rng.randint(0, len(other)) :]
        else:
            buf[: min(2, len(buf))] = rng.randbytes(2)  # new options and chunking
    return bytes(buf[:MAX_LEN])


def run_atheris(name: str, seconds: float, artifacts: Path) -> int:
    import atheris

    with atheris.instrument_imports(include=["mailgate"]):
        target = load_targets()[name]
    corpus = artifacts / f"corpus-{name}"
    corpus.mkdir(exist_ok=True)
    for i, seed in enumerate(seed_inputs(name)):
        (corpus / f"seed-{i}").write_bytes(seed)
    tokens = artifacts / "tokens.dict"
    tokens.write_text("".join('"' + "".join(f"\\x{b:02x}" for b in t) + '"\n' for t in TOKENS))
    argv = [sys.argv[0], str(corpus), f"-max_total_time={int(seconds)}", f"-dict={tokens}",
            f"-artifact_prefix={artifacts}/{name}-", f"-max_len={MAX_LEN}", "-timeout=10",
            "-rss_limit_mb=2048", "-print_final_stats=1"]  # fmt: skip
    atheris.Setup(argv, lambda data: target(*decode(data)))
    atheris.Fuzz()  # exits the process
    return 0


# --- the parent: one child process per target -------------------------------------------------

DONE = re.compile(rb"Done (\d+) runs in (\d+) second")


def run_child(name: str, args: argparse.Namespace, artifacts: Path) -> tuple[bool, int, float]:
    log = artifacts / f"{name}.log"
    argv = [sys.executable, __file__, "--child", name, "--seconds", str(args.seconds),
            "--engine", args.engine, "--artifacts", str(artifacts)]  # fmt: skip
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    )
    started = time.monotonic()
    with log.open("wb") as out:
        code = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    elapsed = time.monotonic() - started
    found = DONE.findall(log.read_bytes())
    runs = int(found[-1][0]) if found else 0
    if code != 0:
        tail = log.read_bytes().decode(errors="replace").splitlines()[-25:]
        print(f"{name}: FAILED (exit {code}); log {log}:\n  " + "\n  ".join(tail), flush=True)
    return code == 0, runs, elapsed


def main() -> int:
    targets = list(SEEDS)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", default=targets, help=", ".join(targets))
    parser.add_argument("--seconds", type=float, default=60.0, help="per target")
    parser.add_argument("--engine", choices=("atheris", "random"), default=default_engine())
    parser.add_argument("--artifacts", type=Path, help="default: a new temp dir")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    artifacts = args.artifacts or Path(tempfile.mkdtemp(prefix="mailgate-fuzz-"))
    if args.child:
        engine = run_atheris if args.engine == "atheris" else run_random
        return engine(args.child, args.seconds, artifacts)
    unknown = set(args.targets) - set(targets)
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    print(f"engine {args.engine}, {args.seconds:g} s per target, artifacts in {artifacts}")
    failed = []
    for name in args.targets:
        ok, runs, elapsed = run_child(name, args, artifacts)
        rate = runs / args.seconds if args.seconds else 0.0
        print(f"{name:13} {runs:>11,} inputs  {rate:>9,.0f} inputs/s  ({elapsed:.0f} s wall)"
              + ("" if ok else "  FAILED"), flush=True)  # fmt: skip
        if not ok:
            failed.append(name)
    print("failures: " + (", ".join(failed) if failed else "none"))
    return 1 if failed else 0


def default_engine() -> str:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return "random"
    return "atheris"


if __name__ == "__main__":
    sys.exit(main())
