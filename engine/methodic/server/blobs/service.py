"""The blob data path's rules: what a presigned request may do, and what it records.

Transport-free. The asyncio listener (listener.py) parses HTTP and moves the bytes; this
module checks grants and lengths, picks injected faults, and wraps the blob ledger's calls
(ledger.py: ``begin_upload`` / ``complete_upload`` / ``end_upload`` / ``open_download``) that
every receiving storage backend shares. Presigned URLs name the listener's origin: see ``blob_origin``.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Mapping
from typing import BinaryIO
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from methodic.server.blobs.ledger import BlobLedger, UploadSlot
from methodic.server.config import ServerConfig
from methodic.server.errors import (
    APIError,
    disk_full,
    error_response,
    forbidden,
    invalid,
    not_found,
)
from methodic.server.fault_injection import Fault, FaultPlan
from methodic.server.signing import Grant, Signer, grant_from_query
from methodic.server.storage.base import Component, Received

log = logging.getLogger("methodic.server.blobs")

BLOB_PREFIX = "/blobs/"
# On every answer of the blob listener (the 100 Continue too): the id of the server answering,
# the ``sid`` of the URLs it issues.
SERVER_HEADER = "X-Methodic-Server-Id"


def blob_origin(config: ServerConfig, request_origin: str, blob_port: int | None) -> str:
    """The origin of presigned blob URLs, for a control request made to ``request_origin``.

    ``--public-blob-url`` if set; else ``--public-url`` (a reverse proxy that routes
    ``/blobs/`` to the blob port); else the scheme and host the client used, with the blob
    port (None: no listener, so the request's own origin).
    """
    if config.public_blob_url:
        return config.public_blob_url
    if config.public_url:
        return config.public_url
    parts = urlsplit(request_origin)
    if blob_port is None or not parts.hostname:
        return request_origin.rstrip("/")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}:{blob_port}"


def misdirected_route(blob_port: int | None) -> Route:
    """A control-port route for /blobs/: say where blob bytes go instead of a bare 404."""

    async def misdirected(request: Request) -> JSONResponse:
        if blob_port is None:  # e.g. S3 storage: clients PUT to the bucket
            message = "this server receives no blob bytes: use the presigned URLs it hands out"
        else:
            message = (
                f"blob bytes are served on port {blob_port}, not on the control API's port; "
                "behind a reverse proxy, route /blobs/ to it (see --public-blob-url)"
            )
        return error_response(421, "misdirected", message)

    methods = ["GET", "HEAD", "PUT", "POST", "DELETE"]
    return Route("/blobs/{rest:path}", misdirected, methods=methods, include_in_schema=False)


def split_blob_path(path: str) -> tuple[str, str]:
    """``/blobs/{asset_id}/{component path}`` -> (asset_id, component path). Raises APIError."""
    if path.startswith(BLOB_PREFIX):
        asset_id, _, component = path[len(BLOB_PREFIX) :].partition("/")
        if asset_id and component:
            return asset_id, component
    raise not_found(f"no blob at {path[:300]!r}; use a presigned URL")


def storage_failure(exc: OSError | sqlite3.Error, asset_id: str, path: str) -> APIError:
    if disk_full(exc):
        return APIError(507, "insufficient_storage", "the server's storage is full")
    log.error("storing %s/%s failed", asset_id, path, exc_info=exc)
    return APIError(500, "storage_error", "the server could not store the body")


class BlobService:
    def __init__(self, ledger: BlobLedger, signer: Signer, faults: FaultPlan | None = None) -> None:
        self.ledger = ledger
        self.signer = signer
        self.faults = faults

    def authorize(
        self,
        method: str,
        asset_id: str,
        path: str,
        query: Mapping[str, str],
        checksum: str | None = None,
    ) -> Grant:
        """The grant a presigned URL carries for ``method`` (PUT or GET). Raises APIError 403.

        ``checksum``: the request's ``x-methodic-checksum`` header (signed into a bound URL).
        """
        claimed = grant_from_query(method, asset_id, path, query, checksum)
        if claimed is None:
            raise forbidden("the presigned URL is malformed; presign again")
        grant, signature = claimed
        if grant.server is not None and grant.server != self.signer.server_id:
            raise APIError(
                421,
                "misdirected",
                f"this presigned URL was issued by Chronicle server {grant.server}, but this is "
                f"server {self.signer.server_id} (another server now listens at that address): "
                "presign again from the server that holds the asset; nothing was stored",
            )
        if (grant.length is None) != (method == "GET") or not self.signer.verify(grant, signature):
            raise forbidden(
                "the presigned URL's signature does not match (tampered, used for another "
                "method, asset, path or range, or sent with an x-methodic-checksum header other "
                "than the one it was presigned with); presign again"
            )
        if grant.expires < time.time():
            raise forbidden(f"the presigned URL expired at {grant.expires}; presign again")
        return grant

    @staticmethod
    def check_length(grant: Grant, declared: int | None) -> None:
        assert grant.length is not None
        if declared is None:
            raise APIError(
                411,
                "length_required",
                f"send Content-Length: {grant.length} (chunked bodies are not accepted)",
            )
        if declared != grant.length:
            raise invalid(
                f"Content-Length {declared} does not match the signed length {grant.length}"
            )

    def take_fault(self) -> Fault | None:
        return self.faults.take() if self.faults is not None else None

    # ---- blocking: call from a worker thread ----------------------------------------------

    def begin(self, grant: Grant) -> UploadSlot:
        try:
            return self.ledger.begin_upload(grant)
        except (OSError, sqlite3.Error) as exc:  # sqlite3: SQLITE_FULL is a 507 too
            raise storage_failure(exc, grant.asset_id, grant.path) from exc

    def settle(self, slot: UploadSlot, received: Received | None) -> None:
        """Record ``received`` (None: the body did not arrive) and release the slot."""
        try:
            if received is not None:
                self.ledger.complete_upload(slot, received)
        except (OSError, sqlite3.Error) as exc:  # sqlite3: SQLITE_FULL is a 507 too
            raise storage_failure(exc, slot.key.asset_id, slot.key.path) from exc
        finally:
            self.ledger.end_upload(slot)

    def put_whole(self, grant: Grant, body: memoryview) -> tuple[UploadSlot, Received]:
        """``begin``, the whole body hashed and written, and ``settle``, in one call."""
        slot = self.begin(grant)
        received: Received | None = None
        try:
            try:
                slot.upload.write(body)
                received = slot.upload.finish()
            except OSError as exc:
                raise storage_failure(exc, grant.asset_id, grant.path) from exc
        finally:
            if received is None:
                self.settle(slot, None)
        self.settle(slot, received)
        return slot, received

    def open(self, asset_id: str, path: str) -> tuple[BinaryIO, Component]:
        return self.ledger.open_download(asset_id, path)


def fault_error(status: int, retry_after: float | None) -> APIError:
    error = APIError(status, "injected_fault", f"injected fault {status} (test or demo)")
    if retry_after is not None:
        error.headers["Retry-After"] = f"{retry_after:g}"
    return error
