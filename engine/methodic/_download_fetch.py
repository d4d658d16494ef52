"""GET one byte range of a component into its partial file: retried, resumed, rate-limited.

The engine's retry policy applies to every GET: connection errors, stalls (no byte for the
client's ``stall_timeout``), 408, 429 and 5xx are retried with backoff and full jitter (a
``Retry-After`` is honoured); an expired or misdirected URL is presigned again. A cut transfer
resumes with ``Range`` from the byte it reached: every byte before it is written and hashed.
Bytes are written at their offset (``os.pwrite``), so ranges of one file arrive in parallel;
each chunk is hashed and written in one hop to a thread, so memory stays at a chunk per range.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import httpx

from methodic import _checksum as checksums
from methodic._bandwidth import TokenBucket
from methodic._download_plan import FilePlan, Span
from methodic._download_wire import Request, Stopped, Unsupported, Wire, direct
from methodic._errors import DownloadError
from methodic._retry import RetryPolicy
from methodic._transfer import CHUNK_SIZE, TransferError, _accepted

_CAUSES = {
    errno.ENOSPC: "disk_full",
    errno.EDQUOT: "disk_full",
    errno.EACCES: "permission",
    errno.EPERM: "permission",
    errno.EROFS: "permission",
    errno.ENAMETOOLONG: "name_too_long",
}


def disk_error(path: str, where: str, exc: OSError) -> DownloadError:
    """A typed error naming the file and the cause of a failed file operation."""
    cause = _CAUSES.get(exc.errno or 0, "filesystem")
    advice = {
        "disk_full": "free space there (or choose another destination) and download again; "
        "what was verified is kept",
        "permission": "make the destination writable (or choose another) and download again",
        "name_too_long": "this file system does not take a name that long; download to one "
        "that does (most take 255 bytes)",
    }.get(cause, "download again once it is fixed; what was verified is kept")
    return DownloadError(
        f"cannot download {path} into {where}: {exc.strerror or exc} ({cause.replace('_', ' ')}); "
        f"{advice}",
        path,
        cause,
    )


@dataclass
class Fetcher:
    """What every range fetch of one download shares."""

    http: httpx.AsyncClient
    retry: RetryPolicy
    bucket: TokenBucket
    dest: str
    urls: dict[str, str]
    refresh: Callable[[int], Awaitable[None]]  # presign again unless done since generation n
    on_bytes: Callable[[str, int], None]
    on_retry: Callable[[str, int, float, str], None]
    gate: asyncio.Event | None = None  # cleared: hold between chunks (paused)
    wire: Wire | None = None  # the plain-HTTP path in threads (None: httpx only)
    pool: Executor | None = None  # the threads of ``wire``
    generation: int = 0
    _directs: dict[str, bool] = field(default_factory=dict)

    async def fetch(self, f: FilePlan, span: Span, fd: int) -> None:
        """Write ``span`` of ``f`` into ``fd``, hashing it in order; retried until it is all
        there, or raise DownloadError naming the file and why."""
        end = span.offset + span.length
        failures = 0
        started = time.monotonic()
        while span.offset + span.got < end:
            generation = self.generation
            before = span.got
            try:
                url = self.urls[f.path]
                if self.wire is not None and self._direct(url):
                    await self._get_wire(f, span, fd, url)
                else:
                    await self._get(f, span, fd)
                continue
            except Unsupported:
                self.wire = None  # this server's answers need httpx: use it from now on
                continue
            except TransferError as exc:
                error: TransferError = exc
            if span.got > before:  # it moved: a new run of attempts
                failures, started = 0, time.monotonic()
            failures += 1
            transient = error.transient or error.expired or error.stale
            if (
                not transient
                or failures >= self.retry.max_attempts
                or time.monotonic() - started > self.retry.max_elapsed
            ):
                tried = f" after {failures} attempts" if transient else ""
                raise DownloadError(
                    f"download of {f.path} failed{tried}: {error}"
                    + ("" if transient else " (the server refused it)"),
                    f.path,
                    "network" if transient else "refused",
                ) from None
            delay = 0.0 if error.expired else self.retry.delay(failures, error.retry_after)
            self.on_retry(f.path, failures, delay, str(error))
            if delay:
                await asyncio.sleep(delay)
            if error.expired or error.stale:
                await self.refresh(generation)

    def _direct(self, url: str) -> bool:
        """``direct(url)``, asked once per scheme and host (reading the proxies is not free)."""
        key = url.split("/", 3)[:3]
        where = "/".join(key)
        known = self._directs.get(where)
        if known is None:
            known = self._directs[where] = direct(url)
        return known

    async def _get_wire(self, f: FilePlan, span: Span, fd: int, url: str) -> None:
        """The range on the thread path: socket, hash and pwrite in a thread, per 1 MiB."""
        assert self.wire is not None
        wire = self.wire
        loop = asyncio.get_running_loop()
        start = span.offset + span.got
        end = span.offset + span.length
        request = Request()
        gate, bucket, dest = self.gate, self.bucket, self.dest

        def sink(view: memoryview) -> None:  # in the thread
            if gate is not None and not gate.is_set():
                asyncio.run_coroutine_threadsafe(gate.wait(), loop).result()
            if bucket.rate:
                asyncio.run_coroutine_threadsafe(bucket.take(len(view)), loop).result()
            pos = span.offset + span.got
            if pos + len(view) > end:
                raise _too_much(f, start, end)
            try:
                _write_hashed(fd, view, pos, span.hashers)
            except OSError as exc:
                raise disk_error(f.path, dest, exc) from None
            span.got += len(view)
            loop.call_soon_threadsafe(self.on_bytes, f.path, len(view))

        future = loop.run_in_executor(self.pool, wire.get, url, start, end, sink, request)
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            request.abort()  # the thread stops at once; wait for it: it writes into ``fd``
            while not future.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({future})
            raise
        except Stopped:
            raise asyncio.CancelledError from None
        if span.offset + span.got < end:
            raise TransferError(
                f"the connection ended after {span.got} of {span.length} bytes", transient=True
            )

    async def _get(self, f: FilePlan, span: Span, fd: int) -> None:
        start = span.offset + span.got
        end = span.offset + span.length
        headers = {"Range": f"bytes={start}-{end - 1}"}
        try:
            async with self.http.stream("GET", self.urls[f.path], headers=headers) as response:
                if response.status_code >= 300:
                    await response.aread()
                    _accepted(response)  # raises TransferError with the server's words
                if response.status_code != 206 and not (start == 0 and end == f.size):
                    raise DownloadError(
                        f"download of {f.path}: the server ignored the byte range asked for "
                        f"(HTTP {response.status_code}); nothing of it was kept",
                        f.path,
                        "refused",
                    )
                if response.status_code == 206:
                    got = response.headers.get("content-range", "")
                    if not got.startswith(f"bytes {start}-"):
                        raise DownloadError(
                            f"download of {f.path}: the server sent the range {got!r}, "
                            f"not bytes {start}-{end - 1}; nothing of it was kept",
                            f.path,
                            "refused",
                        )
                async for chunk in response.aiter_bytes(CHUNK_SIZE):
                    pos = span.offset + span.got
                    if pos + len(chunk) > end:
                        raise _too_much(f, start, end)
                    if self.gate is not None:
                        await self.gate.wait()
                    await self.bucket.take(len(chunk))
                    try:
                        await asyncio.to_thread(_write_hashed, fd, chunk, pos, span.hashers)
                    except OSError as exc:
                        raise disk_error(f.path, self.dest, exc) from None
                    span.got += len(chunk)
                    self.on_bytes(f.path, len(chunk))
        except httpx.TransportError as exc:
            raise TransferError(
                f"{type(exc).__name__}: {exc or 'connection lost'}", transient=True, stale=True
            ) from exc
        if span.offset + span.got < end:
            raise TransferError(
                f"the connection ended after {span.got} of {span.length} bytes", transient=True
            )


def _too_much(f: FilePlan, start: int, end: int) -> DownloadError:
    return DownloadError(
        f"download of {f.path}: the server sent more than its {f.size} bytes (asked for "
        f"bytes {start}-{end - 1}); nothing of it was kept",
        f.path,
        "corrupt",
    )


def _write_hashed(
    fd: int, data: bytes | memoryview, offset: int, hashers: list[checksums.Hasher]
) -> None:
    for h in hashers:
        h.update(data)
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
