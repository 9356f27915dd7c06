"""The IMAP token grammar on its own: bytes in, values or WireError out."""

from __future__ import annotations

import pytest

from mailgate.protocols import imapwire as wire
from mailgate.protocols.imapwire import LiteralHeader, Reader, WireError


def read(data: bytes, rule: str) -> object:
    """Apply one grammar rule to all of `data`; the rule must consume it exactly."""
    reader = Reader(data)
    value = getattr(reader, rule)()
    reader.end()
    return value


@pytest.mark.parametrize(
    ("line", "header"),
    [
        (b"a LOGIN {5}", LiteralHeader(5, sync=True)),
        (b"a LOGIN {5+}", LiteralHeader(5, sync=False)),
        (b"a LOGIN {0}", LiteralHeader(0, sync=True)),
        (b"a LOGIN x {007}", LiteralHeader(7, sync=True)),
        (b"{" + b"9" * 40 + b"}", LiteralHeader(wire.TOO_LARGE, sync=True)),
        (b"{" + b"9" * 5000 + b"+}", LiteralHeader(wire.TOO_LARGE, sync=False)),  # no int() limit
    ],
)
def test_literal_header_read_from_the_end_of_a_line(line: bytes, header: LiteralHeader) -> None:
    assert wire.literal_header(line) == header


@pytest.mark.parametrize(
    "line",
    [
        *(b"a NOOP", b"a LOGIN {}", b"a LOGIN {+}", b"a LOGIN {5", b"a LOGIN {5}x", b"{-5}"),
        *(b"{5++}", b"{ 5}", b"}"),
        b"{\xd9\xa3}",  # ARABIC-INDIC DIGIT THREE: a digit to str.isdigit, not to bytes
    ],
)
def test_not_a_literal_header(line: bytes) -> None:
    assert wire.literal_header(line) is None


@pytest.mark.parametrize(
    ("data", "value"),
    [
        (b"alice", b"alice"),
        (b"a]b", b"a]b"),  # resp-specials are ASTRING-CHARs
        (b'"two words"', b"two words"),
        (b'""', b""),
        (rb'"a\"b\\c"', b'a"b\\c'),
        (b'"caf\xc3\xa9"', b"caf\xc3\xa9"),
        (b"{5}\r\na\r\nbc", b"a\r\nbc"),  # a literal may hold CRLF
        (b"{3+}\r\nx y", b"x y"),
        (b"{0}\r\n", b""),
    ],
)
def test_astring(data: bytes, value: bytes) -> None:
    assert read(data, "astring") == value


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"a(b",
        b'"open',
        b'"a\\x"',  # only quoted-specials may be escaped
        b'"a\rb"',
        b'"a\x00b"',
        b"{5}\r\nabc",  # fewer bytes than announced
        b"{2}\r\na\x00",  # CHAR8 excludes NUL
        b"{2}a",
        b"a%",
        b"a*",
        b"a{",
    ],
)
def test_astring_rejects(data: bytes) -> None:
    with pytest.raises(WireError):
        read(data, "astring")


@pytest.mark.parametrize("tag", [b"a1", b"A.001", b"x]y", b"~!#$&'-/:;<=>?@^_`|"])
def test_valid_tags(tag: bytes) -> None:
    reader = Reader(tag + b" NOOP")
    assert reader.tag() == tag
    assert reader.pos == len(tag)


@pytest.mark.parametrize("line", [b"a+b NOOP", b'"a" NOOP', b"a* NOOP", b"a% NOOP", b"(a NOOP"])
def test_invalid_tags(line: bytes) -> None:
    with pytest.raises(WireError) as caught:
        Reader(line).tag()
    assert caught.value.text == b"Invalid tag"


def test_id_params_list() -> None:
    assert read(b"NIL", "id_params_list") is None
    assert read(b"nil", "id_params_list") is None
    assert read(b"()", "id_params_list") == ()
    parsed = read(b'("name" "imaplib" "version" NIL "os" {5}\r\nLinux)', "id_params_list")
    assert parsed == ((b"name", b"imaplib"), (b"version", None), (b"os", b"Linux"))


