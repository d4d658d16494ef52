"""Assembling one Chronicle server: its sockets, its data dir, the blob listener and the app.

``methodic serve`` (cli.py) and ``EmbeddedServer`` (embedded.py) both get their server from
``build_server``; they differ only in how they run the control API (the main thread's event
loop with signal handling, or a background thread).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from methodic.server.app import create_app
from methodic.server.blobs.listener import (
    BlobListener,
    RememberedPortTaken,
    bind_blob_socket,
    receives_blobs,
    serve_blobs,
)
from methodic.server.blobs.server import BlobLimits
from methodic.server.config import ServerConfig
from methodic.server.fault_injection import FaultPlan
from methodic.server.runner import PortInUseError, QuietServer, bind_socket, make_server, socket_url
from methodic.server.state import DataDirLock, ServerState, open_state


class ListenError(OSError):
    """A listening socket could not be bound.

    ``listener`` is ``"control"`` (the API port) or ``"blob"`` (the blob port); ``in_use``
    says whether another process holds the address; ``remembered``, whether that address is
    the blob port the data dir had last time (the server refuses to move it silently).
    """

    def __init__(self, listener: str, port: int | None, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror if cause.strerror is not None else str(cause))
        self.listener = listener
        self.remembered = isinstance(cause, RememberedPortTaken)
        self.port = cause.port if isinstance(cause, RememberedPortTaken) else port
        self.in_use = isinstance(cause, PortInUseError)


@dataclass
class AssembledServer:
    """A server ready to run: the blob listener serves already, the control API not yet.

    Run ``http`` on ``sock`` (``http.run(sockets=[sock])`` or ``await http.serve(...)``); once
    it has stopped, ``close()`` stops the blob listener and closes the data dir.
    """

    config: ServerConfig
    state: ServerState = field(repr=False)
    sock: socket.socket = field(repr=False)  # the control API's, bound and listening
    http: QuietServer = field(repr=False)  # uvicorn, serving the control API once run
    blobs: BlobListener | None  # None when storage takes blob bytes itself (S3)
    url: str

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    @property
    def blob_port(self) -> int | None:
        return self.blobs.port if self.blobs is not None else None

    def close(self) -> None:
        if self.blobs is not None:
            self.blobs.stop()
        self.state.close()


def build_server(
    config: ServerConfig,
    *,
    faults: FaultPlan | None = None,
    blob_limits: BlobLimits | None = None,
) -> AssembledServer:
    """Bind ``config``'s sockets, open its data dir, start the blob listener, make the app.

    The data dir is locked first (DATA_DIR/lock: one server per data dir), then the sockets are
    bound before anything else in the data dir is touched, so a busy port leaves no fresh API
    key behind (nor a data dir created for it). Raises ListenError, DataDirError or ValueError
    (a bad API key); whatever was opened by then is closed again.
    """
    # First, so that a second server on this data dir is told so (not that its ports are busy).
    lock = DataDirLock(config.data_dir).acquire()
    try:
        sock = _bind("control", config.port, lambda: bind_socket(config.host, config.port))
    except BaseException:
        lock.release(undo_create=True)
        raise
    blob_sock: socket.socket | None = None
    state: ServerState | None = None
    blobs: BlobListener | None = None
    try:
        if receives_blobs(config):
            blob_sock = _bind(
                "blob",
                config.blob_port,
                lambda: bind_blob_socket(config.host, config.blob_port, config.data_dir),
            )
        state = open_state(config, lock)
        if blob_sock is not None:
            blobs = serve_blobs(state, blob_sock, faults, blob_limits)
        app = create_app(config, state=state, blob_port=blobs.port if blobs else None)
        return AssembledServer(
            config=config,
            state=state,
            sock=sock,
            http=make_server(app),
            blobs=blobs,
            url=socket_url(sock, config.host),
        )
    except BaseException:
        if blobs is not None:
            blobs.stop()
        elif blob_sock is not None:
            blob_sock.close()
        if state is not None:
            state.close()  # releases the lock
        else:
            lock.release(undo_create=True)
        sock.close()
        raise


def _bind(listener: str, port: int | None, bind: Callable[[], socket.socket]) -> socket.socket:
    try:
        return bind()
    except OSError as exc:
        raise ListenError(listener, port, exc) from exc
