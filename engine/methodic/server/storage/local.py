"""The local storage backend: component bytes under DATA_DIR/blobs, received by this server.

Each component is one file, DATA_DIR/blobs/<asset>/<shard>/<index>, named by its position in
the manifest (never by its client-chosen path). A whole-file PUT streams to DATA_DIR/tmp and is
renamed into place; parts are written at their offsets straight into the component's file, so
finalize needs no concatenation. Every body is hashed as it arrives, with the asset's checksum
algorithm (``_checksum.new_hasher``), and a body whose URL was bound to a digest is refused
unless it has that digest. Nothing is fsynced per PUT: finalize fsyncs every file and
directory of the asset before the finalized state commits, and re-reads (verifies) every file
whose bytes this process did not hash on receipt itself: a power cut that loses unsynced pages
also restarts the server, so after one, everything is read back; until then a file that is
unchanged since its receipts (inode, size, mtime) is the bytes its receipts hashed, and a
parted file's whole-file checksum is derived from its parts' digests without reading it.

What is stored is known from the receipts the blob data path records (``Component``); only a
deep inspection (finalize) reads the bytes back.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, TypeVar

from methodic import _checksum
from methodic.server.signing import CHECKSUM_HEADER, Signer
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
_HASHERS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="methodic-hash")


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


T = TypeVar("T")
R = TypeVar("R")


def _chunked_map(
    pool: ThreadPoolExecutor, workers: int, fn: Callable[[T], R], items: Sequence[T]
) -> list[R]:
    """``[fn(x) for x in items]`` on the pool, in about 4 runs of items per worker: a future
    per item (100,000 for a finalize of 100,000 files) costs more than an fsync that finds
    nothing to write."""
    size = max(1, -(-len(items) // max(1, 4 * workers)))
    runs = [items[i : i + size] for i in range(0, len(items), size)]
    return [r for run in pool.map(lambda run: [fn(x) for x in run], runs) for r in run]


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

    def __init__(self, fd: int, length: int, algorithm: str, sha256: bool = False) -> None:
        self._lock = threading.Lock()
        self._fd: int | None = fd
        self._length = length
        self._received = 0
        self._hash = _checksum.new_hasher(algorithm)
        # Also the body's sha256 (a manifest's whole-file sha256 to check, another algorithm).
        self._sha256 = hashlib.sha256() if sha256 and algorithm != "sha256" else None

    def _update(self, data: bytes | memoryview) -> None:
        self._hash.update(data)
        if self._sha256 is not None:
            self._sha256.update(data)

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
                self._update(data)
            else:
                hashing = _HASHERS.submit(self._update, data)
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
            digest = self._hash.hexdigest()
            sha256 = self._sha256.hexdigest() if self._sha256 is not None else None
            return Received(size=self._received, digest=digest, sha256=sha256)


_Stamp = tuple[int, int, int, int, int, str]  # dev, inode, size, mtime, ctime; digest or PARTS
PARTS = "parts"  # the stamp of a parted file: its parts' own receipts hold their digests


def _stamp(st: os.stat_result, digest: str) -> _Stamp:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, digest)


class _Hashed:
    """Files whose bytes this process hashed as they arrived, as the files were then.

    A file is trusted at finalize while its device, inode, size, mtime and ctime are what they
    were at its last receipt (ctime: ``os.utime`` cannot put it back). A part upload that wrote bytes and then failed tears its file: whatever it
    overwrote is no longer known, so the file is read back whatever its stamp says.
    """

    def __init__(self) -> None:
        self._stamps: dict[str, _Stamp] = {}  # by file name (LocalStorage._name)
        self._torn: set[str] = set()

    def record(self, file: str, digest: str) -> None:
        if file not in self._torn:
            st = os.stat(file)
            self._stamps[file] = _stamp(st, digest)

    def tear(self, file: str) -> None:
        self._torn.add(file)
        self._stamps.pop(file, None)

    def holds(self, file: str, st: os.stat_result, digest: str | None) -> bool:
        return digest is not None and self._stamps.get(file) == _stamp(st, digest)

    def forget(self, file: str) -> None:
        self._stamps.pop(file, None)
        self._torn.discard(file)

    def forget_under(self, directory: str) -> None:
        prefix = os.path.join(directory, "")
        for file in [f for f in [*self._stamps, *self._torn] if f.startswith(prefix)]:
            self.forget(file)


class _ObjectUpload(_LengthBoundUpload):
    def __init__(
        self, tmp: str, final: str, length: int, algorithm: str, sha256: bool, hashed: _Hashed
    ) -> None:
        super().__init__(
            os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), length, algorithm, sha256
        )
        self._tmp = tmp
        self._final = final
        self._hashed = hashed
        self._committed = False

    def _write(self, fd: int, data: bytes | memoryview, position: int) -> None:
        _write_all(fd, data)

    def commit(self) -> None:
        with self._lock:
            try:
                os.replace(self._tmp, self._final)
            except FileNotFoundError:  # the first file of its shard: its directory is made now
                _private_dir(Path(self._final).parent)
                os.replace(self._tmp, self._final)
            self._committed = True
            self._hashed.record(self._final, self._hash.hexdigest())

    def abort(self) -> None:
        with self._lock:
            self._close()
            if not self._committed:  # once renamed, the temp name is gone
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._tmp)


class _PartUpload(_LengthBoundUpload):
    def __init__(
        self, file: str, offset: int, length: int, algorithm: str, hashed: _Hashed
    ) -> None:
        _private_dir(Path(file).parent)
        super().__init__(os.open(file, os.O_WRONLY | os.O_CREAT, 0o600), length, algorithm)
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


class _CheckOnlyUpload(_LengthBoundUpload):
    """A part body whose bytes are already stored (a receipt with the digest the URL is bound
    to): it is hashed and compared, never written, so a replay of the URL with other bytes
    cannot overwrite the stored part."""

    def __init__(self, length: int, algorithm: str) -> None:
        super().__init__(-1, length, algorithm)

    def _write(self, fd: int, data: bytes | memoryview, position: int) -> None:
        pass

    def _close(self) -> None:
        self._fd = None

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        with self._lock:
            self._close()


class LocalStorage:
    limits = StorageLimits()

    def __init__(self, data_dir: Path, signer: Signer) -> None:
        self.root = data_dir / "blobs"
        self.tmp = data_dir / "tmp"
        self._signer = signer
        self._hashed = _Hashed()
        self._root = str(self.root)
        # Temp names: this process's random prefix and a counter (O_EXCL refuses a clash).
        self._tmp_prefix = f"{self.tmp}/{secrets.token_hex(8)}."
        self._tmp_count = itertools.count()
        self._read_lock = threading.Lock()
        self.bytes_read_back = 0  # read back at finalize (files whose receipts are not trusted)
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
        return Path(self._name(key))

    def _name(self, key: BlobKey) -> str:
        """The component's file (as a str: a Path per PUT costs more than its syscalls)."""
        index = key.index
        return f"{self._root}/{key.asset_id}/{index // FILES_PER_SHARD:05d}/{index:07d}"

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
                        "PUT",
                        asset_id,
                        s.component.path,
                        s.part,
                        s.offset,
                        s.length,
                        expires,
                        s.checksum,
                    ),
                ),
                {CHECKSUM_HEADER: s.checksum} if s.checksum is not None else {},
            )
            for s in slots
        ]

    def presign_get(self, key: BlobKey, expires: int, origin: str) -> str:
        return self._signer.url(
            origin, self._signer.grant("GET", key.asset_id, key.path, None, None, None, expires)
        )

    # ---- the receiving side (Receiver) -----------------------------------------------------

    def open_object_upload(
        self, key: BlobKey, length: int, algorithm: str, *, sha256: bool = False
    ) -> Upload:
        tmp = f"{self._tmp_prefix}{key.asset_id}.{key.index}.{next(self._tmp_count)}.tmp"
        return _ObjectUpload(tmp, self._name(key), length, algorithm, sha256, self._hashed)

    def open_part_upload(
        self, key: BlobKey, offset: int, length: int, algorithm: str, *, stored: bool = False
    ) -> Upload:
        if stored:
            return _CheckOnlyUpload(length, algorithm)
        return _PartUpload(self._name(key), offset, length, algorithm, self._hashed)

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
            return _chunked_map(pool, workers, one, components)

    def _measure(self, key: BlobKey, c: Component) -> Found:
        """The component's size and whole-file checksum value, from its receipts while this
        process's stamps hold (nothing is read), else by reading the file back.

        A parted file is also read when its manifest declares a whole-file sha256 that the
        checksum value cannot show (a legacy asset's settled checksum is that sha256).
        """
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
                self._name(key), st, c.stored_digest if c.part_size is None else PARTS
            )
            if c.part_size is None:
                if trusted:
                    return Found(True, size=stored, digest=c.stored_digest)
                (digest,), _ = self._read_back(f, c, [c.size], whole_sha256=False)
                damaged = (
                    None
                    if digest == c.stored_digest
                    else "the stored bytes differ from what was uploaded"
                )
                return Found(True, size=stored, digest=digest, damaged=damaged)
            numbers = range(1, c.parts + 1)
            lengths = [c.part_length(n) for n in numbers]
            want_sha256 = c.algorithm is None or c.sha256 is not None
            sha256: str | None = None
            if trusted and not want_sha256:
                digests = [c.part_digest[n] for n in numbers]
            else:
                digests, sha256 = self._read_back(f, c, lengths, whole_sha256=want_sha256)
        bad = tuple(
            n for n, got in zip(numbers, digests, strict=True) if c.part_digest.get(n) != got
        )
        if bad:
            return Found(True, size=stored, bad_parts=bad)
        if c.algorithm is None:  # legacy: the settled checksum is the whole file's sha256
            return Found(True, size=stored, digest=sha256)
        whole = _checksum.whole_file(c.receipt_algorithm, digests, lengths, parted=True)
        damaged = None
        if c.sha256 is not None and sha256 != c.sha256:
            damaged = f"stored sha256 {sha256}, the manifest says {c.sha256}"
        return Found(True, size=stored, digest=whole, damaged=damaged)

    def _read_back(
        self, f: BinaryIO, c: Component, lengths: Sequence[int], *, whole_sha256: bool
    ) -> tuple[list[str], str | None]:
        """The digests (the component's receipt algorithm) of consecutive ranges of ``f``, and
        with ``whole_sha256`` the sha256 of all of them."""
        out: list[str] = []
        whole = hashlib.sha256() if whole_sha256 else None
        for length in lengths:
            hasher = _checksum.new_hasher(c.receipt_algorithm)
            while length:
                chunk = f.read(min(READ_CHUNK, length))
                if not chunk:
                    raise OSError(f"{f.name!r} shrank while being verified")
                hasher.update(chunk)
                if whole is not None:
                    whole.update(chunk)
                length -= len(chunk)
                with self._read_lock:
                    self.bytes_read_back += len(chunk)
            out.append(hasher.hexdigest())
        return out, (whole.hexdigest() if whole is not None else None)

    def seal(
        self,
        asset_id: str,
        components: Sequence[Component],
        workers: int,
        checksums: Mapping[int, str],
    ) -> list[tuple[Component, str]]:
        for c in components:
            self._hashed.forget(self._name(c.key(asset_id)))
        files = [self._file(c.key(asset_id)) for c in components]
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(files)))) as pool:
            _chunked_map(pool, workers, _fsync_path, files)
        for directory in sorted({f.parent for f in files}):
            _fsync_path(directory, directory=True)
        asset_dir = self._asset_dir(asset_id)
        if asset_dir.exists():
            _fsync_path(asset_dir, directory=True)
        _fsync_path(self.root, directory=True)
        return []

    def forget(self, key: BlobKey) -> None:
        self._hashed.forget(self._name(key))
        self._file(key).unlink(missing_ok=True)

    def delete_asset(self, asset_id: str) -> None:
        self._hashed.forget_under(str(self._asset_dir(asset_id)))
        shutil.rmtree(self._asset_dir(asset_id), ignore_errors=True)
