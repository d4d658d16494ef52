"""What the pool knows of an upload, in memory: the asset, its components, their parts.

Built from a registration (``plan_components``) or from a tracker an earlier process left
(``adopted_upload``). Nothing here does I/O except ``AssetUpload.track``, which writes
through the asset's tracker when it has one.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from operator import attrgetter
from typing import Any

from methodic import _tracker_ops as ops
from methodic._contributions import Contribution, RankStatus, from_tracker
from methodic._events import AssetSnapshot, ComponentSnapshot, RateMeter
from methodic._states import AssetState, ComponentState
from methodic._tracker import AsyncTracker
from methodic._transfer import FileIdentity
from methodic._types import (
    Asset,
    ComponentSpec,
    RunBinding,
    TrackedAsset,
    TrackedComponent,
    UploadTarget,
)

MiB = 1 << 20
MAX_PARTS = 10_000

Key = tuple[str, int | None]
"""One unit of transfer: (component path, part number, or None for a whole file)."""


@dataclass(eq=False, slots=True)
class ComponentUpload:
    path: str
    identity: FileIdentity
    sha256: str | None
    part_size: int | None
    declared: str | None = None  # the caller's "algo:hex" of the whole file
    declared_ok: bool = False  # the file was read and found to have it
    state: ComponentState = ComponentState.QUEUED
    bytes_done: int = 0
    attempts: int = 0
    last_error: str | None = None
    checksum: str | None = None  # "algo:value" of the whole file, once every range is sent
    # Hex digest (the asset's algorithm) of each range, by part number (None: the whole file),
    # computed before the range is presigned.
    digests: dict[int | None, str] = field(default_factory=dict)
    last_event: float = 0.0
    # The containers below are made on first use (the properties): most files never need
    # them, and 100,000 empty sets and dicts held ~47 MB. An empty one assigned is dropped.
    _parts_done: set[int] | None = field(default=None, repr=False)
    _suspect: dict[int | None, str] | None = field(default=None, repr=False)
    _piece_sent: dict[int | None, int] | None = field(default=None, repr=False)
    _piece_counted: dict[int | None, int] | None = field(default=None, repr=False)

    @property
    def parts_done(self) -> set[int]:
        if self._parts_done is None:
            self._parts_done = set()
        return self._parts_done

    @parts_done.setter
    def parts_done(self, value: set[int]) -> None:
        self._parts_done = value or None

    @property
    def suspect(self) -> dict[int | None, str]:
        """A range's digest the receiver refused, kept to tell a damaged send (the same digest
        again) from a changed file."""
        if self._suspect is None:
            self._suspect = {}
        return self._suspect

    def take_suspect(self, part: int | None) -> str | None:
        """The refused digest of ``part``, forgotten (without making the dict for none)."""
        return self._suspect.pop(part, None) if self._suspect else None

    @property
    def piece_sent(self) -> dict[int | None, int]:
        """Per piece in progress (part number, None for a whole file): bytes its current
        attempt sent. ``piece_counted``: bytes of it counted in bytes_done (the most any
        attempt sent). A stopped or failed attempt does not take its bytes out of bytes_done:
        progress never goes back."""
        if self._piece_sent is None:
            self._piece_sent = {}
        return self._piece_sent

    @piece_sent.setter
    def piece_sent(self, value: dict[int | None, int]) -> None:
        self._piece_sent = value or None

    @property
    def piece_counted(self) -> dict[int | None, int]:
        if self._piece_counted is None:
            self._piece_counted = {}
        return self._piece_counted

    @piece_counted.setter
    def piece_counted(self, value: dict[int | None, int]) -> None:
        self._piece_counted = value or None

    @property
    def size(self) -> int:
        return self.identity.size

    @property
    def part_count(self) -> int:
        return max(1, math.ceil(self.size / self.part_size)) if self.part_size else 1

    def part_numbers(self) -> list[int | None]:
        if not self.part_size:
            return [None]
        return [n for n in range(1, self.part_count + 1) if n not in self.parts_done]

    def part_length(self, n: int) -> int:
        assert self.part_size
        return min(self.part_size, self.size - (n - 1) * self.part_size)

    def span(self, part: int | None) -> tuple[int, int]:
        """(offset, length) in the file of one range: a part, or the whole file (None)."""
        if part is None:
            return 0, self.size
        return (part - 1) * (self.part_size or 0), self.part_length(part)

    def ranges(self) -> list[int | None]:
        """Every range of the file, in order."""
        return [None] if not self.part_size else list(range(1, self.part_count + 1))

    def manifest(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "size": self.size,
            "sha256": self.sha256,
            "part_size": self.part_size,
        }

    def snapshot(self) -> ComponentSnapshot:
        return ComponentSnapshot(
            self.path,
            self.state,
            self.bytes_done,
            self.size,
            len(self._parts_done or ()),
            self.part_count if self.part_size else 0,
            self.attempts,
            self.last_error,
        )


_size = attrgetter("identity.size")
_state = attrgetter("state")


def new_future() -> asyncio.Future[Asset]:
    future: asyncio.Future[Asset] = asyncio.get_running_loop().create_future()
    # A failure nobody waits for must not be logged as "never retrieved".
    future.add_done_callback(lambda f: f.cancelled() or f.exception())
    return future


@dataclass(eq=False)
class AssetUpload:
    """One asset in flight: what the pool knows of it, in memory."""

    asset_id: str
    asset_type: str
    binding: RunBinding
    metadata: dict[str, Any]
    components: dict[str, ComponentUpload]
    tracker: AsyncTracker | None
    local_dir: str | None = None
    sealed: bool = True
    resumed: bool = False
    state: AssetState = AssetState.REGISTERED
    last_error: str | None = None
    future: asyncio.Future[Asset] = field(default_factory=new_future)
    targets: dict[Key, UploadTarget] = field(default_factory=dict)
    use_until: dict[Key, float] = field(default_factory=dict)
    presign_order: deque[Key] = field(default_factory=deque)
    presign_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    queued: set[Key] = field(default_factory=set)  # jobs in the queue or in flight
    # A small range's bytes as they were hashed (``_digests.KEEP_BODY``), until they are sent:
    # the body that goes out is then the very bytes whose digest its URL is bound to. Per
    # asset, not per component: a dict per file would outlive its one entry.
    bodies: dict[Key, bytes] = field(default_factory=dict)
    inflight: set[asyncio.Task[Any]] = field(default_factory=set)
    meter: RateMeter = field(default_factory=RateMeter)
    bytes_sent: int = 0  # net bytes this process sent (failed attempts are subtracted)
    bytes_skipped: int = 0  # bytes the server already held when a resumed upload began
    was_finalized: bool = False  # the server had finalized it before this process began
    remote_ready: bool = False
    # The tracker says the server had created it (an earlier process was sending): a resume
    # reads the server's account without sending the whole manifest again.
    known_remote: bool = False
    # The paths of the components the server lists (None: all). A big manifest is created with
    # its first slice, the rest appended while those send; only what is listed is sent.
    listed: set[str] | None = None
    # Set once a component is stored (the rest of a sliced manifest is listed after that).
    first_stored: asyncio.Event = field(default_factory=asyncio.Event)
    algorithm: str | None = None  # of the range digests; the server says it at create
    resends: int = 0  # rounds of sending again what finalize found missing
    completed: int = 0  # components completed; kept as a count so each completion is O(1)
    contribution: Contribution | None = None  # a rank's part of a multi-rank asset
    delete_local: bool = False  # remove the registered files once the asset is finalized
    ranks: RankStatus | None = None  # the server's account of the multi-rank asset
    stored_at: float | None = None  # when this rank's contribution was stored (time.time())

    def __post_init__(self) -> None:
        self.recount()

    def recount(self) -> None:
        self.completed = sum(
            1 for c in self.components.values() if c.state == ComponentState.COMPLETED
        )

    @property
    def remaining(self) -> int:
        return len(self.components) - self.completed

    async def track(self, op: ops.Op[Any]) -> Any:
        return await self.tracker.run(op) if self.tracker is not None else None

    def cancel_transfers(self) -> None:
        for task in list(self.inflight):
            task.cancel()

    def snapshot(self, with_components: bool, limit: int | None = None) -> AssetSnapshot:
        """With ``limit``, at most that many files (a dashboard at 4 Hz does not build
        100,000 of them): the block of ``limit`` in manifest order that holds the first file not
        completed, so the files listed change once per ``limit`` completions, not at each."""
        comps = self.components.values()
        done = sum(c.bytes_done for c in comps)
        total = sum(map(_size, comps))
        # No rate (nor ETA) until the meter has one full interval of transfer: a first, partly
        # busy sample would show a tiny rate and an ETA of days.
        settled = self.state == AssetState.UPLOADING and self.meter.settled
        rate = self.meter.rate if settled else None
        return AssetSnapshot(
            asset_id=self.asset_id,
            asset_type=self.asset_type,
            local_dir=self.local_dir,
            state=self.state,
            components_done=self.completed,
            component_count=len(self.components),
            bytes_done=done,
            bytes_total=total,
            rate=rate,
            eta=(total - done) / rate if rate else None,
            last_error=self.last_error,
            components=self._component_snapshots(limit) if with_components else (),
            files_uploading=list(map(_state, comps)).count(ComponentState.UPLOADING),
            **self._rank_fields(),
        )

    def _component_snapshots(self, limit: int | None) -> tuple[ComponentSnapshot, ...]:
        comps = self.components.values()
        if limit is None or len(comps) <= limit:
            return tuple(c.snapshot() for c in comps)
        done = ComponentState.COMPLETED
        first = next((i for i, c in enumerate(comps) if c.state != done), len(comps))
        start = min(first - first % limit, len(comps) - limit)
        return tuple(c.snapshot() for c in islice(comps, start, start + limit))

    def _rank_fields(self) -> dict[str, Any]:
        c = self.contribution
        if c is None:
            return {}
        r = self.ranks
        return {
            "rank": c.rank,
            "world_size": c.world_size,
            "ranks_stored": None if r is None else r.stored,
            "ranks_missing": () if r is None else r.missing,
            "waiting": None if r is None or self.state != AssetState.FINALIZING else r.waiting,
            "contribution_stored": self.stored_at is not None,
            "contributions": () if r is None else r.contributions,
        }


class AsyncUploadHandle:
    """What ``register_and_upload_async`` returns: the asset id and the eventual finalized asset."""

    def __init__(self, upload: AssetUpload) -> None:
        self._upload = upload

    @property
    def asset_id(self) -> str:
        return self._upload.asset_id

    def done(self) -> bool:
        return self._upload.future.done()

    @property
    def contribution_stored(self) -> bool:
        """Of a rank's contribution: True once the server holds it stored and verified (the
        asset itself is finalized when every rank's is; ``result()`` waits for that)."""
        return self._upload.stored_at is not None or (
            self._upload.state == AssetState.FINALIZED and self._upload.contribution is not None
        )

    @property
    def stored_at(self) -> float | None:
        """When this rank's contribution was stored (``time.time()``), if it is."""
        return self._upload.stored_at

    def add_done_callback(self, fn: Callable[[AsyncUploadHandle], object]) -> None:
        """Call ``fn(handle)`` once, on the event loop, when the asset is finalized or the
        upload failed (``result()`` then says which). An exception in ``fn`` is logged."""
        self._upload.future.add_done_callback(lambda _f: fn(self))

    async def result(self, timeout: float | None = None) -> Asset:
        """The finalized asset; raises ``UploadFailedError`` if the upload gave up."""
        return await asyncio.wait_for(asyncio.shield(self._upload.future), timeout)

    def __repr__(self) -> str:
        return f"<UploadHandle asset_id={self.asset_id} state={self._upload.state}>"


