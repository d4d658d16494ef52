"""A raw-socket HTTP/1.1 client for the blob listener's protocol tests: exact bytes out, responses in.

Requests are written by hand (so tests can pipeline, lie about lengths, stop mid-body);
responses are read with a deliberately small reader that knows Content-Length only, which
is all the listener ever sends.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit


@dataclass
class Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes = b""

    def json(self) -> Any:
        return json.loads(self.body)


class RawClient:
    def __init__(self, url: str, timeout: float = 60.0) -> None:
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None
        self.host = f"{parts.hostname}:{parts.port}"
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        self._buffer = b""

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def head(self, method: str, url: str, headers: dict[str, str] | None = None) -> bytes:
        """The bytes of a request head for ``url`` (its path and query), Host included."""
        parts = urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def put(self, url: str, body: bytes, **headers: str) -> bytes:
        return self.head("PUT", url, {"Content-Length": str(len(body)), **headers}) + body

    def _fill(self) -> bool:
        data = self.sock.recv(1 << 20)
        self._buffer += data
        return bool(data)

    def read(self, *, head_only: bool = False) -> Reply:
        """The next response (``head_only`` for a HEAD request's). Raises EOFError on close."""
        while b"\r\n\r\n" not in self._buffer:
            if not self._fill():
                raise EOFError(f"connection closed; pending {self._buffer[:200]!r}")
        head, _, self._buffer = self._buffer.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        reply = Reply(int(status_line.split(" ")[1]))
        for line in lines:
            name, _, value = line.partition(":")
            reply.headers[name.strip().lower()] = value.strip()
        length = (
            0 if head_only or reply.status < 200 else int(reply.headers.get("content-length", 0))
        )
        while len(self._buffer) < length:
            if not self._fill():
                raise EOFError("connection closed in a response body")
        reply.body, self._buffer = self._buffer[:length], self._buffer[length:]
        return reply

    def closed_by_server(self, timeout: float = 60.0) -> bool:
        """True once the server has closed the connection (after any bytes still unread)."""
        self.sock.settimeout(timeout)
        try:
            while self._fill():
                pass
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        return True
