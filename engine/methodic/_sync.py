"""The sync facade: Chronicle and Run run the async core on a private event-loop thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar, overload

from methodic._client import AsyncChronicle, AsyncRun
from methodic._events import Event, PoolSnapshot, Subscription
from methodic._recovery import DrainReport, drain_incomplete_uploads_async
from methodic._retry import RetryPolicy
from methodic._sessions import CommandResult, UploaderSession
from methodic._tracker import UploadTracker
from methodic._types import Asset, ComponentSpec, PresignedAsset
from methodic._uploads import AsyncUploadHandle

T = TypeVar("T")


class LoopThread:
    """An asyncio event loop running in a daemon thread of its own.

    ``Chronicle`` runs its ``AsyncChronicle`` on one; a UI with a loop of its own (methodic-tui)
    runs the engine on one too, so painting never holds up a transfer. ``submit`` schedules a
    coroutine there and returns a ``concurrent.futures.Future``; ``call`` waits for it.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="methodic-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coro`` on the loop; its ``concurrent.futures.Future`` at once."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result (``TimeoutError`` after ``timeout``)."""
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"gave up waiting after {timeout} s") from None

    def stop(self) -> None:
        """Stop the loop and join its thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class UploadHandle:
    """A queued upload: ``asset_id`` at once, ``result()`` the finalized asset (or it raises)."""

    def __init__(self, handle: AsyncUploadHandle, loop: LoopThread) -> None:
        self._handle = handle
        self._future = loop.submit(handle.result())

    @property
    def asset_id(self) -> str:
        return self._handle.asset_id

    def done(self) -> bool:
        return self._future.done()

    @property
    def contribution_stored(self) -> bool:
        """Of a rank's contribution: True once the server holds it stored and verified."""
        return self._handle.contribution_stored

    @property
    def stored_at(self) -> float | None:
        """When this rank's contribution was stored (``time.time()``), if it is."""
        return self._handle.stored_at

    def add_done_callback(self, fn: Callable[[UploadHandle], object]) -> None:
        """Call ``fn(handle)`` once, on the Chronicle's loop thread, when the asset is
        finalized or the upload failed (``result()`` says which). An exception in ``fn`` is
        logged, never raised into the upload."""
        self._future.add_done_callback(lambda _f: fn(self))

    def result(self, timeout: float | None = None) -> Asset:
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(
                f"asset {self.asset_id} was not finalized within {timeout} s"
            ) from None

    def __repr__(self) -> str:
        return repr(self._handle)


