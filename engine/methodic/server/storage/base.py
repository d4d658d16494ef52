"""Where component bytes live: the narrow interface every storage backend implements.

Two backends sit behind it. ``LocalStorage`` (local.py) keeps the bytes under the data
directory and receives them itself, through this server's presigned blob routes (it is also a
``Receiver``). ``S3Storage`` (s3.py) hands out SigV4-presigned S3 URLs: clients PUT
straight to the bucket and this server keeps only metadata. The catalog talks to either through
``Storage`` alone, so the control API answers the same JSON on both.

Every method blocks (disk or network): call it from a worker thread, never the event loop.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol


class StorageSetupError(RuntimeError):
    """The storage cannot be used at all (no such bucket, no credentials, ...): a one-line reason."""


class StorageUnavailable(RuntimeError):
    """The storage failed to answer a request (network, throttling): the client should retry."""


def part_count(size: int, part_size: int | None) -> int:
    """Parts of a component; a multipart component of 0 bytes is one empty part."""
    if part_size is None:
        return 1
    return max(1, math.ceil(size / part_size))


def part_range(size: int, part_size: int, part: int) -> tuple[int, int]:
    """(offset, length) of part ``part`` (from 1) of a component of ``size`` bytes."""
    offset = (part - 1) * part_size
    return offset, (min(part_size, size - offset) if size else 0)


@dataclass(frozen=True)
class BlobKey:
    """One component of one asset. Backends may name the stored object by index or by path."""

    asset_id: str
    index: int
    path: str


@dataclass(frozen=True)
class Component:
    """A manifest component, with the receipts of bytes this server received itself.

    Receipts (``stored_digest`` of a one-PUT component, ``parts_stored`` and ``part_digest``)
    are written by the blob data path of a receiving backend: the digest of the received bytes
    in the asset's checksum ``algorithm`` (None: a legacy asset, sha256 receipts), and whether
    the PUT was *bound* to the digest the client computed (``stored_bound``, ``parts_bound``).
    An S3 server has none, and learns what is stored from S3. ``checksum`` is the settled
    whole-file checksum (``algo:value``) once finalized.
    """

    index: int
    path: str
    size: int
    sha256: str | None  # the manifest's (the client-declared whole-file sha256)
    part_size: int | None
    stored_digest: str | None
    parts_stored: tuple[int, ...] = ()
    part_digest: Mapping[int, str] = field(default_factory=dict, compare=False, repr=False)
    algorithm: str | None = None
    stored_bound: bool = False
    parts_bound: frozenset[int] = frozenset()
    checksum: str | None = None

    @property
    def receipt_algorithm(self) -> str:
        """The algorithm of this component's receipt digests (sha256 for a legacy asset)."""
        return self.algorithm or "sha256"

    @property
    def bound(self) -> bool | None:
        """Whether every receipt was bound: True, False (none was), None (some were)."""
        if self.part_size is None:
            return self.stored_bound
        if not self.parts_stored or len(self.parts_bound) == len(self.parts_stored):
            return bool(self.parts_stored)
        return None if self.parts_bound else False

    @property
    def parts(self) -> int:
        return part_count(self.size, self.part_size)

    @property
    def received(self) -> bool:
        """The receipts cover every byte (a receiving backend's view of "stored")."""
        if self.part_size is None:
            return self.stored_digest is not None
        return len(self.parts_stored) == self.parts

    def key(self, asset_id: str) -> BlobKey:
        return BlobKey(asset_id, self.index, self.path)

    def part_length(self, part: int) -> int:
        assert self.part_size is not None
        return part_range(self.size, self.part_size, part)[1]


@dataclass(frozen=True)
class Slot:
    """One PUT a client is to make: a whole component (``part`` None) or one part of it."""

    component: Component
    part: int | None
    offset: int
    length: int
    checksum: str | None = None  # "algo:hex" of exactly this range, bound into the target


