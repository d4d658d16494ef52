"""Downloading a finalized asset: retried, resumable, verified, atomic per file.

Every component is fetched into ``DEST/.methodic-download/`` under a short name (see
``_download_state``), in ranges fetched in parallel (``_download_plan``, ``_download_fetch``),
verified against its published checksum from its ranges' digests, and only then renamed to its
final name. A file already at its final name that has the published bytes is kept; one that
does not is replaced, once the download of it is verified. The first failure stops every
other transfer at once and raises a ``DownloadError`` naming the file and the cause; what was
verified stays, so a second call fetches only the rest.

Nothing is written outside the destination: the manifest's paths are checked before any byte
is written (relative, no ``..``, no duplicates, no path that is both a file and a directory),
and every directory below the destination is walked by file descriptor without following a
symlink, so a link already inside the destination cannot lead out of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import httpx

from methodic import _checksum as checksums
from methodic._api import ApiClient, DownloadTarget
from methodic._bandwidth import TokenBucket
from methodic._download_fetch import Fetcher, disk_error
from methodic._download_plan import FilePlan, Span, plan
from methodic._download_state import SideDir, final_is_verified, short_name
from methodic._download_wire import Wire
from methodic._errors import ChronicleError, DownloadError, InvalidInputError
from methodic._paths import component_path_problem
from methodic._retry import RetryPolicy
from methodic._scan import matches

T = TypeVar("T")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


class DownloadWatcher(Protocol):
    """What a UI learns of a download (never per chunk for the events it makes of them)."""

    def planned(self, files: Sequence[tuple[str, int, int]]) -> None:
        """Every chosen file as (path, size, bytes already verified here), before any GET."""

    def moved(self, path: str, n: int) -> None:
        """``n`` more bytes of ``path`` arrived (written and hashed)."""

    def file_state(self, path: str, state: str, error: str | None = None) -> None:
        """``path`` is "downloading", "completed" (verified, under its final name) or "failed"."""

    def retrying(self, path: str, attempt: int, delay: float, cause: str) -> None:
        """A GET of ``path`` failed and is tried again after ``delay`` seconds."""


class _Quiet:
    def planned(self, files: Sequence[tuple[str, int, int]]) -> None:
        pass

    def moved(self, path: str, n: int) -> None:
        pass

    def file_state(self, path: str, state: str, error: str | None = None) -> None:
        pass

    def retrying(self, path: str, attempt: int, delay: float, cause: str) -> None:
        pass


@dataclass(eq=False)
class _File:
    plan: FilePlan
    digests: dict[int, str] = field(default_factory=dict)  # span offset -> digest, verified
    left: int = 0  # spans not yet fetched
    fd: int | None = None
    recorded: bool = False  # a record of its verified spans is on disk: keep its partial
    whole_sha256: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


async def download_asset(
    api: ApiClient,
    http: httpx.AsyncClient,
    asset_id: str,
    dest: Path,
    *,
    concurrency: int,
    retry: RetryPolicy | None = None,
    bucket: TokenBucket | None = None,
    include: str | Sequence[str] | None = None,
    watcher: DownloadWatcher | None = None,
    gate: asyncio.Event | None = None,
) -> Path:
    """Write a verified, byte-identical copy of a finalized asset (or of the components that
    ``include`` chooses) under ``dest``; returns ``dest``."""
    targets = await api.download_targets(asset_id)
    check_manifest(asset_id, [t.path for t in targets])
    chosen = select(asset_id, targets, include)
    try:
        await asyncio.to_thread(dest.mkdir, parents=True, exist_ok=True)
    except OSError as exc:
        raise disk_error("the destination", str(dest), exc) from None
    job = _Download(api, asset_id, dest, concurrency, watcher or _Quiet())
    job.fetcher = Fetcher(
        http,
        retry or RetryPolicy(),
        bucket or TokenBucket(None),
        str(dest),
        {t.path: t.url for t in chosen},
        job.refresh,
        job.watcher.moved,
        job.watcher.retrying,
        gate,
    )
    timeout = http.timeout
    wire = Wire(timeout.read or 60.0, timeout.connect or 15.0)
    threads = ThreadPoolExecutor(max(concurrency, 1), thread_name_prefix="methodic-download")
    job.fetcher.wire, job.fetcher.pool = wire, threads
    try:
        await job.run([plan(t) for t in chosen])
    finally:
        threads.shutdown(wait=False)  # every GET in it has ended (each is awaited to its end)
        wire.close()
    return dest


async def _to_its_end(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` in a thread, run to its end: a cancel waits for it (it opens, closes or
    renames files the cleanup then sees as they are), then propagates."""
    future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        while not future.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({future})
        raise