class Chronicle:
    """A connection to a Chronicle server and **one shared upload pool**.

    ```python
    # server_url and api_key from $METHODIC_SERVER_URL and $METHODIC_API_KEY
    from methodic import Chronicle

    with Chronicle(max_upload_workers=8, max_bandwidth="200MB") as chronicle:
        run = chronicle.run(chronicle.create_experiment("llama-ft"), variation=0, run=0)
    ```

    The pool runs ``max_upload_workers`` transfers at once for every ``Run`` made from this
    ``Chronicle``. ``server_url`` defaults to ``$METHODIC_SERVER_URL``, ``api_key`` to
    ``$METHODIC_API_KEY``. ``max_bandwidth`` caps all workers together (a token bucket): bytes/s,
    or text such as ``"200MB"``, ``"1.5GiB"``, ``"500k"``; ``None``: no cap (see ``parse_rate``).

    Keyword options: ``retry=RetryPolicy(...)``; ``part_threshold`` (default 64 MiB: files at or
    above it go in parts); ``part_size`` (default 16 MiB, at least 5 MiB, raised so no file
    exceeds 10,000 parts); ``stall_timeout`` (default 60 s: a transfer that moves no byte that
    long is aborted and retried, however slow the link); ``checksum_algorithm`` (default
    ``None``: the server's, ``crc64nvme``; or ``"sha256"``, ``"blake3"``): the digest of every
    range, bound into its upload URL and verified by the receiver (see the integrity model).

    Each range is hashed before it is presigned; bodies to ``http://`` targets that no proxy
    applies to leave by ``sendfile(2)``, ``https://`` and proxied targets go through httpx,
    which honours ``HTTPS_PROXY``/``NO_PROXY``. Use it as a context manager: on exit, uploads
    still running stay resumable from their tracker. The API key never appears in ``repr``,
    messages, logs or the tracker. Every method runs the ``AsyncChronicle`` method of the same
    name and parameters on a private loop thread and waits for it.
    """

    def __init__(
        self,
        server_url: str | None = None,
        api_key: str | None = None,
        max_upload_workers: int = 8,
        max_bandwidth: str | float | None = None,
        *,
        retry: RetryPolicy | None = None,
        **options: Any,
    ) -> None:
        self.core = AsyncChronicle(
            server_url, api_key, max_upload_workers, max_bandwidth, retry=retry, **options
        )
        self._loop = LoopThread()
        try:
            self._loop.call(self.core.open())
        except BaseException:
            self._loop.stop()
            raise
        self._closed = False

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return self._loop.call(coro, timeout)

    @property
    def server_url(self) -> str:
        """The server this connection talks to."""
        return self.core.server_url

    def __repr__(self) -> str:
        return f"Chronicle(server_url={self.server_url!r}, max_upload_workers={self.core.max_upload_workers})"

    def close(self) -> None:
        """Stop the pool (unfinished uploads stay resumable) and the loop thread."""
        if not self._closed:
            self._closed = True
            try:
                self._call(self.core.close())
            finally:
                self._loop.stop()

    def __enter__(self) -> Chronicle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create_experiment(self, name: str) -> str:
        """Create the experiment ``name`` (or find the existing one) and return its id."""
        return self._call(self.core.create_experiment(name))

    def run(self, experiment_id: str, variation: int = 0, run: int = 0) -> Run:
        """Get or create run (variation, run) of an experiment."""
        return Run(self, self._call(self.core.run(experiment_id, variation, run)))

    def get_asset(self, asset_id: str) -> Asset:
        """The server's view of an asset, pending or not, with the components and parts
        storage holds."""
        return self._call(self.core.get_asset(asset_id))

    def finalize_asset(self, asset_id: str) -> Asset:
        """As ``Run.finalize_asset``."""
        return self._call(self.core.finalize_asset(asset_id))

    # Operator controls: AsyncChronicle's, run on the loop thread (see it for each one's rules).

    def pause(self, asset_id: str | None = None) -> list[str]:
        """Pause one asset (or all, with no id); returns the ids paused.

        In-flight transfers stop at once, finished parts stay finished; a paused asset stays
        paused across a restart."""
        return self._call(self.core.pause(asset_id))

    def resume(self, asset_id: str | None = None) -> list[str]:
        """Resume paused assets (and those held from an earlier process); returns their ids."""
        return self._call(self.core.resume(asset_id))

    def retry_failed(self, asset_id: str | None = None) -> list[str]:
        """Queue failed components again, with fresh attempts; returns the assets' ids."""
        return self._call(self.core.retry_failed(asset_id))

    def force_finalize(self, asset_id: str) -> Asset:
        """Ask the server to finalize whatever the local state says, now.

        The server still verifies storage and every file's checksum: ``AssetIncompleteError``
        lists what is missing; ``ConflictError`` when a local file changed since it was sent."""
        return self._call(self.core.force_finalize(asset_id))

    def discard(self, asset_id: str) -> None:
        """Stop the asset, mark it discarded in the tracker and abort it on the server (its
        stored bytes are removed). Discarding a finalized asset raises ``ConflictError``."""
        self._call(self.core.discard(asset_id))

    def set_bandwidth(self, max_bandwidth: str | float | None) -> None:
        """Change the shared bandwidth cap while uploads run (None lifts it)."""
        self._call(self.core.set_bandwidth(max_bandwidth))

    def snapshot(
        self, with_components: bool | str = False, component_limit: int | None = None
    ) -> PoolSnapshot:
        """Every asset of the pool, consistent at one instant: bytes done and total, state,
        components done, rate, ETA, last error; components too when ``with_components`` is true
        (or is one asset's id), at most ``component_limit`` of an upload (see
        ``AsyncChronicle.snapshot``). An asset's ``rate`` and ``eta`` are ``None`` unless it is
        uploading and a few seconds of its transfer were measured."""
        return self._call(self.core.snapshot(with_components, component_limit))

    # Uploader sessions (docs/monitor.md): see AsyncChronicle for each one's rules.

    @property
    def session_id(self) -> str | None:
        return self.core.session_id

    def sessions(
        self, experiment: str | None = None, run: int | None = None
    ) -> list[UploaderSession]:
        """Every uploader session the server knows (live, lost or closed)."""
        return self._call(self.core.sessions(experiment, run))

    def send_command(
        self,
        session_id: str,
        action: str,
        asset_id: str | None = None,
        value: float | None = None,
        timeout: float = 10.0,
    ) -> CommandResult:
        """Relay a control to another uploader through the server; waits for its acknowledgement."""
        return self._call(self.core.send_command(session_id, action, asset_id, value, timeout))

    def subscribe(self, maxsize: int = 10_000) -> EventStream:
        """The engine's event stream, read from this thread: an ``EventStream``."""
        return EventStream(self._loop, self._call(_subscribe(self.core, maxsize)))