def part_size_for(size: int, threshold: int, part_size: int) -> int | None:
    """None for a file sent in one PUT; otherwise a part size that keeps it under 10,000 parts."""
    if size < threshold:
        return None
    return max(part_size, math.ceil(size / MAX_PARTS / MiB) * MiB)


def plan_components(
    specs: Sequence[ComponentSpec], *, part_threshold: int, part_size: int
) -> dict[str, ComponentUpload]:
    """The components of a new registration, each sent whole or in parts."""
    # Positional (path, identity, sha256, part_size, declared): one per file, and keywords
    # were a third of the cost of each.
    return {
        s.path: ComponentUpload(
            s.path,
            FileIdentity(
                os.fspath(s.local_path), s.size, s.mtime_ns, s.inode, s.ctime_ns, s.device
            ),
            s.sha256,
            part_size_for(s.size, part_threshold, part_size),
            s.declared,
        )
        for s in specs
    }


def adopted_upload(
    tracked: TrackedAsset, tracker: AsyncTracker, server_url: str
) -> AssetUpload | None:
    """The upload (not started) of an asset an earlier process left unfinished.

    None when the tracker does not record which run the asset belongs to.
    """
    if tracked.binding is None:
        return None
    b = tracked.binding
    metadata, contribution, delete_local = from_tracker(tracked.metadata)
    return AssetUpload(
        asset_id=tracked.asset_id,
        asset_type=tracked.asset_type,
        binding=RunBinding(server_url, b.run_id, b.experiment_id, b.variation, b.run),
        metadata=metadata,
        contribution=contribution,
        delete_local=delete_local,
        components=_tracked_components(tracked),
        tracker=tracker,
        local_dir=tracked.local_dir,
        sealed=tracked.sealed,
        resumed=True,
        known_remote=tracked.state in (AssetState.UPLOADING, AssetState.FINALIZING),
        state=AssetState.PAUSED if tracked.state == AssetState.PAUSED else AssetState.REGISTERED,
    )


