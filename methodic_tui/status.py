"""``methodic-tui status [--json]``: a one-shot summary of a tracker, for scripts."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from methodic import TrackedAsset, UploadTracker
from methodic_tui import format as fmt
from methodic_tui.engine_source import ConfigError, missing_summary, stopped_reason
from methodic_tui.manage import asset_json


def collect(tracker_path: Path) -> tuple[list[TrackedAsset], list[TrackedAsset]]:
    """(every asset summary, the unfinished ones with their components)."""
    if not tracker_path.exists():
        raise ConfigError(f"no tracker at {tracker_path} (pass --tracker or set METHODIC_TRACKER)")
    with UploadTracker(tracker_path) as tracker:
        return tracker.list_assets(), tracker.get_pending_uploads()


def as_json(
    tracker_path: Path, assets: list[TrackedAsset], pending: list[TrackedAsset]
) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for a in assets:
        counts[a.state] = counts.get(a.state, 0) + 1
    return {
        "schema": 1,
        "tracker": str(tracker_path),
        "assets": len(assets),
        "states": counts,
        "bytes_total": sum(a.total_bytes for a in assets),
        "bytes_sent": sum(a.bytes_sent for a in assets),
        "unfinished": [
            {**asset_json(t), "missing": [c.path for c in t.missing], "why": stopped_reason(t)}
            for t in pending
        ],
    }


def render(
    tracker_path: Path, assets: list[TrackedAsset], pending: list[TrackedAsset], now: float
) -> list[str]:
    counts: dict[str, int] = {}
    for a in assets:
        counts[a.state] = counts.get(a.state, 0) + 1
    states = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no assets"
    lines = [f"{tracker_path}: {fmt.plural(len(assets), 'asset')} ({states})"]
    for t in pending:
        name = fmt.asset_name(t.asset_id, t.local_dir)
        lines.append(
            f"  {name} [{t.state}] {t.asset_id}: missing {missing_summary(t)}; "
            f"started {fmt.age(t.created_at, now)}; {stopped_reason(t)}"
        )
    if pending:
        lines.append("  `methodic-tui resume` finishes them")
    if any(t.state == "failed" for t in pending):
        lines.append("  `methodic-tui retry ASSET` retries a failed one, `discard ASSET` drops it")
    return lines


def run_status(tracker_path: Path, *, json_out: bool, out: TextIO = sys.stdout) -> int:
    assets, pending = collect(tracker_path)
    if json_out:
        print(json.dumps(as_json(tracker_path, assets, pending)), file=out)
    else:
        for line in render(tracker_path, assets, pending, time.time()):
            print(line, file=out)
    return 0
