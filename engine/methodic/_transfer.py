"""Sending one byte range of a file to a presigned target: streamed and rate-limited.

The range's digest was computed before its target was presigned and is bound into it: the
receiver refuses a body with another digest (``TransferError.mismatch``), so nothing here hashes.
"""

from __future__ import annotations

import asyncio
import os
import re
import urllib.request
from collections.abc import AsyncIterator, Callable
from typing import BinaryIO, NamedTuple

import httpx

from methodic._api import error_message
from methodic._bandwidth import TokenBucket
from methodic._retry import is_transient_status, retry_after_seconds
from methodic._sendfile import Connections, Reply, SendError, put_body, put_file_range
from methodic._types import UploadTarget

CHUNK_SIZE = 1 << 20
MISDIRECTED = 421
_S3_CODE = re.compile(r"<Code>([A-Za-z]+)</Code>")
# Answers of S3 (and S3-compatible stores) that mean "presign again": real S3 answers an
# expired session token with 400, rclone an expired presigned URL with 400; NoSuchUpload: the
# server aborted the multipart upload the URL was for (a finalize that forgot a damaged file).
_EXPIRED_CODES = {"ExpiredToken", "TokenRefreshRequired", "RequestExpired", "NoSuchUpload"}
_TRANSIENT_CODES = {"RequestTimeout", "SlowDown", "InternalError", "RequestTimeTooSkewed"}
_MISMATCH_CODES = {"checksum_mismatch", "BadDigest", "XAmzContentChecksumMismatch", "InvalidDigest"}


class FileChangedError(Exception):
    """The local file is not what was registered: sending it would upload a torn checkpoint."""


