"""The real engine as a Source: an AsyncChronicle (and, without --server-url, an embedded server).

The engine (the Chronicle, its pool and the job) runs on an event loop of its own, in a thread,
so that painting the dashboard never holds up a transfer: each control is one hop to that loop,
and ``snapshot``/``poll_events`` are taken there, consistent at one instant. A ``Job`` decides
what gets uploaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import deque
from collections.abc import Coroutine, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from methodic import (
    DONE_STATES,
    HELD_STATES,
    IN_FLIGHT_STATES,
    Asset,
    AssetState,
    AsyncChronicle,
    AsyncRun,
    AsyncUploadHandle,
    ChronicleError,
    DrainReport,
    Event,
    LoopThread,
    PoolSnapshot,
    Subscription,
    TrackedAsset,
    UploadTracker,
    adopt_incomplete_uploads,
)
from methodic_tui.format import plural, size
from methodic_tui.notices import Notice, capture_logging, restore_logging
from methodic_tui.options import Options
from methodic_tui.source import DETAIL_FILES, EMPTY, Labels, Source

if TYPE_CHECKING:
    import logging

    from methodic.server import EmbeddedServer

T = TypeVar("T")
PendingMode = Literal["hold", "start", "leave"]


class ConfigError(ChronicleError):
    """A setup problem (data dir, options) reported as one line, exit status 2."""


class Job(Protocol):
    name: str
    continuous: bool  # True: never finishes by itself (watch)
    needs_run: bool  # uploads into the --experiment/--variation/--run run
    resumable: bool  # what it leaves unfinished can be resumed later

    def prepare(self, options: Options) -> None:
        """Adjust the options before anything starts (the demo uses a temp dir)."""

    async def run(self, source: EngineSource) -> None:
        """Submit the work; returns once everything is submitted."""

    def cleanup(self) -> None:
        """After the source closed."""


def default_server_dir() -> Path:
    from methodic.server import default_data_dir

    return default_data_dir()


class EngineSource(Source):
    """``pending``: what to do with uploads an earlier process left in the tracker:
    ``hold`` them for the operator (the dashboard), ``start`` them (``resume --no-ui``), or
    ``leave`` them alone (headless upload, which only mentions them)."""

    def __init__(
        self, options: Options, job: Job, *, pending: PendingMode = "hold", take_over: bool = False
    ) -> None:
        self.options = options
        self.job = job
        self.pending_mode = pending
        self.take_over = take_over  # adopt even assets a live process owns (`--take-over`)
        job.prepare(options)
        self.labels = Labels(tracker=str(options.tracker), mode=job.name)
        self.server: EmbeddedServer | None = None
        self.chronicle: AsyncChronicle | None = None
        self.tracker: UploadTracker | None = None
        self.run: AsyncRun | None = None
        self.report = DrainReport()  # what adopting the earlier uploads did
        self._notices: deque[Event] = deque()
        self._sub: Subscription | None = None
        self._job_task: asyncio.Task[None] | None = None
        self._adopted: set[str] = set()
        self._tracked: list[TrackedAsset] = []
        self._stopped_by: dict[str, int | None] = {}  # owner_pid of each asset before adopting
        self._logging: tuple[logging.Handler, list[logging.Handler]] | None = None
        self._closed = False
        self._worked_on: set[str] = set()  # assets seen in flight in this process
        self._closing: asyncio.Task[None] | None = None  # on the engine's loop: one close, shared
        self._engine: LoopThread | None = None
        self.job_error: str | None = None  # the job itself stopped on an error

    # -------------------------------------------------- lifecycle

    def notice(self, level: str, message: str, asset_id: str | None = None) -> None:
        self._notices.append(Notice(asset_id, level, message))

    async def _on_engine(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the engine's loop and wait for it from this one."""
        if self._engine is None or self._on_engine_thread():
            return await coro
        return await asyncio.wrap_future(self._engine.submit(coro))

    def _on_engine_call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` (one that does not wait) on the engine's loop and block until it ends."""
        if self._engine is None:
            raise RuntimeError("the engine is not started")
        if self._on_engine_thread():
            coro.close()
            raise RuntimeError("a blocking engine call from the engine's own loop")
        return self._engine.call(coro)

    def _on_engine_thread(self) -> bool:
        try:
            return self._engine is not None and asyncio.get_running_loop() is self._engine.loop
        except RuntimeError:
            return False

    async def start(self) -> None:
        self._logging = capture_logging(self._notices)
        self._engine = LoopThread()
        await self._on_engine(self._start())

    async def _start(self) -> None:
        opts = self.options
        url, key = opts.server_url, opts.api_key
        if url is None:
            url, key = await self._start_embedded()
        self.labels.server = url
        try:
            self.chronicle = AsyncChronicle(url, key, **opts.chronicle_kwargs())  # type: ignore[arg-type]
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        await self.chronicle.open()
        self._sub = self.chronicle.subscribe()
        if getattr(self.job, "needs_tracker", True):  # a download opens none
            self.tracker = await asyncio.to_thread(UploadTracker, opts.tracker)
        # One authenticated call up front: a wrong key or URL is a setup error (exit 2).
        exp_id = await self.chronicle.find_experiment(opts.experiment)
        if self.job.needs_run:
            exp_id = exp_id or await self.chronicle.create_experiment(opts.experiment)
            self.run = await self.chronicle.run(exp_id, opts.variation, opts.run)
            self.labels.run = f"{opts.experiment} v{opts.variation} r{opts.run}"
        if self.tracker is not None:
            await self._take_pending()
        self._job_task = asyncio.create_task(self._run_job(), name=f"methodic-tui-{self.job.name}")

    async def _start_embedded(self) -> tuple[str, str]:
        from methodic.server import DataDirError, EmbeddedServer

        data_dir = self.options.server_dir or default_server_dir()
        server = EmbeddedServer(data_dir, blob_port=0)  # its URLs end with it: no port to keep
        try:
            await asyncio.to_thread(server.start)
        except (DataDirError, ValueError, OSError) as exc:
            raise ConfigError(f"cannot start the embedded server in {data_dir}: {exc}") from None
        self.server = server
        self.labels.local_only = True
        assert server.url is not None and server.api_key is not None
        self.notice(
            "info",
            f"no --server-url: started an embedded Chronicle server at {server.url} "
            f"(data in {data_dir}); the bytes stay on this machine, and its port changes "
            "each start",
        )
        return server.url, server.api_key

    async def _take_pending(self) -> None:
        assert self.chronicle is not None and self.tracker is not None
        if self.pending_mode == "leave":
            waiting = await asyncio.to_thread(self.tracker.list_assets, None)
            n = sum(1 for a in waiting if a.state not in DONE_STATES)
            if n:
                self.notice(
                    "warn",
                    f"{plural(n, 'unfinished upload')} from an earlier process in "
                    f"{self.options.tracker}; finish with `methodic-tui resume`",
                )
            return
        # Adopting claims them (owner_pid becomes this process): keep who left them, for "why".
        before = await asyncio.to_thread(self.tracker.list_assets, None)
        self._stopped_by = {t.asset_id: t.owner_pid for t in before}
        adopted = await adopt_incomplete_uploads(
            self.chronicle,
            self.tracker,
            self.report,
            start=self.pending_mode == "start",
            take_over=self.take_over,
        )
        self._adopted = set(adopted)
        for asset_id, why in self.report.failed.items():
            self.notice("error", f"cannot resume {asset_id}: {why}", asset_id)
        for asset_id, why in self.report.skipped.items():
            if asset_id not in self._adopted:  # left to the live process that owns it
                self.notice("warn", f"not taking over {asset_id}: {why}", asset_id)
        tracked = {t.asset_id: t for t in before}
        for asset_id, what in self.report.unsealed.items():
            t = tracked.get(asset_id)
            self.notice(
                "warn", f"{asset_id} is {t.unsealed_note(cli=True) if t else what}", asset_id
            )
        await self.refresh_pending()

    async def _run_job(self) -> None:
        try:
            await self.job.run(self)
        except (ChronicleError, OSError) as exc:
            self.job_error = f"{self.job.name}: {exc}"
            self.notice("error", self.job_error)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._on_engine(self._close_once())
        finally:
            if self._engine is not None:
                await asyncio.to_thread(self._engine.stop)
            if self._logging is not None:
                restore_logging(*self._logging)

    def close_now(self, timeout: float) -> None:
        """From any thread but the engine's (a watchdog whose UI loop is stuck): close the engine,
        flushing the tracker, giving up after ``timeout`` seconds. Shares a close under way."""
        engine = self._engine
        if engine is None:
            return
        with contextlib.suppress(Exception):  # the loop already stopped, or the time ran out
            engine.call(self._close_once(), timeout)

    async def _close_once(self) -> None:
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        if self._job_task is not None:
            self._job_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._job_task
        if self._sub is not None:
            self._sub.close()
        try:
            if self.chronicle is not None:
                await self.chronicle.close()  # flushes the tracker: `resume` continues from here
        finally:
            if self.tracker is not None:
                self.tracker.close()
            if self.server is not None:
                await asyncio.to_thread(self.server.stop)
            self.job.cleanup()

    # -------------------------------------------------- for jobs

    async def upload_dir(
        self,
        local_dir: Path,
        asset_type: str | None = None,
        *,
        exclude: Sequence[str] = (),
        **metadata: Any,
    ) -> AsyncUploadHandle:
        """Upload ``local_dir`` as one asset, with the files --include/--exclude keep."""
        assert self.run is not None, "this job does not upload into a run"
        return await self._on_engine(
            self.run.register_and_upload_async(
                os.fspath(local_dir),
                asset_type=asset_type or self.options.asset_type,
                upload_tracker=self.tracker,
                include=self.options.include,
                exclude=[*self.options.exclude, *exclude],
                **metadata,
            )
        )

    @property
    def resumable(self) -> bool:
        return self.job.resumable

    @property
    def job_done(self) -> bool:
        return self._job_task is not None and self._job_task.done()

    # -------------------------------------------------- Source

    @property
    def engine(self) -> AsyncChronicle:
        assert self.chronicle is not None
        return self.chronicle

    def snapshot(self, detail: str | None = None) -> PoolSnapshot:
        if self.chronicle is None or self._closed:
            return EMPTY
        return self._on_engine_call(
            self.chronicle.snapshot(
                with_components=detail if detail is not None else False,
                component_limit=DETAIL_FILES,
            )
        )

    def poll_events(self) -> list[Event]:
        sub = self._sub
        events: list[Event] = self._on_engine_call(_take(sub)) if sub is not None else []
        while self._notices:
            events.append(self._notices.popleft())
        events.sort(key=lambda e: e.at)
        return events

    def pending(self) -> list[TrackedAsset]:
        if self.chronicle is None or self._closed:
            return []
        snap = self._on_engine_call(self.engine.snapshot())
        held = {a.asset_id for a in snap.assets if a.state in HELD_STATES}
        return [t for t in self._tracked if t.asset_id in self._adopted and t.asset_id in held]

    async def refresh_pending(self) -> None:
        if self.tracker is not None and self._adopted:
            tracked = await asyncio.to_thread(self.tracker.get_pending_uploads)
            self._tracked = [
                replace(t, owner_pid=self._stopped_by.get(t.asset_id, t.owner_pid)) for t in tracked
            ]

    def settled(self) -> bool:
        """As a source settles, but an asset paused while this process uploaded it holds the
        job until it is resumed or discarded (an operator's pause, e.g. from the monitor, does
        not end a headless upload). Paused assets adopted from an earlier process do not."""
        assets = self.snapshot().assets
        self._worked_on.update(a.asset_id for a in assets if a.state in IN_FLIGHT_STATES)
        held = any(a.state == AssetState.PAUSED and a.asset_id in self._worked_on for a in assets)
        return not self.job.continuous and self.job_done and not held and super().settled()

    async def pause(self, asset_id: str | None = None) -> list[str]:
        return list(await self._on_engine(self.engine.pause(asset_id)))

    async def resume(self, asset_id: str | None = None) -> list[str]:
        return list(await self._on_engine(self.engine.resume(asset_id)))

    async def retry_failed(self, asset_id: str | None = None) -> list[str]:
        return list(await self._on_engine(self.engine.retry_failed(asset_id)))

    async def force_finalize(self, asset_id: str) -> Asset | None:
        asset: Asset = await self._on_engine(self.engine.force_finalize(asset_id))
        return asset

    async def discard(self, asset_id: str) -> None:
        await self._on_engine(self.engine.discard(asset_id))

    def set_bandwidth(self, rate: float | None) -> None:
        self._on_engine_call(self.engine.set_bandwidth(rate))


def stopped_reason(t: TrackedAsset) -> str:
    """Why an earlier process left this upload unfinished, as far as the tracker can tell."""
    if t.state == AssetState.PAUSED:
        return "paused by the operator"
    if t.owner_alive:
        return (
            f"pid {t.owner_pid} is still running: it may be uploading this (see `attach`; "
            "`methodic-tui resume --take-over` takes it over anyway)"
        )
    if not t.sealed:
        return t.unsealed_note(cli=True)
    if t.last_error:
        return t.last_error
    who = f"process {t.owner_pid}" if t.owner_pid else "the uploading process"
    if t.state in IN_FLIGHT_STATES:
        return f"{who} stopped while {t.state} (killed or crashed)"
    return f"{who} stopped ({t.state})"


def missing_summary(t: TrackedAsset) -> str:
    left = t.component_count - t.completed_count
    return f"{left}/{t.component_count} files, {size(max(t.total_bytes - t.bytes_sent, 0))}"


async def _take(sub: Subscription) -> list[Event]:
    return sub.get_nowait()
