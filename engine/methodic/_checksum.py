"""Checksums: the digest algorithms, hashing a file range, and a whole file's checksum from its
parts' digests (so finalize never reads a file back).

Every byte range the engine sends (a whole file, or one part of a large one) has a digest
computed from the file before it is presigned; the digest is bound into the upload URL and the
receiver (``methodic serve``, or S3 itself) refuses a body with another one. A file's checksum
is then derived from its ranges' digests:

- ``crc64nvme`` (the default): CRC-64/NVME, ~25 GB/s per core (hardware CRC); the parts' CRCs
  are *combined* into the CRC of the whole file, exactly S3's ``FULL_OBJECT`` checksum.
- ``sha256`` and ``blake3`` (collision resistant): a file sent in N parts has the *composite*
  checksum ``H(digest_1 || ... || digest_N)-N`` over the raw part digests (S3's ``COMPOSITE``
  form for sha256); a file sent whole has its plain digest.

Values are lowercase hex; ``algo:value`` names the algorithm wherever a checksum travels.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Sequence
from typing import Protocol

import blake3
from awscrt import checksums as crt  # type: ignore[import-untyped]  # awscrt ships no types

CRC64NVME = "crc64nvme"
SHA256 = "sha256"
BLAKE3 = "blake3"
DEFAULT_ALGORITHM = CRC64NVME
# Digest size in bytes of each algorithm (what a hex value must have, halved).
DIGEST_SIZE = {CRC64NVME: 8, SHA256: 32, BLAKE3: 32}
ALGORITHMS = tuple(DIGEST_SIZE)
READ_SIZE = 4 << 20


class ChecksumFormatError(ValueError):
    """A checksum that is not ``algo:hex`` of a known algorithm; the message says what is wrong."""


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> object: ...
    def hexdigest(self) -> str: ...


class _Crc64Nvme:
    """CRC-64/NVME fed incrementally (awscrt releases the GIL while it runs)."""

    def __init__(self) -> None:
        self._crc = 0

    def update(self, data: bytes | memoryview, /) -> None:
        self._crc = crt.crc64nvme(data, self._crc)

    def hexdigest(self) -> str:
        return f"{self._crc:016x}"


def new_hasher(algorithm: str) -> Hasher:
    if algorithm == CRC64NVME:
        return _Crc64Nvme()
    if algorithm == SHA256:
        return hashlib.sha256()
    if algorithm == BLAKE3:
        return blake3.blake3()
    raise ChecksumFormatError(f"unknown checksum algorithm {algorithm!r}; use one of {ALGORITHMS}")


def check_algorithm(algorithm: str) -> str:
    """``algorithm`` if methodic knows it; ChecksumFormatError naming the choices otherwise."""
    if algorithm not in DIGEST_SIZE:
        raise ChecksumFormatError(
            f"unknown checksum algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}"
        )
    return algorithm


def is_digest(algorithm: str, value: str) -> bool:
    """``value`` is a digest (lowercase hex of the right length) of ``algorithm``."""
    size = DIGEST_SIZE.get(algorithm)
    return (
        size is not None
        and len(value) == 2 * size
        and all(ch in "0123456789abcdef" for ch in value)
    )


def parse(text: str) -> tuple[str, str]:
    """(algorithm, value) of an ``algo:value`` checksum; a composite value keeps its ``-N``."""
    algorithm, sep, value = text.partition(":")
    if not sep:
        raise ChecksumFormatError(
            f"checksum {text[:80]!r} does not name its algorithm; write e.g. 'sha256:<hex>'"
        )
    check_algorithm(algorithm)
    value = value.lower()
    digest, dash, count = value.partition("-")
    if not is_digest(algorithm, digest) or (dash and not (count.isdigit() and int(count) > 0)):
        raise ChecksumFormatError(
            f"checksum {text[:100]!r} is not a {algorithm} value "
            f"({2 * DIGEST_SIZE[algorithm]} hex digits)"
        )
    return algorithm, value


def hash_range(path: str | os.PathLike[str], offset: int, length: int, algorithm: str) -> str:
    """Hex digest of ``length`` bytes of the file at ``offset`` (blocking: run it in a thread).

    Raises EOFError when the file ends before the range does.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        return hash_fd(fd, offset, length, algorithm)
    except EOFError:
        raise EOFError(f"{os.fspath(path)} ends before byte {offset + length}") from None
    finally:
        os.close(fd)


