"""Hashing and writing request bodies off the event loop, in reusable buffers.

The listener receives a body straight into ~1 MiB buffers (``recv_into``) and hands each full
buffer to a ``BodySink``; a worker thread hashes and writes it (``Upload.write`` with a
memoryview: no copy) and gives the buffer back. A connection owns at most
``BUFFERS_PER_BODY`` buffers; when all of them wait on the disk, it stops reading the
socket, so a slow disk slows the client down instead of growing memory.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from methodic.server.storage import Received, Upload

BUFFER_SIZE = 1024 * 1024
BUFFERS_PER_BODY = 4


class BufferPool:
    """Free body buffers, shared by a listener's connections (event-loop thread only)."""

    def __init__(self, size: int = BUFFER_SIZE, keep: int = 64) -> None:
        self.size = size
        self._keep = keep
        self._free: list[bytearray] = []
        self.allocated = 0

    def take(self) -> bytearray:
        if self._free:
            return self._free.pop()
        self.allocated += 1
        return bytearray(self.size)

    def give(self, buffer: bytearray) -> None:
        if len(self._free) < self._keep:
            self._free.append(buffer)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


_FINISH = object()


class BodySink:
    """One body's buffers, written in order by one pool thread at a time.

    Loop side: ``put`` each filled buffer, then ``finish()`` (the Received) or ``abandon()``.
    ``on_written(buffer)`` runs on the loop for each buffer once no thread uses it any more.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        pool: Executor,
        upload: Upload,
        on_written: Callable[[bytearray], None],
    ) -> None:
        self._loop = loop
        self._pool = pool
        self._upload = upload
        self._on_written = on_written
        self._lock = threading.Lock()
        self._queue: deque[tuple[bytearray, int] | object] = deque()
        self._running = False
        self._error: BaseException | None = None
        self._idle: asyncio.Future[None] | None = None
        self._finished: asyncio.Future[Received] = loop.create_future()

    @property
    def failed(self) -> BaseException | None:
        return self._error

    def put(self, buffer: bytearray, length: int) -> None:
        self._push((buffer, length))

    def finish(self) -> asyncio.Future[Received]:
        """Resolves with what was received once every buffer is written (or with the error)."""
        self._push(_FINISH)
        return self._finished

    async def abandon(self) -> None:
        """Drop what is not written yet; return once no thread touches the upload."""
        with self._lock:
            dropped = [item for item in self._queue if item is not _FINISH]
            self._queue.clear()
            running = self._running
            if running:
                self._idle = self._loop.create_future()
        for item in dropped:
            assert isinstance(item, tuple)
            self._on_written(item[0])
        if running:
            assert self._idle is not None
            await self._idle

    def _push(self, item: tuple[bytearray, int] | object) -> None:
        with self._lock:
            self._queue.append(item)
            if self._running:
                return
            self._running = True
        self._pool.submit(self._drain)

    def _drain(self) -> None:  # a pool thread
        for _ in range(BUFFERS_PER_BODY):
            with self._lock:
                if not self._queue:
                    self._running = False
                    if self._idle is not None:
                        self._loop.call_soon_threadsafe(_settle, self._idle, None, None)
                    return
                item = self._queue.popleft()
            if item is _FINISH:
                result: Received | None = None
                if self._error is None:
                    try:
                        result = self._upload.finish()
                    except BaseException as exc:
                        self._error = exc
                self._loop.call_soon_threadsafe(_settle, self._finished, result, self._error)
                continue
            assert isinstance(item, tuple)
            buffer, length = item
            if self._error is None:
                try:  # a view, not a copy; Upload.write keeps no reference to it
                    self._upload.write(memoryview(buffer)[:length])  # type: ignore[arg-type]
                except BaseException as exc:
                    self._error = exc
            self._loop.call_soon_threadsafe(self._on_written, buffer)
        # Back in line behind the other bodies: a fast client never keeps a thread to itself.
        self._pool.submit(self._drain)
