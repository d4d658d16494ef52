"""Locks keyed by a value (an asset id, a component), created on demand and dropped when unused."""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class _Guard:
    lock: threading.Lock = field(default_factory=threading.Lock)
    users: int = 0


class KeyedLocks:
    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._guards: dict[Hashable, _Guard] = {}

    @contextmanager
    def hold(self, key: Hashable) -> Iterator[None]:
        with self._mutex:
            guard = self._guards.setdefault(key, _Guard())
            guard.users += 1
        try:
            with guard.lock:
                yield
        finally:
            with self._mutex:
                guard.users -= 1
                if guard.users == 0:
                    del self._guards[key]