def select(
    asset_id: str, targets: Sequence[DownloadTarget], include: str | Sequence[str] | None
) -> list[DownloadTarget]:
    """The components ``include`` chooses (globs relative to the asset's root; a pattern
    without ``/`` matches a name at any depth); all of them when it is None."""
    if include is None:
        return list(targets)
    patterns = [include] if isinstance(include, str) else list(include)
    chosen = [t for t in targets if matches(t.path, patterns)]
    if not chosen:
        some = ", ".join(t.path for t in targets[:3]) + (", ..." if len(targets) > 3 else "")
        raise InvalidInputError(
            f"no component of asset {asset_id} matches {', '.join(patterns)} "
            f"(it has {len(targets)}: {some}); nothing was downloaded"
        )
    return chosen


class _Download:
    fetcher: Fetcher

    def __init__(
        self,
        api: ApiClient,
        asset_id: str,
        dest: Path,
        concurrency: int,
        watcher: DownloadWatcher,
    ) -> None:
        self.api = api
        self.asset_id = asset_id
        self.dest = dest
        self.concurrency = max(concurrency, 1)
        self.watcher = watcher
        self.jobs: deque[tuple[_File, Span]] = deque()
        self.files: list[_File] = []
        self._refreshing = asyncio.Lock()
        self._slots = asyncio.Semaphore(self.concurrency)  # GETs in flight
        self._dest_fd = -1
        self._side: SideDir | None = None
        self._renamed_in: set[str] = set()  # directories (relative to dest) files went into

    @property
    def side(self) -> SideDir:
        assert self._side is not None
        return self._side

    async def refresh(self, generation: int) -> None:
        """Presign every GET again, unless another range did since ``generation``."""
        async with self._refreshing:
            if self.fetcher.generation != generation:
                return
            fresh = await self.api.download_targets(self.asset_id)
            self.fetcher.urls.update({t.path: t.url for t in fresh if t.path in self.fetcher.urls})
            self.fetcher.generation += 1

    async def run(self, plans: list[FilePlan]) -> None:
        ok = False
        try:
            await asyncio.to_thread(self._survey, plans)
            self.watcher.planned(
                [
                    (
                        f.plan.path,
                        f.plan.size,
                        sum(s.length for s in f.plan.spans if s.offset in f.digests),
                    )
                    for f in self.files
                ]
            )
            for f in self.files:
                if f.left == 0:  # every range verified by an earlier call
                    await self._finish(f)
            await self._work()
            await asyncio.to_thread(self._sync_dirs)
            ok = True
        finally:
            await asyncio.to_thread(self._close, ok)

    def _survey(self, plans: list[FilePlan]) -> None:
        """Open the destination; keep what is already there and verified (blocking)."""
        try:
            self._dest_fd = os.open(self.dest, _DIR_FLAGS & ~os.O_NOFOLLOW)
            self._side = SideDir(self._dest_fd)
        except OSError as exc:
            raise disk_error("the destination", str(self.dest), exc) from None
        for p in plans:
            try:
                parent = _open_parent(self.dest, p.path)
            except OSError as exc:
                raise disk_error(p.path, str(self.dest), exc) from None
            try:
                if final_is_verified(parent, p.path.rsplit("/", 1)[-1], p):
                    self.side.forget(p)
                    continue
            except OSError as exc:
                raise disk_error(p.path, str(self.dest), exc) from None
            finally:
                os.close(parent)
            f = _File(p, self.side.verified_ranges(p))
            f.recorded = bool(f.digests)
            for span in p.spans:
                if span.offset not in f.digests:
                    self.jobs.append((f, span))
                    f.left += 1
            self.files.append(f)

    async def _work(self) -> None:
        tasks = [
            asyncio.create_task(self._worker(), name=f"methodic-download-{i}")
            # Twice as many workers as transfers: while one opens or renames a file (a hop to
            # a thread), another's GET keeps the connection busy. GETs hold a slot.
            for i in range(min(2 * self.concurrency, len(self.jobs)))
        ]
        if not tasks:
            return
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for t in tasks:
            if t in done and not t.cancelled() and (exc := t.exception()) is not None:
                raise exc

    async def _worker(self) -> None:
        while self.jobs:
            f, span = self.jobs.popleft()
            try:
                await self._fetch(f, span)
            except DownloadError as exc:
                self.watcher.file_state(f.plan.path, "failed", str(exc))
                raise
            except OSError as exc:
                error = disk_error(f.plan.path, str(self.dest), exc)
                self.watcher.file_state(f.plan.path, "failed", str(error))
                raise error from exc

    async def _fetch(self, f: _File, span: Span) -> None:
        p = f.plan
        async with f.lock:
            if f.fd is None:

                def open_it() -> None:  # sets f.fd in the thread: a cancel cannot lose it
                    f.fd = self.side.open_partial(p)

                await _to_its_end(open_it)
                self.watcher.file_state(p.path, "downloading")
            fd = f.fd
        assert fd is not None
        span.got = 0
        span.hashers = p.new_hashers(span)
        if span.length:
            async with self._slots:
                await self.fetcher.fetch(p, span, fd)
        index = 0
        if p.algorithm is not None:
            f.digests[span.offset] = span.hashers[0].hexdigest()
            index = 1
        if p.sha256 is not None and not p.read_back:
            f.whole_sha256 = span.hashers[index].hexdigest()
        span.hashers = []
        f.left -= 1
        if f.left == 0:  # this worker fetched its last range: only it finishes the file
            await self._finish(f)
        elif len(p.spans) > 1:
            async with f.lock:
                if f.fd is not None:  # not finished meanwhile
                    await asyncio.to_thread(self.side.save, p, dict(f.digests))
                    f.recorded = True

    async def _finish(self, f: _File) -> None:
        """Verify ``f`` from its ranges' digests; then, only then, give it its final name."""
        async with f.lock:  # after a record being saved: this one drops it
            fd, f.fd = f.fd, None
            problem = await _to_its_end(self._settle, f, fd)  # one hop per file
            f.recorded = False
        if problem is not None:
            p = f.plan
            raise DownloadError(
                f"download of {p.path} was corrupt ({problem}); nothing of it was kept, "
                "download again",
                p.path,
                "corrupt",
            )
        self.watcher.file_state(f.plan.path, "completed")

    def _settle(self, f: _File, fd: int | None) -> str | None:
        """Close, verify, and rename into place, or forget it (blocking); why it is not the
        published bytes, or None."""
        p = f.plan
        if fd is None:  # every range verified by an earlier call
            fd = os.open(short_name(p.path), os.O_RDONLY | os.O_NOFOLLOW, dir_fd=self.side.fd)
        try:
            os.fsync(fd)  # its bytes on disk before its final name can point at them
        finally:
            os.close(fd)
        whole = self._read_back(p) if p.read_back else f.whole_sha256
        problem = p.problem(f.digests, whole)
        if problem is not None:
            self.side.forget(p)
            return problem
        self._rename(p)
        return None

    def _read_back(self, p: FilePlan) -> str:
        fd = os.open(short_name(p.path), os.O_RDONLY | os.O_NOFOLLOW, dir_fd=self.side.fd)
        try:
            return checksums.hash_fd(fd, 0, p.size, checksums.SHA256)
        finally:
            os.close(fd)

    def _rename(self, p: FilePlan) -> None:
        parent = _open_parent(self.dest, p.path)
        try:
            # rename() replaces a symlink at the final name itself, never what it points to.
            os.replace(
                short_name(p.path),
                p.path.rsplit("/", 1)[-1],
                src_dir_fd=self.side.fd,
                dst_dir_fd=parent,
            )
        except OSError as exc:
            if exc.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                raise DownloadError(
                    f"cannot download {p.path} into {self.dest}: a directory is in the way "
                    "of its name; move it aside and download again",
                    p.path,
                    "filesystem",
                ) from None
            raise
        finally:
            os.close(parent)
        if len(p.spans) > 1:
            self.side.drop_record(p)
        parts = p.path.split("/")[:-1]
        self._renamed_in.update("/".join(parts[:i]) for i in range(len(parts) + 1))

    def _sync_dirs(self) -> None:
        """fsync every directory a file was renamed into, and those above it up to the
        destination: once the download returns, a power cut loses none of its names."""
        for rel in sorted(self._renamed_in, key=len, reverse=True):
            fd = os.open(rel or ".", _DIR_FLAGS, dir_fd=self._dest_fd)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _close(self, ok: bool) -> None:
        """Close what is open; a partial file with nothing verified recorded is removed."""
        for f in self.files:
            if f.fd is not None:
                os.close(f.fd)
                f.fd = None
            if not f.recorded and f.left:
                with contextlib.suppress(OSError):
                    self.side.forget(f.plan)
        if self._side is not None:
            self._side.close(remove_if_empty=True)
        if self._dest_fd >= 0:
            os.close(self._dest_fd)


