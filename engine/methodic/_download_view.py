"""Downloads as the pool shows them: rows in its snapshots and events on its bus, like uploads.

A download in flight is an ``AssetSnapshot`` (id ``download:<asset id>``, so an asset this
pool uploads and downloads has two rows) of state ``downloading`` (then ``downloaded`` or
``failed``) whose ``local_dir`` is the destination; its files are component rows with their
bytes. Progress events are throttled per file, as an upload's are. ``pause`` holds every range
of a download between chunks (a connection the server drops meanwhile resumes with ``Range``);
``cancel`` stops it, leaving what was verified for the next call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Container, Sequence
from dataclasses import dataclass

from methodic._events import (
    AssetSnapshot,
    AssetStateChanged,
    ComponentProgress,
    ComponentSnapshot,
    ComponentStateChanged,
    EventBus,
    RateMeter,
    RetryScheduled,
)
from methodic._states import DownloadState
from methodic._types import Asset

DOWNLOADING, DOWNLOADED, PAUSED, FAILED, CANCELLED = (
    DownloadState.DOWNLOADING,
    DownloadState.DOWNLOADED,
    DownloadState.PAUSED,
    DownloadState.FAILED,
    DownloadState.CANCELLED,
)
PROGRESS_INTERVAL = 0.25
DOWNLOAD_PREFIX = "download:"


def newest_finalized(assets: Sequence[Asset]) -> Asset | None:
    """The newest finalized asset of ``assets`` (as the server lists them: in creation order),
    or None. Newest by creation, as retention counts (server/retention.py): an older checkpoint
    that finalizes late never becomes the latest, so retention can never delete the latest."""
    done = [a for a in assets if a.state == "finalized"]
    return done[-1] if done else None


@dataclass
class _FileRow:
    size: int
    done: int = 0
    state: str = "queued"
    attempts: int = 0
    error: str | None = None
    told: float = 0.0


class DownloadJob:
    """One download's progress (a ``DownloadWatcher``) and its controls."""

    def __init__(self, asset_id: str, dest: str, events: EventBus, meter: RateMeter) -> None:
        self.asset_id = asset_id
        self.dest = dest
        self.state: DownloadState = DOWNLOADING
        self.error: str | None = None
        self.files: dict[str, _FileRow] = {}
        self.running = asyncio.Event()
        self.running.set()
        self.task: asyncio.Task[object] | None = None
        self._events = events
        self._meter = meter
        self._moved = 0
        self._started: float | None = None

    @property
    def row_id(self) -> str:
        """The id of its row in a snapshot (the asset itself may be an upload of the pool)."""
        return DOWNLOAD_PREFIX + self.asset_id

    # ---- DownloadWatcher
    def planned(self, files: Sequence[tuple[str, int, int]]) -> None:
        for path, size, already in files:
            self.files[path] = _FileRow(size, already, "completed" if already == size else "queued")
        self._events.emit(AssetStateChanged(self.row_id, self.state))

    def moved(self, path: str, n: int) -> None:
        row = self.files[path]
        row.done += n
        self._moved += n
        self._meter.add(n)
        now = time.monotonic()
        if self._started is None:
            self._started = now
        if now - row.told >= PROGRESS_INTERVAL:
            row.told = now
            self._events.emit(ComponentProgress(self.row_id, path, row.done, row.size))

    def file_state(self, path: str, state: str, error: str | None = None) -> None:
        row = self.files[path]
        row.state, row.error = state, error
        if state == "completed":
            row.done = row.size
        self._events.emit(ComponentStateChanged(self.row_id, path, state, error))

    def retrying(self, path: str, attempt: int, delay: float, cause: str) -> None:
        row = self.files[path]
        row.attempts += 1
        row.error = cause
        self._events.emit(RetryScheduled(self.row_id, path, attempt, delay, cause))

    # ---- controls and outcome
    def finished(self, error: BaseException | None) -> None:
        if isinstance(error, asyncio.CancelledError):
            self.state = CANCELLED
        elif error is not None:
            self.state, self.error = FAILED, str(error)
        else:
            self.state = DOWNLOADED
        self._events.emit(AssetStateChanged(self.row_id, self.state, self.error))

    def pause(self) -> bool:
        if self.state != DOWNLOADING:
            return False
        self.running.clear()
        self.state = PAUSED
        self._events.emit(AssetStateChanged(self.row_id, self.state))
        return True

    def resume(self) -> bool:
        if self.state != PAUSED:
            return False
        self.running.set()
        self.state = DOWNLOADING
        self._events.emit(AssetStateChanged(self.row_id, self.state))
        return True

    def cancel(self) -> bool:
        if self.task is None or self.task.done():
            return False
        self.running.set()
        self.task.cancel()
        return True

    def snapshot(self, with_components: bool) -> AssetSnapshot:
        total = sum(r.size for r in self.files.values())
        done = sum(min(r.done, r.size) for r in self.files.values())
        rate = eta = None
        if self.state == DOWNLOADING and self._started is not None:
            elapsed = time.monotonic() - self._started
            if elapsed >= 1.0 and self._moved:
                rate = self._moved / elapsed
                eta = (total - done) / rate
        rows = tuple(
            ComponentSnapshot(path, r.state, min(r.done, r.size), r.size, 0, 0, r.attempts, r.error)
            for path, r in self.files.items()
        )
        return AssetSnapshot(
            asset_id=self.row_id,
            asset_type="download",
            local_dir=self.dest,
            state=self.state,
            components_done=sum(1 for r in self.files.values() if r.state == "completed"),
            component_count=len(self.files),
            bytes_done=done,
            bytes_total=total,
            rate=rate,
            eta=eta,
            last_error=self.error,
            components=rows if with_components else (),
            files_uploading=sum(1 for r in self.files.values() if r.state == DOWNLOADING),
        )


class Downloads:
    """The pool's downloads, by asset id (the latest download of an asset replaces the last)."""

    def __init__(self, events: EventBus, meter: RateMeter) -> None:
        self.jobs: dict[str, DownloadJob] = {}
        self._events = events
        self._meter = meter

    def watch(self, asset_id: str, dest: str) -> DownloadJob:
        job = self.jobs[asset_id] = DownloadJob(asset_id, dest, self._events, self._meter)
        return job

    def select(self, asset_id: str | None, uploads: Container[str] = ()) -> list[DownloadJob]:
        """All downloads (None), or the one ``asset_id`` names: its row id, or the asset's id
        when the pool does not also upload that asset."""
        if asset_id is None:
            return list(self.jobs.values())
        if asset_id.startswith(DOWNLOAD_PREFIX):
            asset_id = asset_id.removeprefix(DOWNLOAD_PREFIX)
        elif asset_id in uploads:
            return []
        job = self.jobs.get(asset_id)
        return [job] if job is not None else []
