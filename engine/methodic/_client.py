"""The async core: AsyncChronicle and AsyncRun. The sync facade and the TUI both run this."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from methodic import _checksum as checksums
from methodic import _redact
from methodic import _tracker_ops as ops
from methodic._api import ApiClient, resolve_api_key, resolve_server_url
from methodic._bandwidth import TokenBucket, parse_rate
from methodic._contributions import Contribution, tracker_metadata
from methodic._contributions import check_arguments as check_contribution
from methodic._download import download_asset
from methodic._download_view import newest_finalized
from methodic._errors import (
    ChronicleError,
    DownloadError,
    InvalidInputError,
    NotFoundError,
    UploadFailedError,
)
from methodic._events import PoolSnapshot, Subscription
from methodic._heartbeat import DEFAULT_INTERVAL, Heartbeat, interval_from_env, run_command
from methodic._ids import contribution_id, new_asset_id
from methodic._pool import UploadPool
from methodic._retry import RetryPolicy
from methodic._scan import scan_directory, validate_specs
from methodic._sessions import CommandResult, UploaderSession
from methodic._states import DONE_STATES
from methodic._types import Asset, ComponentSpec, PresignedAsset, RunBinding
from methodic._uploads import (
    AssetUpload,
    AsyncUploadHandle,
    ComponentUpload,
    MiB,
    plan_components,
)

log = logging.getLogger("methodic")
DEFAULT_PART_THRESHOLD = 64 * MiB
DEFAULT_PART_SIZE = 16 * MiB


def _warn_unfinished(pool: UploadPool) -> None:
    """Closing abandons the uploads not yet finalized: say so, and how to finish them."""
    left = [u for u in pool.assets.values() if u.state not in DONE_STATES]
    if not left:
        return
    trackers = sorted({str(u.tracker.db_path) for u in left if u.tracker is not None})
    how = (
        "; resume them with drain_incomplete_uploads(chronicle, UploadTracker(PATH)) or "
        + " / ".join(f"`methodic-tui resume --tracker {t}`" for t in trackers)
        if trackers
        else " (no upload tracker: they cannot be resumed; wait_for_uploads() before closing)"
    )
    log.warning(
        "closing with %d upload%s unfinished%s",
        len(left),
        "" if len(left) == 1 else "s",
        how,
    )


def _not_open() -> ChronicleError:
    return ChronicleError("this Chronicle is not open; use it in a `with` block or call open()")


class AsyncChronicle:
    """A connection to a Chronicle server with one shared upload pool (the async core)."""

    def __init__(
        self,
        server_url: str | None = None,
        api_key: str | None = None,
        max_upload_workers: int = 8,
        max_bandwidth: str | float | None = None,
        *,
        retry: RetryPolicy | None = None,
        part_threshold: int = DEFAULT_PART_THRESHOLD,
        part_size: int = DEFAULT_PART_SIZE,
        stall_timeout: float = 60.0,
        checksum_algorithm: str | None = None,
        heartbeat_interval: float | None = None,
    ) -> None:
        self.server_url = resolve_server_url(server_url)
        self._api_key = resolve_api_key(api_key)
        _redact.install()
        if not isinstance(max_upload_workers, int) or max_upload_workers < 1:
            raise InvalidInputError(
                f"max_upload_workers must be a whole number >= 1, not {max_upload_workers!r}"
            )
        if part_size < 5 * MiB:
            raise InvalidInputError("part_size must be at least 5 MiB (the S3 minimum)")
        self.max_upload_workers = max_upload_workers
        self.retry = retry or RetryPolicy()
        self.part_threshold = part_threshold
        self.part_size = part_size
        self.bucket = TokenBucket(parse_rate(max_bandwidth))
        self.stall_timeout = stall_timeout
        # Of every range digest (None: the server's default, crc64nvme); see docs/integrity.md.
        try:
            self.checksum_algorithm = (
                None
                if checksum_algorithm is None
                else checksums.check_algorithm(checksum_algorithm)
            )
        except checksums.ChecksumFormatError as exc:
            raise InvalidInputError(str(exc)) from None
        # Seconds between beats to the server (docs/monitor.md); None: METHODIC_HEARTBEAT_INTERVAL
        # or 5 s; 0: no heartbeat. It starts with the first run.
        if heartbeat_interval is None:
            self.heartbeat_interval = interval_from_env(DEFAULT_INTERVAL)
        else:
            self.heartbeat_interval = heartbeat_interval if heartbeat_interval > 0 else None
        self._heartbeat: Heartbeat | None = None
        self._runs: dict[str, dict[str, Any]] = {}
        self._http_client: httpx.AsyncClient | None = None
        self._upload_pool: UploadPool | None = None
        self._api_client: ApiClient | None = None

    def __repr__(self) -> str:
        return f"AsyncChronicle(server_url={self.server_url!r}, max_upload_workers={self.max_upload_workers})"

    async def open(self) -> AsyncChronicle:
        if self._http_client is None:
            n = self.max_upload_workers + 4
            self._http_client = httpx.AsyncClient(
                # A transfer that moves no byte for stall_timeout is aborted (and retried).
                timeout=httpx.Timeout(self.stall_timeout, connect=min(15.0, self.stall_timeout)),
                limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
                follow_redirects=False,
            )
            self._api_client = ApiClient(
                self.server_url, self._api_key, self._http_client, self.retry
            )
            self._upload_pool = UploadPool(
                self._api_client,
                self._http_client,
                workers=self.max_upload_workers,
                bucket=self.bucket,
                retry=self.retry,
            )
            await self._upload_pool.start()
        return self

    async def close(self) -> None:
        if self._heartbeat is not None:
            await self._heartbeat.close()
            self._heartbeat = None
        if self._upload_pool is not None:
            _warn_unfinished(self._upload_pool)
            await self._upload_pool.close()
        if self._http_client is not None:
            await self._http_client.aclose()
        self._http_client = self._upload_pool = self._api_client = None

    async def __aenter__(self) -> AsyncChronicle:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def _api(self) -> ApiClient:
        if self._api_client is None:
            raise _not_open()
        return self._api_client

    @property
    def _pool(self) -> UploadPool:
        if self._upload_pool is None:
            raise _not_open()
        return self._upload_pool

    @property
    def _http(self) -> httpx.AsyncClient:
        if self._http_client is None:
            raise _not_open()
        return self._http_client

    # ------------------------------------------------------------ operator controls

    async def pause(self, asset_id: str | None = None) -> list[str]:
        """Pause one asset, or all: transfers in flight stop now, finished parts stay finished.

        Returns the ids of the assets it paused.
        """
        downloads = self._pool.downloads.select(asset_id, self._pool.assets)
        if asset_id is not None and downloads:
            return [d.asset_id for d in downloads if d.pause()]
        paused = await self._pool.controls.pause(asset_id)
        return paused + [d.asset_id for d in downloads if d.pause()]

    async def resume(self, asset_id: str | None = None) -> list[str]:
        """Resume paused assets (one, or all), and those held from an earlier process."""
        downloads = self._pool.downloads.select(asset_id, self._pool.assets)
        if asset_id is not None and downloads:
            return [d.asset_id for d in downloads if d.resume()]
        resumed = await self._pool.controls.resume(asset_id)
        return resumed + [d.asset_id for d in downloads if d.resume()]

    async def retry_failed(self, asset_id: str | None = None) -> list[str]:
        """Queue the failed components again (attempts reset); finalize once all are stored."""
        return await self._pool.controls.retry_failed(asset_id)

    async def force_finalize(self, asset_id: str) -> Asset:
        """Ask the server to finalize now, whatever the tracker says; the server still verifies.

        Raises ``AssetIncompleteError`` (listing what storage lacks) when the server refuses.
        """
        return await self._pool.controls.force_finalize(asset_id)

    async def discard(self, asset_id: str) -> None:
        """Stop, forget locally and abort the pending asset on the server (its bytes go).

        For an asset being downloaded: cancel the download (what was verified stays on disk;
        the asset on the server is untouched)."""
        downloads = self._pool.downloads.select(asset_id, self._pool.assets)
        if downloads:
            downloads[0].cancel()
            return
        await self._pool.controls.discard(asset_id)

    async def set_bandwidth(self, max_bandwidth: str | float | None) -> None:
        """Change the shared bandwidth cap while uploads run: bytes/s, text like "200MB", or None."""
        self.bucket.set_rate(parse_rate(max_bandwidth))

    async def snapshot(
        self, with_components: bool | str = False, component_limit: int | None = None
    ) -> PoolSnapshot:
        """Every asset of the pool with bytes, state, rate and ETA, consistent at one instant.

        ``with_components``: True for every asset's files, or one asset id to detail only it;
        ``component_limit``: at most that many files of an upload, the block of that many
        (in manifest order) that holds its first file not completed.
        """
        return self._pool.snapshot(with_components, component_limit)

    def subscribe(self, maxsize: int = 10_000) -> Subscription:
        """A stream of engine events (progress, states, retries, bandwidth), on this loop.

        Progress samples are dropped, never state changes, when the reader falls ``maxsize``
        behind. ``close()`` it (or leave ``async with``) when done.
        """
        return self._pool.events.subscribe(maxsize)

    # ------------------------------------------------------------ uploader sessions

    @property
    def session_id(self) -> str | None:
        """This uploader's session on the server (None until its first run, or heartbeats off)."""
        return self._heartbeat.session_id if self._heartbeat is not None else None

    def _uploading_in(self, data: dict[str, Any]) -> None:
        """A run this Chronicle uploads into: its heartbeat says so (and starts with the first)."""
        self._runs[str(data["id"])] = {
            k: data.get(k) for k in ("id", "experiment_id", "variation", "run")
        } | {"run_id": str(data["id"])}
        if self._heartbeat is None and self.heartbeat_interval is not None:
            self._heartbeat = Heartbeat(
                self.server_url,
                self._api_key,
                self,
                lambda: list(self._runs.values()),
                interval=self.heartbeat_interval,
            )
            self._heartbeat.start()

    async def sessions(
        self, experiment: str | None = None, run: int | None = None
    ) -> list[UploaderSession]:
        """Every uploader session the server knows, live, lost or closed (docs/monitor.md).

        ``experiment`` (an id or a name) and ``run`` keep those uploading into it.
        """
        experiment_id = None
        if experiment is not None:
            experiment_id = await self.find_experiment(experiment)
            if experiment_id is None:
                return []
        rows = await self._api.list_sessions(experiment_id, run)
        return [UploaderSession.from_json(r) for r in rows]

    async def send_command(
        self,
        session_id: str,
        action: str,
        asset_id: str | None = None,
        value: float | None = None,
        timeout: float = 10.0,
    ) -> CommandResult:
        """Relay an operator control to another uploader through the server and wait for its
        acknowledgement (at most ``timeout`` s; then ``acknowledged`` is False).

        ``action``: pause, resume, retry_failed (``asset_id`` None: all), force_finalize,
        discard (``asset_id`` needed), set_bandwidth (``value`` bytes/s, None: no cap).
        """
        data = await run_command(self._api, session_id, action, asset_id, value, timeout=timeout)
        return CommandResult.from_json(session_id, data)

    # ------------------------------------------------------------ experiments and runs

    async def create_experiment(self, name: str) -> str:
        """Create the experiment ``name`` (or find the existing one) and return its id."""
        if not name or not name.strip():
            raise InvalidInputError("an experiment needs a non-empty name")
        return await self._api.create_experiment(name)

    async def find_experiment(self, id_or_name: str) -> str | None:
        """The id of the experiment with this name, or with this id; None when there is none.

        Only the server's "not found" means none: any other error (the API key refused, the
        server failing after the retries, unreachable) is raised.
        """
        found = await self._api.find_experiments(id_or_name)
        if found:
            return found[0]
        if not id_or_name or "/" in id_or_name or id_or_name in (".", ".."):
            return None  # not one path segment, so not an id
        try:
            return await self._api.get_experiment(id_or_name)
        except NotFoundError:
            return None

    async def run(self, experiment_id: str, variation: int = 0, run: int = 0) -> AsyncRun:
        """Get or create run (variation, run) of an experiment; calling it twice is harmless."""
        for name, value in (("variation", variation), ("run", run)):
            if not isinstance(value, int) or value < 0:
                raise InvalidInputError(f"{name} must be a whole number >= 0, not {value!r}")
        data = await self._api.put_run(experiment_id, variation, run)
        self._uploading_in(data)
        return AsyncRun(self, data)

    async def run_by_id(self, run_id: str) -> AsyncRun:
        data = await self._api.get_run(run_id)
        self._uploading_in(data)
        return AsyncRun(self, data)

    # ------------------------------------------------------------ assets

    async def get_asset(self, asset_id: str) -> Asset:
        """The server's view of an asset, pending or not, with what storage already holds."""
        return await self._api.get_asset(asset_id)

    async def finalize_asset(self, asset_id: str, checksums: dict[str, str] | None = None) -> Asset:
        """Ask the server to finalize; idempotent. Raises ``AssetIncompleteError`` listing what is missing."""
        return await self._api.finalize(asset_id, checksums)

    def components_for(self, specs: Sequence[ComponentSpec]) -> dict[str, ComponentUpload]:
        return plan_components(specs, part_threshold=self.part_threshold, part_size=self.part_size)


