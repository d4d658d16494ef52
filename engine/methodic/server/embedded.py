"""An in-process Chronicle server on a background thread (tests, the TUI's embedded default)."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from types import TracebackType

import httpx

from methodic.server.assemble import AssembledServer, build_server
from methodic.server.blobs.listener import BlobListener
from methodic.server.blobs.server import BlobLimits
from methodic.server.config import ServerConfig
from methodic.server.fault_injection import FaultPlan
from methodic.server.state import ServerState

START_TIMEOUT_S = 15.0


class EmbeddedServer:
    """``with EmbeddedServer(tmp_path) as srv: Chronicle(srv.url, api_key=srv.api_key)``.

    ``port=0`` picks a free port. ``url`` and ``api_key`` (the given key, or the one in
    DATA_DIR/api_key) are set by ``start()``, which returns once ``/healthz`` answers; so is
    ``blob_port``, the blob listener's (``blob_port=None``: the data dir's last one, else free).

    One server per data directory: ``start()`` raises ``methodic.server.state.DataDirError``
    (naming the directory and the pid of the server that holds it) when another server, in this
    process or another, has it open. ``from_config(ServerConfig(...))`` takes every setting, the
    request limits too.
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
        self._assembled: AssembledServer | None = None
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

    @property
    def _state(self) -> ServerState | None:
        return self._assembled.state if self._assembled is not None else None

    @property
    def _blobs(self) -> BlobListener | None:
        return self._assembled.blobs if self._assembled is not None else None

    def start(self) -> EmbeddedServer:
        if self._thread is not None:
            raise RuntimeError("this EmbeddedServer is already started")
        # self.port: after a stop(), a restart listens where clients were told the server is.
        config = dataclasses.replace(self._config, port=self.port)
        server = build_server(config, faults=self.faults, blob_limits=self.blob_limits)
        self._assembled = server
        self.port = server.port
        self.url = server.url
        self.blob_port = server.blob_port
        self.api_key = server.state.active_key.key
        self._thread = threading.Thread(
            target=self._run, args=(server,), name=f"methodic-server-{self.port}", daemon=True
        )
        self._thread.start()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _run(self, server: AssembledServer) -> None:
        try:
            server.http.run(sockets=[server.sock])
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
        server = self._assembled
        if server is not None:
            server.http.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive() and server is not None:
                server.http.force_exit = True
                self._thread.join(timeout)
        if server is not None:
            server.close()
        self._assembled = None
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
