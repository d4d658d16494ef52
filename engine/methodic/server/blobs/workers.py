"""The blob listener's worker threads: blocking work (hash + write, ledger calls) off its loop.

A hand-off is one ``SimpleQueue.put`` (in C), and an awaited call comes back with one
``call_soon_threadsafe``. ``ThreadPoolExecutor.submit`` with ``run_in_executor`` cost several
times that per call (a concurrent Future with its Condition, ``_adjust_thread_count``'s
semaphore, two futures chained): it was 37% of the server's GIL time under small PUTs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger("methodic.server.blobs")

T = TypeVar("T")


def settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    """Resolve ``future`` (on its loop) unless it is done already (cancelled)."""
    if future.done():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


class Workers:
    """``count`` threads taking calls in order from one queue; started with the first call."""

    def __init__(self, count: int, name: str) -> None:
        self._count = count
        self._name = name
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on a worker; what it raises is logged (it should raise nothing)."""
        if not self._threads:
            self._start()
        self._queue.put(fn)

    def run(
        self, loop: asyncio.AbstractEventLoop, fn: Callable[..., T], *args: Any
    ) -> asyncio.Future[T]:
        """``fn(*args)`` on a worker; the future (of ``loop``) has its result or exception."""
        future: asyncio.Future[T] = loop.create_future()

        def call() -> None:
            try:
                result, error = fn(*args), None
            except BaseException as exc:
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(settle, future, result, error)

        self.submit(call)
        return future

    def shutdown(self) -> None:
        """Let the queued calls finish, then stop the threads (blocks)."""
        with self._lock:
            self._closed = True
            threads, self._threads = self._threads, []
        for _ in threads:
            self._queue.put(None)
        for thread in threads:
            thread.join()

    def _start(self) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the blob listener's workers are shut down")
            if self._threads:
                return
            threads = [
                threading.Thread(target=self._work, name=f"{self._name}-{i}", daemon=True)
                for i in range(self._count)
            ]
            for thread in threads:
                thread.start()
            self._threads = threads

    def _work(self) -> None:
        while (fn := self._queue.get()) is not None:
            try:
                fn()
            except BaseException:
                log.exception("a blob worker call failed")
