"""The upload pool: N async workers shared by every Run of a Chronicle (the composition root).

The pool builds its collaborators and owns their lifetime; each lives in a room of its own:

- ``_uploads``: what the pool knows of an asset and its components, in memory;
- ``_intake``: an asset enters (``submit``, or ``hold`` after a crash) and starts sending;
- ``_jobs``: the queue, the workers, and presigned targets fetched in batches;
- ``_progress``: bytes counted, told as throttled events, written behind to the tracker;
- ``_finish``: state changes, finalize once sealed and stored, failure;
- ``_controls``: pause, resume, retry, force-finalize, discard.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx

from methodic._api import ApiClient
from methodic._background import Background
from methodic._bandwidth import TokenBucket
from methodic._controls import Controls
from methodic._download_view import Downloads
from methodic._errors import TrackerError, UploadFailedError
from methodic._events import EventBus, PoolSnapshot
from methodic._finish import Finisher
from methodic._intake import Intake
from methodic._jobs import Scheduler
from methodic._progress import Progress
from methodic._retry import RetryPolicy
from methodic._sendfile import Connections
from methodic._tracker import AsyncTracker
from methodic._uploads import AssetUpload

log = logging.getLogger("methodic")

TRACKER_CHECK_INTERVAL = 2.0  # seconds between checks that each tracker file is still there


class UploadPool:
    def __init__(
        self,
        api: ApiClient,
        http: httpx.AsyncClient,
        *,
        workers: int,
        bucket: TokenBucket,
        retry: RetryPolicy,
    ) -> None:
        self.connections = Connections()
        self.workers = workers
        self.bucket = bucket
        self.events = EventBus()
        self.assets: dict[str, AssetUpload] = {}
        self._background = Background()
        self._tasks: list[asyncio.Task[Any]] = []
        self._trackers: dict[Path, AsyncTracker] = {}
        self._tracker_lock = asyncio.Lock()

        self._progress = Progress(self.events, self.assets, bucket)
        self.meter = self._progress.meter
        self.downloads = Downloads(self.events, self.meter)
        finisher = self._finisher = Finisher(
            api, self.events, self._progress, self._background.spawn
        )
        self.scheduler = Scheduler(
            api,
            http,
            self.connections,
            bucket=bucket,
            retry=retry,
            events=self.events,
            progress=self._progress,
            finisher=finisher,
        )
        self._intake = Intake(
            api,
            assets=self.assets,
            events=self.events,
            scheduler=self.scheduler,
            finisher=finisher,
            spawn=self._background.spawn,
        )
        finisher.resend = self._intake.resend
        self.controls = Controls(
            api,
            assets=self.assets,
            events=self.events,
            progress=self._progress,
            intake=self._intake,
            finisher=finisher,
        )

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self.scheduler.worker(), name=f"methodic-worker-{i}")
            for i in range(self.workers)
        ]
        self._tasks.append(asyncio.create_task(self._progress.flusher(), name="methodic-flusher"))
        self._tasks.append(asyncio.create_task(self._progress.sampler(), name="methodic-sampler"))
        self._tasks.append(asyncio.create_task(self._watch_trackers(), name="methodic-trackers"))

    async def _watch_trackers(self) -> None:
        while True:
            await asyncio.sleep(TRACKER_CHECK_INTERVAL)
            await self.check_trackers()

    async def check_trackers(self) -> None:
        """Fail, loudly, every unfinished asset whose tracker file was deleted or replaced."""
        for tracker in list(self._trackers.values()):
            if tracker.lost is not None:
                continue
            reason = await tracker.check_file()
            if reason is None:
                continue
            log.warning("%s", reason)
            for up in list(self.assets.values()):
                if up.tracker is tracker and not up.future.done():
                    await self._finisher.fail_asset(up, TrackerError(reason))

    async def close(self) -> None:
        # With the assets' own tasks: a presign ahead left pending was destroyed with the loop.
        inflight = [t for up in self.assets.values() for t in up.inflight]
        await self._background.cancel_all(*self._tasks, *inflight)
        await self._progress.flush()
        for up in self.assets.values():
            if not up.future.done():
                up.future.set_exception(
                    UploadFailedError(
                        f"asset {up.asset_id} was not finished when its Chronicle closed; "
                        "it stays resumable: run drain_incomplete_uploads() or `methodic-tui resume`"
                    )
                )
        for tracker in self._trackers.values():
            await tracker.close()
        self._trackers.clear()
        self.connections.close()

    async def tracker_for(self, db_path: Path) -> AsyncTracker:
        """The pool's one connection to the tracker at ``db_path`` (opened on first use)."""
        async with self._tracker_lock:
            tracker = self._trackers.get(db_path)
            if tracker is None:
                tracker = self._trackers[db_path] = await AsyncTracker(db_path).open()
            return tracker

    def submit(self, up: AssetUpload) -> None:
        """Start uploading ``up`` (already recorded in its tracker)."""
        self._intake.submit(up)

    def hold(self, up: AssetUpload) -> None:
        """Show an asset an earlier process left unfinished, without starting it."""
        self._intake.hold(up)

    async def wait(self, uploads: Iterable[AssetUpload], timeout: float | None = None) -> None:
        futures = [up.future for up in uploads]
        if futures:
            await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), timeout)

    def snapshot(
        self, with_components: bool | str = False, component_limit: int | None = None
    ) -> PoolSnapshot:
        """The whole pool at this instant; ``with_components`` True, or one asset id to detail
        (at most ``component_limit`` files of each upload: ``AssetUpload.snapshot``)."""
        return PoolSnapshot(
            assets=(
                *(
                    up.snapshot(
                        with_components is True or with_components == up.asset_id,
                        component_limit,
                    )
                    for up in self.assets.values()
                ),
                *(
                    d.snapshot(with_components is True or with_components == d.row_id)
                    for d in self.downloads.jobs.values()
                ),
            ),
            rate=self.meter.rate,
            history=tuple(self.meter.history),
            total_sent=self.meter.total,
            bandwidth_cap=self.bucket.rate,
            workers=self.workers,
            active_transfers=self.scheduler.active,
        )
