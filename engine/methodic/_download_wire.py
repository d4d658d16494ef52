"""GET a byte range over plain HTTP/1.1 in a thread: the body goes from the socket into one
reused buffer (``recv_into``), is hashed there and written at its offset (``os.pwrite``).

No Python object is made per chunk and the event loop is not involved per chunk: the socket
read, the CRC (awscrt releases the GIL) and the write all run in the thread. This path serves
``http://`` URLs that no proxy applies to (the blob listener, S3 endpoints on a private
network); anything else, or an answer it does not handle (a chunked body), goes through httpx
(``_download_fetch``). Idle keep-alive connections are kept per (host, port).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx

from methodic._transfer import TransferError, _accepted
from methodic._transfer import _direct as direct

BUFFER = 1 << 20
HEAD_LIMIT = 64 << 10
ERROR_BODY_LIMIT = 1 << 20
IDLE_PER_HOST = 32


__all__ = ["Request", "Stopped", "Unsupported", "Wire", "direct"]


class Unsupported(Exception):
    """An answer this path does not read (e.g. chunked): use httpx for it."""


class Stopped(Exception):
    """The request was aborted from outside (a sibling failed, or the download was cancelled)."""


class Request:
    """One GET in flight; ``abort()`` (from any thread) makes its thread stop promptly."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.stopped = False

    def abort(self) -> None:
        self.stopped = True
        sock = self.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class Wire:
    """Blocking ranged GETs with keep-alive connections, shared by a download's threads."""

    def __init__(self, timeout: float, connect_timeout: float) -> None:
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._idle: dict[tuple[str, int], list[socket.socket]] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            for idle in self._idle.values():
                for sock in idle:
                    sock.close()
            self._idle.clear()

    def _connect(self, host: str, port: int) -> tuple[socket.socket, bool]:
        with self._lock:
            idle = self._idle.get((host, port), [])
            while idle:
                sock = idle.pop()
                if _alive(sock):
                    return sock, True
                sock.close()
        sock = socket.create_connection((host, port), timeout=self.connect_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.timeout)
        return sock, False

    def _release(self, host: str, port: int, sock: socket.socket) -> None:
        with self._lock:
            idle = self._idle.setdefault((host, port), [])
            if len(idle) < IDLE_PER_HOST:
                idle.append(sock)
                return
        sock.close()

    def get(
        self,
        url: str,
        start: int,
        end: int,
        sink: Callable[[memoryview], None],
        request: Request,
    ) -> int:
        """GET bytes ``start``..``end - 1`` of ``url``; hand the body to ``sink`` in order, in
        chunks of up to 1 MiB. Returns the status (206, or 200 for a whole body asked from 0).

        Raises TransferError (with the server's words for an error answer), Unsupported, or
        Stopped; a connection that breaks raises TransferError(transient) after ``sink`` had
        every byte that arrived.
        """
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port or 80
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        head = (
            f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nRange: bytes={start}-{end - 1}\r\n"
            "User-Agent: methodic\r\nAccept-Encoding: identity\r\n\r\n"
        ).encode("latin-1")
        for attempt in (0, 1):
            if request.stopped:
                raise Stopped
            try:
                sock, reused = self._connect(host, port)
            except OSError as exc:
                raise _lost(exc, self.connect_timeout) from exc
            request.sock = sock
            try:
                sock.sendall(head)
                status, headers, rest = _read_head(sock)
            except (OSError, ConnectionError) as exc:
                sock.close()
                request.sock = None
                if reused and attempt == 0 and not request.stopped:
                    continue  # a kept-alive connection the server had closed: once more, fresh
                if request.stopped:
                    raise Stopped from None
                raise _lost(exc, self.timeout) from exc
            break
        keep = headers.get("connection", "").lower() != "close"
        try:
            if "chunked" in headers.get("transfer-encoding", "").lower():
                raise Unsupported("a chunked answer")
            length_text = headers.get("content-length")
            if length_text is None or not length_text.isdigit():
                raise Unsupported("an answer without Content-Length")
            length = int(length_text)
            if status >= 300:
                body = _read_exact(sock, rest, min(length, ERROR_BODY_LIMIT))
                keep = keep and length <= ERROR_BODY_LIMIT
                _accepted(httpx.Response(status, headers=list(headers.items()), content=body))
            if status == 200 and not (start == 0 and length == end):
                raise Unsupported("a server that ignores Range")
            if length > end - start:
                raise TransferError(
                    f"the server announced {length} bytes for the {end - start} asked for",
                    transient=False,
                )
            self._body(sock, rest, length, sink, request)
        except BaseException:
            keep = False
            raise
        finally:
            request.sock = None
            if keep:
                self._release(host, port, sock)
            else:
                sock.close()
        return status

    def _body(
        self,
        sock: socket.socket,
        rest: bytes,
        length: int,
        sink: Callable[[memoryview], None],
        request: Request,
    ) -> None:
        view = _buffer()
        if length < len(view):
            view = view[: max(length, 1)]
        left = length
        filled = min(len(rest), left)
        view[:filled] = rest[:filled]
        while left:
            want = min(len(view), left)
            try:
                while filled < want:
                    n = sock.recv_into(view[filled:want])
                    if n == 0:
                        raise ConnectionResetError("the server closed the connection mid-body")
                    filled += n
            except OSError as exc:
                if filled:
                    sink(view[:filled])  # what arrived is kept: the retry resumes after it
                if request.stopped:
                    raise Stopped from None
                raise _lost(exc, self.timeout) from exc
            if request.stopped:
                raise Stopped
            sink(view[:filled])
            left -= filled
            filled = 0


_local = threading.local()


def _buffer() -> memoryview:
    """This thread's 1 MiB receive buffer (made once: zeroing a new one per GET costs)."""
    view: memoryview | None = getattr(_local, "view", None)
    if view is None:
        view = _local.view = memoryview(bytearray(BUFFER))
    return view


def _read_head(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionResetError("the server closed the connection before it answered")
        data += chunk
        if len(data) > HEAD_LIMIT:
            raise ConnectionResetError("the server sent a response head over 64 KiB")
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = lines[0].split(" ", 2)
    if len(fields) < 2 or not fields[0].startswith("HTTP/1.") or not fields[1].isdigit():
        raise ConnectionResetError(f"not an HTTP/1.1 answer: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(fields[1]), headers, rest


def _read_exact(sock: socket.socket, rest: bytes, n: int) -> bytes:
    data = bytearray(rest[:n])
    while len(data) < n:
        chunk = sock.recv(min(65536, n - len(data)))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def _alive(sock: socket.socket) -> bool:
    """An idle connection the server has not closed (nor sent anything unasked on)."""
    timeout = sock.gettimeout()
    sock.settimeout(0)
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.settimeout(timeout)
    return False


def _lost(exc: BaseException, timeout: float) -> TransferError:
    if isinstance(exc, TimeoutError):
        what = f"ReadTimeout: no byte for {timeout:g} s (stalled)"
    else:
        what = f"{type(exc).__name__}: {exc or 'connection lost'}"
    return TransferError(what, transient=True, stale=True)