def hash_fd(fd: int, offset: int, length: int, algorithm: str) -> str:
    """Hex digest of ``length`` bytes of the open file ``fd`` at ``offset`` (blocking)."""
    hasher = new_hasher(algorithm)
    buffer = bytearray(min(READ_SIZE, max(length, 1)))
    view = memoryview(buffer)
    while length:
        got = os.preadv(fd, [view[: min(length, len(buffer))]], offset)
        if got == 0:
            raise EOFError(f"the file ends before byte {offset + length}")
        hasher.update(view[:got])
        offset += got
        length -= got
    return hasher.hexdigest()


def whole_file(algorithm: str, digests: Sequence[str], lengths: Sequence[int], parted: bool) -> str:
    """The value of a file's checksum from its ranges' hex digests, in order.

    A file sent whole (``parted`` False, one digest) has that digest. A parted file has the
    combined CRC (crc64nvme) or the composite ``H(raw digests)-N`` (sha256, blake3).
    """
    if not parted:
        (digest,) = digests
        return digest
    if algorithm == CRC64NVME:
        crc = 0
        for digest, length in zip(digests, lengths, strict=True):
            crc = crt.combine_crc64nvme(crc, int(digest, 16), length)
        return f"{crc:016x}"
    hasher = new_hasher(algorithm)
    for digest in digests:
        hasher.update(bytes.fromhex(digest))
    return f"{hasher.hexdigest()}-{len(digests)}"


def to_base64(value: str) -> str:
    """S3's form of a checksum value (base64 of the digest bytes; a composite keeps its -N)."""
    digest, dash, count = value.partition("-")
    return base64.b64encode(bytes.fromhex(digest)).decode("ascii") + (f"-{count}" if dash else "")


def from_base64(value: str) -> str:
    digest, dash, count = value.partition("-")
    return base64.b64decode(digest).hex() + (f"-{count}" if dash else "")


def range_lengths(size: int, part_size: int | None) -> list[int]:
    """The lengths of a file's ranges: one for a file sent whole, else its parts in order."""
    if part_size is None:
        return [size]
    full, rest = divmod(size, part_size)
    return [part_size] * full + ([rest] if rest or not full else [])


class StreamVerifier:
    """Checks a file's bytes, fed in order as they stream, against its ``algo:value`` checksum
    (the whole-file form of ``whole_file``: ``part_size`` is the layout it was derived over)."""

    def __init__(self, checksum: str, size: int, part_size: int | None) -> None:
        self.algorithm, self.want = parse(checksum)
        self._parted = part_size is not None
        self._lengths = range_lengths(size, part_size)
        self._digests: list[str] = []
        self._hasher = new_hasher(self.algorithm)
        self._left = self._lengths[0]

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            if self._left == 0:
                raise ValueError("more bytes than the file has")
            take = view[: self._left]
            self._hasher.update(take)
            self._left -= len(take)
            view = view[len(take) :]
            if self._left == 0 and len(self._digests) + 1 < len(self._lengths):
                self._next_range()

    def _next_range(self) -> None:
        self._digests.append(self._hasher.hexdigest())
        self._hasher = new_hasher(self.algorithm)
        self._left = self._lengths[len(self._digests)]

    def value(self) -> str:
        """The checksum value of the bytes fed (all of the file's must have been)."""
        digests = [*self._digests, self._hasher.hexdigest()]
        return whole_file(self.algorithm, digests, self._lengths, self._parted)
