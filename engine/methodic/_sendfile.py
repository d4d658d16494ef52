"""PUT a byte range of a file over plain HTTP/1.1 with the body sent by sendfile(2).

The body never passes through Python on its way out: sendfile(2) moves it from the page cache
to the socket a slice at a time, and no per-chunk objects are made (the range's digest was
computed before the target was presigned, and the receiver checks the body against it). The
request head is formatted directly, and an answer framed by Content-Length (every answer of
``methodic serve`` and S3) is read without h11; any other framing is handed to h11. This path serves
``http://`` targets that no proxy applies to; everything else goes through httpx
(``methodic._transfer``). Idle keep-alive connections are kept per (host, port) by
``Connections``, which the upload pool owns.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import sys
import termios
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import urlsplit

import h11
import httpx

from methodic._bandwidth import TokenBucket
from methodic._types import UploadTarget

SLICE = 4 << 20  # bytes per turn of the send loop (and per take from the bandwidth cap)
MIN_CAPPED_SLICE = 64 << 10
IDLE_PER_HOST = 32
USER_AGENT = "methodic"


class SendError(Exception):
    """The connection failed before a response arrived."""


@dataclass(slots=True)
class _Connection:
    sock: socket.socket

    def alive(self) -> bool:
        """An idle connection the server has not closed (nor sent anything unasked on)."""
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False  # closed (b""), or bytes nobody asked for


@dataclass(slots=True)
class Reply:
    """A server's answer: what a PUT's caller needs of it (header names in lower case)."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    reusable: bool = False  # the connection may carry the next request

    def header(self, name: bytes) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value.decode("latin-1")
        return None

    def response(self) -> httpx.Response:
        """As an ``httpx.Response`` (for the error path, which reads the server's words)."""
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in self.headers]
        return httpx.Response(self.status, headers=headers, content=self.body)


