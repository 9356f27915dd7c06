"""Log format under the journal and elsewhere, and reopening log_file after logrotate."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from mailgate import logsetup

TIMESTAMPED = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO mailgate\.test\[\d+\]: hello$"
)


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    logsetup._file_handler = None


def identity(stream: IO[str]) -> str:
    st = os.fstat(stream.fileno())
    return f"{st.st_dev}:{st.st_ino}"


def test_journal_stream_must_be_this_stream(tmp_path: Path) -> None:
    with (tmp_path / "a").open("w") as a, (tmp_path / "b").open("w") as b:
        assert logsetup.journal_stream(a, {"JOURNAL_STREAM": identity(a)})
        # Inherited from a parent whose stderr was the journal, ours is not: no match.
        assert not logsetup.journal_stream(a, {"JOURNAL_STREAM": identity(b)})
        assert not logsetup.journal_stream(a, {})
        assert not logsetup.journal_stream(a, {"JOURNAL_STREAM": "garbage"})


def test_under_the_journal_no_timestamp_and_syslog_priorities(tmp_path: Path) -> None:
    path = tmp_path / "journal-stream"
    with path.open("w") as stream:
        logsetup.configure("debug", stream=stream, environ={"JOURNAL_STREAM": identity(stream)})
        log = logging.getLogger("mailgate.test")
        log.debug("d")
        log.info("i")
        log.warning("w")
        log.error("e")
        log.critical("c")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
        stream.flush()
    pid = os.getpid()
    lines = path.read_text().splitlines()
    assert lines[:5] == [
        f"<7>DEBUG mailgate.test[{pid}]: d",
        f"<6>INFO mailgate.test[{pid}]: i",
        f"<4>WARNING mailgate.test[{pid}]: w",
        f"<3>ERROR mailgate.test[{pid}]: e",
        f"<2>CRITICAL mailgate.test[{pid}]: c",
    ]
    # A traceback is several lines: journald files each as its own entry, each at <3>.
    assert lines[5] == f"<3>ERROR mailgate.test[{pid}]: failed"
    assert lines[6] == "<3>Traceback (most recent call last):"
    assert lines[-1] == "<3>ValueError: boom"
    assert all(line.startswith("<3>") for line in lines[5:])


def test_elsewhere_the_timestamped_format(tmp_path: Path) -> None:
    path = tmp_path / "stderr"
    with path.open("w") as stream:
        logsetup.configure("info", stream=stream, environ={})
        logging.getLogger("mailgate.test").info("hello")
        logging.getLogger("mailgate.test").debug("not at info")
        stream.flush()
    assert TIMESTAMPED.match(path.read_text().rstrip("\n"))
    assert logsetup.reopen() is False  # nothing to reopen on stderr


def test_log_file_is_reopened_after_it_was_moved(tmp_path: Path) -> None:
    path = tmp_path / "mailgate.log"
    logsetup.configure("info", path, environ={"JOURNAL_STREAM": "1:1"})
    log = logging.getLogger("mailgate.test")
    log.info("hello")
    path.rename(tmp_path / "mailgate.log.1")  # logrotate
    log.info("still the old file")
    assert logsetup.reopen() is True
    log.info("the new file")
    old = (tmp_path / "mailgate.log.1").read_text().splitlines()
    assert TIMESTAMPED.match(old[0])
    assert old[1].endswith(": still the old file")
    assert path.read_text().splitlines()[0].endswith(": the new file")
    assert len(path.read_text().splitlines()) == 1


def test_a_failed_reopen_keeps_the_old_file(tmp_path: Path) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    path = directory / "mailgate.log"
    logsetup.configure("info", path)
    path.rename(tmp_path / "moved.log")
    directory.rmdir()
    with pytest.raises(OSError):
        logsetup.reopen()
    logging.getLogger("mailgate.test").info("after")
    assert (tmp_path / "moved.log").read_text().endswith(": after\n")


def test_configure_replaces_the_handlers(tmp_path: Path) -> None:
    logsetup.configure("info", tmp_path / "one.log")
    logsetup.configure("warning", tmp_path / "two.log")
    assert len(logging.getLogger().handlers) == 1
    logging.getLogger("mailgate.test").warning("w")
    assert (tmp_path / "one.log").read_text() == ""
    assert (tmp_path / "two.log").read_text().endswith(": w\n")


def test_an_unwritable_log_file_raises(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        logsetup.configure("info", tmp_path / "absent-dir" / "mailgate.log")
