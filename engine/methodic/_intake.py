"""Intake: how an asset enters the pool and starts sending.

Work arrives from the code path that registers (``submit``), never from polling the
tracker. Starting an asset makes sure the server has it (create is idempotent), skips what
the server already stores when an earlier process began it, then queues the rest.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import MutableMapping
from typing import Any

from methodic import _checksum as checksums
from methodic import _digests as digests
from methodic import _tracker_ops as ops
from methodic._api import ApiClient
from methodic._contributions import RankStatus
from methodic._errors import ChronicleError, ConflictError, NotFoundError
from methodic._events import AssetStateChanged, ComponentStateChanged, EventBus
from methodic._finish import Finisher, Spawn, check_identities
from methodic._jobs import Scheduler
from methodic._manifest import manifest_digest
from methodic._states import AssetState, ComponentState
from methodic._transfer import FileChangedError
from methodic._types import Asset, PresignedAsset
from methodic._uploads import AssetUpload

# A bigger manifest is created with its first FIRST_SLICE components, so that their files
# start sending at once; the rest are appended APPEND_SLICE at a time meanwhile (a create of
# 10,000 is ~0.15 s of server time, most of it SQLite's row inserts).
FIRST_SLICE = 256
APPEND_SLICE = 2000


class Intake:
    def __init__(
        self,
        api: ApiClient,
        *,
        assets: MutableMapping[str, AssetUpload],
        events: EventBus,
        scheduler: Scheduler,
        finisher: Finisher,
        spawn: Spawn,
    ) -> None:
        self._api = api
        self._assets = assets
        self._events = events
        self._scheduler = scheduler
        self._finisher = finisher
        self._spawn = spawn
        # Assets are created on the server in the order they were registered: "newest" (run.latest,
        # retention) is by creation, and concurrent creates could land checkpoint-2000 first.
        self._create_order = asyncio.Lock()
        self._slices = True  # False once the server is seen not to take a manifest in slices

    def submit(self, up: AssetUpload) -> None:
        """Start uploading ``up`` (already recorded in its tracker)."""
        self._assets[up.asset_id] = up
        self._events.emit(AssetStateChanged(up.asset_id, up.state))
        self._spawn(self._begin(up), f"methodic-begin-{up.asset_id}")

    def hold(self, up: AssetUpload) -> None:
        """Show an asset an earlier process left unfinished, without starting it (``resume`` does)."""
        if up.state != AssetState.PAUSED:
            up.state = AssetState.INTERRUPTED
        self._assets[up.asset_id] = up
        self._events.emit(AssetStateChanged(up.asset_id, up.state))

    async def restart(self, up: AssetUpload) -> None:
        """Send again an asset that stopped (held, paused or failed) from where it stopped."""
        if not up.remote_ready:
            up.state = AssetState.REGISTERED
            self._spawn(self._begin(up), f"methodic-begin-{up.asset_id}")
            return
        await self._send(up)

    async def resend(self, up: AssetUpload, missing: dict[str, list[int] | None]) -> None:
        """Send again what finalize found missing or damaged (the server has forgotten it):
        the listed parts of a parted file, or the whole file."""
        for path, parts in missing.items():
            c = up.components.get(path)
            if c is None:
                continue
            c.parts_done -= set(parts) if parts and c.part_size else c.parts_done
            c.state, c.checksum = ComponentState.QUEUED, None
            c.bytes_done = sum(c.part_length(n) for n in c.parts_done) if c.part_size else 0
            self._events.emit(ComponentStateChanged(up.asset_id, c.path, ComponentState.QUEUED))
        for key in [k for k in up.targets if k[0] in missing]:  # the server forgot their uploads
            del up.targets[key]
            up.use_until.pop(key, None)
        up.recount()
        await up.track(ops.mark_components(up.asset_id, list(missing), ComponentState.QUEUED))
        await self._send(up)

    async def _send(self, up: AssetUpload) -> None:
        await self._finisher.set_state(up, AssetState.UPLOADING)
        self._scheduler.enqueue(up)
        self._finisher.maybe_finalize(up)

    async def _begin(self, up: AssetUpload) -> None:
        try:
            remote = await self._ensure_remote(up)
            if remote.state == AssetState.FINALIZED:
                up.was_finalized = True
                await self._finisher.finalized(up, remote)
                return
            if up.resumed:
                # What the server holds was sent from these files: unless each is still the
                # file that was registered, none of it may be published.
                await asyncio.to_thread(check_identities, up)
                await self._skip_stored(up, remote)
                await digests.verify_stored(up)
            if up.state == AssetState.PAUSED:
                return
            await self._send(up)
        except FileChangedError as exc:
            await self._finisher.fail_asset(up, exc)
        except ChronicleError as exc:
            await self._finisher.fail_asset(up, exc)

    async def _ensure_remote(self, up: AssetUpload) -> Asset:
        known = up.known_remote and up.contribution is None  # a rank's create reports the others
        asset = await self._known_asset(up) if known else None
        if asset is None:
            async with self._create_order:
                create = self._create(up)
                created = await (create if up.resumed else digests.hashed_during(up, create))
            asset = created.asset
            # A brief answer lists none: those the create carried.
            listed = set(itertools.islice(up.components, FIRST_SLICE))
            if up.contribution is not None:  # what the server holds of the other ranks' so far
                up.ranks = RankStatus.of(asset)
            if up.resumed:
                asset = await self._api.get_asset(up.asset_id)
                listed = {c.path for c in asset.components}
        else:
            listed = {c.path for c in asset.components}
        up.algorithm = asset.checksum_algorithm or up.algorithm or checksums.DEFAULT_ALGORITHM
        if not asset.manifest_complete:
            up.listed = listed
            self._spawn(self._list_rest(up), f"methodic-list-{up.asset_id}")
        up.remote_ready = True
        return asset

    async def _list_rest(self, up: AssetUpload) -> None:
        """Append the components the server does not list yet, a slice at a time; each
        slice's files are queued once it is listed."""
        if not up.resumed:
            # Once a first file is stored: the first presign, its hashing and the first PUT go
            # first (the appends' encoding and the server's inserts would hold them up).
            await up.first_stored.wait()
        listed = up.listed or set()
        rest = [c for c in up.components.values() if c.path not in listed]
        try:
            for at in range(0, len(rest), APPEND_SLICE):
                entries = [c.manifest() for c in rest[at : at + APPEND_SLICE]]
                await self._api.append_components(up.asset_id, entries)
                listed.update(e["path"] for e in entries)
                if up.state == AssetState.UPLOADING:
                    self._scheduler.enqueue(up)
            up.listed = None
        except ChronicleError as exc:
            up.remote_ready = False  # a retry makes sure of the server's manifest again
            await self._finisher.fail_asset(up, exc)

    async def _known_asset(self, up: AssetUpload) -> Asset | None:
        """The server's account of an asset an earlier process was sending, read rather than
        created again (at 100,000 components the create of the whole manifest costs seconds).
        None when the server no longer has it: it is created again. Its manifest must be this
        one, as a create would check."""
        try:
            asset = await self._api.get_asset(up.asset_id)
        except NotFoundError:
            return None
        # Whole or not (a manifest sent in slices): the digest is of the whole, declared. A
        # server that does not say it (older) is compared file by file.
        if asset.manifest_digest is not None:
            same = asset.manifest_digest == await asyncio.to_thread(_digest, up)
        else:
            same = {c.path: (c.size, c.part_size) for c in asset.components} == {
                c.path: (c.size, c.part_size) for c in up.components.values()
            }
        if not same:
            raise ConflictError(
                f"asset {up.asset_id} exists on the server with another manifest than the one"
                " this tracker recorded; discard it here (`methodic-tui discard "
                f"{up.asset_id}`) and register the directory again"
            )
        return asset

    async def _create(self, up: AssetUpload) -> PresignedAsset:
        entries = [c.manifest() for c in up.components.values()]
        declared: dict[str, Any] | None = None
        if self._slices and up.contribution is None and len(entries) > FIRST_SLICE:
            declared = {
                "component_count": len(entries),
                "total_size": sum(e["size"] for e in entries),
                "digest": await asyncio.to_thread(_digest, up, entries),
            }
            entries = entries[:FIRST_SLICE]
        created = await self._api.create_asset(
            up.binding.run_id,
            asset_id=up.asset_id,
            asset_type=up.asset_type,
            metadata=up.metadata,
            components=entries,
            checksum_algorithm=up.algorithm,
            brief=True,  # the components are known here; a resume asks for them below
            contribution=None if up.contribution is None else up.contribution.create_fields(),
            manifest=declared,
        )
        if declared is not None and created.asset.component_count != len(up.components):
            # A server older than manifests in slices took the first slice for the whole: the
            # new pending asset is removed and created whole (nothing of it is stored yet).
            await self._api.delete_asset(up.asset_id)
            self._slices = False
            return await self._create(up)
        return created

    async def _skip_stored(self, up: AssetUpload, remote: Asset) -> None:
        """After a crash: what the server already stores is not sent again."""
        stored: list[str] = []  # here not completed yet
        forgotten: list[str] = []  # completed here, not stored there
        for rc in remote.components:
            c = up.components.get(rc.path)
            if c is None:
                continue
            if rc.stored:
                if c.state != ComponentState.COMPLETED:
                    stored.append(c.path)
                c.state, c.bytes_done = ComponentState.COMPLETED, c.size
            else:
                c.parts_done = set(rc.parts_stored)
                if c.state == ComponentState.COMPLETED:
                    c.state = ComponentState.QUEUED
                    forgotten.append(c.path)
                c.bytes_done = sum(c.part_length(n) for n in c.parts_done) if c.part_size else 0
        up.recount()
        up.bytes_skipped = sum(c.bytes_done for c in up.components.values())
        await up.track(ops.resume_components(up.asset_id, stored, forgotten))


def _digest(up: AssetUpload, entries: list[dict[str, Any]] | None = None) -> str:
    """The digest the server names this asset's manifest by."""
    if entries is None:
        entries = [c.manifest() for c in up.components.values()]
    return manifest_digest(up.binding.run_id, up.asset_type, entries)
