"""Lines of the event log that do not come from the upload pool: startup notes, log warnings."""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from methodic import Event


@dataclass(frozen=True)
class Notice(Event):
    level: str  # ok, info, warn, error
    message: str


class NoticeHandler(logging.Handler):
    """Collects log records (the engine's and the embedded server's) as notices.

    Installed on the root logger while a session runs, so nothing prints over the dashboard;
    the server logs from its own thread, hence the thread-safe deque.
    """

    def __init__(self, sink: deque[Event]) -> None:
        super().__init__(logging.WARNING)
        self._sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = "error" if record.levelno >= logging.ERROR else "warn"
            self._sink.append(Notice(None, level, f"{record.name}: {record.getMessage()}"))
        except Exception:  # logging must never raise into the caller
            self.handleError(record)


def capture_logging(sink: deque[Event]) -> tuple[logging.Handler, list[logging.Handler]]:
    """Route every WARNING+ log record to ``sink`` instead of the terminal; see ``restore_logging``."""
    root = logging.getLogger()
    saved = list(root.handlers)
    for h in saved:
        root.removeHandler(h)
    handler = NoticeHandler(sink)
    root.addHandler(handler)
    if root.level > logging.WARNING or root.level == logging.NOTSET:
        root.setLevel(logging.WARNING)
    return handler, saved


def restore_logging(handler: logging.Handler, saved: list[logging.Handler]) -> None:
    root = logging.getLogger()
    root.removeHandler(handler)
    for h in saved:
        root.addHandler(h)
