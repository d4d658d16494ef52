"""Finishing an asset: every state change, finalize once all is stored, and failure."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from methodic import _digests as digests
from methodic import _tracker_ops as ops
from methodic._api import ApiClient
from methodic._checksum import SHA256
from methodic._contributions import RankStatus, await_whole, delete_local_files
from methodic._errors import (
    AssetIncompleteError,
    ChronicleError,
    ConflictError,
    UploadFailedError,
)
from methodic._events import (
    AssetFinalized,
    AssetStateChanged,
    ComponentStateChanged,
    EventBus,
    RanksChanged,
)
from methodic._progress import Progress
from methodic._states import AssetState, ComponentState
from methodic._transfer import FileChangedError
from methodic._types import Asset, RemoteComponent, components_fingerprint
from methodic._uploads import AssetUpload, ComponentUpload, new_future

log = logging.getLogger("methodic")

Spawn = Callable[[Coroutine[Any, Any, Any], str], None]
Resend = Callable[[AssetUpload, dict[str, list[int] | None]], Coroutine[Any, Any, None]]
# Times finalize may send again what the server found missing or damaged (a replayed URL, a
# torn store) before the asset fails.
MAX_RESENDS = 3
# Waits (seconds) while the server is still receiving a body into a file (a stale or leaked
# PUT): finalize again after each, before that counts as missing (~2.5 minutes in all).
BUSY_WAITS = (0.5, 1, 2, 4, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8)


class Finisher:
    """Moves assets between states (tracker first, then the event), finalizes and fails them."""

    def __init__(self, api: ApiClient, events: EventBus, progress: Progress, spawn: Spawn) -> None:
        self._api = api
        self._events = events
        self._progress = progress
        self._spawn = spawn
        self.resend: Resend | None = None  # the pool's intake sends again what finalize lacks

    async def set_state(self, up: AssetUpload, state: AssetState, error: str | None = None) -> None:
        # The event goes out with the change, before the tracker write: a snapshot that shows
        # the state always has its event queued (a headless run that ends as soon as nothing
        # is in flight printed no reason for an asset that failed during that write).
        up.state, up.last_error = state, error
        self._events.emit(AssetStateChanged(up.asset_id, state, error))
        await self._track(up, ops.set_asset_state(up.asset_id, state, error=error), state)

    @staticmethod
    async def _track(up: AssetUpload, op: ops.Op[Any], what: str) -> None:
        """Write ``op`` through the asset's tracker; a failure is a warning, not the asset's end.

        The server is the truth of what is stored and finalized: a process that resumes the
        asset later asks it, and fixes the tracker row from the answer.
        """
        try:
            await up.track(op)
        except ChronicleError as exc:
            if up.tracker is not None and up.tracker.lost is not None:
                return  # said once, loudly, when the loss was found
            log.warning(
                "asset %s is %s, but the tracker could not record it: %s; "
                "the next `methodic-tui resume` (or drain) brings the tracker up to date",
                up.asset_id,
                what,
                exc,
            )

    def maybe_finalize(self, up: AssetUpload) -> None:
        """Finalize in the background once the asset is sealed and every component stored."""
        if up.sealed and up.state == AssetState.UPLOADING and up.remaining == 0:
            up.state = AssetState.FINALIZING
            self._spawn(self._finalize_in_background(up), f"methodic-finalize-{up.asset_id}")

    async def _finalize_in_background(self, up: AssetUpload) -> None:
        # The outcome reaches the waiters through up.future; nobody awaits this task.
        with contextlib.suppress(ChronicleError):
            await self.finalize(up)

    async def finalize(self, up: AssetUpload) -> Asset | None:
        """Ask the server to finalize, with every file's checksum from its ranges' digests.

        The server publishes a file only if the bytes it holds have that checksum. What it
        finds missing or damaged it forgets; that is sent again (None) a few times before the
        asset fails.
        """
        try:
            # The tracker holds every completion before the asset says finalizing.
            await self._progress.flush()
            await self.set_state(up, AssetState.FINALIZING)
            checksums = await digests.file_checksums(up)
            rank = None if up.contribution is None else up.contribution.rank
            for wait in (*BUSY_WAITS, None):
                try:
                    asset = await self._api.finalize(up.asset_id, checksums, rank, brief=True)
                    break
                except AssetIncompleteError as exc:
                    if not exc.busy or wait is None:
                        raise
                    await asyncio.sleep(wait)
            if asset.state != AssetState.FINALIZED:  # a rank's contribution: wait for the rest
                whole = await self._await_whole(up)
                if whole is None:
                    return None
                asset = whole
            elif asset.components_fingerprint is not None:
                asset = await self._with_components(up, asset, checksums)
            await self.finalized(up, asset)
            return asset
        except FileChangedError as exc:
            await self.fail_asset(up, exc)
            raise UploadFailedError(str(exc), exc) from None
        except AssetIncompleteError as exc:
            if self.resend is not None and exc.missing and up.resends < MAX_RESENDS:
                up.resends += 1
                log.warning("finalize of %s: %s; sending it again", up.asset_id, exc)
                await self.resend(up, {p: exc.parts_missing.get(p) for p in exc.missing})
                return None
            await self.fail_asset(
                up, exc, f"finalize refused: {exc} (missing: {', '.join(exc.missing)})"
            )
            raise
        except ChronicleError as exc:
            await self.fail_asset(up, exc)
            raise

    async def _with_components(
        self, up: AssetUpload, asset: Asset, checksums: dict[str, str]
    ) -> Asset:
        """The finalized asset of a brief answer, its components built from this process's
        manifest and the checksums the server verified and settled; when they are not what the
        server holds (the fingerprint differs: a legacy asset, another client's finalize),
        they are read back."""
        built = await asyncio.to_thread(settled_components, up, asset, checksums)
        if await asyncio.to_thread(components_fingerprint, built) == asset.components_fingerprint:
            return dataclasses.replace(asset, components=built, components_fingerprint=None)
        log.info("finalize of %s: reading its components back", up.asset_id)
        full = await self._api.get_asset(up.asset_id)
        mine = tuple(c for c in full.components if c.path in up.components)
        return dataclasses.replace(asset, components=mine, components_fingerprint=None)

    async def _await_whole(self, up: AssetUpload) -> Asset | None:
        """This rank's contribution is stored: wait until the server finalizes the asset.
        None when the asset stopped here meanwhile (discarded)."""
        up.stored_at = up.stored_at or time.time()
        said: list[tuple[int, ...]] = []

        def seen(status: RankStatus) -> None:
            up.ranks = status
            if not said or said[-1] != status.missing:  # once, then on each change
                said.append(status.missing)
                assert up.contribution is not None
                self._events.emit(
                    RanksChanged(
                        up.asset_id,
                        up.contribution.rank,
                        status.world_size,
                        status.stored,
                        status.missing,
                        status.waiting,
                        True,
                    )
                )

        task = asyncio.ensure_future(await_whole(self._api, up.asset_id, seen))
        # A discard (or any end of the upload) elsewhere settles the future: stop waiting.
        try:
            await asyncio.wait({task, up.future}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():  # the asset ended here, or this process is closing
                task.cancel()
        return task.result() if not task.cancelled() else None

    async def force(self, up: AssetUpload) -> Asset:
        """Ask the server to finalize now; only a yes changes the asset. (Of a rank's
        contribution: store it now; the answer is pending until every rank's is stored.)

        It obeys the rule of every finalize: each file must still be the one registered, and
        the server publishes only bytes that have the checksums derived here (ranges hashed
        again where their digests are unknown). Until the server answers, transfers go on and
        the state stays; a refusal (or an error) is raised with the asset exactly as it was.
        """
        await self._progress.flush()
        try:
            await asyncio.to_thread(check_identities, up)
            checksums = await digests.file_checksums(up)
        except FileChangedError as exc:
            raise ConflictError(f"asset {up.asset_id} cannot be finalized: {exc}") from None
        rank = None if up.contribution is None else up.contribution.rank
        asset = await self._api.finalize(up.asset_id, checksums, rank)
        up.cancel_transfers()  # what they were sending, the server already holds
        if up.future.done():
            up.future = new_future()
        if asset.state != AssetState.FINALIZED:
            # A rank's contribution is stored: the asset is finalized when the others' are.
            await self.set_state(up, AssetState.FINALIZING)
            self._spawn(self._wait_for_ranks(up), f"methodic-ranks-{up.asset_id}")
            return asset
        await self.finalized(up, asset)
        return asset

    async def _wait_for_ranks(self, up: AssetUpload) -> None:
        try:
            whole = await self._await_whole(up)
            if whole is not None:
                await self.finalized(up, whole)
        except ChronicleError as exc:
            await self.fail_asset(up, exc)

    async def finalized(self, up: AssetUpload, asset: Asset) -> None:
        """The server holds ``asset`` finalized: so does the tracker, and the waiters learn it."""
        for c in up.components.values():
            c.state, c.bytes_done = ComponentState.COMPLETED, c.size
        up.completed = len(up.components)
        await self._track(
            up,
            ops.mark_components(
                up.asset_id, list(up.components), ComponentState.COMPLETED, sizes_done=True
            ),
            "finalized on the server",
        )
        await self.set_state(up, AssetState.FINALIZED)
        self._events.emit(
            AssetFinalized(up.asset_id, up.asset_type, asset.total_size, asset.component_count)
        )
        if up.delete_local:
            files = [(c.identity.local_path, c.identity) for c in up.components.values()]
            removed = await asyncio.to_thread(delete_local_files, up.local_dir, files)
            log.info("asset %s is finalized: removed %d local files", up.asset_id, len(removed))
        if not up.future.done():
            up.future.set_result(asset)

    async def component_failed(
        self, up: AssetUpload, c: ComponentUpload, message: str, cause: BaseException | None
    ) -> None:
        """One file cannot be sent: it fails, and with it the asset."""
        c.state, c.last_error = ComponentState.FAILED, message
        await self._track(
            up,
            ops.set_component_state(up.asset_id, c.path, ComponentState.FAILED, error=message),
            f"failing ({c.path})",
        )
        self._events.emit(
            ComponentStateChanged(up.asset_id, c.path, ComponentState.FAILED, message)
        )
        await self.fail_asset(up, cause, message)

    async def fail_asset(
        self, up: AssetUpload, cause: BaseException | None, message: str | None = None
    ) -> None:
        if up.state == AssetState.DISCARDED:
            return  # discarded meanwhile (e.g. a waiting rank's asset, gone from the server)
        message = message or str(cause)
        up.cancel_transfers()
        await self.set_state(up, AssetState.FAILED, message)
        if not up.future.done():
            where = f" ({up.local_dir})" if up.local_dir else ""
            up.future.set_exception(
                UploadFailedError(f"upload of asset {up.asset_id}{where} failed: {message}", cause)
            )


def settled_components(
    up: AssetUpload, asset: Asset, checksums: dict[str, str]
) -> tuple[RemoteComponent, ...]:
    """The components of ``up`` as the server reports them once it finalized the asset with
    ``checksums`` (``records.component_out``: stored whole, and the sha256 of a one-PUT file of
    a sha256 asset is its checksum's value)."""
    plain_sha256 = asset.checksum_algorithm == SHA256
    out = []
    for c in up.components.values():
        checksum = checksums.get(c.path)
        sha256 = c.sha256
        if sha256 is None and plain_sha256 and c.part_size is None and checksum is not None:
            sha256 = checksum.partition(":")[2]
        parts = tuple(range(1, c.part_count + 1)) if c.part_size else ()
        out.append(RemoteComponent(c.path, c.size, sha256, c.part_size, True, parts, checksum))
    return tuple(out)


def check_identities(up: AssetUpload) -> None:
    """FileChangedError naming the first file that is not what was registered."""
    for c in up.components.values():
        c.identity.check()
