"""Fault injection, for tests and the demo only: the next blob PUTs answer an error instead of storing.

Off unless a caller adds rules (``EmbeddedServer.faults.add(status=503)``); `methodic serve`
never enables it.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Fault:
    status: int
    retry_after: float | None = None


class FaultPlan:
    def __init__(self) -> None:
        self._queue: deque[Fault] = deque()
        self._lock = threading.Lock()
        self.fired = 0

    def add(self, status: int, count: int = 1, retry_after: float | None = None) -> None:
        """Answer the next ``count`` blob PUTs with ``status`` (and ``Retry-After`` if given)."""
        with self._lock:
            self._queue.extend(Fault(status, retry_after) for _ in range(count))

    def clear(self) -> None:
        with self._lock:
            self._queue.clear()

    def take(self) -> Fault | None:
        with self._lock:
            if not self._queue:
                return None
            self.fired += 1
            return self._queue.popleft()
