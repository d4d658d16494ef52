"""The client's side of the integrity chain: the digest of every range before it is presigned,
the caller's declared checksum checked before a byte is sent, and each file's checksum for
finalize, derived from its ranges' digests.

A digest is computed from the file as it is on disk (after its identity is checked); the
receiver refuses a body whose bytes have another one, so a range is only ever stored as the
bytes that were hashed. After a crash the ranges whose digest the tracker did not keep are
hashed again, once the file's identity (size, mtimes, inode, device) shows it unchanged.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Iterator, Sequence
from typing import TypeVar

from methodic import _checksum as checksums
from methodic._states import SETTLED_COMPONENT_STATES, ComponentState
from methodic._transfer import FileChangedError
from methodic._uploads import AssetUpload, ComponentUpload, Key

# Ranges up to this size are hashed SMALL_BATCH (or SMALL_BATCH_BYTES) to a thread hop.
SMALL_RANGE = 1 << 20
SMALL_BATCH = 64
SMALL_BATCH_BYTES = 8 << 20
# Ranges up to this size keep the bytes they were hashed from, to be sent (no second read,
# no second thread hop); at most PRESIGN_BATCH of them wait per asset (~13 MiB).
KEEP_BODY = 64 << 10
# Ranges hashed while the asset's create call is in flight: the first presign call's (the
# rest are hashed as they are presigned, in the background); that call waits for them.
FIRST_PRESIGN_BATCH = 32
AHEAD_BYTES = 16 << 20

T = TypeVar("T")
Range = tuple[ComponentUpload, int | None]  # a whole file's (None) or a part's


def algorithm_of(up: AssetUpload) -> str:
    return up.algorithm or checksums.DEFAULT_ALGORITHM


async def ensure_digests(up: AssetUpload, keys: Sequence[Key], *, strict: bool = True) -> None:
    """Hash every range of ``keys`` that has no digest yet, concurrently, off the loop.

    ``strict``: the first failure is raised; otherwise a range that fails stays without one.
    """
    todo = [(up.components[path], part) for path, part in keys]
    todo = [(c, part) for c, part in todo if part not in c.digests]
    jobs = [_hash(up, c, part) for c, part in todo if not _small(c, part)]
    small = [(c, part) for c, part in todo if _small(c, part)]
    jobs += [_hash_small(up, batch, strict) for batch in _small_batches(small)]
    if jobs:
        await asyncio.gather(*jobs, return_exceptions=not strict)


async def hashed_during(up: AssetUpload, create: Awaitable[T]) -> T:
    """Await ``create`` (the asset's create call) while the first ranges to send are hashed,
    so the first presign need not wait for them. The server names the algorithm at create:
    if it is not the one guessed, those digests are dropped (hashed again when presigned)."""
    algorithm = algorithm_of(up)
    keys: list[Key] = []
    size = 0
    for c in up.components.values():
        if c.state in SETTLED_COMPONENT_STATES:
            continue
        for part in c.part_numbers():
            if part not in c.digests:
                keys.append((c.path, part))
                size += c.span(part)[1]
        if len(keys) >= FIRST_PRESIGN_BATCH or size >= AHEAD_BYTES:
            break
    hashing = asyncio.ensure_future(ensure_digests(up, keys, strict=False))
    try:
        return await create
    finally:
        await hashing  # not strict: a range that failed is hashed again by its job
        if algorithm_of(up) != algorithm:
            for path, part in keys:
                up.components[path].digests.pop(part, None)
                up.bodies.pop((path, part), None)


def _small_batches(ranges: Sequence[Range]) -> Iterator[list[Range]]:
    """Small ranges SMALL_BATCH (or SMALL_BATCH_BYTES) to a batch: what one thread hop
    hashes (three hops a file cost more than the hash)."""
    batch: list[Range] = []
    size = 0
    for c, part in ranges:
        batch.append((c, part))
        size += c.span(part)[1]
        if len(batch) >= SMALL_BATCH or size >= SMALL_BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _small(c: ComponentUpload, part: int | None) -> bool:
    return c.span(part)[1] <= SMALL_RANGE and (c.declared is None or c.declared_ok)


async def _hash_small(up: AssetUpload, batch: Sequence[Range], strict: bool) -> None:
    """``_hash`` for many small ranges in one thread hop: each file's identity checked, its
    range hashed, its identity checked again, in turn; the results land as ``_hash``'s do."""
    algorithm = algorithm_of(up)

    def run() -> list[tuple[str, bytes | None] | BaseException]:
        out: list[tuple[str, bytes | None] | BaseException] = []
        for c, part in batch:
            try:
                out.append(_digest_of(c, part, algorithm))
            except (FileChangedError, OSError, EOFError) as exc:
                out.append(exc)
        return out

    results = await asyncio.to_thread(run)
    failure: BaseException | None = None
    for (c, part), result in zip(batch, results, strict=True):
        try:
            if isinstance(result, BaseException):
                raise result
            _settle(c, part, result[0])
            if result[1] is not None:
                up.bodies[(c.path, part)] = result[1]
        except (FileChangedError, OSError, EOFError) as exc:
            failure = failure or exc
    if failure is not None and strict:
        raise failure


def _digest_of(c: ComponentUpload, part: int | None, algorithm: str) -> tuple[str, bytes | None]:
    """The range's digest, read between two checks of the file's identity (blocking), and
    for a range of at most ``KEEP_BODY`` bytes the bytes it was computed from."""
    c.identity.check()
    offset, length = c.span(part)
    body: bytes | None = None
    try:
        if length <= KEEP_BODY:
            body = _read(c.identity.local_path, offset, length)
            hasher = checksums.new_hasher(algorithm)
            hasher.update(body)
            digest = hasher.hexdigest()
        else:
            digest = checksums.hash_range(c.identity.local_path, offset, length, algorithm)
    except (EOFError, FileNotFoundError):
        raise FileChangedError(
            f"{c.identity.local_path} shrank or vanished while it was being hashed"
        ) from None
    c.identity.check()
    return digest, body


def _read(path: str, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, length, offset)
    finally:
        os.close(fd)
    if len(data) != length:
        raise EOFError(f"{path} ends before byte {offset + length}")
    return data


async def _hash(up: AssetUpload, c: ComponentUpload, part: int | None) -> None:
    algorithm = algorithm_of(up)
    await asyncio.to_thread(c.identity.check)
    if c.declared is not None and not c.declared_ok:
        await _check_declared(c, algorithm)
    offset, length = c.span(part)
    if part is None and c.declared is not None and c.declared.startswith(f"{algorithm}:"):
        digest = c.declared.partition(":")[2]  # just read and found to be the file's
    else:
        try:
            digest = await asyncio.to_thread(
                checksums.hash_range, c.identity.local_path, offset, length, algorithm
            )
        except (EOFError, FileNotFoundError):
            raise FileChangedError(
                f"{c.identity.local_path} shrank or vanished while it was being hashed"
            ) from None
    await asyncio.to_thread(c.identity.check)
    _settle(c, part, digest)


def _settle(c: ComponentUpload, part: int | None, digest: str) -> None:
    """Keep the range's digest, unless the receiver refused a body of it with another one
    (then the file changed while it was being uploaded)."""
    refused = c.take_suspect(part)
    if refused is not None and refused != digest:
        where = f"part {part}" if part is not None else "the file"
        raise FileChangedError(
            f"{c.identity.local_path} changed while it was being uploaded ({where} has other "
            "bytes than when it was sent); a checkpoint must not change while it uploads: "
            "discard this asset and register the directory again once it is complete"
        )
    c.digests[part] = digest


async def verify_stored(up: AssetUpload) -> None:
    """After a crash: every range the server holds whose digest this client recorded is read
    again and must still have it. A file rewritten in place without a trace in its metadata (a
    shared memory mapping writes without moving mtime or ctime) fails here, naming it, instead
    of being published as the old ranges plus new ones. Costs one read of what was sent."""
    held = [
        (c, n)
        for c in up.components.values()
        for n in (sorted(c.parts_done) if c.part_size else [None])
        if n in c.digests and (c.part_size or c.state == ComponentState.COMPLETED)
    ]
    if not held:
        return
    algorithm = algorithm_of(up)

    def check(batch: Sequence[Range]) -> None:  # in a thread
        for c, part in batch:
            offset, length = c.span(part)
            try:
                now = checksums.hash_range(c.identity.local_path, offset, length, algorithm)
            except (EOFError, FileNotFoundError):
                now = ""
            if now != c.digests[part]:
                where = f"part {part}" if part is not None else "its bytes"
                raise FileChangedError(
                    f"{c.identity.local_path} changed since it was sent ({where} no longer has "
                    "the digest recorded when it was sent), though its size and times did not; "
                    "a checkpoint must not change while it uploads (write a new file and rename "
                    "it into place): discard this asset and register the directory again"
                )

    # A task and a thread hop per file: 50,000 stored 1 KiB files took 15 s and ~200 MB.
    big = [[r] for r in held if r[0].span(r[1])[1] > SMALL_RANGE]
    small = [r for r in held if r[0].span(r[1])[1] <= SMALL_RANGE]
    await asyncio.gather(*(asyncio.to_thread(check, b) for b in [*big, *_small_batches(small)]))


async def _check_declared(c: ComponentUpload, algorithm: str) -> None:
    """Read the whole file once and compare it with the digest the caller registered."""
    assert c.declared is not None
    declared_algorithm, want = checksums.parse(c.declared)
    got = await asyncio.to_thread(
        checksums.hash_range, c.identity.local_path, 0, c.size, declared_algorithm
    )
    if got != want:
        raise FileChangedError(
            f"{c.identity.local_path}: its {declared_algorithm} is {got}, not the {want} it was "
            "registered with; nothing of it was sent"
        )
    c.declared_ok = True


def file_checksum(up: AssetUpload, c: ComponentUpload) -> str:
    """``algo:value`` of the whole file from its ranges' digests (all must be known)."""
    algorithm = algorithm_of(up)
    ranges = c.ranges()
    value = checksums.whole_file(
        algorithm,
        [c.digests[n] for n in ranges],
        [c.span(n)[1] for n in ranges],
        parted=c.part_size is not None,
    )
    return f"{algorithm}:{value}"


async def file_checksums(up: AssetUpload) -> dict[str, str]:
    """Every component's checksum for finalize; ranges without a digest are hashed again."""
    await ensure_digests(
        up, [(c.path, n) for c in up.components.values() for n in c.ranges() if n not in c.digests]
    )
    return {c.path: file_checksum(up, c) for c in up.components.values()}
