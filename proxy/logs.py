"""Logging: one JSON line per record on stderr, written off the event loop."""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
import sys

ENV_LOG_LEVEL = "TOLLGATE_LOG_LEVEL"


class JsonLines(logging.Formatter):
    """Request lines are JSON already; other records become JSON too."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.name == "tollgate.requests":
            return message
        line = {"level": record.levelname.lower(), "logger": record.name, "message": message}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines())
    # The event loop only queues records; a thread writes them, so a slow or full stderr
    # pipe never stalls requests. Stopped (and drained) at exit.
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, handler)
    listener.start()
    atexit.register(listener.stop)
    root = logging.getLogger()
    root.handlers = [logging.handlers.QueueHandler(records)]
    root.setLevel(level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)
