"""``--no-ui``: the same engine, a status line every few seconds and a line per event.

Human lines go to stderr (coloured only on a terminal, never with NO_COLOR); ``--json`` writes
JSON lines to stdout instead. Textual is never imported on this path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from methodic import DONE_STATES, Event, PoolSnapshot
from methodic_tui import format as fmt
from methodic_tui.notices import Notice
from methodic_tui.source import Source

EXIT_OK, EXIT_FAILED = 0, 1
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_COLOURS = {"ok": "32", "info": "", "warn": "33", "error": "31", "status": "2"}


def use_colour(stream: TextIO) -> bool:
    if "NO_COLOR" in os.environ or os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@dataclass
class Reporter:
    json_lines: bool = False
    err: TextIO = field(default_factory=lambda: sys.stderr)
    out: TextIO = field(default_factory=lambda: sys.stdout)
    colour: bool | None = None
    names: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.colour is None:
            self.colour = use_colour(self.err)

    def name(self, asset_id: str | None) -> str:
        if asset_id is None:
            return "-"
        return self.names.get(asset_id, asset_id[:13])

    def learn(self, snapshot: PoolSnapshot) -> None:
        for a in snapshot.assets:
            self.names.setdefault(a.asset_id, fmt.name_of(a))

    def _human(self, level: str, text: str, at: float) -> None:
        line = f"{fmt.clock(at)} {text}"
        code = _COLOURS.get(level, "")
        if self.colour and code:
            line = f"\x1b[{code}m{line}\x1b[0m"
        print(line, file=self.err, flush=True)

    def _json(self, data: dict[str, Any]) -> None:
        print(json.dumps(data, default=str), file=self.out, flush=True)

    def event(self, event: Event) -> None:
        described = fmt.describe_event(event, self.name)
        if described is None:
            return
        if self.json_lines:
            data = event.to_json()
            if isinstance(event, Notice):
                data["event"] = "notice"
            elif event.asset_id is not None:
                data["name"] = self.name(event.asset_id)
            self._json(data)
        else:
            self._human(*described, event.at)

    def status(self, snapshot: PoolSnapshot) -> None:
        if self.json_lines:
            self._json(status_json(snapshot))
        else:
            self._human("status", f"status {fmt.status_line(snapshot)}", time.time())

    def note(self, level: str, text: str) -> None:
        if self.json_lines:
            self._json({"event": "notice", "level": level, "message": text, "at": time.time()})
        else:
            self._human(level, text, time.time())

    def summary(self, snapshot: PoolSnapshot, code: int, message: str) -> None:
        if self.json_lines:
            self._json(
                {**status_json(snapshot), "event": "summary", "exit_code": code, "message": message}
            )
        else:
            self._human("error" if code else "ok", message, time.time())


def status_json(snapshot: PoolSnapshot) -> dict[str, Any]:
    assets = [a for a in snapshot.assets if a.state != "discarded"]
    return {
        "event": "status",
        "at": time.time(),
        "assets": len(assets),
        "states": fmt.count_states(snapshot),
        "components_done": sum(a.components_done for a in assets),
        "components": sum(a.component_count for a in assets),
        "bytes_done": sum(a.bytes_done for a in assets),
        "bytes_total": sum(a.bytes_total for a in assets),
        "rate": snapshot.rate,
        "eta": snapshot.eta,
    }


async def run_headless(
    source: Source,
    reporter: Reporter,
    *,
    status_every: float = 2.0,
    tick: float = 0.25,
    resume_hint: str = "methodic-tui resume",
) -> int:
    """Run until the source settles or a signal arrives; returns the exit status.

    On SIGINT/SIGTERM/SIGHUP the pool is stopped (the tracker flushed) before returning
    128 + the signal number, so ``resume`` continues where this stopped.
    """
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    received: list[int] = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        stopped.set()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    started = time.monotonic()
    try:
        await source.start()
        last_status = -status_every
        while not stopped.is_set():
            await source.tick()
            snap = _drain(source, reporter)
            if source.settled():
                break
            if time.monotonic() - last_status >= status_every:
                last_status = time.monotonic()
                reporter.status(snap)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopped.wait(), tick)
        snap = _drain(source, reporter)
        code, message = _outcome(
            source, reporter, snap, received, resume_hint, time.monotonic() - started
        )
    finally:
        await source.close()  # stops the pool: the tracker is flushed before we exit
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
    reporter.summary(snap, code, message)
    return code


def _outcome(
    source: Source,
    reporter: Reporter,
    snap: PoolSnapshot,
    received: list[int],
    resume_hint: str,
    elapsed: float,
) -> tuple[int, str]:
    if received:
        sig = signal.Signals(received[0])
        left = sum(1 for a in snap.assets if a.state not in DONE_STATES)
        return 128 + sig.value, (
            f"stopped by {sig.name}: {left} unfinished uploads stay "
            f"resumable (`{resume_hint}` continues them)"
        )
    failed = [a for a in snap.assets if a.state == "failed"]
    took = fmt.long_duration(elapsed)
    if failed:
        names = ", ".join(reporter.name(a.asset_id) for a in failed)
        return (
            EXIT_FAILED,
            f"done in {took}: {len(failed)} failed ({names}); `{resume_hint}` retries them",
        )
    if source.job_error:
        return EXIT_FAILED, f"stopped: {source.job_error}"
    unsealed = _unsealed(source)
    if unsealed:
        cmds = "; ".join(
            f"`methodic-tui seal {a}` once every file is registered, or `methodic-tui discard {a}`"
            for a in unsealed
        )
        return EXIT_FAILED, (
            f"done in {took}: {len(unsealed)} unsealed, not finalized "
            f"({', '.join(reporter.name(a) for a in unsealed)}): {cmds}"
        )
    return EXIT_OK, f"done in {took}: {fmt.status_line(snap)}"


def _unsealed(source: Source) -> list[str]:
    """Assets an earlier process registered unsealed: not this run's failure, nor finalized."""
    from methodic_tui.engine_source import EngineSource

    return list(source.report.unsealed) if isinstance(source, EngineSource) else []


def _drain(source: Source, reporter: Reporter) -> PoolSnapshot:
    events = source.poll_events()
    snap = source.snapshot()
    reporter.learn(snap)
    for event in events:
        reporter.event(event)
    return snap
