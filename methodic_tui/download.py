"""``methodic-tui download ASSET_ID|--latest DEST``: restore a checkpoint, shown like an upload.

The engine's download shows in the pool's snapshots and events (a row ``download:<id>`` of
state ``downloading``), so the dashboard and the headless reporter show it as they show an
upload: per-file progress, rate, ETA, and pause/resume (``p``) and cancel (``d``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from methodic import AsyncRun, ChronicleError, InvalidInputError
from methodic_tui import format as fmt
from methodic_tui.jobs import BaseJob

if TYPE_CHECKING:
    from methodic_tui.engine_source import EngineSource


class DownloadUsage(ValueError):
    """The command line does not say what to download, or where."""


@dataclass
class DownloadJob(BaseJob):
    """Download one finalized asset (by id, or the run's latest) into ``dest``."""

    asset: str | None  # None: the latest finalized asset of the run
    dest: Path
    asset_type: str | None = "checkpoint"  # of --latest
    include: list[str] | None = None
    name = "download"
    needs_run = False  # the asset says its run; --latest finds it, never creates it
    needs_tracker = False  # nothing is uploaded: no upload tracker is opened
    asset_id: str | None = None

    async def run(self, source: EngineSource) -> None:
        chronicle = source.engine
        opts = source.options
        if self.asset is None:
            exp_id = await chronicle.find_experiment(opts.experiment)
            if exp_id is None:
                raise InvalidInputError(
                    f"no experiment {opts.experiment!r} on {chronicle.server_url}; "
                    "pass --experiment ID|NAME"
                )
            run = await chronicle.run(exp_id, opts.variation, opts.run)
            latest = await run.latest(self.asset_type or None)
            what = f"{self.asset_type} asset" if self.asset_type else "asset"
            where = f"{opts.experiment} v{opts.variation} r{opts.run}"
            if latest is None:
                raise InvalidInputError(f"run {where} has no finalized {what} yet")
            asset = latest
            source.labels.run = where
        else:
            asset = await chronicle.get_asset(self.asset)
            run = await chronicle.run_by_id(asset.run_id)
        self.asset_id = asset.asset_id
        source.notice(
            "info",
            f"downloading {asset.asset_id} ({fmt.plural(asset.component_count, 'file')}, "
            f"{fmt.size(asset.total_size)}) into {self.dest}",
            f"download:{asset.asset_id}",
        )
        await _download(run, asset.asset_id, self.dest, self.include)
        source.notice(
            "ok",
            f"downloaded {asset.asset_id} into {self.dest}: every file verified",
            f"download:{asset.asset_id}",
        )


async def _download(run: AsyncRun, asset_id: str, dest: Path, include: list[str] | None) -> None:
    try:
        await run.download_asset(asset_id, dest, include)
    except ChronicleError:
        raise
    except OSError as exc:  # not expected (the engine types them), but never a traceback
        raise ChronicleError(f"download of {asset_id} into {dest}: {exc}") from None


def job_from(args: argparse.Namespace) -> DownloadJob:
    """The job the command line asks for; DownloadUsage says what is wrong with it."""
    given: list[str] = list(args.targets)
    if args.latest:
        if len(given) != 1:
            raise DownloadUsage(
                "with --latest, give only DEST (the asset is the run's newest finalized one)"
            )
        asset, dest = None, given[0]
    else:
        if len(given) != 2:
            raise DownloadUsage("give ASSET_ID and DEST, or --latest and DEST")
        asset, dest = given
    path = Path(dest).expanduser()
    if path.exists() and not path.is_dir():
        raise DownloadUsage(f"DEST {path} is not a directory")
    return DownloadJob(asset, path.absolute(), args.asset_type, args.include)
