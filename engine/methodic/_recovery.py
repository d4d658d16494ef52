"""Crash recovery: finish every upload an earlier process left unfinished."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from methodic import _tracker_ops as ops
from methodic._client import AsyncChronicle
from methodic._states import AssetState
from methodic._uploads import AssetUpload, adopted_upload

if TYPE_CHECKING:
    from methodic._tracker import UploadTracker


@dataclass
class DrainReport:
    """What ``drain_incomplete_uploads`` did, asset by asset."""

    resumed: list[str] = field(default_factory=list)
    finalized: list[str] = field(default_factory=list)
    already_finalized: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    bytes_resent: int = 0
    bytes_skipped: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed


async def adopt_incomplete_uploads(
    chronicle: AsyncChronicle,
    tracker: UploadTracker,
    report: DrainReport | None = None,
    *,
    start: bool = True,
) -> list[str]:
    """Bring every unfinished asset of ``tracker`` into the pool: started, or only held.

    Each adopted asset is claimed (its tracker owner becomes this process); one whose owner is
    another process that still runs is left to it and listed in ``report.skipped``.

    Held assets (``start=False``) are listed by the pool in state ``interrupted`` until an
    operator resumes, discards or force-finalizes them; paused ones stay paused either way.
    Returns the ids of the adopted assets.
    """
    report = report if report is not None else DrainReport()
    return [up.asset_id for up in await _adopt(chronicle, tracker, report, start)]


async def _adopt(
    chronicle: AsyncChronicle, tracker: UploadTracker, report: DrainReport, start: bool
) -> list[AssetUpload]:
    pool = chronicle._pool
    atracker = await pool.tracker_for(Path(tracker.db_path))
    uploads: list[AssetUpload] = []
    for tracked in await asyncio.to_thread(tracker.get_pending_uploads):
        if tracked.asset_id in pool.assets:
            report.skipped[tracked.asset_id] = "already in this process's upload pool"
            continue
        up = adopted_upload(tracked, atracker, chronicle.server_url)
        if up is None:
            report.failed[tracked.asset_id] = "the tracker does not record which run it belongs to"
            continue
        owner = await atracker.run(ops.claim(tracked.asset_id))
        if owner is not None:  # resuming it here could send it twice
            report.skipped[tracked.asset_id] = (
                f"pid {owner} is still running: it may be uploading this (see `attach`)"
            )
            continue
        if up.state == AssetState.PAUSED:
            report.skipped[tracked.asset_id] = "paused by the operator; resume it to continue"
        uploads.append(up)
        if start and up.state != AssetState.PAUSED:
            report.resumed.append(up.asset_id)
            pool.submit(up)
        else:
            pool.hold(up)
    return uploads


async def drain_incomplete_uploads_async(
    chronicle: AsyncChronicle, tracker: UploadTracker
) -> DrainReport:
    """Resume every unfinished upload recorded in ``tracker`` and finalize it.

    For each asset: create it on the server if the crash came before that, ask the server which
    components and parts it already stores, send only the rest, then finalize. Returns what it
    did, asset by asset (``drain_incomplete_uploads`` is the same for a ``Chronicle``).
    """
    report = DrainReport()
    adopted = await _adopt(chronicle, tracker, report, start=True)
    uploads = [up for up in adopted if up.asset_id in report.resumed]
    await chronicle._pool.wait(uploads)
    for up in uploads:
        report.bytes_resent += up.bytes_sent
        report.bytes_skipped += up.bytes_skipped
        exc = up.future.exception()
        if exc is not None:
            report.failed[up.asset_id] = str(exc)
        elif up.was_finalized:
            report.already_finalized.append(up.asset_id)
        else:
            report.finalized.append(up.asset_id)
    return report
