"""Logging: one JSON line per record on stderr, written off the event loop."""

from __future__ import annotations

import atexit
import json
import logging
import sys
import threading
from collections import deque
from typing import TextIO

WRITE_EVERY_S = 0.05
"""How long an info line may wait for the writer thread (warnings and errors do not wait)."""


class JsonLines(logging.Formatter):
    """Request lines are JSON already; other records become JSON too."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if is_request_line(record, message):
            return message
        line = {"level": record.levelname.lower(), "logger": record.name, "message": message}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def is_request_line(record: logging.LogRecord, message: str) -> bool:
    """Whether `record` is a request's line, written as JSON by the web layer. Its logger
    also says what went wrong around a request (a ledger error, a refused key, a batch
    followed) in words, which become JSON as every other record does: a log reader takes
    each line as one JSON object."""
    return (
        record.name == "tollgate.requests"
        and record.levelno == logging.INFO
        and not record.args
        and message.startswith("{")
    )


class BatchWriter(logging.Handler):
    """Formats each record where it is logged; a thread writes the lines in batches.

    The event loop never blocks on a slow or full stderr pipe. Nor does it wake a thread
    per record, as a queue would (a cross-thread hand-off for every line): lines wait in a
    deque that the writer drains every `every_s` with one `write`. A warning or an error
    wakes the writer at once. `flush()` writes what waits; `close()` (at exit, and from
    `logging.shutdown`) stops the writer and writes the rest.
    """

    def __init__(self, stream: TextIO, every_s: float = WRITE_EVERY_S) -> None:
        super().__init__()
        self.stream = stream
        self.every_s = every_s
        self._lines: deque[str] = deque()
        self._wake = threading.Event()
        self._writing = threading.Lock()  # one batch at a time, so lines keep their order
        self._closed = False
        self._direct = False  # each line written as it is logged (`write_through`)
        self._writer = threading.Thread(target=self._run, name="tollgate-log-writer", daemon=True)
        self._writer.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._lines.append(self.format(record) + "\n")
        except Exception:
            self.handleError(record)
            return
        if self._closed or self._direct:  # logged during shutdown: no later write may come
            self.flush()
        elif record.levelno >= logging.WARNING and not self._wake.is_set():
            self._wake.set()

    def flush(self) -> None:
        """Write every waiting line now, in one `write`."""
        with self._writing:
            # Only this (locked) drain pops, so the first `count` lines are ours to take.
            count = len(self._lines)
            if not count:
                return
            batch = "".join([self._lines.popleft() for _ in range(count)])
            try:
                self.stream.write(batch)
                self.stream.flush()
            except (OSError, ValueError):
                pass  # stderr is closed or broken: there is nowhere left to say so

    def write_through(self) -> None:
        """Write what waits, and from now on each line as it is logged."""
        self._direct = True
        self.flush()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self.flush()
        super().close()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self.every_s)
            self._wake.clear()
            self.flush()


def flush_logs() -> None:
    """Write every line still waiting, now. A server stopped by SIGTERM ends by raising the
    signal again once it has shut down (uvicorn does, for the exit status), which ends the
    process without `atexit`: the lines of its last 50 ms, the requests it settled while
    stopping among them, went with it. From then on each line is written as it is logged:
    uvicorn's own last lines (`Application shutdown complete.`, `Finished server
    process`) come after the lifespan, just before that signal."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, BatchWriter):
            handler.write_through()
        else:
            handler.flush()


def configure_logging(level: str) -> None:
    """Send every record, as a JSON line, to stderr through one `BatchWriter`."""
    root = logging.getLogger()
    for previous in root.handlers:
        if isinstance(previous, BatchWriter):
            previous.close()
    handler = BatchWriter(sys.stderr)
    handler.setFormatter(JsonLines())
    atexit.register(handler.close)
    root.handlers = [handler]
    root.setLevel(level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # JsonLines prints no thread, process or call site, and looking them up costs more than
    # the rest of a record; the logging HOWTO ("Optimization") names these switches.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None
