"""PUT a byte range of a file over plain HTTP/1.1 with the body sent by sendfile(2).

The body never passes through Python on its way out: sendfile(2) moves it from the page cache
to the socket a slice at a time, and no per-chunk objects are made (the range's digest was
computed before the target was presigned, and the receiver checks the body against it). The request head and the response are handled by h11. This path serves
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
from dataclasses import dataclass, field
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


@dataclass
class _Connection:
    sock: socket.socket
    protocol: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))

    def alive(self) -> bool:
        """An idle connection the server has not closed (nor sent anything unasked on)."""
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False  # closed (b""), or bytes nobody asked for


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
        """Keep the connection for the next request if HTTP allows it, else close it."""
        protocol = conn.protocol
        idle = self._idle.setdefault((host, port), [])
        if (
            protocol.our_state is h11.DONE
            and protocol.their_state is h11.DONE
            and len(idle) < IDLE_PER_HOST
        ):
            protocol.start_next_cycle()
            idle.append(conn)
        else:
            conn.sock.close()

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.sock.close()
        self._idle.clear()


class _Length:
    """Stands for ``n`` body bytes sent behind h11's back (h11 only counts them)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def _request(target: UploadTarget) -> tuple[str, int, h11.Request]:
    url = urlsplit(target.url)
    path = url.path + (f"?{url.query}" if url.query else "")
    headers = [
        ("Host", url.netloc),
        ("User-Agent", USER_AGENT),
        ("Content-Length", str(target.length)),
        *target.headers.items(),
    ]
    request = h11.Request(method=target.method, target=path, headers=headers)
    return url.hostname or "", url.port or 80, request


async def put_file_range(
    connections: Connections,
    target: UploadTarget,
    f: BinaryIO,
    bucket: TokenBucket,
    on_bytes: Callable[[int], None],
    timeout: float,
) -> httpx.Response:
    """PUT the target's range of ``f``; the server's response.

    Raises ``SendError`` when the connection fails before a response arrives, ``EOFError``
    when the file is shorter than the range. ``on_bytes`` hears of each slice sent.
    """
    host, port, request = _request(target)
    loop = asyncio.get_running_loop()

    async def send(conn: _Connection, moved: list[int]) -> None:
        def counted(n: int) -> None:
            moved[0] += n
            on_bytes(n)

        await loop.sock_sendall(conn.sock, conn.protocol.send(request))
        offset, remaining = target.offset, target.length
        while remaining:
            n = min(_slice(bucket), remaining)
            await bucket.take(n)
            conn.protocol.send_with_data_passthrough(h11.Data(data=_Length(n)))  # type: ignore[arg-type]
            await _sendfile(conn.sock, f.fileno(), offset, n, timeout, counted)
            offset, remaining = offset + n, remaining - n
            await asyncio.sleep(0)  # a fast receiver never makes this wait: let others run
        conn.protocol.send(h11.EndOfMessage())

    return await _put(connections, host, port, send, timeout)


async def put_body(
    connections: Connections, target: UploadTarget, body: bytes, timeout: float
) -> httpx.Response:
    """PUT a small body already read into memory: the request head and the body go out in one
    write on a kept-alive connection (a small file costs one send and one receive, not an
    httpx request). Raises ``SendError`` as ``put_file_range`` does."""
    host, port, request = _request(target)
    loop = asyncio.get_running_loop()

    async def send(conn: _Connection, moved: list[int]) -> None:
        protocol = conn.protocol
        wire = (protocol.send(request) or b"") + body
        protocol.send_with_data_passthrough(h11.Data(data=_Length(len(body))))  # type: ignore[arg-type]
        protocol.send(h11.EndOfMessage())
        try:
            done = conn.sock.send(wire)
        except BlockingIOError:
            done = 0
        if done < len(wire):  # the socket's buffer is full: wait for room, not forever
            async with asyncio.timeout(timeout):
                await loop.sock_sendall(conn.sock, memoryview(wire)[done:])

    return await _put(connections, host, port, send, timeout)


async def _put(
    connections: Connections,
    host: str,
    port: int,
    send: Callable[[_Connection, list[int]], Awaitable[None]],
    timeout: float,
) -> httpx.Response:
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
                response = await _response(conn, timeout)
            except (OSError, TimeoutError, h11.ProtocolError) as exc:
                raise SendError(_describe(failure or exc, timeout)) from exc
            if failure is None and response.status_code < 300:
                connections.release(host, port, conn)
            else:
                conn.sock.close()
            return response
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


async def _response(conn: _Connection, timeout: float) -> httpx.Response:
    loop = asyncio.get_running_loop()
    protocol = conn.protocol
    status, headers, body = 0, [], bytearray()
    while True:
        event = protocol.next_event()
        if event is h11.NEED_DATA:
            protocol.receive_data(await _recv(loop, conn.sock, timeout))
        elif isinstance(event, h11.Response):
            status, headers = (
                event.status_code,
                [(k.decode(), v.decode("latin-1")) for k, v in event.headers],
            )
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return httpx.Response(status, headers=headers, content=bytes(body))
        elif isinstance(event, h11.ConnectionClosed):
            raise ConnectionResetError("the server closed the connection before it answered")
