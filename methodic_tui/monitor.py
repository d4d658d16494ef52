"""``methodic-tui monitor``: the dashboard over every uploader, or one headless look at them.

``--no-ui`` prints each uploader session and its assets once (``--json``: one JSON document,
schema 1) and exits 0, or 1 when an uploader is lost, so that a cron job can alert on it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import TextIO

from methodic import DONE_STATES, UploaderSession
from methodic_tui import format as fmt
from methodic_tui.monitor_source import LOST, MonitorSource, lost_note
from methodic_tui.options import Options

EXIT_OK, EXIT_LOST = 0, 1
SCHEMA = 1


def run_monitor(args: argparse.Namespace, opts: Options, headless: bool) -> int:
    source = MonitorSource(
        opts, experiment=getattr(args, "experiment", None), run=getattr(args, "run", None)
    )
    if headless:
        return asyncio.run(look(source, json_out=getattr(args, "json", False)))
    from methodic_tui.dashboard.app import run_app

    code, _ = run_app(source)
    return code


async def look(source: MonitorSource, *, json_out: bool, out: TextIO | None = None) -> int:
    """Read the sessions once and print them."""
    out = out or sys.stdout
    await source.start()
    try:
        sessions = source.sessions
    finally:
        await source.close()
    if json_out:
        doc = {"schema": SCHEMA, "at": time.time(), "sessions": [s.to_json() for s in sessions]}
        print(json.dumps(doc), file=out, flush=True)
    else:
        for line in describe(sessions):
            print(line, file=out)
        out.flush()
    return EXIT_LOST if any(s.state == LOST for s in sessions) else EXIT_OK


def describe(sessions: list[UploaderSession]) -> list[str]:
    if not sessions:
        return ["no uploader has reported to this server"]
    lines = []
    for s in sessions:
        snap = s.snapshot
        head = f"{s.label} {s.user} methodic {s.version}: {s.state.upper()}"
        if s.state == LOST:
            head += f" ({lost_note(s)})"
        elif s.state == "live":
            head += f", {fmt.rate(snap.rate)}, {fmt.cap(snap.bandwidth_cap)}"
        lines.append(head)
        for a in snap.assets:
            if a.state in DONE_STATES and s.state != "live":
                continue
            error = f"  ({a.last_error})" if a.last_error else ""
            lines.append(
                f"  {a.asset_id}  {fmt.name_of(a)}  {a.state}  "
                f"{fmt.size_pair(a.bytes_done, a.bytes_total)}  {fmt.rate(a.rate)}{error}"
            )
    return lines
