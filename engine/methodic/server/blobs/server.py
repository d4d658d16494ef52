"""The blob listener's server: its limits, and what every connection of it shares."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from methodic.server.blobs.service import SERVER_HEADER, BlobService
from methodic.server.blobs.sink import BufferPool
from methodic.server.blobs.workers import Workers


class Connection(Protocol):
    """What the server asks of a connection at shutdown (framing.py's FramedConnection)."""

    def shut(self) -> None: ...  # close now if idle; a request in flight gets its answer first
    def abort(self) -> None: ...


MiB = 1024 * 1024


@dataclass(frozen=True)
class BlobLimits:
    max_head: int = 64 * 1024  # 431 beyond
    idle_timeout: float = 60.0  # a keep-alive connection with no byte of a next request
    head_timeout: float = 20.0  # from a head's first byte to its end (408)
    body_timeout: float = 60.0  # no body byte for this long (waits on our own disk excluded)
    send_timeout: float = 60.0  # an answer, or one sendfile chunk, not taken by the client
    discard_limit: int = MiB  # a refused body up to this size is read and dropped (keep-alive)
    linger: float = 5.0  # after an answer that closes: drain what still arrives this long
    workers: int = 16  # pool threads: hash + write, catalog calls
    grace: float = 5.0  # at shutdown, requests in flight get this long


class BlobServer:
    """The listener on a bound socket. ``start()`` and ``shutdown()`` run on its event loop.

    What its connections share: limits, buffers, worker threads, the open connections (each
    made by ``connection(server)``) and their request tasks.
    """

    def __init__(
        self,
        service: BlobService,
        sock: socket.socket,
        connection: Callable[[BlobServer], asyncio.BaseProtocol],
        limits: BlobLimits | None = None,
    ) -> None:
        self.service = service
        # Every answer names this server (service.SERVER_HEADER), the 100 Continue too.
        self.identity = {SERVER_HEADER: service.signer.server_id}
        self.continue_head = (
            f"HTTP/1.1 100 Continue\r\n{SERVER_HEADER}: {service.signer.server_id}\r\n\r\n"
        ).encode("latin-1")
        self._connection = connection
        self.sock = sock
        self.limits = limits or BlobLimits()
        self.connections: set[Connection] = set()
        self.buffers = BufferPool()
        self.scratch = memoryview(bytearray(256 * 1024))  # where dropped bytes go
        self.pool = Workers(self.limits.workers, "methodic-blob")
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.loop: asyncio.AbstractEventLoop

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def named(self, headers: dict[str, str]) -> dict[str, str]:
        """``headers`` with this server's identity header."""
        return {**self.identity, **headers}

    def track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._server = await self.loop.create_server(lambda: self._connection(self), sock=self.sock)

    async def shutdown(self) -> None:
        """Stop accepting; answer what is in flight (``grace`` at most); release everything."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.shut()
        deadline = self.loop.time() + self.limits.grace
        while (self.connections or self._tasks) and self.loop.time() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            conn.abort()
        await asyncio.sleep(0)  # connection_lost() runs, and request tasks see it
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.limits.grace)
        await self.loop.run_in_executor(None, self.pool.shutdown)
