"""Crash recovery: finish every upload an earlier process left unfinished.

Recovery always returns. An asset it cannot finish on its own is reported, never waited on:

- ``skipped``: another live process owns it (identified by pid *and* start time, so a pid
  that was reused after the owner died holds nothing); ``take_over=True`` takes it anyway.
- ``unsealed``: registered with ``seal=False`` by a process that stopped before ``seal()``.
  Nobody can know whether more components were to follow, so it is never finalized here:
  the operator seals it (``tracker.seal(id)``, ``methodic-tui seal ID``) and drains again, or
  discards it. ``upload_unsealed=True`` sends what is registered meanwhile (not finalized).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from methodic import _tracker_ops as ops
from methodic._client import AsyncChronicle
from methodic._states import AssetState
from methodic._types import TrackedAsset
from methodic._uploads import AssetUpload, adopted_upload

if TYPE_CHECKING:
    from methodic._tracker import UploadTracker

TAKE_OVER_HINT = "take_over=True (`methodic-tui resume --take-over`) takes it over anyway"


@dataclass
class DrainReport:
    """What ``drain_incomplete_uploads`` did, asset by asset.

    ``resumed``: assets it sent bytes for; ``finalized``: assets it finalized;
    ``already_finalized``: assets the server had finalized already (nothing sent); ``failed``
    and ``skipped``: {asset id: reason}; ``bytes_resent``: bytes sent again; ``bytes_skipped``:
    bytes the server already held, not sent again; ``ok``: no failures.

    ``unsealed`` maps each asset registered with ``seal=False`` and never sealed to what it
    holds and what to do (seal or discard it); such an asset is not a failure, nor finalized.
    """

    resumed: list[str] = field(default_factory=list)
    finalized: list[str] = field(default_factory=list)
    already_finalized: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    unsealed: dict[str, str] = field(default_factory=dict)
    bytes_resent: int = 0
    bytes_skipped: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed


def unsealed_note(t: TrackedAsset, *, stored: bool = False) -> str:
    return t.unsealed_note(stored=stored)


def skipped_note(pid: int) -> str:
    return f"pid {pid} is still running: it may be uploading this (see `attach`); {TAKE_OVER_HINT}"


async def adopt_incomplete_uploads(
    chronicle: AsyncChronicle,
    tracker: UploadTracker,
    report: DrainReport | None = None,
    *,
    start: bool = True,
    take_over: bool = False,
) -> list[str]:
    """Bring every unfinished asset of ``tracker`` into the pool: started, or only held.

    Each adopted asset is claimed (its tracker owner becomes this process); one whose owner is
    another process that still runs (same pid and start time) is left to it and listed in
    ``report.skipped``, unless ``take_over``.

    Held assets (``start=False``) are listed by the pool in state ``interrupted`` until an
    operator resumes, discards or force-finalizes them; paused ones stay paused either way.
    Unsealed assets are listed in ``report.unsealed``: held with ``start=False``, left alone
    (neither claimed nor started) with ``start=True``. Returns the ids of the adopted assets.
    """
    report = report if report is not None else DrainReport()
    adopted, _ = await _adopt(chronicle, tracker, report, start, take_over, False)
    return [up.asset_id for up in adopted]


async def _adopt(
    chronicle: AsyncChronicle,
    tracker: UploadTracker,
    report: DrainReport,
    start: bool,
    take_over: bool,
    upload_unsealed: bool,
) -> tuple[list[AssetUpload], list[AssetUpload]]:
    """The adopted uploads, and those of them that are unsealed and started."""
    pool = chronicle._pool
    atracker = await pool.tracker_for(Path(tracker.db_path))
    uploads: list[AssetUpload] = []
    open_started: list[AssetUpload] = []
    for tracked in await asyncio.to_thread(tracker.get_pending_uploads):
        asset_id = tracked.asset_id
        if asset_id in pool.assets:
            report.skipped[asset_id] = "already in this process's upload pool"
            continue
        up = adopted_upload(tracked, atracker, chronicle.server_url)
        if up is None:
            report.failed[asset_id] = "the tracker does not record which run it belongs to"
            continue
        if not tracked.sealed and start and not upload_unsealed:
            # Nothing to send: report it, and leave its owner as it is.
            if tracked.owner_alive and not take_over:  # it may still be registering
                report.skipped[asset_id] = skipped_note(int(tracked.owner_pid or 0))
            else:
                report.unsealed[asset_id] = unsealed_note(tracked)
            continue
        owner = await atracker.run(ops.claim(asset_id, take_over=take_over))
        if owner is not None:  # resuming it here could send it twice
            report.skipped[asset_id] = skipped_note(owner[0])
            continue
        if not tracked.sealed:
            report.unsealed[asset_id] = unsealed_note(tracked)
        b = up.binding
        chronicle._uploading_in(
            {
                "id": b.run_id,
                "experiment_id": b.experiment_id,
                "variation": b.variation,
                "run": b.run,
            }
        )
        if up.state == AssetState.PAUSED:
            report.skipped[asset_id] = "paused by the operator; resume it to continue"
        uploads.append(up)
        if start and up.state != AssetState.PAUSED:
            if up.sealed:
                report.resumed.append(asset_id)
            else:
                open_started.append(up)
            pool.submit(up)
        else:
            pool.hold(up)
    return uploads, open_started


async def drain_incomplete_uploads_async(
    chronicle: AsyncChronicle,
    tracker: UploadTracker,
    *,
    upload_unsealed: bool = False,
    take_over: bool = False,
) -> DrainReport:
    """Resume every unfinished upload recorded in ``tracker`` and finalize it.

    For each asset: create it on the server if the crash came before that, ask the server which
    components and parts it already stores, send only the rest, then finalize. Returns what it
    did, asset by asset (``drain_incomplete_uploads`` is the same for a ``Chronicle``).

    It always returns once the assets it took are finished or failed: an asset another live
    process owns is ``skipped`` (``take_over=True`` takes it); an unsealed one is reported in
    ``unsealed`` and never finalized. With ``upload_unsealed=True`` the components registered
    in an unsealed asset are sent (the asset stays pending on the server and resumable: once
    sealed, the next drain finalizes it; register nothing more in it).
    """
    report = DrainReport()
    adopted, open_started = await _adopt(
        chronicle, tracker, report, True, take_over, upload_unsealed
    )
    uploads = [up for up in adopted if up.asset_id in report.resumed]
    await asyncio.gather(chronicle._pool.wait(uploads), _until_stored(chronicle, open_started))
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
    for up in open_started:
        report.bytes_resent += up.bytes_sent
        report.bytes_skipped += up.bytes_skipped
        if up.future.done():  # failed, discarded, or finalized meanwhile by someone else
            exc = up.future.exception()
            if exc is not None:
                report.failed[up.asset_id] = str(exc)
                report.unsealed.pop(up.asset_id, None)
            continue
        if up.state == AssetState.UPLOADING and up.remaining == 0:
            tracked = await asyncio.to_thread(tracker.get_asset, up.asset_id)
            if tracked is not None:
                report.unsealed[up.asset_id] = unsealed_note(tracked, stored=True)
        # Out of the pool: once sealed, a later drain in this process takes it again.
        chronicle._pool.assets.pop(up.asset_id, None)
    return report


def _sent_all_it_can(up: AssetUpload) -> bool:
    """An unsealed upload has stored every registered component, or has stopped."""
    if up.future.done() or up.state in (AssetState.FAILED, AssetState.PAUSED):
        return True
    return up.state == AssetState.UPLOADING and up.remaining == 0


async def _until_stored(chronicle: AsyncChronicle, uploads: list[AssetUpload]) -> None:
    """Wait (on the pool's events) until every unsealed upload has sent all it can."""
    if not uploads:
        return
    async with chronicle.subscribe() as sub:
        while not all(_sent_all_it_can(up) for up in uploads):
            # Every state change is an event; the timeout re-checks one that came before
            # this subscription.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(anext(sub), 1.0)
