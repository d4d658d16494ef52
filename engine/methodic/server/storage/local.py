"""The local storage backend: component bytes under DATA_DIR/blobs, received by this server.

Each component is one file, DATA_DIR/blobs/<asset>/<shard>/<index>, named by its position in
the manifest (never by its client-chosen path). A whole-file PUT streams to DATA_DIR/tmp and is
renamed into place; parts are written at their offsets straight into the component's file, so
finalize needs no concatenation. Nothing is fsynced per PUT: finalize fsyncs every file and
directory of the asset before the finalized state commits, and re-reads (verifies) every file
whose bytes this process did not hash on receipt itself: a power cut that loses unsynced pages
also restarts the server, so after one, everything is read back; until then a whole-PUT file
that is unchanged since its receipt (inode, size, mtime) is the bytes its receipt hashed.

What is stored is known from the receipts the blob data path records (``Component``); only a
deep inspection (finalize) reads the bytes back.
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
from pathlib import Path
from typing import BinaryIO

from methodic.server.signing import Signer
from methodic.server.storage.base import (
    BlobKey,
    Component,
    Found,
    Presigned,
    Received,
    Receiver,
    Slot,
    StorageLimits,
    Upload,
)

READ_CHUNK = 1024 * 1024
FILES_PER_SHARD = 1000
PARALLEL_HASH_MIN = 256 * 1024
# Hashing a received buffer here while the receiving thread writes it: per body, the slower of
# sha256 and the write sets the pace instead of their sum. These threads never wait on anything.
_HASHERS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="methodic-sha256")


def _write_all(fd: int, data: bytes | memoryview, offset: int | None = None) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        view = view[n:]
        if offset is not None:
            offset += n


def _private_dir(path: Path) -> None:
    """Create ``path`` and any missing parents with mode 0700 (``mkdir(parents=True)`` would
    give the parents the umask's default)."""
    if path.is_dir():
        return
    _private_dir(path.parent)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)


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

    def write(self, data: bytes | memoryview) -> None:
        with self._lock:
            if self._fd is None:
                raise ValueError("upload already closed")
            if self._received + len(data) > self._length:
                raise ValueError(f"body is longer than the declared {self._length} bytes")
            if len(data) < PARALLEL_HASH_MIN:
                self._write(self._fd, data, self._received)
                self._hash.update(data)
            else:
                hashing = _HASHERS.submit(self._hash.update, data)
                try:
                    self._write(self._fd, data, self._received)
                finally:
                    hashing.result()  # the caller may reuse data once this returns
            self._received += len(data)

    def _write(self, fd: int, data: bytes | memoryview, position: int) -> None:
        raise NotImplementedError

    def finish(self) -> Received:
        with self._lock:
            if self._received != self._length:
                raise ValueError(f"body has {self._received} bytes, {self._length} were declared")
            self._close()
            return Received(size=self._received, sha256=self._hash.hexdigest())


_Stamp = tuple[int, int, int, str]  # inode, size, mtime_ns, and the sha256 or PARTS
PARTS = "parts"  # the stamp of a parted file: its parts' own receipts hold their sha256


class _Hashed:
    """Files whose bytes this process hashed as they arrived, as the files were then.

    A file is trusted at finalize while its inode, size and mtime are what they were at its
    last receipt. A part upload that wrote bytes and then failed tears its file: whatever it
    overwrote is no longer known, so the file is read back whatever its stamp says.
    """

    def __init__(self) -> None:
        self._stamps: dict[Path, _Stamp] = {}
        self._torn: set[Path] = set()

    def record(self, file: Path, sha256: str) -> None:
        if file not in self._torn:
            st = os.stat(file)
            self._stamps[file] = (st.st_ino, st.st_size, st.st_mtime_ns, sha256)

    def tear(self, file: Path) -> None:
        self._torn.add(file)
        self._stamps.pop(file, None)

    def holds(self, file: Path, st: os.stat_result, sha256: str | None) -> bool:
        return sha256 is not None and self._stamps.get(file) == (
            st.st_ino,
            st.st_size,
            st.st_mtime_ns,
            sha256,
        )

    def forget(self, file: Path) -> None:
        self._stamps.pop(file, None)
        self._torn.discard(file)

    def forget_under(self, directory: Path) -> None:
        for file in [f for f in [*self._stamps, *self._torn] if f.is_relative_to(directory)]:
            self.forget(file)


class _ObjectUpload(_LengthBoundUpload):
    def __init__(self, tmp: Path, final: Path, length: int, hashed: _Hashed) -> None:
        super().__init__(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), length)
        self._tmp = tmp
        self._final = final
        self._hashed = hashed

    def _write(self, fd: int, data: bytes | memoryview, position: int) -> None:
        _write_all(fd, data)

    def commit(self) -> None:
        with self._lock:
            _private_dir(self._final.parent)
            os.replace(self._tmp, self._final)
            self._hashed.record(self._final, self._hash.hexdigest())

    def abort(self) -> None:
        with self._lock:
            self._close()
            self._tmp.unlink(missing_ok=True)


