"""nginx configuration syntax: words, quotes, escapes, comments, blocks, includes."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailgate.nginx_conf import (
    MAX_INCLUDE_DEPTH,
    Directive,
    NginxSyntaxError,
    load,
    parse_text,
)


def simple(text: str) -> list[tuple[str, tuple[str, ...]]]:
    return [(d.name, d.args) for d in parse_text(text, "t.conf")]


def test_directives_blocks_and_lines() -> None:
    body = parse_text("a 1;\nmail {\n  server {\n    listen 143;\n  }\n}\n", "t.conf")
    assert body == (
        Directive("a", ("1",), "t.conf", 1),
        Directive(
            "mail",
            (),
            "t.conf",
            2,
            (Directive("server", (), "t.conf", 3, (Directive("listen", ("143",), "t.conf", 4),)),),
        ),
    )
    assert body[1].where == "t.conf:2"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('h "some secret";', [("h", ("some secret",))]),
        ("h 'single \"inner\"';", [("h", ('single "inner"',))]),
        (r'h "a\"b\\c";', [("h", ('a"b\\c',))]),
        (r'h "tab\tnl\ncr\r";', [("h", ("tab\tnl\ncr\r",))]),
        (r'h "keep\x";', [("h", ("keep\\x",))]),
        (r"h a\ b;", [("h", ("a\\ b",))]),  # nginx keeps the backslash of "\ "
        ('h "two\nlines";', [("h", ("two\nlines",))]),
        ('h "";', [("h", ("",))]),
        ("h $remote_addr ${host}x;", [("h", ("$remote_addr", "${host}x"))]),
        ("h a#b; # comment ; {\nnext 1;", [("h", ("a#b",)), ("next", ("1",))]),
        ("# only a comment\n", []),
        ("h\ta\r\nb;", [("h", ("a", "b"))]),
        ('h "q"{ }', [("h", ("q",))]),
    ],
    ids=[
        "double quotes",
        "single quotes keep double",
        "escaped quote and backslash",
        "control escapes",
        "unknown escape kept",
        "escaped space in a bare word",
        "quoted line end",
        "empty string",
        "variables stay text",
        "hash inside a word, comment after",
        "comment only",
        "tabs and CRLF",
        "quote then block",
    ],
)
def test_words(text: str, expected: list[tuple[str, tuple[str, ...]]]) -> None:
    assert simple(text) == expected


def test_a_closing_brace_inside_a_word_is_part_of_it() -> None:
    # As nginx: '}' closes a block only where a word would start.
    with pytest.raises(NginxSyntaxError, match=r"t\.conf:1: unexpected end of file"):
        parse_text("mail { a b}", "t.conf")
    assert simple("mail { a b; }")[0][0] == "mail"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('h "open;\n\n', r"t.conf:1: unterminated \" string"),
        ("h a;\n}\n", r"t.conf:2: unexpected '\}'"),
        ("mail {\n a 1;\n", r"t.conf:1: mail \{ is never closed"),
        ("a 1;\nb 2", r"t.conf:2: unexpected end of file, expecting ';'"),
        ("a 1;\n;", r"t.conf:2: unexpected ';'"),
        ("mail { a 1 }", r"t.conf:1: unexpected '\}', expecting ';'"),
        ('h "a"b;', r"t.conf:1: unexpected 'b' after a quote"),
    ],
    ids=[
        "unterminated quote",
        "stray brace",
        "unclosed block",
        "missing semicolon at end",
        "empty directive",
        "brace before semicolon",
        "text after quote",
    ],
)
def test_syntax_errors_name_file_and_line(text: str, message: str) -> None:
    with pytest.raises(NginxSyntaxError, match=message):
        parse_text(text, "t.conf")


# --- includes ---------------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_includes_glob_sorted_relative_to_the_main_file(tmp_path: Path) -> None:
    main = write(tmp_path / "nginx.conf", "a 1;\nmail { include conf.d/*.conf; }\nz 9;\n")
    write(tmp_path / "conf.d/20-b.conf", "b 2;\n")
    write(tmp_path / "conf.d/10-a.conf", "server { include snippets/x.conf; }\n")
    # Relative to nginx.conf's directory, not to the including file's (nginx's prefix).
    write(tmp_path / "snippets/x.conf", "x 3;\n")
    body = load(main)
    mail = body[1]
    assert mail.block is not None
    assert [d.name for d in mail.block] == ["server", "b"]
    server = mail.block[0]
    assert server.block == (Directive("x", ("3",), str(tmp_path / "snippets/x.conf"), 1),)
    assert mail.block[1].where == f"{tmp_path / 'conf.d/20-b.conf'}:1"
    assert body[2].name == "z"


def test_a_pattern_matching_nothing_is_fine_a_missing_file_is_not(tmp_path: Path) -> None:
    write(tmp_path / "ok.conf", "include none-*.conf;\na 1;\n")
    assert [d.name for d in load(tmp_path / "ok.conf")] == ["a"]
    write(tmp_path / "bad.conf", "a 1;\ninclude absent.conf;\n")
    with pytest.raises(NginxSyntaxError, match=r"absent.conf: cannot read: No such file"):
        load(tmp_path / "bad.conf")


def test_an_include_cycle_is_refused(tmp_path: Path) -> None:
    write(tmp_path / "nginx.conf", "include a.conf;\n")
    write(tmp_path / "a.conf", "include b.conf;\n")
    write(tmp_path / "b.conf", "include a.conf;\n")
    with pytest.raises(NginxSyntaxError, match=r"b.conf:1: .*a.conf includes itself"):
        load(tmp_path / "nginx.conf")


def test_include_depth_is_bounded(tmp_path: Path) -> None:
    for i in range(MAX_INCLUDE_DEPTH + 2):
        write(tmp_path / f"f{i}.conf", f"include f{i + 1}.conf;\n")
    write(tmp_path / f"f{MAX_INCLUDE_DEPTH + 2}.conf", "end 1;\n")
    with pytest.raises(NginxSyntaxError, match=f"nested deeper than {MAX_INCLUDE_DEPTH}"):
        load(tmp_path / "f0.conf")
    # One level less deep than the bound loads.
    assert load(tmp_path / "f3.conf")[0].name == "end"


def test_skipped_blocks_keep_their_includes_unread(tmp_path: Path) -> None:
    main = write(tmp_path / "nginx.conf", "http { include mime.types; }\nmail { a 1; }\n")
    with pytest.raises(NginxSyntaxError, match=r"mime\.types"):
        load(main)
    body = load(main, skip=("http",))
    assert body[0].block == (Directive("include", ("mime.types",), str(main), 1),)


def test_include_needs_one_argument(tmp_path: Path) -> None:
    write(tmp_path / "nginx.conf", "include a b;\n")
    with pytest.raises(NginxSyntaxError, match=r"nginx\.conf:1: include takes one"):
        load(tmp_path / "nginx.conf")
