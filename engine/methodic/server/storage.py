"""Where component bytes live. The interface is kept narrow so an S3 backend can sit beside it.

``LocalStorage`` keeps each component as one file, DATA_DIR/blobs/<asset>/<shard>/<index>,
named by its position in the manifest (never by its client-chosen path). A whole-file PUT
streams to DATA_DIR/tmp and is renamed into place; parts are written at their offsets
straight into the component's file, so finalize needs no concatenation. Nothing is fsynced
per PUT: finalize re-reads (verifies) and fsyncs every file and directory of the asset
before the finalized state commits.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

READ_CHUNK = 1024 * 1024
FILES_PER_SHARD = 1000


@dataclass(frozen=True)
class BlobKey:
    """One component of one asset. Backends may name the stored object by index or by path."""

    asset_id: str
    index: int
    path: str


@dataclass(frozen=True)
class Received:
    size: int
    sha256: str


@dataclass(frozen=True)
class Measurement:
    """What storage holds for a component right now, read back from the stored bytes."""

    size: int
    sha256: str | None  # None when the size is not the expected one (not worth hashing)
    part_sha256: list[str]  # per part, when measured with a part size


class Upload(Protocol):
    """One PUT body being received. ``write`` blocks: call it off the event loop."""

    def write(self, data: bytes) -> None: ...
    def finish(self) -> Received: ...  # all bytes arrived; raises ValueError on a length mismatch
    def commit(self) -> None: ...  # make the received bytes the component's (after finish)
    def abort(self) -> None: ...  # forget this body; safe to call at any time, repeatedly


class Storage(Protocol):
    def open_object_upload(self, key: BlobKey, length: int) -> Upload: ...
    def open_part_upload(self, key: BlobKey, offset: int, length: int) -> Upload: ...
    def measure(self, key: BlobKey, size: int, part_size: int | None) -> Measurement | None: ...
    def make_durable(self, asset_id: str, keys: Sequence[BlobKey], workers: int) -> None: ...
    def forget(self, key: BlobKey) -> None: ...
    def delete_asset(self, asset_id: str) -> None: ...
    def open_read(self, key: BlobKey) -> BinaryIO: ...


def _write_all(fd: int, data: bytes, offset: int | None = None) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        view = view[n:]
        if offset is not None:
            offset += n


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _LengthBoundUpload:
    """Shared bookkeeping: hash while receiving, refuse more than the declared length.

    The lock makes ``abort`` wait for a ``write`` still running in another thread, so a
    descriptor is never closed (and its number reused) under a write.
    """

    def __init__(self, fd: int, length: int) -> None:
        self._lock = threading.Lock()
        self._fd: int | None = fd
        self._length = length
        self._received = 0
        self._hash = hashlib.sha256()

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._fd is None:
                raise ValueError("upload already closed")
            if self._received + len(data) > self._length:
                raise ValueError(f"body is longer than the declared {self._length} bytes")
            self._write(self._fd, data, self._received)
            self._hash.update(data)
            self._received += len(data)

    def _write(self, fd: int, data: bytes, position: int) -> None:
        raise NotImplementedError

    def finish(self) -> Received:
        with self._lock:
            if self._received != self._length:
                raise ValueError(f"body has {self._received} bytes, {self._length} were declared")
            self._close()
            return Received(size=self._received, sha256=self._hash.hexdigest())


class _ObjectUpload(_LengthBoundUpload):
    def __init__(self, tmp: Path, final: Path, length: int) -> None:
        super().__init__(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), length)
        self._tmp = tmp
        self._final = final

    def _write(self, fd: int, data: bytes, position: int) -> None:
        _write_all(fd, data)

    def commit(self) -> None:
        with self._lock:
            self._final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self._tmp, self._final)

    def abort(self) -> None:
        with self._lock:
            self._close()
            self._tmp.unlink(missing_ok=True)


class _PartUpload(_LengthBoundUpload):
    def __init__(self, file: Path, offset: int, length: int) -> None:
        file.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(os.open(file, os.O_WRONLY | os.O_CREAT, 0o600), length)
        self._offset = offset

    def _write(self, fd: int, data: bytes, position: int) -> None:
        _write_all(fd, data, self._offset + position)

    def commit(self) -> None:
        pass  # the bytes are already at their offset; the part becomes stored once recorded

    def abort(self) -> None:
        with self._lock:
            self._close()


class LocalStorage:
    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / "blobs"
        self.tmp = data_dir / "tmp"
        self.root.mkdir(mode=0o700, exist_ok=True)
        self.tmp.mkdir(mode=0o700, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def _asset_dir(self, asset_id: str) -> Path:
        return self.root / asset_id

    def _file(self, key: BlobKey) -> Path:
        return (
            self._asset_dir(key.asset_id)
            / f"{key.index // FILES_PER_SHARD:05d}"
            / f"{key.index:07d}"
        )

    def remove_stale_temp(self, older_than: float = 3600.0) -> None:
        """Drop temp files of PUTs a crash interrupted (live ones are touched on every write)."""
        cutoff = time.time() - older_than
        for entry in os.scandir(self.tmp):
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)

    def open_object_upload(self, key: BlobKey, length: int) -> Upload:
        tmp = self.tmp / f"{key.asset_id}.{key.index}.{secrets.token_hex(8)}.tmp"
        return _ObjectUpload(tmp, self._file(key), length)

    def open_part_upload(self, key: BlobKey, offset: int, length: int) -> Upload:
        return _PartUpload(self._file(key), offset, length)

    def measure(self, key: BlobKey, size: int, part_size: int | None) -> Measurement | None:
        try:
            f = open(self._file(key), "rb", buffering=0)  # noqa: SIM115
        except FileNotFoundError:
            return None
        with f:
            stored = os.fstat(f.fileno()).st_size
            if stored != size:
                return Measurement(size=stored, sha256=None, part_sha256=[])
            whole = hashlib.sha256()
            parts: list[str] = []
            step = part_size or max(size, 1)
            remaining = size
            while True:
                part_hash = hashlib.sha256()
                in_part = min(step, remaining)
                while in_part:
                    chunk = f.read(min(READ_CHUNK, in_part))
                    if not chunk:
                        raise OSError(f"{self._file(key)} shrank while being verified")
                    whole.update(chunk)
                    part_hash.update(chunk)
                    in_part -= len(chunk)
                    remaining -= len(chunk)
                parts.append(part_hash.hexdigest())
                if remaining == 0:
                    break
            return Measurement(
                size=stored, sha256=whole.hexdigest(), part_sha256=parts if part_size else []
            )

    def make_durable(self, asset_id: str, keys: Sequence[BlobKey], workers: int) -> None:
        files = [self._file(key) for key in keys]
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(files)))) as pool:
            list(pool.map(_fsync_path, files))
        for directory in sorted({f.parent for f in files}):
            _fsync_path(directory, directory=True)
        asset_dir = self._asset_dir(asset_id)
        if asset_dir.exists():
            _fsync_path(asset_dir, directory=True)
        _fsync_path(self.root, directory=True)

    def forget(self, key: BlobKey) -> None:
        self._file(key).unlink(missing_ok=True)

    def delete_asset(self, asset_id: str) -> None:
        shutil.rmtree(self._asset_dir(asset_id), ignore_errors=True)

    def open_read(self, key: BlobKey) -> BinaryIO:
        return open(self._file(key), "rb")