async def _subscribe(core: AsyncChronicle, maxsize: int) -> Subscription:
    return core.subscribe(maxsize)


class EventStream:
    """A ``Subscription`` read from another thread than the engine's loop.

    ``get_nowait()`` takes what has arrived; iterating blocks for each next event.
    """

    def __init__(self, loop: LoopThread, subscription: Subscription) -> None:
        self._loop = loop
        self._sub = subscription

    def get_nowait(self) -> list[Event]:
        """Every event that has arrived, without waiting."""
        return self._loop.call(_drain(self._sub))

    def get(self, timeout: float | None = None) -> Event:
        """The next event; ``TimeoutError`` when none comes within ``timeout`` seconds."""
        return self._loop.call(self._sub.__anext__(), timeout)

    def __iter__(self) -> Iterator[Event]:
        while True:
            yield self.get()

    @property
    def dropped(self) -> int:
        """How many progress samples a slow reader lost (state changes are never lost)."""
        return self._sub.dropped

    def close(self) -> None:
        """Stop receiving events."""
        self._loop.call(_close(self._sub))

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _drain(sub: Subscription) -> list[Event]:
    return sub.get_nowait()


async def _close(sub: Subscription) -> None:
    sub.close()


@overload
def drain_incomplete_uploads(
    chronicle: Chronicle,
    tracker: UploadTracker,
    *,
    upload_unsealed: bool = False,
    take_over: bool = False,
) -> DrainReport: ...
@overload
def drain_incomplete_uploads(
    chronicle: AsyncChronicle,
    tracker: UploadTracker,
    *,
    upload_unsealed: bool = False,
    take_over: bool = False,
) -> Coroutine[Any, Any, DrainReport]: ...
def drain_incomplete_uploads(
    chronicle: Chronicle | AsyncChronicle,
    tracker: UploadTracker,
    *,
    upload_unsealed: bool = False,
    take_over: bool = False,
) -> DrainReport | Coroutine[Any, Any, DrainReport]:
    """Resume every unfinished upload recorded in ``tracker`` and finalize it; returns a DrainReport.

    For each asset: create it on the server if the crash came before that, ask the server which
    components and parts it already stores, send only the rest, then finalize. It always
    returns: assets another live process owns are ``skipped`` (``take_over=True`` takes them),
    unsealed ones are reported in ``unsealed`` (``upload_unsealed=True`` sends what they hold,
    without finalizing). With an ``AsyncChronicle`` this returns a coroutine
    (``drain_incomplete_uploads_async``).

    An asset the server already finalized is marked finalized locally without sending anything.
    A component whose file vanished or changed (size, mtime, ctime, inode, device, or the digest
    of a range already sent) fails its asset with a message naming the file; nothing else is
    touched. Paused assets stay paused.

    **Owned by a live process** (``skipped``): each asset taken over is claimed; its owner is
    recorded as pid and process start time, so a live process that was given a dead owner's pid
    holds nothing. An asset whose owner is alive is left to it (the reason names the pid), so it
    is never sent twice; ``take_over=True`` (``methodic-tui resume --take-over``) takes it anyway,
    for a process known to be stuck.

    **Unsealed** (``unsealed``: {asset id: what it holds and what to do}): registered with
    ``seal=False`` by a process that stopped before ``seal()``. Nobody can tell whether more
    components were to follow, so recovery never finalizes it and does not count it as failed:
    ``tracker.seal(asset_id)`` (``methodic-tui seal ASSET``) then drain again, or discard it. With
    ``upload_unsealed=True`` the drain also sends the components registered so far; the server
    fixes the manifest then, so no more components can be registered into it.
    """
    coro = drain_incomplete_uploads_async(
        chronicle.core if isinstance(chronicle, Chronicle) else chronicle,
        tracker,
        upload_unsealed=upload_unsealed,
        take_over=take_over,
    )
    if isinstance(chronicle, Chronicle):
        return chronicle._call(coro)
    return coro