@dataclass(frozen=True)
class Presigned:
    url: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Found:
    """What storage holds of one component.

    ``complete``: every byte is there (for a multipart component: every part, or the assembled
    object). The other fields come from a deep inspection (finalize) of a complete component:
    ``size`` held, ``digest``: the whole-file checksum value of the held bytes in the asset's
    algorithm when the backend knows it (``_checksum.whole_file`` of the part digests for a
    parted file), ``bad_parts`` whose bytes differ from what was received, ``damaged``: why the
    held bytes are wrong.
    """

    complete: bool
    parts: frozenset[int] = frozenset()
    size: int | None = None
    digest: str | None = None
    bad_parts: tuple[int, ...] = ()
    damaged: str | None = None


@dataclass(frozen=True)
class StorageLimits:
    """What a backend can store, checked when an asset is created (S3's rules differ from a disk's)."""

    min_part_size: int = 1  # for every part but the last
    max_part_size: int | None = None
    max_single_put: int | None = None  # largest component sent in one PUT
    # The checksum algorithms whose digests the backend verifies on receipt (the first for
    # an asset that names none is ``_checksum.DEFAULT_ALGORITHM``, which every backend has).
    checksum_algorithms: tuple[str, ...] = ("crc64nvme", "sha256", "blake3")


@dataclass(frozen=True)
class Received:
    size: int
    digest: str  # hex, in the algorithm the upload was opened with
    sha256: str | None = None  # also the body's sha256, when asked for (and not the digest)


class Upload(Protocol):
    """One PUT body being received. ``write`` blocks: call it off the event loop."""

    def write(self, data: bytes | memoryview) -> None: ...
    def finish(self) -> Received: ...  # all bytes arrived; ValueError on a length mismatch
    def commit(self) -> None: ...  # make the received bytes the component's (after finish)
    def abort(self) -> None: ...  # forget this body; safe to call at any time, repeatedly


class Receiver(Protocol):
    """A backend whose bytes arrive through this server's own blob routes."""

    def open_object_upload(
        self, key: BlobKey, length: int, algorithm: str, *, sha256: bool = False
    ) -> Upload: ...  # sha256: also hash the body with sha256 (Received.sha256)
    def open_part_upload(
        self, key: BlobKey, offset: int, length: int, algorithm: str, *, stored: bool = False
    ) -> Upload: ...  # stored: those bytes are already there (check the body, write nothing)
    def open_read(self, key: BlobKey) -> BinaryIO: ...


class Storage(Protocol):
    limits: StorageLimits

    @property
    def receiver(self) -> Receiver | None:
        """Itself when this server receives the bytes, None when clients PUT elsewhere."""
        ...

    def describe(self) -> str: ...

    def presign_puts(
        self, asset_id: str, slots: Sequence[Slot], expires: int, origin: str
    ) -> list[Presigned]:
        """Upload targets for ``slots``, valid until ``expires`` (Unix seconds).

        ``origin`` is where this server's blob routes are reached (receiving backends only).
        """
        ...

    def presign_get(self, key: BlobKey, expires: int, origin: str) -> str: ...

    def inspect(
        self, asset_id: str, components: Sequence[Component], *, deep: bool, workers: int
    ) -> list[Found]:
        """What is stored of each component, in order; ``deep`` also measures complete ones."""
        ...

    def seal(
        self,
        asset_id: str,
        components: Sequence[Component],
        workers: int,
        checksums: Mapping[int, str],
    ) -> list[tuple[Component, str]]:
        """Make a verified asset's bytes final and durable; returns (component, why) failures.

        ``checksums``: {component index: whole-file checksum value} the client computed, in
        the asset's algorithm; a backend that can have the store verify them does (S3).
        A failure whose ``why`` starts with "checksum mismatch" means the bytes are wrong.
        """
        ...

    def forget(self, key: BlobKey) -> None:
        """Drop whatever is stored of one component, so that it is sent again."""
        ...

    def delete_asset(self, asset_id: str) -> None:
        """Remove every stored byte of an asset (and abort its unfinished uploads)."""
        ...

    def close(self) -> None: ...