class Connections:
    """Idle keep-alive connections of the sendfile path, per (host, port)."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], list[_Connection]] = {}

    async def acquire(
        self, host: str, port: int, timeout: float, *, reuse: bool = True
    ) -> tuple[_Connection, bool]:
        """A connection to (host, port) and whether it was reused."""
        idle = self._idle.get((host, port), [])
        while reuse and idle:
            conn = idle.pop()
            if conn.alive():
                return conn, True
            conn.sock.close()
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            failure: OSError | None = None
            for family, kind, proto, _name, address in infos:  # e.g. ::1, then 127.0.0.1
                try:
                    sock = socket.socket(family, kind, proto)
                except OSError as exc:  # e.g. no IPv6 on this host
                    failure = exc
                    continue
                try:
                    sock.setblocking(False)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    await loop.sock_connect(sock, address)
                except OSError as exc:
                    sock.close()
                    failure = exc
                    continue
                except BaseException:
                    sock.close()
                    raise
                return _Connection(sock), False
        raise failure or OSError(f"no address for {host}")

    def release(self, host: str, port: int, conn: _Connection) -> None:
        """Keep the connection for the next request, or close it if there is no room."""
        idle = self._idle.setdefault((host, port), [])
        if len(idle) < IDLE_PER_HOST:
            idle.append(conn)
        else:
            conn.sock.close()

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.sock.close()
        self._idle.clear()


_OURS = frozenset({"host", "user-agent", "content-length"})
_origins: dict[str, tuple[str, int]] = {}


def _request(target: UploadTarget) -> tuple[str, int, bytes]:
    """(host, port, request head) of a PUT of the target's range, formatted directly: an
    ``h11.Request`` validates and rebuilds every header on every file."""
    _scheme, _, rest = target.url.partition("://")
    netloc, _, path = rest.partition("/")
    path = "/" + path.partition("#")[0]
    if "?" in netloc or "#" in netloc:  # no path before the query
        url = urlsplit(target.url)
        netloc, path = url.netloc, "/" + (f"?{url.query}" if url.query else "")
    if (origin := _origins.get(netloc)) is None:
        if len(_origins) > 64:
            _origins.clear()
        url = urlsplit(f"http://{netloc}/")
        origin = _origins[netloc] = (url.hostname or "", url.port or 80)
    extra = [f"{k}: {v}\r\n" for k, v in target.headers.items() if k.lower() not in _OURS]
    head = (
        f"{target.method} {path} HTTP/1.1\r\nHost: {netloc}\r\nUser-Agent: {USER_AGENT}\r\n"
        f"Content-Length: {target.length}\r\n{''.join(extra)}\r\n"
    )
    # A CR, LF or NUL of a URL or header would forge header lines: refused, as h11 does.
    lines = 5 + len(extra)
    if head.count("\n") != lines or head.count("\r") != lines or "\0" in head:
        raise ValueError(f"a line break or NUL in the target of {target.path}")
    return origin[0], origin[1], head.encode("ascii")


async def put_file_range(
    connections: Connections,
    target: UploadTarget,
    f: BinaryIO,
    bucket: TokenBucket,
    on_bytes: Callable[[int], None],
    timeout: float,
) -> Reply:
    """PUT the target's range of ``f``; the server's answer.

    Raises ``SendError`` when the connection fails before a response arrives, ``EOFError``
    when the file is shorter than the range. ``on_bytes`` hears of each slice sent.
    """
    host, port, request = _request(target)
    loop = asyncio.get_running_loop()

    async def send(conn: _Connection, moved: list[int]) -> None:
        def counted(n: int) -> None:
            moved[0] += n
            on_bytes(n)

        await loop.sock_sendall(conn.sock, request)
        offset, remaining = target.offset, target.length
        while remaining:
            n = min(_slice(bucket), remaining)
            await bucket.take(n)
            await _sendfile(conn.sock, f.fileno(), offset, n, timeout, counted)
            offset, remaining = offset + n, remaining - n
            if remaining:
                await asyncio.sleep(0)  # a fast receiver never makes this wait: let others run

    return await _put(connections, host, port, target.method, send, timeout)


async def put_body(
    connections: Connections, target: UploadTarget, body: bytes, timeout: float
) -> Reply:
    """PUT a small body already read into memory: the request head and the body go out in one
    write on a kept-alive connection (a small file costs one send and one receive, not an
    httpx request). Raises ``SendError`` as ``put_file_range`` does."""
    host, port, request = _request(target)
    loop = asyncio.get_running_loop()

    async def send(conn: _Connection, moved: list[int]) -> None:
        wire = request + body
        try:
            done = conn.sock.send(wire)
        except BlockingIOError:
            done = 0
        if done < len(wire):  # the socket's buffer is full: wait for room, not forever
            async with asyncio.timeout(timeout):
                await loop.sock_sendall(conn.sock, memoryview(wire)[done:])

    return await _put(connections, host, port, target.method, send, timeout)


async def _put(
    connections: Connections,
    host: str,
    port: int,
    method: str,
    send: Callable[[_Connection, list[int]], Awaitable[None]],
    timeout: float,
) -> Reply:
    """Send a request by ``send`` (head and body; it counts the body bytes it moved by sendfile
    in its list) and read the answer, on a kept-alive connection (tried once more on a new one
    when a reused one turns out closed before a counted byte left)."""
    moved = [0]
    for attempt in range(2):
        try:
            conn, reused = await connections.acquire(host, port, timeout, reuse=attempt == 0)
        except (OSError, TimeoutError) as exc:
            raise SendError(f"ConnectError: {_describe(exc, timeout)}") from exc
        try:
            try:
                await send(conn, moved)
            except (OSError, TimeoutError) as exc:
                if reused and moved[0] == 0 and isinstance(exc, ConnectionError):
                    conn.sock.close()  # a keep-alive connection the server had just closed
                    continue
                failure: BaseException | None = exc  # the server may have answered early: read it
            else:
                failure = None
            try:
                reply = await _reply(conn.sock, method, timeout)
            except (OSError, TimeoutError, h11.ProtocolError) as exc:
                raise SendError(_describe(failure or exc, timeout)) from exc
            if failure is None and reply.status < 300 and reply.reusable:
                connections.release(host, port, conn)
            else:
                conn.sock.close()
            return reply
        except BaseException:
            conn.sock.close()
            raise
    raise AssertionError("unreachable")


async def _sendfile(
    sock: socket.socket,
    fd: int,
    offset: int,
    count: int,
    timeout: float,
    on_moved: Callable[[int], None],
) -> int:
    """Move ``count`` bytes of the file at ``offset`` to the socket with sendfile(2); ``count``.

    Each sendfile call runs straight from the loop's writability callback, as in
    ``loop.sock_sendfile``, but ``on_moved`` hears of every call's bytes, and TimeoutError
    comes when the socket takes no byte for ``timeout`` (a stall, however slow the link), not
    when the whole count takes longer. EOFError when the file ends first.
    """
    loop = asyncio.get_running_loop()
    out = sock.fileno()
    done: asyncio.Future[None] = loop.create_future()
    left, last = count, loop.time()

    def pump() -> None:
        nonlocal offset, left, last
        while left and not done.done():
            try:
                moved = os.sendfile(out, fd, offset, left)
            except BlockingIOError:
                return  # called again once the socket has room
            except OSError as exc:
                done.set_exception(exc)
                return
            if moved == 0:
                done.set_exception(EOFError())
                return
            offset, left, last = offset + moved, left - moved, loop.time()
            try:
                on_moved(moved)
            except Exception as exc:  # not lost in the loop's handler: the caller gets it
                done.set_exception(exc)
                return
        if not done.done():
            done.set_result(None)

    pump()
    if not done.done():
        loop.add_writer(out, pump)
        try:
            while not done.done():
                await asyncio.wait([done], timeout=max(0.0, last + timeout - loop.time()))
                if not done.done() and loop.time() - last >= timeout:
                    raise TimeoutError
        finally:
            loop.remove_writer(out)
    done.result()
    return count


async def _recv(loop: asyncio.AbstractEventLoop, sock: socket.socket, timeout: float) -> bytes:
    """The next bytes of the answer. While the body's tail still drains from our send queue
    (a slow link), the peer is acknowledging bytes: only a wait with neither is a stall."""
    unacked = _unacknowledged(sock)
    while True:
        try:
            async with asyncio.timeout(timeout):
                return await loop.sock_recv(sock, 65536)
        except TimeoutError:
            now = _unacknowledged(sock)
            if now is None or unacked is None or now >= unacked:
                raise
            unacked = now


def _unacknowledged(sock: socket.socket) -> int | None:
    """Bytes in the socket's send queue the peer has not acknowledged (Linux SIOCOUTQ)."""
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except OSError:
        return None
    return int.from_bytes(raw, sys.byteorder, signed=True)


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"WriteTimeout: no progress for {timeout:g} s"
    return f"{type(exc).__name__}: {exc or 'connection lost'}"


