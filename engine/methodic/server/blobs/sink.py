"""Hashing and writing request bodies off the event loop, in reusable buffers.

The listener receives a body straight into ~1 MiB buffers (``recv_into``) and hands each full
buffer to a ``BodySink``; a worker thread hashes and writes it (``Upload.write`` with a
memoryview: no copy) and gives the buffer back. At most ``BUFFERS_PER_BODY`` buffers of a
body wait on the disk; then the connection stops reading the socket until half of them are
written, so a slow disk slows the client down instead of growing memory.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable

from methodic.server.blobs.workers import Workers, settle
from methodic.server.storage.base import Received, Upload

BUFFER_SIZE = 1024 * 1024
BUFFERS_PER_BODY = 8  # at most this many wait on the disk per body (so 8 MiB of memory)
DRAIN_TURN = 16  # buffers a thread writes for one body before the next body's turn


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


_FINISH = object()


class BodySink:
    """One body's buffers, hashed and written in order by one pool thread at a time.

    Loop side: ``put`` each filled buffer; ``take_written`` the buffers no thread uses any
    more (collected when the loop wants them, not one wakeup per buffer); ``wake_when`` to be
    called back once few enough buffers wait (flow control); then ``finish()`` (the Received)
    or ``abandon()``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: Workers, upload: Upload) -> None:
        self._loop = loop
        self._pool = pool
        self._upload = upload
        self._lock = threading.Lock()
        self._queue: deque[tuple[bytearray, int] | object] = deque()
        self._pending = 0  # buffers put and not written yet
        self._written: list[bytearray] = []
        self._waiter: tuple[int, Callable[[], None]] | None = None
        self._running = False
        self._error: BaseException | None = None
        self._idle: asyncio.Future[None] | None = None
        self._finished: asyncio.Future[Received] = loop.create_future()

    @property
    def failed(self) -> BaseException | None:
        return self._error

    def put(self, buffer: bytearray, length: int) -> None:
        self._push((buffer, length), 1)

    def take_written(self) -> list[bytearray]:
        with self._lock:
            written, self._written = self._written, []
        return written

    def wake_when(self, pending: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` on the loop once at most ``pending`` buffers wait, or on failure."""
        with self._lock:
            if self._pending > pending and self._error is None:
                self._waiter = (pending, callback)
                return
        self._loop.call_soon(callback)

    def finish(self) -> asyncio.Future[Received]:
        """Resolves with what was received once every buffer is written (or with the error)."""
        self._push(_FINISH, 0)
        return self._finished

    async def abandon(self) -> None:
        """Drop what is not written yet; return once no thread touches the upload."""
        with self._lock:
            for item in self._queue:
                if isinstance(item, tuple):
                    self._written.append(item[0])
            self._queue.clear()
            self._pending = 0
            self._waiter = None
            running = self._running
            if running:
                self._idle = self._loop.create_future()
        if running:
            assert self._idle is not None
            await self._idle

    def _push(self, item: tuple[bytearray, int] | object, buffers: int) -> None:
        with self._lock:
            self._queue.append(item)
            self._pending += buffers
            if self._running:
                return
            self._running = True
        self._pool.submit(self._drain)

    def _drain(self) -> None:  # a pool thread
        for _ in range(DRAIN_TURN):
            with self._lock:
                if not self._queue:
                    self._running = False
                    if self._idle is not None:
                        self._loop.call_soon_threadsafe(settle, self._idle, None, None)
                    return
                item = self._queue.popleft()
            if isinstance(item, tuple):
                self._write(*item)
                continue
            result: Received | None = None
            if self._error is None:
                try:
                    result = self._upload.finish()
                except BaseException as exc:
                    self._error = exc
            self._loop.call_soon_threadsafe(settle, self._finished, result, self._error)
        # Back in line behind the other bodies: a fast client never keeps a thread to itself.
        self._pool.submit(self._drain)

    def _write(self, buffer: bytearray, length: int) -> None:  # a pool thread
        if self._error is None:
            try:  # a view, not a copy; Upload.write keeps no reference to it
                self._upload.write(memoryview(buffer)[:length])
            except BaseException as exc:
                self._error = exc
        with self._lock:
            self._written.append(buffer)
            self._pending -= 1
            waiter = self._waiter
            if waiter is not None and (self._pending <= waiter[0] or self._error is not None):
                self._waiter = None
                self._loop.call_soon_threadsafe(waiter[1])
