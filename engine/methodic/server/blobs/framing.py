"""HTTP/1.1 framing of one blob-listener connection: heads, bodies into buffers, deadlines.

A connection serves one request at a time: pipelined requests wait in the head buffer, and
once bytes arrive while a request is served the socket is not read until it is answered. A
head is framed here (it ends at its first blank line) and parsed by httptools; a body is
exactly ``Content-Length`` bytes, received with ``BufferedProtocol`` straight into reusable
~1 MiB buffers that a ``BodySink`` hashes and writes on a pool thread (a body of one buffer
at most is kept whole for one worker call: ``_receive_whole``). Every state has a deadline:
an idle keep-alive connection, a head that trickles in, a body that stops arriving, an answer
nobody reads. What a request does is the subclass's ``_serve`` (connection.py).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from methodic.server.blobs.server import BlobServer
from methodic.server.blobs.sink import BUFFERS_PER_BODY, BodySink
from methodic.server.blobs.wire import (
    HEAD_END,
    BadRequest,
    HeadParser,
    RequestHead,
    error_body,
    response_head,
)
from methodic.server.storage.base import Received, Upload

JSON = {"Content-Type": "application/json"}


class Lost(Exception):
    """The connection closed, or timed out, before the request was served."""


_HEAD, _BUSY, _BODY, _DISCARD, _LINGER, CLOSED = range(6)


@dataclass
class _Body:
    remaining: int
    done: asyncio.Future[None]  # every byte arrived (or the exception that ended the body)
    sink: BodySink | None = None  # None: a whole body, kept in its one buffer (_receive_whole)
    current: bytearray | None = None
    view: memoryview | None = None
    fill: int = 0
    in_sink: int = 0  # buffers handed to the sink and not taken back


def _done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
        future.exception()  # marked retrieved: the waiter may be gone already


class FramedConnection(asyncio.BufferedProtocol):
    """The transport side of a blob connection; subclasses serve the requests it frames."""

    def __init__(self, server: BlobServer) -> None:
        self.server = server
        self.limits = server.limits
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.state = _HEAD
        self.buf = bytearray(self.limits.max_head)
        self.view = memoryview(self.buf)
        self.start = 0  # unprocessed bytes are buf[start:fill]
        self.fill = 0
        self.scan = 0  # where the search for the end of the head resumes
        self.parser: HeadParser | None = None
        self.fed = 0  # end of the bytes fed to the parser
        self.body: _Body | None = None
        self.skip = 0  # body bytes of a refused request still to drop
        self.keep_alive = True  # of the request being served
        self.closing = False  # shutdown: answer the request in flight, then close
        self.reading = True
        self.writable: asyncio.Future[None] | None = None
        self.deadline: float | None = None
        self.timer: asyncio.TimerHandle | None = None

    # ---- asyncio callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.connections.add(self)
        self._arm(self.limits.idle_timeout)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.state == _BODY and self.body is not None:
            return self._body_buffer(self.body)
        if self.state == _DISCARD:
            return self.server.scratch[: self.skip]
        if self.state == _LINGER:
            return self.server.scratch
        if self.fill == len(self.buf):
            self._compact()
        if self.fill == len(self.buf):  # only if a read raced pause_reading(): give up
            self.state = _LINGER
            if self.transport is not None:
                self.transport.abort()
            return self.server.scratch
        return self.view[self.fill :]

    def buffer_updated(self, nbytes: int) -> None:
        state = self.state
        if state == _BODY and self.body is not None:
            self._body_received(self.body, nbytes)
        elif state == _DISCARD:
            self.skip -= nbytes
            self.deadline = self.loop.time() + self.limits.body_timeout
            if self.skip == 0:
                self._next_request()
        elif state in (_HEAD, _BUSY):
            self.fill += nbytes
            if state == _HEAD:
                self._read_heads()
            else:
                # Pipelined: kept until this request is answered, and nothing more read. Pausing
                # only then, not for every request, saves two epoll changes per request.
                self._pause()

    def eof_received(self) -> bool | None:
        return None  # close; a body cut short is abandoned in connection_lost

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = CLOSED
        self.deadline = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.server.connections.discard(self)
        if self.body is not None:
            _fail(self.body.done, Lost("the connection closed during the body"))
        if self.writable is not None:
            _fail(self.writable, Lost("the connection closed"))

    def pause_writing(self) -> None:
        if self.writable is None:
            self.writable = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.writable is not None:
            _done(self.writable)
            self.writable = None

    # ---- reading and deadlines ------------------------------------------------------------

    def _pause(self) -> None:
        if self.reading and self.transport is not None and not self.transport.is_closing():
            self.reading = False
            self.transport.pause_reading()

    def _resume(self) -> None:
        if not self.reading and self.transport is not None and not self.transport.is_closing():
            self.reading = True
            self.transport.resume_reading()

    def _arm(self, seconds: float | None) -> None:
        """Set this connection's one deadline (None: none). Pushing it later costs nothing."""
        if seconds is None:
            self.deadline = None
            return
        self.deadline = self.loop.time() + seconds
        if self.timer is None or self.timer.when() > self.deadline:
            if self.timer is not None:
                self.timer.cancel()
            self.timer = self.loop.call_at(self.deadline, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        if self.deadline is None or self.state == CLOSED:
            return
        if self.deadline > self.loop.time():
            self.timer = self.loop.call_at(self.deadline, self._on_timer)
            return
        self.deadline = None
        assert self.transport is not None
        if self.state == _HEAD and self.parser is not None:
            self._answer_and_close(408, "timeout", "the request head did not arrive in time")
        elif self.state == _BODY and self.body is not None:
            _fail(self.body.done, Lost("the body stopped arriving"))
            self.transport.abort()
        elif self.state == _LINGER or self.writable is not None:
            self.transport.abort()
        else:
            self.transport.close()  # idle keep-alive, or a refused body that stopped arriving

    # ---- heads ----------------------------------------------------------------------------

    def _compact(self) -> None:
        if self.start:
            n = self.fill - self.start
            self.buf[:n] = bytes(self.view[self.start : self.fill])
            self.fed = max(0, self.fed - self.start)
            self.scan = max(0, self.scan - self.start)
            self.start, self.fill = 0, n

    def _read_heads(self) -> None:
        """Frame and parse the buffered head; start serving it once it is complete."""
        while self.state == _HEAD:
            if self.start == self.fill:
                self.start = self.fill = self.scan = self.fed = 0
                if self.parser is None:
                    self._arm(self.limits.idle_timeout)
                return
            if self.parser is None:
                self.parser = HeadParser()
                self.fed = self.scan = self.start
                self._arm(self.limits.head_timeout)
            end = self.buf.find(HEAD_END, max(self.scan, self.start), self.fill)
            try:
                if end < 0:
                    self.parser.feed(self.view[self.fed : self.fill])  # garbage: 400 at once
                    self.fed = self.fill
                    self.scan = max(self.start, self.fill - len(HEAD_END) + 1)
                    if self.start == 0 and self.fill == len(self.buf):
                        message = f"the request head is over {self.limits.max_head} bytes"
                        self._answer_and_close(431, "headers_too_large", message)
                    return
                stop = end + len(HEAD_END)
                self.parser.feed(self.view[self.fed : stop])
                self.fed = self.scan = stop
                if not self.parser.complete:
                    continue  # blank lines before a request line
                head = self.parser.head()
            except BadRequest as exc:
                self._answer_and_close(400, "invalid_request", str(exc))
                return
            self.parser = None
            self.start = stop
            self.state = _BUSY  # the socket is paused only if bytes arrive meanwhile
            self._arm(None)
            self.server.track(self.loop.create_task(self._serve(head)))

    def _next_request(self) -> None:
        """The last request is answered: read the next one (it may be buffered already)."""
        if self.closing:
            self._close_after_answer()
            return
        self.state = _HEAD
        self._resume()
        self._read_heads()

    def _answer_and_close(self, status: int, code: str, message: str) -> None:
        """Answer from a loop callback (no request task), then close."""
        body = error_body(code, message)
        head = response_head(status, self.server.named(JSON), length=len(body), close=True)
        self._write(head + body)
        self._close_after_answer()

    def _close_after_answer(self) -> None:
        """Send what is written, then read and drop what still arrives for a while, and close.

        Closing with unread bytes in the socket would reset the connection, and the client
        might lose the answer.
        """
        assert self.transport is not None
        self.state = _LINGER
        self.parser = None
        if not self.transport.is_closing() and self.transport.can_write_eof():
            self.transport.write_eof()
        self._resume()
        self._arm(self.limits.linger)

    # ---- bodies ---------------------------------------------------------------------------

    def _body_buffer(self, body: _Body) -> memoryview:
        if body.current is None:
            body.current = self.server.buffers.take()
            body.view = memoryview(body.current)
            body.fill = 0
        assert body.view is not None
        return body.view[body.fill : body.fill + body.remaining]

    def _body_received(self, body: _Body, nbytes: int) -> None:
        body.fill += nbytes
        body.remaining -= nbytes
        self.deadline = self.loop.time() + self.limits.body_timeout
        if body.remaining and body.current is not None and body.fill < len(body.current):
            return
        if body.sink is not None:
            self._hand_off(body)
        if body.remaining == 0:
            self.state = _BUSY
            self._arm(None)
            _done(body.done)
        elif body.sink is None:
            raise AssertionError("a whole body is larger than its buffer")
        elif body.sink.failed is not None:
            self._sink_failed(body)
        elif body.in_sink >= BUFFERS_PER_BODY:
            self._collect(body)
            if body.in_sink >= BUFFERS_PER_BODY:  # the disk lags: stop reading until it catches up
                self._pause()
                self._arm(None)
                body.sink.wake_when(BUFFERS_PER_BODY // 2, lambda: self._caught_up(body))

    def _hand_off(self, body: _Body) -> None:
        assert body.sink is not None
        if body.current is None:
            return
        buffer, length = body.current, body.fill
        body.current = body.view = None
        if length == 0:
            self.server.buffers.give(buffer)
            return
        body.in_sink += 1
        body.sink.put(buffer, length)

    def _collect(self, body: _Body) -> None:
        """Take back the buffers the sink is done with."""
        assert body.sink is not None
        for buffer in body.sink.take_written():
            body.in_sink -= 1
            self.server.buffers.give(buffer)

    def _caught_up(self, body: _Body) -> None:
        if body is not self.body or self.state != _BODY:
            return
        assert body.sink is not None
        self._collect(body)
        if body.sink.failed is not None:
            self._sink_failed(body)
        else:
            self._resume()
            self._arm(self.limits.body_timeout)

    def _sink_failed(self, body: _Body) -> None:
        assert body.sink is not None and body.sink.failed is not None
        self.state = _BUSY  # the rest of the body is not read; the answer closes
        self._pause()
        self._arm(None)
        _fail(body.done, body.sink.failed)

    def _start_body(self, body: _Body) -> None:
        """Take the body bytes that arrived with the head, then read the rest."""
        self.body = body
        early = min(self.fill - self.start, body.remaining)
        if early:
            self._body_buffer(body)[:early] = self.view[self.start : self.start + early]
            self.start += early
            self._body_received(body, early)
        if body.remaining:
            self.state = _BODY
            self._resume()
            self._arm(self.limits.body_timeout)
        else:
            if body.sink is not None:
                self._hand_off(body)
            _done(body.done)

    def _drop_buffer(self, body: _Body) -> None:
        if body.current is not None:
            self.server.buffers.give(body.current)
            body.current = body.view = None

    async def _receive(self, upload: Upload, length: int) -> Received:
        """Receive ``length`` body bytes into ``upload``; raises Lost or the storage's error."""
        body = _Body(remaining=length, done=self.loop.create_future())
        body.sink = sink = BodySink(self.loop, self.server.pool, upload)
        try:
            self._start_body(body)
            await body.done
            return await sink.finish()
        except BaseException:
            await sink.abandon()
            raise
        finally:
            self.body = None
            self._collect(body)  # finished or abandoned: the sink holds none any more
            self._drop_buffer(body)

    async def _receive_whole(self, length: int) -> bytearray:
        """Receive a body of at most one buffer on the loop, with no thread hand-off: its
        bytes are ``buffer[:length]``; the caller gives the buffer back (``buffers.give``).
        Raises Lost."""
        assert length <= self.server.buffers.size
        body = _Body(remaining=length, done=self.loop.create_future())
        try:
            self._body_buffer(body)
            self._start_body(body)
            await body.done
            buffer, body.current, body.view = body.current, None, None
            assert buffer is not None
            return buffer
        finally:
            self.body = None
            self._drop_buffer(body)

    # ---- between requests -----------------------------------------------------------------

    async def _serve(self, head: RequestHead) -> None:
        """Answer one request, then ``_request_done``; runs as a task of its own."""
        raise NotImplementedError

    def _request_done(self, close: bool) -> None:
        """The request is answered: close, drop the rest of a refused body, or read the next."""
        if self.state == CLOSED:
            return
        if close or not self.keep_alive:
            self._close_after_answer()
            return
        self._skip_buffered()  # what arrived of a refused body while its answer was made
        if self.skip:
            self.state = _DISCARD
            self._resume()
            self._arm(self.limits.body_timeout)
        else:
            self._next_request()

    # ---- answers --------------------------------------------------------------------------

    def _drop_body(self, head: RequestHead, declared: int | None) -> bool:
        """A body that will not be read: drop a small one, else close (True) after the answer."""
        if not declared:
            return False
        if head.expects_continue or declared > self.limits.discard_limit:
            return True  # a client that waits for 100 sends no body (RFC 9110 10.1.1)
        self.skip = declared
        self._skip_buffered()
        return False

    def _skip_buffered(self) -> None:
        """Drop the buffered bytes of a refused body (``skip``: those still to drop)."""
        early = min(self.fill - self.start, self.skip)
        self.start += early
        self.skip -= early

    def _closes(self, close: bool) -> bool:
        return close or self.closing or not self.keep_alive

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def _drain(self) -> None:
        if self.writable is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self.writable), self.limits.send_timeout)
        except TimeoutError:
            assert self.transport is not None
            self.transport.abort()
            raise Lost("the client does not read its answers") from None

    # ---- shutdown -------------------------------------------------------------------------

    def shut(self) -> None:
        """Close now if idle; a request in flight gets its answer first."""
        self.closing = True
        if self.state == _HEAD and self.parser is None and self.start == self.fill:
            assert self.transport is not None
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