def _slice(bucket: TokenBucket) -> int:
    """Under a cap, slices of about an eighth of a second, so workers share it smoothly."""
    rate = bucket.rate
    return SLICE if not rate else max(MIN_CAPPED_SLICE, min(SLICE, int(rate / 8)))


MAX_HEAD = 64 << 10


async def _reply(sock: socket.socket, method: str, timeout: float) -> Reply:
    """The answer to the request just sent. The common answer (a final status, framed by
    Content-Length) is read here; anything else (informational, chunked, until-close) by h11."""
    loop = asyncio.get_running_loop()
    data = b""
    while (end := data.find(b"\r\n\r\n")) < 0:
        if len(data) > MAX_HEAD:
            raise h11.RemoteProtocolError("the answer's head is too long")
        more = await _recv(loop, sock, timeout)
        if not more:
            raise ConnectionResetError("the server closed the connection before it answered")
        data += more
    lines = data[:end].split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    code = rest[:3]
    headers: list[tuple[bytes, bytes]] = []
    length: int | None = None
    framed = (
        version in (b"HTTP/1.1", b"HTTP/1.0")
        and code.isdigit()
        and code[:1] != b"1"
        and rest[3:4] in (b"", b" ")
    )
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        name = name.lower()
        if not colon or name != name.strip() or not name:
            framed = False  # h11 refuses it (or folds it), with its reasons
            break
        value = value.strip()
        headers.append((name, value))
        if name == b"content-length":
            framed = framed and length is None and value.isdigit()
            length = int(value) if framed else None
        elif name == b"transfer-encoding":
            framed = False
    status = int(code) if framed else 0
    if not framed or length is None or status in (204, 304) or method == "HEAD":
        return await _reply_by_h11(loop, sock, method, data, timeout)
    body = data[end + 4 :]
    while len(body) < length:
        more = await _recv(loop, sock, timeout)
        if not more:
            raise ConnectionResetError("the server closed the connection in its answer")
        body += more
    keep = version == b"HTTP/1.1" and len(body) == length
    for name, value in headers:
        if name == b"connection" and b"close" in value.lower():
            keep = False
    return Reply(status, headers, body, keep)


async def _reply_by_h11(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, method: str, data: bytes, timeout: float
) -> Reply:
    protocol = h11.Connection(h11.CLIENT)
    # h11 frames an answer by the request it answers: only the method matters here.
    protocol.send(
        h11.Request(method=method, target="/", headers=[("Host", "-"), ("Content-Length", "0")])
    )
    protocol.send(h11.EndOfMessage())
    protocol.receive_data(data)
    status, headers, body = 0, [], bytearray()
    while True:
        event = protocol.next_event()
        if event is h11.NEED_DATA:
            protocol.receive_data(await _recv(loop, sock, timeout))
        elif isinstance(event, h11.Response):
            status, headers = event.status_code, [(k.lower(), v) for k, v in event.headers]
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            reusable = (
                protocol.our_state is h11.DONE
                and protocol.their_state is h11.DONE
                and not protocol.trailing_data[0]
            )
            return Reply(status, headers, bytes(body), reusable)
        elif isinstance(event, h11.ConnectionClosed):
            raise ConnectionResetError("the server closed the connection before it answered")