class TransferError(Exception):
    """A PUT that did not succeed. ``transient`` says whether trying again may help."""

    def __init__(
        self,
        message: str,
        *,
        transient: bool,
        expired: bool = False,
        stale: bool = False,
        mismatch: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.transient = transient
        self.expired = expired
        # The receiver found another digest than the one bound into the target: the file's
        # bytes changed since they were hashed (or were damaged on the way); hash them again.
        self.mismatch = mismatch
        # The target may no longer lead to the server that signed it (connection failed, 421):
        # the next attempt presigns again instead of trusting a cached URL.
        self.stale = stale
        self.retry_after = retry_after


class FileIdentity(NamedTuple):
    """What a file looked like when it was registered. ``ctime_ns`` catches a rewrite whose
    mtime was put back (``os.utime`` cannot set it); inode and device catch a replacement.

    A named tuple rather than a frozen dataclass: as immutable, and one is built per file of
    a registration in a third of the time."""

    local_path: str
    size: int
    mtime_ns: int | None
    inode: int | None
    ctime_ns: int | None = None
    device: int | None = None

    def check(self) -> None:
        try:
            st = os.stat(self.local_path)
        except FileNotFoundError:
            raise FileChangedError(
                f"{self.local_path} vanished after it was registered; restore it, or discard the asset"
            ) from None
        changes = []
        if st.st_size != self.size:
            changes.append(f"size {self.size} -> {st.st_size}")
        if self.mtime_ns is not None and st.st_mtime_ns != self.mtime_ns:
            changes.append("modification time")
        if self.ctime_ns is not None and st.st_ctime_ns != self.ctime_ns:
            changes.append("change time (rewritten)")
        if (self.inode is not None and st.st_ino != self.inode) or (
            self.device is not None and st.st_dev != self.device
        ):
            changes.append("inode (replaced)")
        if changes:
            raise FileChangedError(
                f"{self.local_path} changed after it was registered ({', '.join(changes)}); "
                "a checkpoint must not change while it uploads: discard this asset and register "
                "the directory again once it is complete"
            )


async def send_range(
    http: httpx.AsyncClient,
    target: UploadTarget,
    identity: FileIdentity,
    bucket: TokenBucket,
    on_bytes: Callable[[int], None],
    connections: Connections | None = None,
    *,
    body: bytes | None = None,
) -> str | None:
    """PUT ``target.length`` bytes of the file from ``target.offset``; return the ETag.

    ``on_bytes`` is told of every chunk handed to the connection, and of the negative total if
    the attempt fails, so progress never counts bytes that did not arrive. With
    ``connections``, bodies to plain-HTTP targets without a proxy go out by sendfile. ``body``:
    the range's bytes, read when its digest was computed (a small range), sent as they are.
    """
    direct = connections is not None and _direct(target.url)
    small = target.length <= CHUNK_SIZE
    if small and (body is not None or not direct):
        return await _send_small(http, target, identity, bucket, on_bytes, connections, body)
    identity.check()
    sent = 0

    def counted(n: int) -> None:
        nonlocal sent
        sent += n
        on_bytes(n)

    # A small range not kept from its hashing goes by sendfile too (no thread hop to read it,
    # no copy): opened here, as the stat just above ran here.
    path = identity.local_path
    f = open(path, "rb") if small else await asyncio.to_thread(open, path, "rb")  # noqa: SIM115
    try:
        try:
            if connections is not None and direct:
                etag = await _put_by_sendfile(
                    connections, http.timeout.write or 60.0, target, f, bucket, counted
                )
            else:
                etag = await _put(http, target, _streamed(f, target, bucket, counted))
        except EOFError:
            raise FileChangedError(
                f"{identity.local_path} shrank while it was being sent"
            ) from None
        identity.check()
        return etag
    except BaseException:
        if sent:
            on_bytes(-sent)
        raise
    finally:
        if small:
            f.close()
        else:
            await asyncio.to_thread(f.close)


async def _streamed(
    f: BinaryIO,
    target: UploadTarget,
    bucket: TokenBucket,
    counted: Callable[[int], None],
) -> AsyncIterator[bytes]:
    """The range in 1 MiB chunks, each read in a thread (the httpx path)."""
    await asyncio.to_thread(f.seek, target.offset)
    remaining = target.length
    while remaining > 0:
        n = min(CHUNK_SIZE, remaining)
        await bucket.take(n)
        chunk = await asyncio.to_thread(f.read, n)
        if not chunk:
            raise EOFError
        remaining -= len(chunk)
        yield chunk
        counted(len(chunk))


_PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY")
_direct_seen: dict[tuple[str, tuple[str | None, ...]], bool] = {}


def _direct(url: str) -> bool:
    """A plain-HTTP URL that no proxy of the environment applies to (httpx reads the same).

    Remembered per origin and proxy settings: a small file must not pay a scan of the whole
    environment (``getproxies``) and a URL parse each."""
    scheme, _, rest = url.partition("://")
    key = (scheme + "://" + rest.partition("/")[0], tuple(map(os.environ.get, _PROXY_VARIABLES)))
    if (known := _direct_seen.get(key)) is not None:
        return known
    if len(_direct_seen) > 64:
        _direct_seen.clear()
    _direct_seen[key] = direct = _direct_uncached(url)
    return direct


def _direct_uncached(url: str) -> bool:
    parts = httpx.URL(url)
    if parts.scheme != "http":
        return False
    proxies = urllib.request.getproxies()
    if not (proxies.get("http") or proxies.get("all")):
        return True
    return bool(urllib.request.proxy_bypass(parts.host))


async def _put_by_sendfile(
    connections: Connections,
    timeout: float,
    target: UploadTarget,
    f: BinaryIO,
    bucket: TokenBucket,
    counted: Callable[[int], None],
) -> str | None:
    try:
        reply = await put_file_range(connections, target, f, bucket, counted, timeout)
    except SendError as exc:
        raise TransferError(str(exc), transient=True, stale=True) from exc
    return _replied(reply)


def _read_slice(identity: FileIdentity, offset: int, length: int) -> bytes:
    identity.check()
    with open(identity.local_path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise FileChangedError(f"{identity.local_path} shrank while it was being sent")
    return data


async def _send_small(
    http: httpx.AsyncClient,
    target: UploadTarget,
    identity: FileIdentity,
    bucket: TokenBucket,
    on_bytes: Callable[[int], None],
    connections: Connections | None,
    body: bytes | None,
) -> str | None:
    """One chunk or less: a single thread hop reads it, and the body goes out as bytes, in one
    write with its request head on a kept-alive connection where the sendfile path applies."""
    await bucket.take(target.length)
    if body is not None and len(body) == target.length:
        identity.check()  # not sent if the file changed since (a stat, as after the send)
        data = body
    else:
        data = await asyncio.to_thread(_read_slice, identity, target.offset, target.length)
    on_bytes(len(data))
    try:
        if connections is not None and _direct(target.url):
            try:
                reply = await put_body(connections, target, data, http.timeout.write or 60.0)
            except SendError as exc:
                raise TransferError(str(exc), transient=True, stale=True) from exc
            etag = _replied(reply)
        else:
            etag = await _put(http, target, data)
        identity.check()
        return etag
    except BaseException:
        on_bytes(-len(data))
        raise


async def _put(
    http: httpx.AsyncClient, target: UploadTarget, content: bytes | AsyncIterator[bytes]
) -> str | None:
    headers = {**target.headers, "Content-Length": str(target.length)}
    try:
        response = await http.request(target.method, target.url, content=content, headers=headers)
    except httpx.TransportError as exc:
        raise TransferError(
            f"{type(exc).__name__}: {exc or 'connection lost'}", transient=True, stale=True
        ) from exc
    return _accepted(response)


def _replied(reply: Reply) -> str | None:
    """``_accepted`` for an answer of the sendfile path: a 2xx costs no ``httpx.Response``."""
    if reply.status < 300:
        return reply.header(b"etag")
    return _accepted(reply.response())


def _accepted(response: httpx.Response) -> str | None:
    """The ETag of a 2xx answer; any other answer raises TransferError with the server's words."""
    status = response.status_code
    if status >= 300:
        code, message, _ = error_message(response)
        if not code and (found := _S3_CODE.search(message)):
            code = found.group(1)
        # 421 Misdirected Request: the URL reached a listener that did not sign it (the server
        # moved, e.g. to another blob port after a restart). Presigning again finds it.
        misdirected = status == MISDIRECTED
        mismatch = code in _MISMATCH_CODES
        expired = code in _EXPIRED_CODES or (status in (400, 403) and "expired" in message.lower())
        raise TransferError(
            f"HTTP {status}: {message}",
            transient=misdirected
            or mismatch
            or code in _TRANSIENT_CODES
            or is_transient_status(status),
            expired=expired,
            stale=misdirected,
            mismatch=mismatch,
            retry_after=retry_after_seconds(response),
        )
    etag: str | None = response.headers.get("etag")
    return etag
