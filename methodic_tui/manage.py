"""``list``, ``seal`` and ``discard``: the CLI's way out of every state an asset can be in."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from methodic import (
    AsyncChronicle,
    ChronicleError,
    DrainReport,
    TrackedAsset,
    UploadTracker,
    adopt_incomplete_uploads,
)
from methodic_tui import format as fmt
from methodic_tui.engine_source import ConfigError, default_server_dir
from methodic_tui.jobs import resolve_asset
from methodic_tui.options import Options

SCHEMA = 1


def _open(tracker_path: Path) -> UploadTracker:
    if not tracker_path.exists():
        raise ConfigError(f"no tracker at {tracker_path} (pass --tracker or set METHODIC_TRACKER)")
    return UploadTracker(tracker_path)


def find(tracker_path: Path, text: str) -> TrackedAsset:
    with _open(tracker_path) as tracker:
        return resolve_asset(tracker.list_assets(), text)


def asset_json(t: TrackedAsset) -> dict[str, Any]:
    """One asset of the tracker as `list --json` and `status --json` show it."""
    return {
        "asset_id": t.asset_id,
        "name": fmt.asset_name(t.asset_id, t.local_dir),
        "asset_type": t.asset_type,
        "state": t.state,
        "sealed": t.sealed,
        "local_dir": t.local_dir,
        "created_at": t.created_at,
        "updated_at": t.updated_at,
        "components": t.component_count,
        "components_done": t.completed_count,
        "bytes_total": t.total_bytes,
        "bytes_sent": t.bytes_sent,
        "last_error": t.last_error,
    }


def run_list(tracker_path: Path, *, json_out: bool, out: TextIO = sys.stdout) -> int:
    with _open(tracker_path) as tracker:
        assets = tracker.list_assets()
    if json_out:
        data = {"schema": SCHEMA, "tracker": str(tracker_path)}
        print(json.dumps({**data, "assets": [asset_json(t) for t in assets]}), file=out)
        return 0
    if not assets:
        print(f"{tracker_path}: no assets", file=out)
    now = time.time()
    for t in assets:
        done = t.total_bytes if t.state == "finalized" else t.bytes_sent
        line = (
            f"{t.asset_id}  {t.state:<11} {fmt.asset_name(t.asset_id, t.local_dir)}  "
            f"{t.completed_count}/{t.component_count} files  "
            f"{fmt.size_pair(done, t.total_bytes)}  {fmt.age(t.updated_at, now)}"
        )
        if t.last_error and t.state != "finalized":
            line += f"  ({' '.join(t.last_error.split())})"
        print(line, file=out)
    return 0


def _said(json_out: bool, out: TextIO, event: str, t: TrackedAsset, message: str) -> None:
    if json_out:
        data = {"schema": SCHEMA, "event": event, "asset_id": t.asset_id, "at": time.time()}
        print(json.dumps({**data, "exit_code": 0, "message": message}), file=out)
    else:
        print(message, file=out)


def run_seal(tracker_path: Path, text: str, *, json_out: bool, out: TextIO = sys.stdout) -> int:
    with _open(tracker_path) as tracker:
        t = resolve_asset(tracker.list_assets(), text)
        if t.state in ("finalized", "discarded"):
            raise ConfigError(f"{t.asset_id} is {t.state}: there is nothing to seal")
        tracker.seal(t.asset_id)
    name = fmt.asset_name(t.asset_id, t.local_dir)
    message = (
        f"sealed {name} ({t.asset_id}): already sealed"
        if t.sealed
        else f"sealed {name} ({t.asset_id})"
    )
    _said(json_out, out, "sealed", t, f"{message}; `methodic-tui resume` finishes it")
    return 0


async def run_discard(
    options: Options, text: str, *, json_out: bool, out: TextIO = sys.stdout
) -> int:
    """Adopt the tracker's unfinished uploads (held, nothing sent), then discard the one."""
    t = find(options.tracker, text)
    if t.state == "finalized":
        raise ConfigError(f"{t.asset_id} is finalized; a finalized asset cannot be discarded")
    if t.state == "discarded":
        _said(json_out, out, "discarded", t, f"{t.asset_id} was already discarded")
        return 0
    server = None
    url, key = options.server_url, options.api_key
    if url is None:
        from methodic.server import EmbeddedServer

        server = EmbeddedServer(options.server_dir or default_server_dir(), blob_port=0)
        await asyncio.to_thread(server.start)
        url, key = server.url, server.api_key
    try:
        try:
            chronicle = AsyncChronicle(url, key, **options.chronicle_kwargs())  # type: ignore[arg-type]
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        async with chronicle:
            with UploadTracker(options.tracker) as tracker:
                report = DrainReport()
                adopted = await adopt_incomplete_uploads(chronicle, tracker, report, start=False)
                if t.asset_id not in adopted and not (
                    t.contribution is not None and t.asset_id in report.skipped
                ):
                    why = report.skipped.get(t.asset_id) or report.failed.get(t.asset_id)
                    raise ChronicleError(f"cannot discard {t.asset_id}: {why or 'not pending'}")
                # A rank still running waits on the asset: it is discarded on the server, and
                # that rank's handle fails (its tracker records it).
                await chronicle.discard(t.asset_id)
    finally:
        if server is not None:
            await asyncio.to_thread(server.stop)
    name = fmt.asset_name(t.asset_id, t.local_dir)
    _said(json_out, out, "discarded", t, f"discarded {name} ({t.asset_id}) on the server and here")
    return 0
