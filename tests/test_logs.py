"""Logging: JSON lines, written in batches by a thread, none lost, errors without delay."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.logs import BatchWriter, JsonLines


def record(
    message: str, name: str = "tollgate", level: int = logging.INFO, exc: bool = False
) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            exc_info = sys.exc_info()
    return logging.LogRecord(name, level, __file__, 1, message, None, exc_info)


@pytest.fixture
def stream() -> io.StringIO:
    return io.StringIO()


@pytest.fixture
def writer(stream: io.StringIO) -> Iterator[BatchWriter]:
    # A long timer: a line that shows up early was not written by it.
    handler = BatchWriter(stream, every_s=60)
    handler.setFormatter(JsonLines())
    yield handler
    handler.close()


def wait_for(stream: io.StringIO, lines: int, within_s: float = 30.0) -> list[str]:
    deadline = time.monotonic() + within_s
    while len(stream.getvalue().splitlines()) < lines and time.monotonic() < deadline:
        time.sleep(0.005)
    return stream.getvalue().splitlines()


def test_a_request_line_is_written_as_it_was_logged() -> None:
    line = json.dumps({"request_id": "tg_req_1", "team": "design"})
    assert JsonLines().format(record(line, name="tollgate.requests")) == line


@pytest.mark.parametrize(
    ("message", "level"),
    [
        ("refused 3 request(s) on generations for their key", logging.WARNING),
        ("ledger settle failed for tg_req_1: disk I/O error", logging.ERROR),
        ("the stream kept for tg_req_1 was forgotten first", logging.INFO),
    ],
)
def test_words_on_the_request_logger_become_json_too(message: str, level: int) -> None:
    line = json.loads(JsonLines().format(record(message, name="tollgate.requests", level=level)))
    assert (line["logger"], line["message"]) == ("tollgate.requests", message)


def test_other_records_become_json_with_level_logger_and_exception() -> None:
    line = json.loads(JsonLines().format(record("ledger down", level=logging.ERROR, exc=True)))
    assert (line["level"], line["logger"], line["message"]) == ("error", "tollgate", "ledger down")
    assert "RuntimeError: boom" in line["exception"]


def test_info_lines_wait_for_a_flush_and_then_come_complete_and_in_order(
    writer: BatchWriter, stream: io.StringIO
) -> None:
    for i in range(500):
        writer.handle(record(json.dumps({"i": i}), name="tollgate.requests"))
    assert stream.getvalue() == ""  # nothing woke the writer
    writer.flush()
    assert [json.loads(line)["i"] for line in stream.getvalue().splitlines()] == list(range(500))


def test_the_timer_writes_info_lines_without_a_flush(stream: io.StringIO) -> None:
    handler = BatchWriter(stream, every_s=0.01)
    handler.setFormatter(JsonLines())
    try:
        handler.handle(record("hello"))
        assert [json.loads(line)["message"] for line in wait_for(stream, 1)] == ["hello"]
    finally:
        handler.close()


def test_an_error_is_written_at_once_without_more_records(
    writer: BatchWriter, stream: io.StringIO
) -> None:
    writer.handle(record("before"))
    writer.handle(record("ledger settle failed", level=logging.ERROR))
    lines = [json.loads(line)["message"] for line in wait_for(stream, 2)]
    assert lines == ["before", "ledger settle failed"]


def test_close_writes_what_waits_and_later_records_directly(
    writer: BatchWriter, stream: io.StringIO
) -> None:
    writer.handle(record("waiting"))
    writer.close()
    writer.handle(record("logged at exit"))
    messages = [json.loads(line)["message"] for line in stream.getvalue().splitlines()]
    assert messages == ["waiting", "logged at exit"]


def test_a_closed_stream_loses_the_lines_but_not_the_process(
    writer: BatchWriter, stream: io.StringIO
) -> None:
    stream.close()
    writer.handle(record("nowhere to go"))
    writer.flush()  # no exception


PROGRAM = """
import json, logging, sys
from proxy.logs import configure_logging
configure_logging("info")
configure_logging("info")  # as the CLI and a worker may both do: one writer stays
requests = logging.getLogger("tollgate.requests")
for i in range(int(sys.argv[1])):
    requests.info(json.dumps({"i": i, "pad": "x" * 200}))
logging.getLogger("httpx").info("not shown")
logging.getLogger("tollgate").warning("last")
"""


def test_a_process_that_exits_has_written_every_line_in_order() -> None:
    count = 20_000
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM, str(count)],
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert [line["i"] for line in lines[:-1]] == list(range(count))
    assert lines[-1] == {"level": "warning", "logger": "tollgate", "message": "last"}