class Run:
    """A run of an experiment (sync): see ``AsyncRun`` for the behaviour of each method."""

    def __init__(self, chronicle: Chronicle, core: AsyncRun) -> None:
        self._chronicle = chronicle
        self.core = core

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return self._chronicle._call(coro, timeout)

    @property
    def id(self) -> str:
        """The run's id on the server."""
        return self.core.id

    @property
    def experiment_id(self) -> str:
        """The id of the run's experiment."""
        return self.core.experiment_id

    @property
    def status(self) -> str:
        """``running``, ``succeeded`` or ``failed``."""
        return self.core.status

    def __repr__(self) -> str:
        return repr(self.core).replace("AsyncRun", "Run", 1)

    def register_and_upload_async(
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
    ) -> UploadHandle:
        """Register every file under ``local_dir`` (or those ``include``/``exclude`` globs keep)
        in one call and upload it in the background; with ``asset_name``, ``rank`` and
        ``world_size``, as one rank's contribution to a multi-rank asset (docs/distributed.md)."""
        handle = self._call(
            self.core.register_and_upload_async(
                local_dir,
                asset_type,
                upload_tracker,
                include=include,
                exclude=exclude,
                asset_name=asset_name,
                rank=rank,
                world_size=world_size,
                delete_local=delete_local,
                **metadata,
            )
        )
        return UploadHandle(handle, self._chronicle._loop)

    def set_retention(self, asset_type: str = "checkpoint", keep_last: int = 3) -> list[str]:
        """Keep this run's newest ``keep_last`` finalized assets of the type; older ones are
        deleted on the server only after newer ones are finalized. Returns the ids deleted now."""
        return self._call(self.core.set_retention(asset_type, keep_last))

    def wait_for_uploads(self, timeout: float | None = None) -> None:
        """Block until every upload queued through this run is finalized or failed; raises
        ``UploadFailedError`` naming the failed assets, ``TimeoutError`` after ``timeout`` s."""
        try:
            self._call(self.core.wait_for_uploads(timeout))
        except TimeoutError:
            raise TimeoutError(
                f"uploads of run {self.id} still running after {timeout} s"
            ) from None

    def succeed(self) -> None:
        """Wait for this run's uploads, then mark the run succeeded (not if one failed)."""
        self._call(self.core.succeed())

    def fail(self) -> None:
        """Mark the run failed."""
        self._call(self.core.fail())

    def upload_asset(self, path: Path | str, asset_type: str = "file", **metadata: Any) -> Asset:
        """Upload one file or directory now and return the finalized asset.

        Not tracked: for checkpoints that must survive a crash, use
        ``register_and_upload_async`` with a tracker."""
        return self._call(self.core.upload_asset(path, asset_type, **metadata))

    def create_asset_presigned(
        self,
        asset_type: str,
        components: Sequence[ComponentSpec],
        *,
        asset_id: str | None = None,
        **metadata: Any,
    ) -> PresignedAsset:
        """Create a pending asset from its full manifest; returns ``.asset_id``, ``.asset`` and
        ``.targets`` (``UploadTarget``s: PUT exactly ``length`` bytes from ``offset`` of the
        file to ``url`` with ``headers``). The asset stays pending, invisible to consumers,
        until ``finalize_asset`` succeeds."""
        return self._call(
            self.core.create_asset_presigned(asset_type, components, asset_id=asset_id, **metadata)
        )

    def finalize_asset(self, asset_id: str) -> Asset:
        """Finalize a pending asset; idempotent (a second call returns the same asset).

        Raises ``AssetIncompleteError`` (with ``.missing``) when storage lacks a component."""
        return self._call(self.core.finalize_asset(asset_id))

    def list_assets(
        self, include_pending: bool = False, asset_type: str | None = None
    ) -> list[Asset]:
        """This run's assets, oldest first; finalized only unless ``include_pending``."""
        return self._call(self.core.list_assets(include_pending, asset_type))

    def download_asset(
        self, asset_id: str, dest: Path | str, include: str | Sequence[str] | None = None
    ) -> Path:
        """Write a verified, byte-identical copy of a finalized asset (or the components
        ``include`` chooses) under ``dest``; retried, resumable, atomic per file."""
        return self._call(self.core.download_asset(asset_id, dest, include))

    def latest(self, asset_type: str | None = None) -> Asset | None:
        """The newest finalized asset of this run (of ``asset_type`` if given), or None."""
        return self._call(self.core.latest(asset_type))
