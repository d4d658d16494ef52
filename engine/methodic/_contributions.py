"""One rank's contribution to a multi-rank asset (docs/distributed.md), as the client sees it.

Every rank derives the asset id from (run, asset name) (``_ids.contribution_id``), registers
only its own files with its own tracker, uploads them and finalizes its contribution; the
server publishes the asset when every rank's is stored. A rank whose contribution is stored
then waits (polling the asset, never the bytes) until the asset is finalized, so each handle
resolves with the whole asset. What the tracker must remember to resume a rank after a crash
rides in the asset's tracker metadata under ``TRACKER_KEY`` and is never sent as metadata.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from methodic._api import ApiClient
from methodic._errors import InvalidInputError, NotFoundError, UploadFailedError
from methodic._transfer import FileChangedError
from methodic._types import TRACKER_KEY, Asset, RankContribution

log = logging.getLogger("methodic")

# Seconds between two looks at a pending asset while this rank waits for the others.
POLL_FIRST, POLL_MAX = 0.1, 2.0


@dataclass(frozen=True)
class Contribution:
    asset_name: str
    rank: int
    world_size: int

    def create_fields(self) -> dict[str, Any]:
        return {"asset_name": self.asset_name, "rank": self.rank, "world_size": self.world_size}


@dataclass(frozen=True)
class RankStatus:
    """The server's account of a multi-rank asset, as this rank last saw it."""

    stored: int  # contributions stored
    world_size: int
    missing: tuple[int, ...]
    waiting: str | None  # "waiting for ranks 5, 7 (last seen: ...)"
    contributions: tuple[RankContribution, ...]

    @classmethod
    def of(cls, asset: Asset) -> RankStatus | None:
        if not asset.world_size:
            return None
        missing = asset.ranks_missing
        return cls(
            asset.world_size - len(missing),
            asset.world_size,
            missing,
            asset.waiting,
            asset.contributions,
        )


def check_arguments(
    asset_name: str | None, rank: int | None, world_size: int | None
) -> Contribution | None:
    """The contribution these arguments describe (None: an asset of one process)."""
    if asset_name is None:
        if rank is not None or world_size is not None:
            raise InvalidInputError(
                "rank and world_size need asset_name: every rank names the asset it joins, "
                'e.g. asset_name="checkpoint-1000"'
            )
        return None
    if not isinstance(asset_name, str) or not asset_name.strip() or len(asset_name) > 256:
        raise InvalidInputError(
            f"asset_name must be a non-empty name of at most 256 characters, not {asset_name!r}"
        )
    rank = 0 if rank is None else rank
    world_size = 1 if world_size is None else world_size
    for name, value, low in (("rank", rank, 0), ("world_size", world_size, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise InvalidInputError(f"{name} must be a whole number >= {low}, not {value!r}")
    if rank >= world_size:
        raise InvalidInputError(
            f"rank {rank} is not one of 0..{world_size - 1}: pass this process's rank and the "
            f"number of ranks (world_size={world_size}) that contribute to {asset_name!r}"
        )
    return Contribution(asset_name, rank, world_size)


def tracker_metadata(
    metadata: dict[str, Any], contribution: Contribution | None, delete_local: bool
) -> dict[str, Any]:
    """The metadata the tracker records: the caller's, plus what a resumed rank needs."""
    if contribution is None and not delete_local:
        return metadata
    extra: dict[str, Any] = {"delete_local": delete_local}
    if contribution is not None:
        extra["contribution"] = contribution.create_fields()
    return {**metadata, TRACKER_KEY: extra}


def from_tracker(metadata: dict[str, Any]) -> tuple[dict[str, Any], Contribution | None, bool]:
    """(the caller's metadata, the contribution, delete_local) of a tracked asset."""
    extra = metadata.get(TRACKER_KEY)
    if not isinstance(extra, dict):
        return metadata, None, False
    rest = {k: v for k, v in metadata.items() if k != TRACKER_KEY}
    c = extra.get("contribution")
    contribution = Contribution(c["asset_name"], c["rank"], c["world_size"]) if c else None
    return rest, contribution, bool(extra.get("delete_local"))


async def await_whole(api: ApiClient, asset_id: str, seen: Any) -> Asset:
    """Wait (polling the asset's summary) until the server has finalized it; ``seen`` is
    called with each ``RankStatus``. Raises UploadFailedError when the asset is gone
    (discarded by an operator, or expired waiting for a rank that never came)."""
    delay = POLL_FIRST
    last: RankStatus | None = None
    while True:
        try:
            asset = await api.asset_summary(asset_id)
        except NotFoundError:
            why = f"; it was {last.waiting}" if last is not None and last.waiting else ""
            raise UploadFailedError(
                f"asset {asset_id} is gone from the server: discarded by an operator, or "
                f"expired while pending{why}"
            ) from None
        status = RankStatus.of(asset)
        if status is not None:
            last = status
            seen(status)
        if asset.state == "finalized":
            return asset
        await asyncio.sleep(delay)
        delay = min(POLL_MAX, delay * 1.5)


def delete_local_files(local_dir: str | None, files: list[tuple[str, Any]]) -> list[str]:
    """Remove the finalized contribution's files (each only if it is still the file that was
    uploaded), then the directories they leave empty up to ``local_dir``. Returns what went."""
    removed: list[str] = []
    parents: set[Path] = set()
    for local_path, identity in files:
        try:
            identity.check()
        except FileChangedError as exc:
            log.warning("delete_local: %s is kept: %s", local_path, exc)
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(local_path)
            removed.append(local_path)
            parents.add(Path(local_path).parent)
    if local_dir is not None:
        top = Path(local_dir).resolve()
        for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
            d = parent.resolve()
            while d == top or top in d.parents:
                try:
                    d.rmdir()
                except OSError:
                    break  # not empty (another rank's files, a file not uploaded) or gone
                if d == top:
                    break
                d = d.parent
    return removed
