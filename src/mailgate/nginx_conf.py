"""nginx configuration syntax: a tokenizer, a block parser and `include` resolution.

Only the syntax, read as nginx's own `ngx_conf_read_token` reads it, so that what nginx
accepts we accept and a mistake is reported at the same line:

- words are separated by spaces, tabs and line ends; `;` ends a directive, `{` opens its
  block, `}` closes a block (only where a new word would start: `a}` is one word);
- `#` starts a comment only where a word would start (`a#b` is one word);
- a word may be quoted with `"` or `'` (line ends allowed inside), and after the closing
  quote comes a space, `;` or `{`; a backslash escapes the next character, and in the word
  `\\"`, `\\'` and `\\\\` stand for the character, `\\n`, `\\r`, `\\t` for the control
  character, any other `\\x` stays as it is;
- `$variables` and `${variables}` are left as text (`${` does not open a block).

`parse_text` is pure. `load` reads a file and expands `include` directives (glob patterns,
relative paths resolved against the main file's directory, as nginx resolves them against
its configuration prefix), at most MAX_INCLUDE_DEPTH files deep.
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

# nginx itself has no limit (a file that includes itself exhausts its stack); real configs
# nest three deep at most (nginx.conf -> conf.d/*.conf -> snippets/*.conf).
MAX_INCLUDE_DEPTH = 10
# The largest file we read; nginx configs are kilobytes, and this is not a place to stream.
MAX_FILE_SIZE = 4 * 1024 * 1024

_SPACE = " \t\r\n"
_ESCAPES = {'"': '"', "'": "'", "\\": "\\", "n": "\n", "r": "\r", "t": "\t"}


class NginxSyntaxError(Exception):
    """The file is not valid nginx syntax, or cannot be read. The message names file:line."""


@dataclass(frozen=True, slots=True)
class Directive:
    name: str
    args: tuple[str, ...]
    file: str
    line: int
    block: tuple[Directive, ...] | None = None  # None: a simple directive ending in ";"

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "word" | ";" | "{" | "}"
    text: str
    line: int


def tokens(text: str, file: str) -> Iterator[_Token]:
    """The words and punctuation of `text`, with the line each starts on."""
    i, line, n = 0, 1, len(text)
    while i < n:
        ch = text[i]
        if ch in _SPACE:
            line += ch == "\n"
            i += 1
        elif ch == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif ch in ";{}":
            yield _Token(ch, ch, line)
            i += 1
        elif ch in "\"'":
            start_line = line
            word, i, line = _quoted(text, i, line, file)
            yield _Token("word", word, start_line)
            if i < n and text[i] not in _SPACE + ";{)":
                raise NginxSyntaxError(f"{file}:{line}: unexpected {text[i]!r} after a quote")
        else:
            start_line = line
            word, i, line = _bare(text, i, line)
            yield _Token("word", word, start_line)


def _quoted(text: str, i: int, line: int, file: str) -> tuple[str, int, int]:
    quote, start_line = text[i], line
    i += 1
    out: list[str] = []
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            out.append(_escape(text[i + 1]))
            line += text[i + 1] == "\n"
            i += 2
            continue
        if ch == quote:
            return "".join(out), i + 1, line
        line += ch == "\n"
        out.append(ch)
        i += 1
    raise NginxSyntaxError(f"{file}:{start_line}: unterminated {quote} string")


def _bare(text: str, i: int, line: int) -> tuple[str, int, int]:
    out: list[str] = []
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            out.append(_escape(text[i + 1]))
            line += text[i + 1] == "\n"
            i += 2
            continue
        if ch == "$" and text.startswith("${", i):
            out.append("${")  # a variable's braces, not a block
            i += 2
            continue
        if ch in _SPACE or ch in ";{":
            break
        out.append(ch)
        i += 1
    return "".join(out), i, line


def _escape(ch: str) -> str:
    return _ESCAPES.get(ch, "\\" + ch)


def parse_text(text: str, file: str) -> tuple[Directive, ...]:
    """Directives and blocks of one file's text, `include` left as a directive."""
    stream = tokens(text, file)
    body, closed_by = _block(stream, file)
    if closed_by is not None:
        raise NginxSyntaxError(f"{file}:{closed_by}: unexpected '}}'")
    return body


