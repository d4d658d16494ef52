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
from collections.abc import Sequence

from methodic import _checksum as checksums
from methodic._states import ComponentState
from methodic._transfer import FileChangedError
from methodic._uploads import AssetUpload, ComponentUpload, Key


def algorithm_of(up: AssetUpload) -> str:
    return up.algorithm or checksums.DEFAULT_ALGORITHM


async def ensure_digests(up: AssetUpload, keys: Sequence[Key], *, strict: bool = True) -> None:
    """Hash every range of ``keys`` that has no digest yet, concurrently, off the loop.

    ``strict``: the first failure is raised; otherwise a range that fails stays without one.
    """
    todo = [(up.components[path], part) for path, part in keys]
    todo = [(c, part) for c, part in todo if part not in c.digests]
    if todo:
        await asyncio.gather(
            *(_hash(up, c, part) for c, part in todo), return_exceptions=not strict
        )


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
    refused = c.suspect.pop(part, None)
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

    async def check(c: ComponentUpload, part: int | None) -> None:
        offset, length = c.span(part)
        try:
            now = await asyncio.to_thread(
                checksums.hash_range, c.identity.local_path, offset, length, algorithm
            )
        except (EOFError, FileNotFoundError):
            now = ""
        if now != c.digests[part]:
            where = f"part {part}" if part is not None else "its bytes"
            raise FileChangedError(
                f"{c.identity.local_path} changed since it was sent ({where} no longer has the "
                "digest recorded when it was sent), though its size and times did not; a "
                "checkpoint must not change while it uploads (write a new file and rename it "
                "into place): discard this asset and register the directory again"
            )

    await asyncio.gather(*(check(c, n) for c, n in held))


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
