"""An in-process Chronicle server on a background thread (tests, the TUI's embedded default)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from types import TracebackType

import httpx

from methodic.server.app import create_app
from methodic.server.blobs.listener import (
    BlobLimits,
    BlobListener,
    bind_blob_socket,
    receives_blobs,
    serve_blobs,
)
from methodic.server.config import ServerConfig
from methodic.server.fault_injection import FaultPlan
from methodic.server.runner import QuietServer, bind_socket, make_server, socket_url
from methodic.server.state import ServerState, open_state

START_TIMEOUT_S = 15.0


class EmbeddedServer:
    """``with EmbeddedServer(tmp_path) as srv: Chronicle(srv.url, api_key=srv.api_key)``.

    ``port=0`` picks a free port. ``url`` and ``api_key`` (the given key, or the one in
    DATA_DIR/api_key) are set by ``start()``, which returns once ``/healthz`` answers; so is
    ``blob_port``, the blob listener's (``blob_port=None``: the data dir's last one, else free).
    """

    def __init__(
        self,
        data_dir: Path | str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        public_url: str | None = None,
        presign_ttl: float = 3600.0,
        blob_port: int | None = None,
        public_blob_url: str | None = None,
        blob_limits: BlobLimits | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port
        self._config = ServerConfig(
            data_dir=self.data_dir,
            api_key=api_key,
            public_url=public_url,
            presign_ttl=presign_ttl,
            host=host,
            port=port,
            blob_port=blob_port,
            public_blob_url=public_blob_url,
        )
        self.blob_limits = blob_limits
        self.blob_port: int | None = None
        self.faults = FaultPlan()  # tests and the demo inject transient errors here
        self.url: str | None = None
        self.api_key: str | None = None
        self._state: ServerState | None = None
        self._server: QuietServer | None = None
        self._blobs: BlobListener | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def __repr__(self) -> str:
        return f"EmbeddedServer(url={self.url!r}, data_dir={str(self.data_dir)!r})"

    @classmethod
    def from_config(cls, config: ServerConfig) -> EmbeddedServer:
        """A server with every setting of ``config`` (limits too); ``config.port`` 0: a free port."""
        srv = cls(
            config.data_dir,
            host=config.host,
            port=config.port,
            api_key=config.api_key,
            public_url=config.public_url,
            presign_ttl=config.presign_ttl,
        )
        srv._config = config
        return srv

    @property
    def config(self) -> ServerConfig:
        return self._config

    def start(self) -> EmbeddedServer:
        if self._thread is not None:
            raise RuntimeError("this EmbeddedServer is already started")
        state = open_state(self._config)
        self._state = state
        sock: socket.socket | None = None
        try:
            sock = bind_socket(self.host, self.port)
            if receives_blobs(self._config):
                blob_sock = bind_blob_socket(self.host, self._config.blob_port, self.data_dir)
                self._blobs = serve_blobs(state, blob_sock, self.faults, self.blob_limits)
                self.blob_port = self._blobs.port
        except BaseException:
            if sock is not None:
                sock.close()
            self.stop()
            raise
        self.port = sock.getsockname()[1]
        self.url = socket_url(sock, self.host)
        self.api_key = state.active_key.key
        app = create_app(self._config, state=state, blob_port=self.blob_port)
        self._server = make_server(app)
        self._thread = threading.Thread(
            target=self._run, args=(sock,), name=f"methodic-server-{self.port}", daemon=True
        )
        self._thread.start()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _run(self, sock: socket.socket) -> None:
        assert self._server is not None
        try:
            self._server.run(sockets=[sock])
        except BaseException as exc:  # surfaced by start() / stop()
            self._error = exc

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        assert self._thread is not None
        with httpx.Client(timeout=1.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                if not self._thread.is_alive():
                    raise RuntimeError(
                        f"the embedded server stopped while starting: {self._error!r}"
                    )
                try:
                    if client.get(f"{self.url}/healthz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.02)
        raise TimeoutError(
            f"the embedded server at {self.url} did not answer /healthz in {START_TIMEOUT_S:.0f} s"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Shut down cleanly (in-flight requests get a few seconds) and join the thread."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive() and self._server is not None:
                self._server.force_exit = True
                self._thread.join(timeout)
        if self._blobs is not None:
            self._blobs.stop()
        if self._state is not None:
            self._state.close()
        self._state = None
        self._server = None
        self._blobs = None
        self._thread = None

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