@pytest.mark.parametrize(
    "data",
    [
        *(b"(", b'("name")', b'("name" "x" )', b'( "a" "b")', b"(name x)", b"NILS", b'("a" NILX)'),
        b"(" + b" ".join([b'"k" "v"'] * (wire.MAX_ID_PARAMS + 1)) + b")",
    ],
)
def test_id_params_list_rejects(data: bytes) -> None:
    with pytest.raises(WireError):
        read(data, "id_params_list")


def test_auth_type_is_case_insensitive() -> None:
    assert read(b"cram-md5", "auth_type") == "CRAM-MD5"


@pytest.mark.parametrize(
    ("data", "value"), [(b"=", b""), (b"AGEAYg==", b"\0a\0b"), (b"YWxpY2U=", b"alice")]
)
def test_initial_response(data: bytes, value: bytes) -> None:
    assert read(data, "initial_response") == value


@pytest.mark.parametrize("data", [b"", b"YWxpY2U", b"****", b"YW=xp"])
def test_initial_response_rejects(data: bytes) -> None:
    with pytest.raises(WireError):
        read(data, "initial_response")


def test_sasl_response_line() -> None:
    assert wire.sasl_response(b"*") == wire.SaslCancel()
    assert wire.sasl_response(b"") == b""
    assert wire.sasl_response(b"YWxpY2U=") == b"alice"
    with pytest.raises(WireError) as caught:
        wire.sasl_response(b"not base64!")
    assert caught.value.text == b"Invalid base64 data"


def test_continue_req() -> None:
    assert wire.continue_req(b"") == b"+ \r\n"
    assert wire.continue_req(b"Username:") == b"+ VXNlcm5hbWU6\r\n"


def test_command_assembler_rebuilds_the_wire_form() -> None:
    command = wire.CommandAssembler(max_literal=8, max_size=40)
    command.start(b"a LOGIN {5}")
    command.announce(LiteralHeader(5, sync=True))
    assert command.literal == 5
    command.add_literal(b"al\r\nx")
    assert command.literal is None
    header = command.add_line(b" {3+}")
    assert header == LiteralHeader(3, sync=False)
    command.announce(header)
    command.add_literal(b"pw!")
    assert command.add_line(b"") is None
    data = command.take()
    assert data == b"a LOGIN {5}\r\nal\r\nx {3+}\r\npw!"
    reader = Reader(data, len(b"a LOGIN "))
    assert reader.astring() == b"al\r\nx"
    reader.sp()
    assert reader.astring() == b"pw!"
    reader.end()


def test_command_assembler_limits() -> None:
    command = wire.CommandAssembler(max_literal=8, max_size=20)
    command.start(b"a ID ({8}")
    with pytest.raises(wire.LiteralTooLarge):
        command.announce(LiteralHeader(9, sync=True))  # past the literal limit
    command.announce(LiteralHeader(8, sync=True))
    command.add_literal(b"k" * 8)
    with pytest.raises(wire.LiteralTooLarge):
        command.announce(LiteralHeader(8, sync=False))  # fits alone, not in the command
    with pytest.raises(wire.CommandTooLong):
        command.add_line(b" x" * 5)


def test_is_atom() -> None:
    assert wire.is_atom(b"IDLE")
    assert wire.is_atom(b"AUTH=PLAIN")
    assert not wire.is_atom(b"X Y")
    assert not wire.is_atom(b"X]")
    assert not wire.is_atom(b"")


def test_errors_carry_no_client_bytes() -> None:
    """Every message is fixed text: feeding a marker never puts the marker in an error."""
    marker = b"SECRETMARK"
    for data, rule in [
        (b'"' + marker, "astring"),
        (marker + b"(", "astring"),
        (b"{99}\r\n" + marker, "literal"),
        (b"(" + marker + b")", "id_params_list"),
        (marker + b"!", "initial_response"),
    ]:
        with pytest.raises(WireError) as caught:
            read(data, rule)
        assert marker not in caught.value.text
        assert marker.decode() not in str(caught.value)
