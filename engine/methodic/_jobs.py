"""Scheduling: the queue of jobs, the N workers that run them, and their upload targets.

A job is one component, or one part of a large component. Targets are presigned lazily, in
batches of the next queued keys, and used while they keep enough validity. A transfer that
fails transiently is retried with backoff; an expired target is presigned again once, and after a
connection failure or a 421 Misdirected Request the asset's targets on that origin are dropped, so
the retry presigns again (the server may have moved to another blob port).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx

from methodic import _digests as digests
from methodic import _tracker_ops as ops
from methodic._api import ApiClient
from methodic._bandwidth import TokenBucket
from methodic._errors import ChronicleError, UploadFailedError
from methodic._events import ComponentStateChanged, EventBus, RetryScheduled
from methodic._finish import Finisher
from methodic._progress import Progress
from methodic._retry import RetryPolicy
from methodic._sendfile import Connections
from methodic._states import SETTLED_COMPONENT_STATES, AssetState, ComponentState
from methodic._transfer import FileChangedError, TransferError, send_range
from methodic._types import UploadTarget
from methodic._uploads import AssetUpload, ComponentUpload, Key

log = logging.getLogger("methodic")

PRESIGN_BATCH = 200
ENQUEUE_FIRST = 64  # jobs queued at once when an asset starts; the rest ENQUEUE_TURN a turn
ENQUEUE_TURN = 256
# Bytes of ranges hashed ahead for one presign call (a range's digest is bound into its URL).
HASH_AHEAD = 256 << 20
# Seconds of validity a target must keep to be used (at most a quarter of its TTL).
PRESIGN_MARGIN = 30.0


def _origin(url: str) -> tuple[str, str, int | None]:
    u = httpx.URL(url)
    return (u.scheme, u.host, u.port)


@dataclass
class Job:
    asset: AssetUpload
    path: str
    part: int | None
    attempt: int = 0
    started: float = 0.0
    refreshed: bool = False

    @property
    def key(self) -> Key:
        return (self.path, self.part)


class Scheduler:
    """Queues the jobs of an asset and runs them on ``workers`` tasks over one HTTP client."""

    def __init__(
        self,
        api: ApiClient,
        http: httpx.AsyncClient,
        connections: Connections,
        *,
        bucket: TokenBucket,
        retry: RetryPolicy,
        events: EventBus,
        progress: Progress,
        finisher: Finisher,
    ) -> None:
        self._api = api
        self._http = http
        self._connections = connections
        self._bucket = bucket
        self._retry = retry
        self._events = events
        self._progress = progress
        self._finisher = finisher
        self.presign_margin = PRESIGN_MARGIN
        self.active = 0  # jobs a worker is running now
        self._queue: asyncio.Queue[Job] = asyncio.Queue()

    def enqueue(self, up: AssetUpload) -> None:
        """Queue every part of ``up`` still to send (of the components the server lists) that is
        not queued or in flight already.

        The first jobs are queued now, the rest in turns of the loop: 10,000 jobs take tens of
        milliseconds to queue, and the first presign call need not wait for them."""
        pending = (
            (c.path, part)
            for c in list(up.components.values())
            if c.state not in SETTLED_COMPONENT_STATES
            and (up.listed is None or c.path in up.listed)
            for part in c.part_numbers()
        )
        self._enqueue_some(up, pending, time.monotonic(), ENQUEUE_FIRST)

    def _enqueue_some(
        self, up: AssetUpload, pending: Iterator[Key], now: float, count: int
    ) -> None:
        n = 0
        for key in itertools.islice(pending, count):
            n += 1
            if key in up.queued:
                continue
            up.queued.add(key)
            up.presign_order.append(key)
            self._queue.put_nowait(Job(up, key[0], key[1], started=now))
        if n == count:
            asyncio.get_running_loop().call_soon(self._enqueue_some, up, pending, now, ENQUEUE_TURN)

    async def worker(self) -> None:
        while True:
            job = await self._queue.get()
            self.active += 1
            try:
                await self._run(job)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not kill a worker; the asset is failed with it
                log.exception("unexpected error uploading %s of %s", job.path, job.asset.asset_id)
                await self._finisher.fail_asset(
                    job.asset, UploadFailedError(f"internal error on {job.path}")
                )
            finally:
                self.active -= 1
                self._queue.task_done()

    async def _run(self, job: Job) -> None:
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
        # A file's tries are those of its most-tried part: a 9-part file sent without an error
        # took 1 try, not 9 (and a pause, which takes the attempt back, adds none).
        c.attempts = max(c.attempts, job.attempt)
        if c.state != ComponentState.UPLOADING:
            c.state = ComponentState.UPLOADING
            self._events.emit(ComponentStateChanged(up.asset_id, c.path, ComponentState.UPLOADING))
        self._progress.changed(up, c)  # state and attempts reach the tracker with the next flush
        try:
            target = await self._target(up, job)
            if up.state != AssetState.UPLOADING:  # paused (or stopped) while it was presigned
                self._stopped(job, c)
                return
            task = asyncio.ensure_future(
                send_range(
                    self._http,
                    target,
                    c.identity,
                    self._bucket,
                    lambda n: self._progress.sent(up, c, n, job.part),
                    self._connections,
                    body=up.bodies.pop(job.key, None),
                )
            )
            up.inflight.add(task)
            try:
                etag = await task
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
            await self._finisher.component_failed(up, c, str(exc), exc)
            return
        up.queued.discard(job.key)
        await self._piece_done(up, c, job.part, etag)

    def _stopped(self, job: Job, c: ComponentUpload) -> None:
        """A transfer a control stopped: not a failed attempt. Resumed already: queue it again."""
        up = job.asset
        job.attempt -= 1  # not a failed attempt (the file's tries are the max, so none to undo)
        if c.state == ComponentState.UPLOADING:
            c.state = ComponentState.QUEUED
            self._progress.changed(up, c)
        # Resumed before the stop landed: enqueue() skipped this key, so queue it here.
        if up.state == AssetState.UPLOADING:
            self._queue.put_nowait(job)
        else:
            up.queued.discard(job.key)

    async def _transfer_failed(self, job: Job, c: ComponentUpload, exc: TransferError) -> None:
        up = job.asset
        c.last_error = str(exc)
        if exc.mismatch:  # hashed again before the retry: a changed file is told from damage
            c.suspect[job.part] = c.digests.pop(job.part, "")
            up.bodies.pop(job.key, None)
            up.targets.pop(job.key, None)
        if exc.expired and not job.refreshed:
            job.refreshed = True
            up.targets.pop(job.key, None)
            self._queue.put_nowait(job)
            return
        if exc.stale:
            self._forget_origin(up, job.key)
        elapsed = time.monotonic() - job.started
        if (
            not exc.transient
            or job.attempt >= self._retry.max_attempts
            or elapsed > self._retry.max_elapsed
        ):
            up.queued.discard(job.key)
            await self._finisher.component_failed(
                up, c, f"{c.path}: {exc} (after {job.attempt} attempts)", exc
            )
            return
        delay = self._retry.delay(job.attempt, exc.retry_after)
        log.info("retrying %s of %s in %.2fs after %s", c.path, up.asset_id, delay, exc)
        self._events.emit(RetryScheduled(up.asset_id, c.path, job.attempt, delay, str(exc)))
        # Queued while it waits for the retry; _run sets it uploading again.
        if c.state == ComponentState.UPLOADING:
            c.state = ComponentState.QUEUED
            self._progress.changed(up, c)
            self._events.emit(
                ComponentStateChanged(up.asset_id, c.path, ComponentState.QUEUED, c.last_error)
            )
        asyncio.get_running_loop().call_later(delay, self._queue.put_nowait, job)

    async def _piece_done(
        self, up: AssetUpload, c: ComponentUpload, part: int | None, etag: str | None
    ) -> None:
        self._progress.piece_done(c, part)
        # Its URL is spent: an asset of 100,000 files keeps no 100,000 targets in memory.
        up.targets.pop((c.path, part), None)
        up.use_until.pop((c.path, part), None)
        if part is not None:
            c.parts_done.add(part)
            try:
                await up.track(
                    ops.record_part(up.asset_id, c.path, part, etag=etag, digest=c.digests[part])
                )
            except ChronicleError as exc:  # the server stores the part: a resume learns it there
                log.warning("part %d of %s not recorded in the tracker: %s", part, c.path, exc)
            # Two last parts may finish together: only the first to get here completes the file.
            if len(c.parts_done) < c.part_count or c.state == ComponentState.COMPLETED:
                return
        if all(n in c.digests for n in c.ranges()):
            c.checksum = digests.file_checksum(up, c)
        c.state, c.bytes_done, c.last_error = ComponentState.COMPLETED, c.size, None
        up.completed += 1
        up.first_stored.set()
        # Written behind, with the next flush: after a crash the server says what it stores.
        self._progress.changed(up, c)
        self._events.emit(ComponentStateChanged(up.asset_id, c.path, ComponentState.COMPLETED))
        self._finisher.maybe_finalize(up)

    async def _target(self, up: AssetUpload, job: Job) -> UploadTarget:
        """A fresh target for the job, presigned lazily in batches of the next queued keys."""
        key = job.key
        if (target := self._fresh(up, key)) is None:
            async with up.presign_lock:
                if (target := self._fresh(up, key)) is None:
                    await self._presign(up, key)
                    target = up.targets[key]
        self._presign_ahead(up)
        return target

    async def _presign(self, up: AssetUpload, first: Key | None) -> None:
        """Presign ``first`` (its range must hash) and the next queued keys, in one call."""
        batch = [] if first is None else [first]
        ahead = 0
        # The very first call is small (its first bytes leave while the next batch is signed).
        limit = (
            digests.FIRST_PRESIGN_BATCH if not up.targets and up.completed == 0 else PRESIGN_BATCH
        )
        while up.presign_order and len(batch) < limit and ahead < HASH_AHEAD:
            nxt = up.presign_order.popleft()
            if nxt != first and nxt in up.queued and nxt not in up.targets:
                batch.append(nxt)
                nc = up.components[nxt[0]]
                ahead += 0 if nxt[1] in nc.digests else nc.span(nxt[1])[1]
        # Each range's digest is bound into its URL: hash them first (the job's own range
        # must succeed; another that fails is presigned later, by its own job).
        strict = 0 if first is None else 1
        await digests.ensure_digests(up, batch[:strict])
        await digests.ensure_digests(up, batch[strict:], strict=False)
        batch = [k for k in batch if k[1] in up.components[k[0]].digests]
        if not batch:
            return
        targets = await self._api.presign(
            up.asset_id, [(p, n, up.components[p].digests[n]) for p, n in batch]
        )
        now = time.time()
        for target in targets:
            margin = min(self.presign_margin, (target.expires_at - now) / 4)
            up.targets[(target.path, target.part)] = target
            up.use_until[(target.path, target.part)] = target.expires_at - margin

    def _presign_ahead(self, up: AssetUpload) -> None:
        """Presign the next batch in the background once half the cached targets are used:
        otherwise every worker waits on that round trip (hashing included) every batch."""
        if len(up.targets) > PRESIGN_BATCH // 2 or not up.presign_order or up.presign_lock.locked():
            return

        async def ahead() -> None:
            async with up.presign_lock:
                try:
                    await self._presign(up, None)
                except (ChronicleError, httpx.HTTPError) as exc:  # each job presigns its own
                    log.debug("presigning ahead for %s failed: %s", up.asset_id, exc)

        task = asyncio.ensure_future(ahead())
        up.inflight.add(task)  # cancelled with the asset's transfers
        task.add_done_callback(up.inflight.discard)

    @staticmethod
    def _forget_origin(up: AssetUpload, key: Key) -> None:
        """Drop the job's target and every cached target of the asset on the same origin.

        A connection failure or a 421 says the listener behind that origin may not be the server
        that signed the URLs (it restarted elsewhere, or something else took its port): no job
        of the asset sends there again before the server is asked for targets afresh.
        """
        failed = up.targets.pop(key, None)
        up.use_until.pop(key, None)
        if failed is None:
            return
        origin = _origin(failed.url)
        for k in [k for k, t in up.targets.items() if _origin(t.url) == origin]:
            del up.targets[k]
            up.use_until.pop(k, None)

    @staticmethod
    def _fresh(up: AssetUpload, key: Key) -> UploadTarget | None:
        target = up.targets.get(key)
        if target is not None and time.time() < up.use_until.get(key, 0):
            return target
        return None
