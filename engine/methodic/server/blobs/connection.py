"""One blob-listener connection: what a presigned PUT, GET or HEAD does, and its answer.

Framing, bodies and deadlines are ``FramedConnection``'s (framing.py); what a request may do
is decided by the ``BlobService`` (service.py), whose blocking calls run on the listener's
pool threads. Downloads are sent with ``loop.sendfile``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any, BinaryIO, TypeVar

from methodic.server.blobs.framing import CLOSED, JSON, FramedConnection, Lost
from methodic.server.blobs.ledger import UploadSlot
from methodic.server.blobs.service import fault_error, split_blob_path, storage_failure
from methodic.server.blobs.wire import (
    BadRequest,
    RangeNotSatisfiable,
    RequestHead,
    byte_range,
    error_body,
    json_body,
    response_head,
)
from methodic.server.errors import APIError
from methodic.server.signing import CHECKSUM_HEADER, Grant
from methodic.server.storage.base import Received

log = logging.getLogger("methodic.server.blobserver")

T = TypeVar("T")
SENDFILE_CHUNK = 8 * 1024 * 1024  # the send deadline of a download applies per chunk


class BlobConnection(FramedConnection):
    """Serves presigned blob requests (``server.service`` decides what each may do)."""

    async def _serve(self, head: RequestHead) -> None:
        self.keep_alive = head.keep_alive
        close = True
        try:
            close = await self._dispatch(head)
        except Lost:
            pass
        except Exception:
            log.exception("blob request %s %s failed", head.method, head.path[:200])
            error = APIError(500, "internal", "internal server error; see the server's log")
            with contextlib.suppress(Lost):
                await self._answer(head, error, close=True)
        self._request_done(close)

    async def _dispatch(self, head: RequestHead) -> bool:
        """Serve one request; True when the connection closes after it."""
        try:
            declared = head.content_length()
        except BadRequest as exc:  # chunked: its body cannot be framed, so the answer closes
            status, code = (
                (411, "length_required") if head.method == "PUT" else (400, "invalid_request")
            )
            return await self._answer(head, APIError(status, code, str(exc)), close=True)
        if head.method == "PUT":
            return await self._put(head, declared)
        close = self._drop_body(head, declared)  # GET and HEAD take no body
        try:
            asset_id, path = split_blob_path(head.path)
            if head.method not in ("GET", "HEAD"):
                error = APIError(
                    405, "method_not_allowed", f"{head.method} is not allowed on a blob"
                )
                error.headers["Allow"] = "GET, HEAD, PUT"
                raise error
            return await self._get(head, asset_id, path, close)
        except APIError as exc:
            return await self._answer(head, exc, close=close)

    async def _put(self, head: RequestHead, declared: int | None) -> bool:
        service = self.server.service
        try:  # everything that can refuse the request before a byte of its body is read
            asset_id, path = split_blob_path(head.path)
            bound = (head.header(CHECKSUM_HEADER.encode("ascii")) or "").strip() or None
            grant = service.authorize("PUT", asset_id, path, head.query, bound)
            service.check_length(grant, declared)
            fault = service.take_fault()
            if fault is not None:
                raise fault_error(fault.status, fault.retry_after)
            assert grant.length is not None
            whole = grant.length <= self.server.buffers.size and not head.expects_continue
            if not whole:
                slot = await self._run(service.begin, grant)
        except APIError as exc:
            return await self._answer(head, exc, close=self._drop_body(head, declared))
        if whole:
            return await self._put_whole(head, grant)
        received: Received | None = None
        try:
            if head.expects_continue and grant.length:
                self._write(self.server.continue_head)
            try:
                received = await self._receive(slot.upload, grant.length)
            except OSError as exc:
                return await self._answer(head, storage_failure(exc, asset_id, path), close=True)
        finally:
            if received is None:
                await self._run(service.settle, slot, None)
        try:
            await self._run(service.settle, slot, received)
        except APIError as exc:  # the body was read: the connection stays usable
            return await self._answer(head, exc, close=False)
        return await self._stored(slot, received)

    async def _put_whole(self, head: RequestHead, grant: Grant) -> bool:
        """A body of at most one buffer: received on the loop, then checked, written and
        recorded in one worker call (``BlobService.put_whole``) instead of a hand-off each for
        begin, body and settle. Nothing is stored unless the ledger takes it, as on the
        streaming path; a refusal comes after the body, so the connection stays usable."""
        if grant.part is None:
            return await self._store_whole(head, grant)
        # Until its receipt is written, finalize says "upload in progress", as when streamed.
        with self.server.service.ledger.records.locks.arriving(grant.asset_id, grant.path):
            return await self._store_whole(head, grant)

    async def _store_whole(self, head: RequestHead, grant: Grant) -> bool:
        assert grant.length is not None
        buffer = await self._receive_whole(grant.length)
        try:
            slot, received = await self._run(
                self.server.service.put_whole, grant, memoryview(buffer)[: grant.length]
            )
        except APIError as exc:
            self.server.buffers.give(buffer)
            return await self._answer(head, exc, close=False)
        # Reused only once a worker is done with it: not when this task is cancelled.
        self.server.buffers.give(buffer)
        return await self._stored(slot, received)

    async def _stored(self, slot: UploadSlot, received: Received) -> bool:
        algorithm = slot.algorithm
        answer: dict[str, object] = {
            "size": received.size,
            "checksum": f"{algorithm}:{received.digest}",
            "bound": slot.checksum is not None,
        }
        if algorithm == "sha256":
            answer["sha256"] = received.digest
        return await self._send(201, {**JSON, "ETag": f'"{received.digest}"'}, json_body(answer))

    async def _get(self, head: RequestHead, asset_id: str, path: str, close: bool) -> bool:
        service = self.server.service
        service.authorize("GET", asset_id, path, head.query)  # HEAD takes the GET URL too
        file, component = await self._run(service.open, asset_id, path)
        with file:
            size = os.fstat(file.fileno()).st_size
            headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
            etag = component.checksum.partition(":")[2] if component.checksum else None
            if etag:
                headers["ETag"] = f'"{etag}"'
            try:
                wanted = byte_range(head.header(b"range"), size)
            except RangeNotSatisfiable:
                error = APIError(416, "range_not_satisfiable", f"the blob has {size} bytes")
                error.headers["Content-Range"] = f"bytes */{size}"
                return await self._answer(head, error, close=close)
            status, offset, count = 200, 0, size
            if wanted is not None:
                status, (offset, count) = 206, wanted
                headers["Content-Range"] = f"bytes {offset}-{offset + count - 1}/{size}"
            close = self._closes(close)
            self._write(
                response_head(status, self.server.named(headers), length=count, close=close)
            )
            if head.method == "GET" and count:
                await self._send_file(file, offset, count)
            else:
                await self._drain()
        return close

    async def _send_file(self, file: BinaryIO, offset: int, count: int) -> None:
        assert self.transport is not None
        end = offset + count
        while offset < end:
            if self.state == CLOSED:
                raise Lost("the connection closed during a download")
            n = min(SENDFILE_CHUNK, end - offset)
            try:
                sent = await asyncio.wait_for(
                    self.loop.sendfile(self.transport, file, offset, n), self.limits.send_timeout
                )
            except (TimeoutError, ConnectionError, RuntimeError) as exc:
                self.transport.abort()
                raise Lost("the download stopped") from exc
            if not sent:
                self.transport.abort()  # the file shrank: the promised length cannot be kept
                raise Lost("the blob file shrank while being sent")
            offset += sent

    # ---- answers --------------------------------------------------------------------------

    async def _answer(self, head: RequestHead, error: APIError, *, close: bool) -> bool:
        body = error_body(error.code, error.message, **error.extra)
        headers = {**JSON, **error.headers}
        if head.method != "HEAD":
            return await self._send(error.status, headers, body, close=close)
        close = self._closes(close)
        self._write(
            response_head(error.status, self.server.named(headers), length=len(body), close=close)
        )
        await self._drain()
        return close

    async def _send(
        self, status: int, headers: dict[str, str], body: bytes, *, close: bool = False
    ) -> bool:
        close = self._closes(close)
        self._write(
            response_head(status, self.server.named(headers), length=len(body), close=close) + body
        )
        await self._drain()
        return close

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.server.pool.run(self.loop, fn, *args)