def check_manifest(asset_id: str, paths: Sequence[str]) -> None:
    """Refuse a manifest that would write outside the destination or clash with itself."""
    files: set[str] = set()
    dirs: set[str] = set()
    for path in paths:
        problem = component_path_problem(path)
        if problem:
            raise ChronicleError(
                f"asset {asset_id}: the server sent a component path {path!r} that {problem}; "
                "refusing to download it (nothing was written)"
            )
        if path in files:
            raise ChronicleError(
                f"asset {asset_id}: the server listed {path!r} twice; "
                "refusing to download it (nothing was written)"
            )
        files.add(path)
        parts = path.split("/")
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
    clash = sorted(files & dirs)
    if clash:
        raise ChronicleError(
            f"asset {asset_id}: the server listed {clash[0]!r} both as a file and as a directory; "
            "refusing to download it (nothing was written)"
        )


def _open_parent(dest: Path, path: str) -> int:
    """A descriptor of the directory that will hold ``path``, created below ``dest`` as needed.

    Each level is opened with O_NOFOLLOW: a symlink (or a file) where a directory should be is
    refused, never followed out of the destination.
    """
    fd = os.open(dest, _DIR_FLAGS & ~os.O_NOFOLLOW)
    try:
        for segment in path.split("/")[:-1]:
            with contextlib.suppress(FileExistsError):
                os.mkdir(segment, 0o777, dir_fd=fd)
            try:
                child = os.open(segment, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise DownloadError(
                        f"cannot download {path}: {segment!r} in {dest} is a symlink or a file, "
                        "not a directory; methodic never writes through a link. Move it aside "
                        "or download into an empty directory",
                        path,
                        "filesystem",
                    ) from None
                raise
            os.close(fd)
            fd = child
        return fd
    except BaseException:
        os.close(fd)
        raise
