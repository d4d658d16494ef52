"""What a download keeps between calls: ``DEST/.methodic-download/``, a hidden side directory.

A component being fetched lives there as ``<16 hex>`` (a hash of its path), never under its
final name, so a 255-byte file name needs no longer temporary one. A component fetched in
several ranges has a record beside it, ``<16 hex>.r``: the digest of every range written and
hashed so far. A later call reads each recorded range back, and keeps it only if it still has
that digest (so bytes lost from the page cache by a power cut are fetched again); the rest is
fetched. The record is replaced atomically (written aside, then renamed).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat

import blake3

from methodic import _checksum as checksums
from methodic._download_plan import FilePlan

SIDE_DIR = ".methodic-download"
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
PART_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def short_name(path: str) -> str:
    return blake3.blake3(path.encode("utf-8", "surrogateescape")).hexdigest()[:16]


class SideDir:
    """The side directory of one destination, by descriptor (never through a symlink)."""

    def __init__(self, dest_fd: int) -> None:
        with contextlib.suppress(FileExistsError):
            os.mkdir(SIDE_DIR, 0o700, dir_fd=dest_fd)
        self.fd = os.open(SIDE_DIR, DIR_FLAGS, dir_fd=dest_fd)
        self._dest_fd = dest_fd

    def close(self, *, remove_if_empty: bool) -> None:
        os.close(self.fd)
        if remove_if_empty:
            with contextlib.suppress(OSError):
                os.rmdir(SIDE_DIR, dir_fd=self._dest_fd)

    def open_partial(self, f: FilePlan) -> int:
        """The partial file of ``f``, of its exact size: emptied for a file of one range
        (nothing of it is kept between calls), its recorded ranges kept for one of several."""
        if len(f.spans) == 1:
            return os.open(short_name(f.path), PART_FLAGS | os.O_TRUNC, 0o644, dir_fd=self.fd)
        fd = os.open(short_name(f.path), PART_FLAGS, 0o644, dir_fd=self.fd)
        try:
            if os.fstat(fd).st_size != f.size:
                os.ftruncate(fd, f.size)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def forget(self, f: FilePlan) -> None:
        """Remove the partial file of ``f`` and its record."""
        for name in (short_name(f.path), short_name(f.path) + ".r"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=self.fd)

    def drop_record(self, f: FilePlan) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(short_name(f.path) + ".r", dir_fd=self.fd)

    def save(self, f: FilePlan, digests: dict[int, str]) -> None:
        """Record the digests of the ranges of ``f`` written so far (atomically)."""
        name = short_name(f.path) + ".r"
        data = json.dumps(
            {
                "path": f.path,
                "size": f.size,
                "checksum": f.target.checksum,
                "ranges": {str(k): v for k, v in digests.items()},
            }
        ).encode()
        fd = os.open(name + "~", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=self.fd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(name + "~", name, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def verified_ranges(self, f: FilePlan) -> dict[int, str]:
        """The ranges of ``f`` an earlier call recorded whose bytes still have their digest."""
        if f.algorithm is None or len(f.spans) < 2:
            return {}
        name = short_name(f.path)
        try:
            with open(name + ".r", "rb", opener=self._opener) as rf:
                record = json.loads(rf.read())
            if (record["path"], record["size"], record["checksum"]) != (
                f.path,
                f.size,
                f.target.checksum,
            ):
                return {}
            recorded = {int(k): str(v) for k, v in record["ranges"].items()}
            if os.stat(name, dir_fd=self.fd, follow_symlinks=False).st_size != f.size:
                return {}
        except (OSError, ValueError, KeyError, TypeError):
            return {}
        kept = {}
        for span in f.spans:
            want = recorded.get(span.offset)
            if want is None:
                continue
            try:
                got = _hash_at(self.fd, name, span.offset, span.length, f.algorithm)
            except (OSError, EOFError):
                continue
            if got == want:
                kept[span.offset] = want
        return kept

    def _opener(self, name: str, flags: int) -> int:
        return os.open(name, flags | os.O_NOFOLLOW, dir_fd=self.fd)


def _hash_at(dir_fd: int, name: str, offset: int, length: int, algorithm: str) -> str:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        return checksums.hash_fd(fd, offset, length, algorithm)
    finally:
        os.close(fd)


def final_is_verified(parent_fd: int, name: str, f: FilePlan) -> bool:
    """Whether the file already at the final name is ``f``'s published bytes (read and hashed)."""
    if f.algorithm is None and f.sha256 is None:
        return False  # nothing to verify it against: fetch it
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ELOOP, errno.EISDIR, errno.ENOTDIR):
            return False
        raise
    try:
        if os.fstat(fd).st_size != f.size or not _is_regular(fd):
            return False
        digests = {}
        if f.algorithm is not None:
            for span in f.spans:
                digests[span.offset] = checksums.hash_fd(fd, span.offset, span.length, f.algorithm)
        sha = checksums.hash_fd(fd, 0, f.size, checksums.SHA256) if f.sha256 else None
        return f.problem(digests, sha) is None
    except EOFError:
        return False
    finally:
        os.close(fd)


def _is_regular(fd: int) -> bool:
    return stat.S_ISREG(os.fstat(fd).st_mode)
