"""The upload pool: N async workers shared by every Run of a Chronicle.

Work arrives from the code path that registers (``submit``), never from polling the tracker.
A job is one component, or one part of a large component. An asset is finalized as soon as it
is sealed and every component is stored. Operator controls (pause, resume, retry, force-finalize,
discard, bandwidth) act here; every change is told on the event bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from methodic import _tracker_ops as ops
from methodic._api import ApiClient
from methodic._bandwidth import TokenBucket
from methodic._errors import (
    AssetIncompleteError,
    ChronicleError,
    ConflictError,
    NotFoundError,
    UploadFailedError,
)
from methodic._events import (
    AssetFinalized,
    AssetSnapshot,
    AssetStateChanged,
    BandwidthSample,
    ComponentProgress,
    ComponentSnapshot,
    ComponentStateChanged,
    EventBus,
    PoolSnapshot,
    RateMeter,
    RetryScheduled,
)
from methodic._retry import RetryPolicy
from methodic._sendfile import Connections
from methodic._states import (
    HELD_STATES,
    SENDING_STATES,
    SETTLED_COMPONENT_STATES,
    AssetState,
    ComponentState,
)
from methodic._tracker import AsyncTracker
from methodic._transfer import FileChangedError, FileIdentity, TransferError, send_range
from methodic._types import Asset, RunBinding, TrackedAsset, UploadTarget

log = logging.getLogger("methodic")

PRESIGN_BATCH = 200
PRESIGN_MARGIN = (
    30.0  # seconds of validity a target must keep to be used (at most a quarter of its TTL)
)
FLUSH_INTERVAL = 0.5  # tracker progress writes, at most this often
PROGRESS_INTERVAL = 0.25  # progress events per component, at most this often
SAMPLE_INTERVAL = 1.0  # bandwidth samples

Key = tuple[str, int | None]


@dataclass(eq=False)
class ComponentUpload:
    path: str
    identity: FileIdentity
    sha256: str | None
    part_size: int | None
    state: ComponentState = ComponentState.QUEUED
    bytes_done: int = 0
    attempts: int = 0
    last_error: str | None = None
    checksum: str | None = None
    parts_done: set[int] = field(default_factory=set)
    last_event: float = 0.0

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
            len(self.parts_done),
            self.part_count if self.part_size else 0,
            self.attempts,
            self.last_error,
        )


def _new_future() -> asyncio.Future[Asset]:
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
    future: asyncio.Future[Asset] = field(default_factory=_new_future)
    targets: dict[Key, UploadTarget] = field(default_factory=dict)
    use_until: dict[Key, float] = field(default_factory=dict)
    presign_order: deque[Key] = field(default_factory=deque)
    presign_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    queued: set[Key] = field(default_factory=set)  # jobs in the queue or in flight
    inflight: set[asyncio.Task[Any]] = field(default_factory=set)
    meter: RateMeter = field(default_factory=RateMeter)
    bytes_sent: int = 0  # net bytes this process sent (failed attempts are subtracted)
    bytes_skipped: int = 0  # bytes the server already held when a resumed upload began
    was_finalized: bool = False  # the server had finalized it before this process began
    remote_ready: bool = False
    completed: int = 0  # components completed; kept as a count so each completion is O(1)

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

    def snapshot(self, with_components: bool) -> AssetSnapshot:
        comps = self.components.values()
        done = sum(c.bytes_done for c in comps)
        total = sum(c.size for c in comps)
        # No rate (nor ETA) until the meter has a few seconds of transfer: a first sample
        # would show a tiny rate and an ETA of days.
        rate = (
            self.meter.rate if self.state == AssetState.UPLOADING and self.meter.settled else None
        )
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
            components=tuple(c.snapshot() for c in comps) if with_components else (),
        )


@dataclass
class _Job:
    asset: AssetUpload
    path: str
    part: int | None
    attempt: int = 0
    started: float = 0.0
    refreshed: bool = False

    @property
    def key(self) -> Key:
        return (self.path, self.part)


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
        self.api = api
        self.http = http
        self.connections = Connections()
        self.workers = workers
        self.bucket = bucket
        self.retry = retry
        self.events = EventBus()
        self.presign_margin = PRESIGN_MARGIN
        self.meter = RateMeter()
        self.assets: dict[str, AssetUpload] = {}
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._tasks: list[asyncio.Task[Any]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._trackers: dict[Path, AsyncTracker] = {}
        self._tracker_lock = asyncio.Lock()
        self._dirty: set[tuple[AssetUpload, ComponentUpload]] = set()
        self._active = 0

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._worker(), name=f"methodic-worker-{i}")
            for i in range(self.workers)
        ]
        self._tasks.append(asyncio.create_task(self._flusher(), name="methodic-flusher"))
        self._tasks.append(asyncio.create_task(self._sampler(), name="methodic-sampler"))

    async def close(self) -> None:
        for task in [*self._tasks, *self._background]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._background, return_exceptions=True)
        await self._flush()
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
        async with self._tracker_lock:
            tracker = self._trackers.get(db_path)
            if tracker is None:
                tracker = self._trackers[db_path] = await AsyncTracker(db_path).open()
            return tracker

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------ intake

    def submit(self, up: AssetUpload) -> None:
        """Start uploading ``up`` (already recorded in its tracker)."""
        self.assets[up.asset_id] = up
        self.events.emit(AssetStateChanged(up.asset_id, up.state))
        self._spawn(self._begin(up), f"methodic-begin-{up.asset_id}")

    async def _begin(self, up: AssetUpload) -> None:
        try:
            remote = await self._ensure_remote(up)
            if remote.state == AssetState.FINALIZED:
                up.was_finalized = True
                await self._finalized(up, remote)
                return
            if up.resumed:
                await self._skip_stored(up, remote)
            if up.state == AssetState.PAUSED:
                return
            await self._set_state(up, AssetState.UPLOADING)
            self._enqueue(up)
            self._maybe_finalize(up)
        except ChronicleError as exc:
            await self._fail_asset(up, exc)

    async def _ensure_remote(self, up: AssetUpload) -> Asset:
        asset = await self.api.create_asset(
            up.binding.run_id,
            asset_id=up.asset_id,
            asset_type=up.asset_type,
            metadata=up.metadata,
            components=[c.manifest() for c in up.components.values()],
        )
        up.remote_ready = True
        if up.resumed:
            asset = await self.api.get_asset(up.asset_id)
        return asset

    async def _skip_stored(self, up: AssetUpload, remote: Asset) -> None:
        """After a crash: what the server already stores is not sent again."""
        stored = []
        for rc in remote.components:
            c = up.components.get(rc.path)
            if c is None:
                continue
            if rc.stored:
                stored.append(c.path)
                c.state, c.bytes_done = ComponentState.COMPLETED, c.size
            else:
                c.parts_done = set(rc.parts_stored)
                if c.state == ComponentState.COMPLETED:
                    c.state = ComponentState.QUEUED
                c.bytes_done = sum(c.part_length(n) for n in c.parts_done) if c.part_size else 0
        up.recount()
        up.bytes_skipped = sum(c.bytes_done for c in up.components.values())
        await up.track(
            ops.mark_components(up.asset_id, stored, ComponentState.COMPLETED, sizes_done=True)
        )
        requeue = [c.path for c in up.components.values() if c.state != ComponentState.COMPLETED]
        await up.track(ops.mark_components(up.asset_id, requeue, ComponentState.QUEUED))

    def _enqueue(self, up: AssetUpload) -> None:
        now = time.monotonic()
        for c in up.components.values():
            if c.state in SETTLED_COMPONENT_STATES:
                continue
            for part in c.part_numbers():
                key = (c.path, part)
                if key in up.queued:
                    continue
                up.queued.add(key)
                up.presign_order.append(key)
                self._queue.put_nowait(_Job(up, c.path, part, started=now))

    # ------------------------------------------------------------ workers

    async def _worker(self) -> None:
        while True:
            job = await self._queue.get()
            self._active += 1
            try:
                await self._run_job(job)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not kill a worker; the asset is failed with it
                log.exception("unexpected error uploading %s of %s", job.path, job.asset.asset_id)
                await self._fail_asset(
                    job.asset, UploadFailedError(f"internal error on {job.path}")
                )
            finally:
                self._active -= 1
                self._queue.task_done()

    async def _run_job(self, job: _Job) -> None:
        up = job.asset
        c = up.components[job.path]
        if (
            up.state != AssetState.UPLOADING
            or c.state in SETTLED_COMPONENT_STATES
            or (job.part is not None and job.part in c.parts_done)
        ):
            up.queued.discard(job.key)
            return
        job.attempt += 1
        c.attempts += 1
        if c.state != ComponentState.UPLOADING:
            c.state = ComponentState.UPLOADING
            self.events.emit(ComponentStateChanged(up.asset_id, c.path, ComponentState.UPLOADING))
        self._dirty.add((up, c))  # state and attempts reach the tracker with the next flush
        try:
            target = await self._target(up, job)
            if up.state != AssetState.UPLOADING:  # paused (or stopped) while it was presigned
                self._stopped(job, c)
                return
            task = asyncio.ensure_future(
                send_range(
                    self.http,
                    target,
                    c.identity,
                    self.bucket,
                    lambda n: self._progress(up, c, n),
                    self.connections,
                )
            )
            up.inflight.add(task)
            try:
                etag, digest = await task
            except asyncio.CancelledError:
                me = asyncio.current_task()
                if not task.cancelled() or (me is not None and me.cancelling()):
                    raise
                self._stopped(job, c)  # by pause, discard, force-finalize or a sibling's failure
                return
            finally:
                up.inflight.discard(task)
        except TransferError as exc:
            await self._transfer_failed(job, c, exc)
            return
        except (FileChangedError, ChronicleError) as exc:
            up.queued.discard(job.key)
            await self._component_failed(up, c, str(exc), exc)
            return
        up.queued.discard(job.key)
        await self._piece_done(up, c, job.part, etag, digest)

    def _stopped(self, job: _Job, c: ComponentUpload) -> None:
        """A transfer a control stopped: not a failed attempt. Resumed already: queue it again."""
        up = job.asset
        job.attempt -= 1
        c.attempts -= 1
        if c.state == ComponentState.UPLOADING:
            c.state = ComponentState.QUEUED
            self._dirty.add((up, c))
        # Resumed before the stop landed: _enqueue skipped this key, so queue it here.
        if up.state == AssetState.UPLOADING:
            self._queue.put_nowait(job)
        else:
            up.queued.discard(job.key)

    async def _transfer_failed(self, job: _Job, c: ComponentUpload, exc: TransferError) -> None:
        up = job.asset
        c.last_error = str(exc)
        if exc.expired and not job.refreshed:
            job.refreshed = True
            up.targets.pop(job.key, None)
            self._queue.put_nowait(job)
            return
        elapsed = time.monotonic() - job.started
        if (
            not exc.transient
            or job.attempt >= self.retry.max_attempts
            or elapsed > self.retry.max_elapsed
        ):
            up.queued.discard(job.key)
            await self._component_failed(
                up, c, f"{c.path}: {exc} (after {job.attempt} attempts)", exc
            )
            return
        delay = self.retry.delay(job.attempt, exc.retry_after)
        log.info("retrying %s of %s in %.2fs after %s", c.path, up.asset_id, delay, exc)
        self.events.emit(RetryScheduled(up.asset_id, c.path, job.attempt, delay, str(exc)))
        # Queued while it waits for the retry; _run_job sets it uploading again.
        if c.state == ComponentState.UPLOADING:
            c.state = ComponentState.QUEUED
            self._dirty.add((up, c))
            self.events.emit(
                ComponentStateChanged(up.asset_id, c.path, ComponentState.QUEUED, c.last_error)
            )
        asyncio.get_running_loop().call_later(delay, self._queue.put_nowait, job)

    async def _piece_done(
        self, up: AssetUpload, c: ComponentUpload, part: int | None, etag: str | None, digest: str
    ) -> None:
        if part is not None:
            c.parts_done.add(part)
            await up.track(ops.record_part(up.asset_id, c.path, part, etag=etag))
            # Two last parts may finish together: only the first to get here completes the file.
            if len(c.parts_done) < c.part_count or c.state == ComponentState.COMPLETED:
                return
        elif c.sha256 and digest != c.sha256:
            await self._component_failed(
                up,
                c,
                f"{c.path}: its sha256 is {digest}, not the {c.sha256} it was registered with",
                None,
            )
            return
        else:
            c.checksum = digest
        c.state, c.bytes_done, c.last_error = ComponentState.COMPLETED, c.size, None
        up.completed += 1
        # Written behind, with the next flush: after a crash the server says what it stores.
        self._dirty.add((up, c))
        self.events.emit(ComponentStateChanged(up.asset_id, c.path, ComponentState.COMPLETED))
        self._maybe_finalize(up)

    async def _target(self, up: AssetUpload, job: _Job) -> UploadTarget:
        """A fresh target for the job, presigned lazily in batches of the next queued keys."""
        key = job.key
        if (target := self._fresh(up, key)) is not None:
            return target
        async with up.presign_lock:
            if (target := self._fresh(up, key)) is not None:
                return target
            batch = [key]
            while up.presign_order and len(batch) < PRESIGN_BATCH:
                nxt = up.presign_order.popleft()
                if nxt != key and nxt in up.queued and nxt not in up.targets:
                    batch.append(nxt)
            targets = await self.api.presign(up.asset_id, batch)
            now = time.time()
            for target in targets:
                margin = min(self.presign_margin, (target.expires_at - now) / 4)
                up.targets[(target.path, target.part)] = target
                up.use_until[(target.path, target.part)] = target.expires_at - margin
            return up.targets[key]

    @staticmethod
    def _fresh(up: AssetUpload, key: Key) -> UploadTarget | None:
        target = up.targets.get(key)
        if target is not None and time.time() < up.use_until.get(key, 0):
            return target
        return None

    # ------------------------------------------------------------ progress

    def _progress(self, up: AssetUpload, c: ComponentUpload, n: int) -> None:
        c.bytes_done += n
        up.bytes_sent += n
        if n > 0:
            up.meter.add(n)
            self.meter.add(n)
        self._dirty.add((up, c))
        now = time.monotonic()
        if now - c.last_event >= PROGRESS_INTERVAL:
            c.last_event = now
            self.events.emit(ComponentProgress(up.asset_id, c.path, c.bytes_done, c.size))

    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            await self._flush()

    async def _flush(self) -> None:
        """Write every changed component (progress, state, attempts) in one transaction per tracker."""
        dirty, self._dirty = self._dirty, set()
        by_tracker: dict[AsyncTracker, list[ops.ComponentProgressRow]] = {}
        for up, c in dirty:
            if up.tracker is not None:
                by_tracker.setdefault(up.tracker, []).append(
                    ops.ComponentProgressRow(
                        asset_id=up.asset_id,
                        path=c.path,
                        state=c.state,
                        bytes_sent=c.bytes_done,
                        attempts=c.attempts,
                        last_error=c.last_error,
                        checksum=c.checksum,
                    )
                )
        for tracker, rows in by_tracker.items():
            try:
                await tracker.run(ops.record_components(rows))
            except ChronicleError as exc:
                log.warning("could not record progress: %s", exc)

    async def _sampler(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_INTERVAL)
            rate = self.meter.sample()
            for up in self.assets.values():
                if up.state == AssetState.UPLOADING:
                    up.meter.sample()
            self.events.emit(BandwidthSample(None, rate, self.meter.total, self.bucket.rate))

    def snapshot(self, with_components: bool | str = False) -> PoolSnapshot:
        """The whole pool at this instant; ``with_components`` True, or one asset id to detail."""
        return PoolSnapshot(
            assets=tuple(
                up.snapshot(with_components is True or with_components == up.asset_id)
                for up in self.assets.values()
            ),
            rate=self.meter.rate,
            history=tuple(self.meter.history),
            total_sent=self.meter.total,
            bandwidth_cap=self.bucket.rate,
            workers=self.workers,
            active_transfers=self._active,
        )

    # ------------------------------------------------------------ finishing

    async def _set_state(
        self, up: AssetUpload, state: AssetState, error: str | None = None
    ) -> None:
        up.state, up.last_error = state, error
        with contextlib.suppress(ChronicleError):
            await up.track(ops.set_asset_state(up.asset_id, state, error=error))
        self.events.emit(AssetStateChanged(up.asset_id, state, error))

    def _maybe_finalize(self, up: AssetUpload) -> None:
        if up.sealed and up.state == AssetState.UPLOADING and up.remaining == 0:
            up.state = AssetState.FINALIZING
            self._spawn(self._finalize(up), f"methodic-finalize-{up.asset_id}")

    async def _finalize(self, up: AssetUpload, force: bool = False) -> Asset:
        try:
            await (
                self._flush()
            )  # the tracker holds every completion before the asset says finalizing
            await self._set_state(up, AssetState.FINALIZING)
            checksums = (
                {} if force else {c.path: c.checksum for c in up.components.values() if c.checksum}
            )
            asset = await self.api.finalize(up.asset_id, checksums)
            await self._finalized(up, asset)
            return asset
        except AssetIncompleteError as exc:
            await self._fail_asset(
                up, exc, f"finalize refused: {exc} (missing: {', '.join(exc.missing)})"
            )
            raise
        except ChronicleError as exc:
            await self._fail_asset(up, exc)
            raise

    async def _finalized(self, up: AssetUpload, asset: Asset) -> None:
        for c in up.components.values():
            c.state, c.bytes_done = ComponentState.COMPLETED, c.size
        up.completed = len(up.components)
        await up.track(
            ops.mark_components(
                up.asset_id, list(up.components), ComponentState.COMPLETED, sizes_done=True
            )
        )
        await self._set_state(up, AssetState.FINALIZED)
        self.events.emit(
            AssetFinalized(up.asset_id, up.asset_type, asset.total_size, asset.component_count)
        )
        if not up.future.done():
            up.future.set_result(asset)

    async def _component_failed(
        self, up: AssetUpload, c: ComponentUpload, message: str, cause: BaseException | None
    ) -> None:
        c.state, c.last_error = ComponentState.FAILED, message
        await up.track(
            ops.set_component_state(up.asset_id, c.path, ComponentState.FAILED, error=message)
        )
        self.events.emit(ComponentStateChanged(up.asset_id, c.path, ComponentState.FAILED, message))
        await self._fail_asset(up, cause, message)

    async def _fail_asset(
        self, up: AssetUpload, cause: BaseException | None, message: str | None = None
    ) -> None:
        message = message or str(cause)
        self._stop_transfers(up)
        await self._set_state(up, AssetState.FAILED, message)
        if not up.future.done():
            where = f" ({up.local_dir})" if up.local_dir else ""
            up.future.set_exception(
                UploadFailedError(f"upload of asset {up.asset_id}{where} failed: {message}", cause)
            )

    def _stop_transfers(self, up: AssetUpload) -> None:
        for task in list(up.inflight):
            task.cancel()

    async def wait(self, uploads: Iterable[AssetUpload], timeout: float | None = None) -> None:
        futures = [up.future for up in uploads]
        if futures:
            await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), timeout)

    # ------------------------------------------------------------ operator controls

    def _select(self, asset_id: str | None, states: Iterable[str]) -> list[AssetUpload]:
        if asset_id is not None:
            up = self.assets.get(asset_id)
            if up is None:
                raise NotFoundError(f"asset {asset_id} is not in this upload pool")
            return [up] if up.state in states else []
        return [up for up in self.assets.values() if up.state in states]

    async def pause(self, asset_id: str | None = None) -> list[str]:
        """Pause one asset, or all: transfers in flight stop now; finished parts stay finished."""
        paused = self._select(asset_id, SENDING_STATES)
        for up in paused:
            self._stop_transfers(up)
            for c in up.components.values():  # a paused asset sends no file
                if c.state == ComponentState.UPLOADING:
                    c.state = ComponentState.QUEUED
                    self._dirty.add((up, c))
                    self.events.emit(
                        ComponentStateChanged(up.asset_id, c.path, ComponentState.QUEUED)
                    )
            await self._set_state(up, AssetState.PAUSED)
        return [up.asset_id for up in paused]

    def hold(self, up: AssetUpload) -> None:
        """Show an asset an earlier process left unfinished, without starting it (``resume`` does)."""
        if up.state != AssetState.PAUSED:
            up.state = AssetState.INTERRUPTED
        self.assets[up.asset_id] = up
        self.events.emit(AssetStateChanged(up.asset_id, up.state))

    async def resume(self, asset_id: str | None = None) -> list[str]:
        """Resume paused assets, and held ones an earlier process left unfinished."""
        resumed = self._select(asset_id, HELD_STATES)
        for up in resumed:
            if not up.remote_ready:
                up.state = AssetState.REGISTERED
                self._spawn(self._begin(up), f"methodic-begin-{up.asset_id}")
                continue
            await self._set_state(up, AssetState.UPLOADING)
            self._enqueue(up)
            self._maybe_finalize(up)
        return [up.asset_id for up in resumed]

    async def retry_failed(self, asset_id: str | None = None) -> list[str]:
        """Queue failed components again (attempts reset); finalize again if all are stored."""
        retried = self._select(asset_id, (AssetState.FAILED,))
        for up in retried:
            for c in up.components.values():
                if c.state != ComponentState.COMPLETED:
                    c.state, c.attempts, c.last_error = ComponentState.QUEUED, 0, None
            await up.track(ops.reset_failed(up.asset_id))
            if up.future.done():
                up.future = _new_future()
            if not up.remote_ready:
                up.state = AssetState.REGISTERED
                self._spawn(self._begin(up), f"methodic-begin-{up.asset_id}")
                continue
            await self._set_state(up, AssetState.UPLOADING)
            self._enqueue(up)
            self._maybe_finalize(up)
        return [up.asset_id for up in retried]

    async def force_finalize(self, asset_id: str) -> Asset:
        """Ask the server to finalize now, whatever the tracker says; the server still verifies.

        Raises ``AssetIncompleteError`` (listing what storage lacks) when the server refuses.
        """
        up = self.assets.get(asset_id)
        if up is None:
            raise NotFoundError(f"asset {asset_id} is not in this upload pool")
        self._stop_transfers(up)
        if up.future.done():
            up.future = _new_future()
        return await self._finalize(up, force=True)

    async def discard(self, asset_id: str) -> None:
        """Stop, forget locally and abort the pending asset on the server (its bytes are removed)."""
        up = self.assets.get(asset_id)
        if up is None:
            raise NotFoundError(f"asset {asset_id} is not in this upload pool")
        if up.state == AssetState.FINALIZED:
            raise ConflictError(f"asset {asset_id} is finalized; it cannot be discarded")
        self._stop_transfers(up)
        up.state = AssetState.DISCARDED
        with contextlib.suppress(NotFoundError):
            await self.api.delete_asset(asset_id)
        if up.tracker is not None:
            await up.tracker.run(ops.discard(asset_id))
        self.events.emit(AssetStateChanged(asset_id, AssetState.DISCARDED))
        if not up.future.done():
            up.future.set_exception(UploadFailedError(f"asset {asset_id} was discarded"))

    def adopt(
        self, tracked: TrackedAsset, tracker: AsyncTracker, server_url: str
    ) -> AssetUpload | None:
        """Build (not start) the upload of an asset an earlier process left unfinished."""
        if tracked.binding is None:
            return None
        b = tracked.binding
        return AssetUpload(
            asset_id=tracked.asset_id,
            asset_type=tracked.asset_type,
            binding=RunBinding(server_url, b.run_id, b.experiment_id, b.variation, b.run),
            metadata=tracked.metadata,
            components=component_uploads(tracked),
            tracker=tracker,
            local_dir=tracked.local_dir,
            sealed=tracked.sealed,
            resumed=True,
            state=AssetState.PAUSED
            if tracked.state == AssetState.PAUSED
            else AssetState.REGISTERED,
        )


def component_uploads(tracked: TrackedAsset) -> dict[str, ComponentUpload]:
    """Rebuild the in-memory view of a tracked asset (used when resuming after a crash)."""
    return {
        tc.path: ComponentUpload(
            path=tc.path,
            identity=FileIdentity(tc.local_path, tc.size, tc.mtime_ns, tc.inode),
            sha256=tc.sha256,
            part_size=tc.part_size,
            state=ComponentState.COMPLETED
            if tc.state == ComponentState.COMPLETED
            else ComponentState.QUEUED,
            bytes_done=tc.bytes_sent,
            attempts=tc.attempts,
            last_error=tc.last_error,
            checksum=tc.checksum,
            parts_done=set(tc.parts_done),
        )
        for tc in tracked.components
    }