async def _register(atracker: Any, contribution: Contribution | None, op: ops.Op[None]) -> None:
    """Record the registration; a rank's asset already in this tracker is said plainly."""
    try:
        await atracker.run(op)
    except InvalidInputError:
        if contribution is None:
            raise
        raise InvalidInputError(
            f"asset {contribution.asset_name!r} is already registered in this tracker; each "
            "rank registers its contribution once, with a tracker file of its own (resume an "
            "interrupted one with drain_incomplete_uploads)"
        ) from None


class AsyncRun:
    """A run of an experiment: registers and uploads assets, and sets the run's status."""

    def __init__(self, chronicle: AsyncChronicle, data: dict[str, Any]) -> None:
        self.chronicle = chronicle
        self.id: str = str(data["id"])
        self.experiment_id: str = str(data["experiment_id"])
        self.variation: int = int(data["variation"])
        self.run: int = int(data["run"])
        self.status: str = str(data.get("status", "running"))
        self._uploads: list[AssetUpload] = []

    def __repr__(self) -> str:
        return (
            f"AsyncRun(id={self.id!r}, experiment_id={self.experiment_id!r}, "
            f"variation={self.variation}, run={self.run}, status={self.status!r})"
        )

    @property
    def binding(self) -> RunBinding:
        return RunBinding(
            self.chronicle.server_url, self.id, self.experiment_id, self.variation, self.run
        )

    async def register_and_upload_async(
        self,
        local_dir: Path | str,
        asset_type: str = "checkpoint",
        upload_tracker: Any = None,
        *,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        asset_name: str | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        delete_local: bool = False,
        **metadata: Any,
    ) -> AsyncUploadHandle:
        """Register every file under ``local_dir`` in one tracker call, then queue the upload.

        ``include``/``exclude`` are globs relative to ``local_dir`` choosing which files (a
        pattern without ``/`` matches a name at any depth). Returns at once with a handle; the
        shared pool uploads in the background and finalizes the asset once every component is
        stored.

        With ``asset_name``, ``rank`` and ``world_size`` these files are rank ``rank``'s
        contribution to one asset that ``world_size`` processes upload together, each with its
        own tracker; the server finalizes it when every rank's contribution is stored, and the
        handle resolves then (docs/distributed.md). ``delete_local`` removes these files once
        the asset is finalized.
        """
        contribution = check_contribution(asset_name, rank, world_size)
        specs = await asyncio.to_thread(scan_directory, local_dir, include, exclude)
        return await self._submit(
            specs,
            asset_type,
            upload_tracker,
            os.fspath(local_dir),
            metadata,
            contribution=contribution,
            delete_local=bool(delete_local),
        )

    async def set_retention(self, asset_type: str = "checkpoint", keep_last: int = 3) -> list[str]:
        """Keep this run's newest ``keep_last`` finalized assets of ``asset_type`` on the server.

        An older one is deleted only once ``keep_last`` newer ones are finalized (the server
        applies the policy after each finalize), so the latest is never deleted and a pending
        one never counts. Returns the ids of the assets it deleted now.
        """
        if not asset_type:
            raise InvalidInputError("asset_type must be a non-empty string, e.g. 'checkpoint'")
        if not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 1:
            raise InvalidInputError(
                f"keep_last must be a whole number >= 1 (the latest is always kept), not {keep_last!r}"
            )
        return await self.chronicle._api.set_retention(self.id, asset_type, keep_last)

    async def _submit(
        self,
        specs: Sequence[ComponentSpec],
        asset_type: str,
        tracker: Any,
        local_dir: str | None,
        metadata: dict[str, Any],
        *,
        contribution: Contribution | None = None,
        delete_local: bool = False,
    ) -> AsyncUploadHandle:
        """Register (when tracked) and queue ``specs``, which come from ``scan_directory`` or,
        untracked, ``ComponentSpec.from_file``: the tracker does not check them again."""
        if not asset_type:
            raise InvalidInputError("asset_type must be a non-empty string, e.g. 'checkpoint'")
        pool = self.chronicle._pool
        if contribution is None:
            asset_id = new_asset_id()
        else:
            asset_id = contribution_id(self.id, contribution.asset_name)
            if asset_id in pool.assets:
                raise InvalidInputError(
                    f"asset {contribution.asset_name!r} is already uploading from this process; "
                    "each rank uses its own Chronicle and its own tracker file"
                )
        if contribution is not None and not specs:
            raise InvalidInputError(
                f"rank {contribution.rank} has no files for asset {contribution.asset_name!r}: "
                "check local_dir and the include/exclude globs"
            )
        components = self.chronicle.components_for(specs)
        atracker = None
        if tracker is not None:
            atracker = await pool.tracker_for(Path(tracker.db_path))
            await _register(
                atracker,
                contribution,
                ops.register(
                    asset_id,
                    list(specs),
                    asset_type=asset_type,
                    seal=True,
                    metadata=tracker_metadata(metadata, contribution, delete_local),
                    binding=self.binding,
                    local_dir=local_dir,
                    part_sizes={p: c.part_size for p, c in components.items() if c.part_size},
                    validated=True,
                ),
            )
        upload = AssetUpload(
            asset_id=asset_id,
            asset_type=asset_type,
            binding=self.binding,
            metadata=metadata,
            components=components,
            tracker=atracker,
            local_dir=local_dir,
            algorithm=self.chronicle.checksum_algorithm,
            contribution=contribution,
            delete_local=delete_local,
        )
        self._uploads.append(upload)
        pool.submit(upload)
        return AsyncUploadHandle(upload)

    async def wait_for_uploads(self, timeout: float | None = None) -> None:
        """Wait until every upload queued through this run is finalized or has failed.

        Raises ``UploadFailedError`` naming the failed assets (the others are finalized).
        """
        await self.chronicle._pool.wait(self._uploads, timeout)
        failed = [
            u
            for u in self._uploads
            if u.future.done() and not u.future.cancelled() and u.future.exception() is not None
        ]
        if failed:
            first = failed[0].future.exception()
            names = ", ".join(f"{u.asset_id} ({u.local_dir or u.asset_type})" for u in failed)
            raise UploadFailedError(
                f"{len(failed)} of {len(self._uploads)} uploads failed: {names}; first cause: {first}",
                first,
            )

    async def set_status(self, status: str) -> None:
        self.status = await self.chronicle._api.set_run_status(self.id, status)

    async def succeed(self) -> None:
        """Wait for this run's uploads, then mark the run succeeded (not if an upload failed)."""
        await self.wait_for_uploads()
        await self.set_status("succeeded")

    async def fail(self) -> None:
        """Mark the run failed. Uploads already queued carry on."""
        await self.set_status("failed")

    async def upload_asset(
        self, path: Path | str, asset_type: str = "file", **metadata: Any
    ) -> Asset:
        """Upload one file or one directory as an asset, now, and return it finalized.

        Not tracked: for large checkpoints that must survive a crash, use
        ``register_and_upload_async`` with an ``UploadTracker``.
        """
        p = Path(path).expanduser()
        if p.is_file():
            specs = [ComponentSpec.from_file(p.name, p)]
        else:
            specs = await asyncio.to_thread(scan_directory, p)
        handle = await self._submit(specs, asset_type, None, os.fspath(p), metadata)
        return await handle.result()

    async def create_asset_presigned(
        self,
        asset_type: str,
        components: Sequence[ComponentSpec],
        *,
        asset_id: str | None = None,
        **metadata: Any,
    ) -> PresignedAsset:
        """Create a pending asset from a full manifest and return its upload targets.

        The asset stays pending (invisible to consumers) until ``finalize_asset`` succeeds.
        """
        asset_id = asset_id or new_asset_id()
        validate_specs(asset_id, components)
        comps = self.chronicle.components_for(components)
        return await self.chronicle._api.create_asset(
            self.id,
            asset_id=asset_id,
            asset_type=asset_type,
            metadata=metadata,
            components=[c.manifest() for c in comps.values()],
            presign=True,
        )

    async def finalize_asset(self, asset_id: str) -> Asset:
        """Finalize a pending asset; a second call returns the same finalized asset."""
        return await self.chronicle.finalize_asset(asset_id)

    async def list_assets(
        self, include_pending: bool = False, asset_type: str | None = None
    ) -> list[Asset]:
        """This run's assets, oldest first: finalized only unless ``include_pending``."""
        return await self.chronicle._api.list_assets(
            self.id, include_pending=include_pending, asset_type=asset_type
        )

    async def download_asset(
        self, asset_id: str, dest: Path | str, include: str | Sequence[str] | None = None
    ) -> Path:
        """Write a verified, byte-identical copy of a finalized asset under ``dest``; returns it.

        Retried (the client's retry policy, stall detection, re-presign), resumed from the last
        verified byte, fetched in parallel ranges under the shared bandwidth cap; each file is
        verified against its published checksum before it takes its final name. ``include``:
        globs choosing components (e.g. ``"__3_*.distcp"``). Files already in ``dest`` with the
        published bytes are kept; after a failure (a ``DownloadError`` naming the file and the
        cause) a second call fetches only what is missing. See docs/restore.md.
        """
        chronicle = self.chronicle
        job = chronicle._pool.downloads.watch(asset_id, os.fspath(dest))
        job.task = asyncio.create_task(
            download_asset(
                chronicle._api,
                chronicle._http,
                asset_id,
                Path(dest).expanduser(),
                concurrency=chronicle.max_upload_workers,
                retry=chronicle.retry,
                bucket=chronicle.bucket,
                include=include,
                watcher=job,
                gate=job.running,
            ),
            name=f"methodic-download-{asset_id}",
        )
        try:
            result = await job.task
        except asyncio.CancelledError as exc:
            job.finished(exc)
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            raise DownloadError(
                f"the download of {asset_id} was cancelled; what was verified is kept in "
                f"{dest}, and downloading again fetches only the rest",
                None,
                "cancelled",
            ) from None
        except BaseException as exc:
            job.finished(exc)
            raise
        job.finished(None)
        return result

    async def latest(self, asset_type: str | None = None) -> Asset | None:
        """The newest finalized asset of this run (of ``asset_type`` if given), or None.

        "Newest" is by creation, as retention counts: it moves only when a newer asset is
        finalized, never to one still pending (a multi-rank asset waiting for ranks), and never
        back to an older checkpoint that finalizes late.
        """
        assets = await self.list_assets(asset_type=asset_type)
        return newest_finalized(assets)