class _PartUpload(_LengthBoundUpload):
    def __init__(self, file: Path, offset: int, length: int, hashed: _Hashed) -> None:
        _private_dir(file.parent)
        super().__init__(os.open(file, os.O_WRONLY | os.O_CREAT, 0o600), length)
        self._file = file
        self._offset = offset
        self._hashed = hashed
        self._committed = False

    def _write(self, fd: int, data: bytes | memoryview, position: int) -> None:
        _write_all(fd, data, self._offset + position)

    def commit(self) -> None:
        # The bytes are already at their offset; the part becomes stored once recorded.
        with self._lock:
            self._committed = True
            self._hashed.record(self._file, PARTS)

    def abort(self) -> None:
        with self._lock:
            self._close()
            if self._received and not self._committed:
                self._hashed.tear(self._file)


class LocalStorage:
    limits = StorageLimits()

    def __init__(self, data_dir: Path, signer: Signer) -> None:
        self.root = data_dir / "blobs"
        self.tmp = data_dir / "tmp"
        self._signer = signer
        self._hashed = _Hashed()
        _private_dir(self.root)
        _private_dir(self.tmp)

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    @property
    def receiver(self) -> Receiver:
        return self

    def describe(self) -> str:
        return f"local ({self.root})"

    def close(self) -> None:
        pass

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

    # ---- presigning: this server's own HMAC-signed blob URLs -------------------------------

    def presign_puts(
        self, asset_id: str, slots: Sequence[Slot], expires: int, origin: str
    ) -> list[Presigned]:
        return [
            Presigned(
                self._signer.url(
                    origin,
                    self._signer.grant(
                        "PUT", asset_id, s.component.path, s.part, s.offset, s.length, expires
                    ),
                )
            )
            for s in slots
        ]

    def presign_get(self, key: BlobKey, expires: int, origin: str) -> str:
        return self._signer.url(
            origin, self._signer.grant("GET", key.asset_id, key.path, None, None, None, expires)
        )

    # ---- the receiving side (Receiver) -----------------------------------------------------

    def open_object_upload(self, key: BlobKey, length: int) -> Upload:
        tmp = self.tmp / f"{key.asset_id}.{key.index}.{secrets.token_hex(8)}.tmp"
        return _ObjectUpload(tmp, self._file(key), length, self._hashed)

    def open_part_upload(self, key: BlobKey, offset: int, length: int) -> Upload:
        return _PartUpload(self._file(key), offset, length, self._hashed)

    def open_read(self, key: BlobKey) -> BinaryIO:
        return open(self._file(key), "rb")

    # ---- what is stored --------------------------------------------------------------------

    def inspect(
        self, asset_id: str, components: Sequence[Component], *, deep: bool, workers: int
    ) -> list[Found]:
        def one(c: Component) -> Found:
            if not c.received:
                return Found(False, frozenset(c.parts_stored))
            return self._measure(c.key(asset_id), c) if deep else Found(True)

        if not deep:
            return [one(c) for c in components]
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(components)))) as pool:
            return list(pool.map(one, components))

    def _measure(self, key: BlobKey, c: Component) -> Found:
        """Read the component's file back: its size, sha256 and per-part sha256."""
        try:
            f = open(self._file(key), "rb", buffering=0)  # noqa: SIM115
        except FileNotFoundError:
            return Found(False)
        with f:
            st = os.fstat(f.fileno())
            stored = st.st_size
            if stored != c.size:
                return Found(True, size=stored)
            trusted = self._hashed.holds(
                self._file(key), st, c.stored_sha256 if c.part_size is None else PARTS
            )
            if trusted and c.part_size is None:
                return Found(True, size=stored, sha256=c.stored_sha256)
            whole = hashlib.sha256()  # a parted file's whole sha256 is known only by reading it
            parts: list[str] = []
            step = c.part_size or max(c.size, 1)
            remaining = c.size
            while True:
                part_hash = None if trusted else hashlib.sha256()
                in_part = min(step, remaining)
                while in_part:
                    chunk = f.read(min(READ_CHUNK, in_part))
                    if not chunk:
                        raise OSError(f"{self._file(key)} shrank while being verified")
                    whole.update(chunk)
                    if part_hash is not None:
                        part_hash.update(chunk)
                    in_part -= len(chunk)
                    remaining -= len(chunk)
                if part_hash is not None:
                    parts.append(part_hash.hexdigest())
                if remaining == 0:
                    break
        digest = whole.hexdigest()
        if c.part_size is not None:
            bad = tuple(n for n, got in enumerate(parts, 1) if c.part_sha256.get(n) != got)
            return Found(True, size=stored, sha256=digest, bad_parts=bad)
        damaged = (
            None if digest == c.stored_sha256 else "the stored bytes differ from what was uploaded"
        )
        return Found(True, size=stored, sha256=digest, damaged=damaged)

    def seal(
        self, asset_id: str, components: Sequence[Component], workers: int
    ) -> list[tuple[Component, str]]:
        files = [self._file(c.key(asset_id)) for c in components]
        for file in files:
            self._hashed.forget(file)
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(files)))) as pool:
            list(pool.map(_fsync_path, files))
        for directory in sorted({f.parent for f in files}):
            _fsync_path(directory, directory=True)
        asset_dir = self._asset_dir(asset_id)
        if asset_dir.exists():
            _fsync_path(asset_dir, directory=True)
        _fsync_path(self.root, directory=True)
        return []

    def forget(self, key: BlobKey) -> None:
        self._hashed.forget(self._file(key))
        self._file(key).unlink(missing_ok=True)

    def delete_asset(self, asset_id: str) -> None:
        self._hashed.forget_under(self._asset_dir(asset_id))
        shutil.rmtree(self._asset_dir(asset_id), ignore_errors=True)