def _block(stream: Iterator[_Token], file: str) -> tuple[tuple[Directive, ...], int | None]:
    """Directives up to a `}` (returns its line) or the end of the text (returns None)."""
    body: list[Directive] = []
    words: list[_Token] = []
    for tok in stream:
        if tok.kind == "word":
            words.append(tok)
            continue
        if tok.kind == "}":
            if words:
                raise NginxSyntaxError(f"{file}:{tok.line}: unexpected '}}', expecting ';'")
            return tuple(body), tok.line
        if not words:
            raise NginxSyntaxError(f"{file}:{tok.line}: unexpected {tok.text!r}")
        name, args, line = words[0].text, tuple(w.text for w in words[1:]), words[0].line
        words = []
        if tok.kind == ";":
            body.append(Directive(name, args, file, line))
            continue
        inner, closed_by = _block(stream, file)
        if closed_by is None:
            raise NginxSyntaxError(f"{file}:{line}: {name} {{ is never closed")
        body.append(Directive(name, args, file, line, inner))
    if words:
        raise NginxSyntaxError(f"{file}:{words[0].line}: unexpected end of file, expecting ';'")
    return tuple(body), None


# --- includes ---------------------------------------------------------------------------------

Reader = Callable[[Path], str]


def read_file(path: Path) -> str:
    with path.open("rb") as f:
        data = f.read(MAX_FILE_SIZE + 1)
    if len(data) > MAX_FILE_SIZE:
        raise NginxSyntaxError(f"{path}: larger than {MAX_FILE_SIZE} bytes")
    return data.decode("utf-8", errors="replace")


@dataclass(frozen=True, slots=True)
class _Loader:
    prefix: Path  # relative include paths start here (nginx's configuration prefix)
    read: Reader
    skip: frozenset[str]  # blocks whose includes are left alone

    def file(self, path: Path, stack: tuple[Path, ...]) -> tuple[Directive, ...]:
        try:
            text = self.read(path)
        except OSError as e:
            raise NginxSyntaxError(f"{path}: cannot read: {e.strerror or e}") from None
        return self.expand(parse_text(text, str(path)), (*stack, path.resolve()))

    def expand(self, body: tuple[Directive, ...], stack: tuple[Path, ...]) -> tuple[Directive, ...]:
        out: list[Directive] = []
        for d in body:
            if d.name == "include" and d.block is None:
                out.extend(self.include(d, stack))
            elif d.block is not None and d.name not in self.skip:
                out.append(Directive(d.name, d.args, d.file, d.line, self.expand(d.block, stack)))
            else:
                out.append(d)
        return tuple(out)

    def include(self, d: Directive, stack: tuple[Path, ...]) -> Iterator[Directive]:
        if len(d.args) != 1:
            raise NginxSyntaxError(f"{d.where}: include takes one file name or pattern")
        pattern = d.args[0]
        full = pattern if Path(pattern).is_absolute() else str(self.prefix / pattern)
        # A pattern may match nothing; a plain name must exist. glob(3) in nginx sorts too.
        matches = sorted(glob.glob(full)) if glob.has_magic(full) else [full]
        if len(stack) >= MAX_INCLUDE_DEPTH:
            raise NginxSyntaxError(f"{d.where}: includes nested deeper than {MAX_INCLUDE_DEPTH}")
        for match in matches:
            path = Path(match)
            if path.resolve() in stack:
                raise NginxSyntaxError(f"{d.where}: {path} includes itself")
            yield from self.file(path, stack)


def load(
    path: str | Path, read: Reader = read_file, skip: Iterable[str] = ()
) -> tuple[Directive, ...]:
    """The directives of `path` with every `include` replaced by what it includes, except
    inside blocks named in `skip` (an importer that reads only `mail {}` need not open the
    files of `http {}`)."""
    path = Path(path)
    return _Loader(path.parent, read, frozenset(skip)).file(path, ())
