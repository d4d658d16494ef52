"""The blob listener: presigned PUT, GET and HEAD of component bytes, on their own port.

An asyncio server beside the control API (which stays on FastAPI/uvicorn), on its own
event-loop thread: connections (connection.py) parse heads with httptools (wire.py),
receive bodies straight into reusable buffers that pool threads hash and write
(sink.py), and send downloads with ``loop.sendfile``. What a request may do (signature,
length, catalog calls) is decided in service.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from methodic.server.blobs.connection import BlobConnection
from methodic.server.blobs.ledger import BlobLedger
from methodic.server.blobs.service import BlobService
from methodic.server.blobs.sink import BufferPool
from methodic.server.config import ServerConfig
from methodic.server.fault_injection import FaultPlan
from methodic.server.runner import bind_socket
from methodic.server.state import ServerState

MiB = 1024 * 1024
PORT_FILE = "blob_port"


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
    """The listener on a bound socket. ``start()`` and ``shutdown()`` run on its event loop."""

    def __init__(
        self, service: BlobService, sock: socket.socket, limits: BlobLimits | None = None
    ) -> None:
        self.service = service
        self.sock = sock
        self.limits = limits or BlobLimits()
        self.connections: set[BlobConnection] = set()
        self.buffers = BufferPool()
        self.scratch = memoryview(bytearray(256 * 1024))  # where dropped bytes go
        self.pool = ThreadPoolExecutor(self.limits.workers, thread_name_prefix="methodic-blob")
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.loop: asyncio.AbstractEventLoop

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._server = await self.loop.create_server(lambda: BlobConnection(self), sock=self.sock)

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


class BlobListener:
    """A BlobServer on its own event-loop thread (``methodic serve`` and EmbeddedServer)."""

    def __init__(
        self, service: BlobService, sock: socket.socket, limits: BlobLimits | None = None
    ) -> None:
        self.server = BlobServer(service, sock, limits)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"methodic-blobs-{self.server.port}", daemon=True
        )

    @property
    def port(self) -> int:
        return self.server.port

    def start(self, timeout: float = 10.0) -> BlobListener:
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            self.stop()
            raise RuntimeError(f"the blob listener did not start: {self._error!r}")
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced by start()
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        await self.server.start()
        self._ready.set()
        await self._stop.wait()
        await self.server.shutdown()

    def stop(self, timeout: float = 20.0) -> None:
        """Stop accepting, let requests in flight finish (``grace``), release everything."""
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop has just ended
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread.ident is not None:
            self._thread.join(timeout)
        self.server.sock.close()


# ---- starting one ---------------------------------------------------------------------------


def receives_blobs(config: ServerConfig) -> bool:
    """Whether this server receives blob bytes itself (local storage; S3 takes them directly)."""
    return config.s3_location is None


def serve_blobs(
    state: ServerState,
    sock: socket.socket,
    faults: FaultPlan | None = None,
    limits: BlobLimits | None = None,
) -> BlobListener:
    """Start the listener on ``sock`` for ``state``'s assets; its port is remembered."""
    listener = BlobListener(
        BlobService(BlobLedger(state.records), state.signer, faults), sock, limits
    )
    listener.start()
    remember_blob_port(state.config.data_dir, listener.port)
    return listener


# ---- the listener's port ------------------------------------------------------------------


def bind_blob_socket(host: str, port: int | None, data_dir: Path) -> socket.socket:
    """The blob listener's socket; ``port`` None: the one this data dir had last time if it
    is free (presigned URLs handed out before a restart keep working), else a free one.

    Raises OSError (``PortInUseError`` when a given port is taken).
    """
    if port is not None:
        return bind_socket(host, port)
    with contextlib.suppress(OSError, ValueError):
        remembered = int((data_dir / PORT_FILE).read_text().strip())
        if 0 < remembered < 65536:
            return bind_socket(host, remembered)
    return bind_socket(host, 0)


def remember_blob_port(data_dir: Path, port: int) -> None:
    """Record the port for the next start (best effort; the data dir exists by now)."""
    tmp = data_dir / f".{PORT_FILE}.tmp"
    with contextlib.suppress(OSError):
        tmp.write_text(f"{port}\n")
        os.replace(tmp, data_dir / PORT_FILE)
