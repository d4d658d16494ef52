"""What a command uploads: directories given on the command line, or nothing new (resume, attach)."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from methodic import (
    AssetState,
    ChronicleError,
    ComponentSpec,
    TrackedAsset,
    UploadTracker,
    scan_directory,
)
from methodic_tui import format as fmt
from methodic_tui.options import Options

if TYPE_CHECKING:
    from methodic_tui.engine_source import EngineSource


class BaseJob:
    name = "job"
    continuous = False
    needs_run = True
    resumable = True  # what it leaves unfinished can be resumed later (not the demo's temp dir)

    def prepare(self, options: Options) -> None:
        pass

    async def run(self, source: EngineSource) -> None:
        pass

    def cleanup(self) -> None:
        pass


@dataclass
class UploadJob(BaseJob):
    """``methodic-tui upload DIR...``: each directory becomes one asset."""

    dirs: Sequence[Path]
    asset_type: str | None = None
    force: bool = False  # upload again a directory this tracker already finalized
    name = "upload"

    async def run(self, source: EngineSource) -> None:
        tracker = source.tracker
        assert tracker is not None
        opts = source.options
        known = await asyncio.to_thread(tracker.list_assets, None)
        for d in self.dirs:
            path = d.expanduser().absolute()
            done = None
            if not self.force:
                try:
                    files = await asyncio.to_thread(
                        scan_directory, path, opts.include, opts.exclude
                    )
                except ChronicleError:
                    files = []  # upload_dir says what is wrong with it
                done = await asyncio.to_thread(finalized_from, tracker, known, path, files)
            if done is not None:
                source.notice(
                    "info",
                    f"skipped {path}: this tracker finalized it as {done.asset_id} "
                    f"{fmt.age(done.updated_at, time.time())}; --force uploads it again",
                )
                continue
            await source.upload_dir(path, self.asset_type)


def finalized_from(
    tracker: UploadTracker,
    known: Sequence[TrackedAsset],
    path: Path,
    files: Sequence[ComponentSpec],
) -> TrackedAsset | None:
    """The tracker's finalized asset uploaded from ``path`` with these very files, if any
    (another --include of the same directory is another asset)."""
    wanted = {f.path for f in files}
    for t in known:
        if t.state == AssetState.FINALIZED and t.local_dir and Path(t.local_dir).absolute() == path:
            full = tracker.get_asset(t.asset_id)
            if wanted and full is not None and {c.path for c in full.components} == wanted:
                return t
    return None


@dataclass
class AssetJob(BaseJob):
    """``methodic-tui retry ASSET``: one asset of the tracker, adopted held, then retried."""

    asset: str
    action: str = "retry"
    name = "retry"
    needs_run = False
    asset_id: str | None = None

    async def run(self, source: EngineSource) -> None:
        assert source.tracker is not None
        known = await asyncio.to_thread(source.tracker.list_assets, None)
        self.asset_id = resolve_asset(known, self.asset).asset_id
        snap = await source.engine.snapshot()
        state = next((a.state for a in snap.assets if a.asset_id == self.asset_id), None)
        if state is None:
            raise ChronicleError(
                f"{self.asset} cannot be retried here: it is not unfinished, or another "
                "process that still runs owns it (see `methodic-tui status`)"
            )
        if state == "failed":
            await source.retry_failed(self.asset_id)
        else:
            await source.resume(self.asset_id)
        source.notice("info", f"retrying {fmt.asset_name(self.asset_id, None)} ({state})")


def resolve_asset(known: Sequence[TrackedAsset], text: str) -> TrackedAsset:
    """The one asset ``text`` names: its id, a unique id prefix, or its directory's name.

    Among several with the same directory name, the newest unfinished one (else the newest).
    """
    exact = [t for t in known if t.asset_id == text]
    if exact:
        return exact[0]
    by_prefix = [t for t in known if t.asset_id.startswith(text)]
    if len(by_prefix) == 1:
        return by_prefix[0]
    if len(by_prefix) > 1:
        raise ChronicleError(f"{text!r} is the start of {len(by_prefix)} asset ids; give more")
    by_name = [t for t in known if t.local_dir and fmt.asset_name(t.asset_id, t.local_dir) == text]
    if by_name:
        open_ = [t for t in by_name if t.state not in ("finalized", "discarded")]
        return max(open_ or by_name, key=lambda t: t.updated_at)
    raise ChronicleError(f"no asset {text!r} in this tracker (see `methodic-tui list`)")


class ResumeJob(BaseJob):
    """``methodic-tui resume``: only the tracker's unfinished uploads (adopted by the source)."""

    name = "resume"
    needs_run = False


def check_dirs(
    dirs: Sequence[Path],
    *,
    allow_empty: bool = False,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> str | None:
    """The first problem with the directories to upload, as one line, or None."""
    for d in dirs:
        p = d.expanduser()
        try:
            mode = p.stat().st_mode
        except FileNotFoundError:
            return f"{d}: no such directory"
        except OSError as exc:
            return f"{d}: {exc.strerror or exc}"
        if not stat.S_ISDIR(mode):
            return f"{d} is {_kind(mode)}, not a directory; pass the checkpoint directory"
        if not allow_empty and not any(files for _, _, files in os.walk(p)):
            return f"{d} is an empty directory: no file to upload"
        if not allow_empty and (include is not None or exclude):
            try:
                scan_directory(p, include, exclude)
            except ChronicleError as exc:
                return str(exc)
    return None


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a file"


def dry_run(
    dirs: Sequence[Path],
    tracker_path: Path,
    *,
    force: bool,
    json_out: bool,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> int:
    """``upload --dry-run``: what would be uploaded (the engine's own scan of each directory,
    with --include/--exclude); no server, no tracker rows (nor file)."""
    tracker = UploadTracker(tracker_path) if tracker_path.exists() else None
    try:
        return _dry_run(dirs, tracker, force, json_out, include, exclude)
    finally:
        if tracker is not None:
            tracker.close()


def _dry_run(
    dirs: Sequence[Path],
    tracker: UploadTracker | None,
    force: bool,
    json_out: bool,
    include: Sequence[str] | None,
    exclude: Sequence[str],
) -> int:
    known = tracker.list_assets() if tracker is not None else []
    out = sys.stdout
    for d in dirs:
        path = d.expanduser().absolute()
        specs = scan_directory(path, include, exclude)
        files = [(c.path, c.size) for c in specs]
        done = finalized_from(tracker, known, path, specs) if tracker is not None else None
        skip = done is not None and not force
        total = sum(n for _, n in files)
        if json_out:
            print(
                json.dumps(
                    {
                        "schema": 1,
                        "event": "dry_run",
                        "dir": str(path),
                        "skip": skip,
                        "files": [{"path": p, "size": n} for p, n in files],
                        "bytes_total": total,
                    }
                ),
                file=out,
            )
            continue
        verdict = "upload"
        if skip and done is not None:
            verdict = f"skip (finalized as {done.asset_id}; --force uploads it)"
        print(
            f"{path}: would {verdict}: {fmt.plural(len(files), 'file')}, {fmt.size(total)}",
            file=out,
        )
        if not skip:
            for p, n in files:
                print(f"  {p}  {fmt.size(n)}", file=out)
    return 0
