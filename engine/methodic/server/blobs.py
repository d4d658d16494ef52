"""The blob data path: presigned PUT and GET of component bytes.

Raw Starlette handlers (no FastAPI), kept apart from the control API because this is the
hot path and will move to a dedicated asyncio listener. A body is never held in memory:
it is read from ``request.stream()``, gathered into ~1 MiB batches and handed to a worker
thread (hash + write) while the next batch is being received. The signature and expiry
are checked before a byte of the body is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from collections.abc import AsyncIterator
from typing import BinaryIO

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from methodic.server.catalog import Catalog
from methodic.server.errors import APIError, api_error_response, error_response, forbidden
from methodic.server.faults import Fault, FaultPlan
from methodic.server.signing import Grant, Signer, grant_from_query
from methodic.server.storage import Received, Upload

log = logging.getLogger("methodic.server.blobs")

BATCH_BYTES = 1024 * 1024
BLOB_ROUTE = "/blobs/{asset_id}/{path:path}"


class _BodyLengthError(Exception):
    pass


def _write_batch(upload: Upload, chunks: list[bytes]) -> None:
    upload.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))


def _finish(upload: Upload, chunks: list[bytes]) -> Received:
    if chunks:
        _write_batch(upload, chunks)
    return upload.finish()


class BlobRoutes:
    def __init__(self, catalog: Catalog, signer: Signer, faults: FaultPlan | None = None) -> None:
        self.catalog = catalog
        self.signer = signer
        self.faults = faults

    def routes(self) -> list[Route]:
        return [
            Route(BLOB_ROUTE, self.put, methods=["PUT"], include_in_schema=False),
            Route(BLOB_ROUTE, self.get, methods=["GET"], include_in_schema=False),
        ]

    def _grant(self, request: Request, method: str) -> Grant:
        claimed = grant_from_query(
            method,
            request.path_params["asset_id"],
            request.path_params["path"],
            request.query_params,
        )
        if claimed is None:
            raise forbidden("the presigned URL is malformed; presign again")
        grant, signature = claimed
        if (grant.length is None) != (method == "GET") or not self.signer.verify(grant, signature):
            raise forbidden(
                "the presigned URL's signature does not match (tampered, or used for another "
                "method, asset, path or range); presign again"
            )
        if grant.expires < time.time():
            raise forbidden(f"the presigned URL expired at {grant.expires}; presign again")
        return grant

    async def put(self, request: Request) -> Response:
        try:
            grant = self._grant(request, "PUT")
            assert grant.length is not None
            declared = request.headers.get("content-length")
            if declared is None:
                return error_response(
                    411,
                    "length_required",
                    f"send Content-Length: {grant.length} (chunked bodies are not accepted)",
                )
            if not declared.isdigit() or int(declared) != grant.length:
                return error_response(
                    400,
                    "invalid_request",
                    f"Content-Length {declared[:40]} does not match the signed length {grant.length}",
                )
            if self.faults is not None and (fault := self.faults.take()) is not None:
                return await _injected(request, fault)
            slot = await asyncio.to_thread(self.catalog.begin_upload, grant)
        except APIError as exc:
            return api_error_response(exc)
        except OSError as exc:
            return _storage_error(exc, grant)
        try:
            received = await self._receive(request, slot.upload, grant.length)
            await asyncio.to_thread(self.catalog.complete_upload, slot, received)
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is left to read it
        except _BodyLengthError as exc:
            return error_response(400, "invalid_request", str(exc))
        except APIError as exc:
            return api_error_response(exc)
        except OSError as exc:
            return _storage_error(exc, grant)
        finally:
            # Shielded: the slot is released even if this request is cancelled at shutdown.
            await asyncio.shield(asyncio.to_thread(self.catalog.end_upload, slot))
        return JSONResponse(
            {"size": received.size, "sha256": received.sha256},
            status_code=201,
            headers={"ETag": f'"{received.sha256}"'},
        )

    async def _receive(self, request: Request, upload: Upload, length: int) -> Received:
        chunks: list[bytes] = []
        batched = 0
        received = 0
        writing: asyncio.Future[None] | None = None
        try:
            async for chunk in request.stream():
                if not chunk:
                    continue
                received += len(chunk)
                if received > length:
                    raise _BodyLengthError(f"the body is longer than the signed length {length}")
                chunks.append(chunk)
                batched += len(chunk)
                if batched >= BATCH_BYTES:
                    if writing is not None:
                        await asyncio.shield(writing)
                    writing = asyncio.ensure_future(asyncio.to_thread(_write_batch, upload, chunks))
                    chunks, batched = [], 0
            if writing is not None:
                await asyncio.shield(writing)
                writing = None
            if received != length:
                raise _BodyLengthError(
                    f"the body has {received} bytes, the signed length is {length}"
                )
            try:
                return await asyncio.to_thread(_finish, upload, chunks)
            except ValueError as exc:
                raise _BodyLengthError(str(exc)) from exc
        finally:
            if writing is not None:
                # Collect the outcome of a write still running; the upload's own lock keeps
                # the release in end_upload() from closing its file under it.
                with contextlib.suppress(Exception):
                    await asyncio.shield(writing)

    async def get(self, request: Request) -> Response:
        try:
            grant = self._grant(request, "GET")
            file, component = await asyncio.to_thread(
                self.catalog.open_download, grant.asset_id, grant.path
            )
        except APIError as exc:
            return api_error_response(exc)
        headers = {"Content-Length": str(component.size)}
        if component.stored_sha256:
            headers["ETag"] = f'"{component.stored_sha256}"'
        return StreamingResponse(
            _file_chunks(file), headers=headers, media_type="application/octet-stream"
        )


async def _injected(request: Request, fault: Fault) -> Response:
    async for _ in request.stream():  # read the body so the client sees the answer
        pass
    headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else None
    return error_response(fault.status, "injected_fault",
                          f"injected fault {fault.status} (test or demo)", headers)


def _storage_error(exc: OSError, grant: Grant) -> Response:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return error_response(507, "insufficient_storage", "the server's storage is full")
    log.error("storing %s/%s failed", grant.asset_id, grant.path, exc_info=exc)
    return error_response(500, "storage_error", "the server could not store the body")


async def _file_chunks(file: BinaryIO) -> AsyncIterator[bytes]:
    try:
        while chunk := await asyncio.to_thread(file.read, BATCH_BYTES):
            yield chunk
    finally:
        file.close()
