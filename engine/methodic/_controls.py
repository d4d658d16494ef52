"""Operator controls: pause, resume, retry failed, force-finalize, discard.

Each acts on the pool's assets at once and tells every change on the event bus; the
bandwidth cap is changed on the shared token bucket directly (``AsyncChronicle``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping

from methodic import _tracker_ops as ops
from methodic._api import ApiClient
from methodic._errors import ConflictError, NotFoundError, UploadFailedError
from methodic._events import AssetStateChanged, ComponentStateChanged, EventBus
from methodic._finish import Finisher
from methodic._intake import Intake
from methodic._progress import Progress
from methodic._states import HELD_STATES, SENDING_STATES, AssetState, ComponentState
from methodic._types import Asset
from methodic._uploads import AssetUpload, new_future


class Controls:
    def __init__(
        self,
        api: ApiClient,
        *,
        assets: Mapping[str, AssetUpload],
        events: EventBus,
        progress: Progress,
        intake: Intake,
        finisher: Finisher,
    ) -> None:
        self._api = api
        self._assets = assets
        self._events = events
        self._progress = progress
        self._intake = intake
        self._finisher = finisher

    def _get(self, asset_id: str) -> AssetUpload:
        up = self._assets.get(asset_id)
        if up is None:
            raise NotFoundError(f"asset {asset_id} is not in this upload pool")
        return up

    def _select(self, asset_id: str | None, states: Iterable[str]) -> list[AssetUpload]:
        if asset_id is not None:
            up = self._get(asset_id)
            return [up] if up.state in states else []
        return [up for up in self._assets.values() if up.state in states]

    async def pause(self, asset_id: str | None = None) -> list[str]:
        """Pause one asset, or all: transfers in flight stop now; finished parts stay finished."""
        paused = self._select(asset_id, SENDING_STATES)
        for up in paused:
            up.cancel_transfers()
            for c in up.components.values():  # a paused asset sends no file
                if c.state == ComponentState.UPLOADING:
                    c.state = ComponentState.QUEUED
                    self._progress.changed(up, c)
                    self._events.emit(
                        ComponentStateChanged(up.asset_id, c.path, ComponentState.QUEUED)
                    )
            await self._finisher.set_state(up, AssetState.PAUSED)
        return [up.asset_id for up in paused]

    async def resume(self, asset_id: str | None = None) -> list[str]:
        """Resume paused assets, and held ones an earlier process left unfinished."""
        resumed = self._select(asset_id, HELD_STATES)
        for up in resumed:
            await self._intake.restart(up)
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
                up.future = new_future()
            await self._intake.restart(up)
        return [up.asset_id for up in retried]

    async def force_finalize(self, asset_id: str) -> Asset:
        """Ask the server to finalize now, whatever the tracker says; the server still verifies.

        Raises ``AssetIncompleteError`` (listing what storage lacks) when the server refuses;
        a refusal (or any error) changes nothing here: the asset keeps its state and progress
        and its transfers go on, as the confirm dialog promises.
        """
        return await self._finisher.force(self._get(asset_id))

    async def discard(self, asset_id: str) -> None:
        """Stop, forget locally and abort the pending asset on the server (its bytes are removed).

        An asset this pool does not hold is aborted on the server only (an operator's discard
        of a multi-rank asset another process waits on: that process's handle then fails).
        """
        if asset_id not in self._assets:
            await self._api.delete_asset(asset_id)  # NotFoundError when the server has none
            return
        up = self._get(asset_id)
        if up.state == AssetState.FINALIZED:
            raise ConflictError(f"asset {asset_id} is finalized; it cannot be discarded")
        up.cancel_transfers()
        up.state = AssetState.DISCARDED
        with contextlib.suppress(NotFoundError):
            await self._api.delete_asset(asset_id)
        if up.tracker is not None:
            await up.tracker.run(ops.discard(asset_id))
        self._events.emit(AssetStateChanged(asset_id, AssetState.DISCARDED))
        if not up.future.done():
            up.future.set_exception(UploadFailedError(f"asset {asset_id} was discarded"))