def _tracked_components(tracked: TrackedAsset) -> dict[str, ComponentUpload]:
    """Rebuild the in-memory view of a tracked asset's components."""
    return {
        tc.path: ComponentUpload(
            path=tc.path,
            identity=FileIdentity(
                tc.local_path, tc.size, tc.mtime_ns, tc.inode, tc.ctime_ns, tc.device
            ),
            sha256=tc.sha256,
            part_size=tc.part_size,
            declared=tc.declared,
            state=(
                ComponentState.COMPLETED
                if tc.state == ComponentState.COMPLETED
                else ComponentState.QUEUED
            ),
            bytes_done=tc.bytes_sent,
            attempts=tc.attempts,
            last_error=tc.last_error,
            checksum=tc.checksum,
            _parts_done=set(tc.parts_done) or None,
            digests=_tracked_digests(tc),
        )
        for tc in tracked.components
    }


def _tracked_digests(tc: TrackedComponent) -> dict[int | None, str]:
    """The range digests the tracker recorded: each sent part's, or a whole file's checksum."""
    digests: dict[int | None, str] = {n: d for n, d in tc.part_digests.items()}
    if tc.part_size is None and tc.checksum is not None:
        _algorithm, named, value = tc.checksum.partition(":")
        if named:  # a bare hex is an older tracker's sha256: the range is hashed again
            digests[None] = value
    return digests
