"""Running the app under uvicorn on a socket we bind ourselves (used by assemble.py)."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI


class PortInUseError(OSError):
    """The requested address is taken by another process."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one). Raises OSError."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    # proto must be IPPROTO_TCP (not 0): asyncio only sets TCP_NODELAY on accepted sockets
    # whose proto says TCP, and without it every response waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # no TIME_WAIT wait on restart
        if family == socket.AF_INET6:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUseError(exc.errno, f"{host}:{port} is already in use") from exc
            raise
        sock.listen(2048)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def socket_url(sock: socket.socket, host: str) -> str:
    port = sock.getsockname()[1]
    shown = host
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class QuietServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its owner.

    uvicorn's own handlers re-raise the signal after shutdown (so the process would die of
    SIGTERM instead of exiting 0) and only work in the main thread anyway.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def make_server(app: FastAPI, *, log_config: dict[str, Any] | None = None) -> QuietServer:
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        log_config=log_config,
        lifespan="off",
        timeout_graceful_shutdown=5,
        server_header=False,
    )
    return QuietServer(config)
