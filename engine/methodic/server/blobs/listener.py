"""The blob listener: presigned PUT, GET and HEAD of component bytes, on their own port.

An asyncio server (server.py) beside the control API (which stays on FastAPI/uvicorn), on its
own event-loop thread: connections frame heads (parsed by httptools, wire.py) and receive
bodies straight into reusable buffers that pool threads hash and write (framing.py, sink.py),
then serve each request and send downloads with ``loop.sendfile`` (connection.py). What a
request may do (signature, length, ledger calls) is decided in service.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import threading
from pathlib import Path

from methodic.server.blobs.connection import BlobConnection
from methodic.server.blobs.ledger import BlobLedger
from methodic.server.blobs.server import BlobLimits, BlobServer
from methodic.server.blobs.service import BlobService
from methodic.server.config import ServerConfig
from methodic.server.fault_injection import FaultPlan
from methodic.server.runner import PortInUseError, bind_socket
from methodic.server.state import ServerState

PORT_FILE = "blob_port"


class BlobListener:
    """A BlobServer on its own event-loop thread (``methodic serve`` and EmbeddedServer)."""

    def __init__(
        self, service: BlobService, sock: socket.socket, limits: BlobLimits | None = None
    ) -> None:
        self.server = BlobServer(service, sock, BlobConnection, limits)
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


class RememberedPortTaken(PortInUseError):
    """The blob port this data dir had last time is taken: the server does not move silently."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(
            errno.EADDRINUSE,
            f"blob port {port} on {host}, where this data dir's presigned URLs point "
            f"(DATA_DIR/{PORT_FILE}), is taken by another process; the server will not move "
            "it silently (that process would be sent uploads meant for this server): free the "
            "port, or move it with --blob-port 0 (any free port; EmbeddedServer: blob_port=0) "
            "or --blob-port N, and clients presign again",
        )
        self.port = port


def bind_blob_socket(host: str, port: int | None, data_dir: Path) -> socket.socket:
    """The blob listener's socket; ``port`` None: the one this data dir had last time
    (presigned URLs handed out before a restart keep working), else a free one.

    Raises OSError: ``RememberedPortTaken`` when the remembered port is taken (moving it is
    the caller's explicit choice: a ``port``), ``PortInUseError`` when a given port is.
    """
    if port is not None:
        return bind_socket(host, port)
    remembered = remembered_blob_port(data_dir)
    if remembered is None:
        return bind_socket(host, 0)
    try:
        return bind_socket(host, remembered)
    except PortInUseError as exc:
        raise RememberedPortTaken(host, remembered) from exc


def remembered_blob_port(data_dir: Path) -> int | None:
    """The port in DATA_DIR/blob_port, or None (none yet, or unreadable)."""
    try:
        port = int((data_dir / PORT_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    return port if 0 < port < 65536 else None


def remember_blob_port(data_dir: Path, port: int) -> None:
    """Record the port for the next start (best effort; the data dir exists by now)."""
    tmp = data_dir / f".{PORT_FILE}.tmp"
    with contextlib.suppress(OSError):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask, like every file of the data dir
            os.write(fd, f"{port}\n".encode())
        finally:
            os.close(fd)
        os.replace(tmp, data_dir / PORT_FILE)
