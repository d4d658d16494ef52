"""``--no-ui``: the same engine, a status line when something changes and a line per event.

Human lines go to stderr (coloured only on a terminal, never with NO_COLOR), each stamped
with an ISO 8601 time; ``--json`` writes JSON lines (schema 1, docs/headless.md) to stdout
instead. A status line is printed when the counts change (not on every byte), and at least
every ``--stats`` seconds as a heartbeat. Textual is never imported on this path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any, TextIO

from methodic import DONE_STATES, AssetStateChanged, Event, PoolSnapshot
from methodic_tui import format as fmt
from methodic_tui.engine_source import ConfigError
from methodic_tui.notices import Notice
from methodic_tui.source import Source

EXIT_OK, EXIT_FAILED = 0, 1
SCHEMA = 1  # of the JSON lines: bumped when a field changes meaning or goes
MIN_STATUS_GAP = 2.0  # seconds: on-change status lines no closer than this (unless -v)
QUIET_LEVELS = ("warn", "error")
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
    quiet: bool = False  # -q: only warnings, errors and the summary
    verbose: bool = False  # -v: a status line on every change
    log_file: Path | None = None  # every line also appended here, without colour
    retry_hint: str = "methodic-tui retry ASSET"
    _log: IO[str] | None = None

    def __post_init__(self) -> None:
        if self.colour is None:
            self.colour = use_colour(self.err)
        if self.log_file is not None:
            try:
                self._log = open(self.log_file, "a", encoding="utf-8")  # noqa: SIM115
            except OSError as exc:
                raise ConfigError(f"--log-file {self.log_file}: {exc.strerror or exc}") from None

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def _to_log(self, line: str) -> None:
        if self._log is not None:
            self._log.write(line + "\n")
            self._log.flush()

    def name(self, asset_id: str | None) -> str:
        if asset_id is None:
            return "-"
        return self.names.get(asset_id, asset_id[:13])

    def learn(self, snapshot: PoolSnapshot) -> None:
        for a in snapshot.assets:
            self.names.setdefault(a.asset_id, fmt.name_of(a))

    def _human(self, level: str, text: str, at: float, *, always: bool = False) -> None:
        if self.quiet and not always and level not in QUIET_LEVELS:
            return
        line = f"{iso_time(at)} {text}"
        self._to_log(line)
        code = _COLOURS.get(level, "")
        if self.colour and code:
            line = f"\x1b[{code}m{line}\x1b[0m"
        print(line, file=self.err, flush=True)

    def _json(self, data: dict[str, Any], *, level: str = "info", always: bool = False) -> None:
        if self.quiet and not always and level not in QUIET_LEVELS:
            return
        line = json.dumps({"schema": SCHEMA, **data}, default=str)
        self._to_log(line)
        print(line, file=self.out, flush=True)

    def event(self, event: Event) -> None:
        described = fmt.describe_event(event, self.name)
        if described is None:
            return
        if isinstance(event, AssetStateChanged) and event.state == "interrupted":
            # No `u` key here: held by `retry`, which leaves the other uploads alone.
            described = (
                "info",
                f"unfinished {self.name(event.asset_id)}: left by an earlier process; "
                "`methodic-tui resume` continues it",
            )
        if self.json_lines:
            data = event.to_json()
            if isinstance(event, Notice):
                data["event"] = "notice"
            elif event.asset_id is not None:
                data["name"] = self.name(event.asset_id)
            self._json(data, level=described[0])
        else:
            self._human(*described, event.at)

    def status(self, snapshot: PoolSnapshot) -> None:
        if self.json_lines:
            self._json(status_json(snapshot))
        else:
            self._human("status", f"status {fmt.status_line(snapshot)}", time.time())

    def note(self, level: str, text: str) -> None:
        if self.json_lines:
            data = {"event": "notice", "level": level, "message": text, "at": time.time()}
            self._json(data, level=level)
        else:
            self._human(level, text, time.time())

    def summary(self, snapshot: PoolSnapshot, code: int, message: str) -> None:
        if self.json_lines:
            self._json(
                {
                    **status_json(snapshot),
                    "event": "summary",
                    "exit_code": code,
                    "message": message,
                },
                always=True,
            )
        else:
            self._human("error" if code else "ok", message, time.time(), always=True)


def iso_time(at: float) -> str:
    """``2026-12-02T07:48:18+00:00``: local time with its offset, sortable, unambiguous."""
    return datetime.fromtimestamp(at).astimezone().isoformat(timespec="seconds")


def status_key(snapshot: PoolSnapshot) -> tuple[object, ...]:
    """What a status line is printed again for: states and files done, not bytes or rate."""
    assets = [a for a in snapshot.assets if a.state != "discarded"]
    states = tuple(sorted(fmt.count_states(snapshot).items()))
    ranks = tuple(a.ranks_stored for a in assets if a.rank is not None)
    return (len(assets), states, sum(a.components_done for a in assets), ranks)


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
        # Each rank's contribution to a multi-rank asset: ranks stored of world_size, missing.
        "ranks": [
            {
                "asset_id": a.asset_id,
                "rank": a.rank,
                "world_size": a.world_size,
                "ranks_stored": a.ranks_stored,
                "ranks_missing": list(a.ranks_missing),
                "waiting": a.waiting,
                "contribution_stored": a.contribution_stored,
            }
            for a in assets
            if a.rank is not None
        ],
    }


async def run_headless(
    source: Source,
    reporter: Reporter,
    *,
    heartbeat: float = 30.0,
    tick: float = 0.25,
    resume_hint: str = "methodic-tui resume",
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Run until the source settles or a signal arrives; returns the exit status.

    A status line is printed when ``status_key`` changes (at most every 2 s, unless verbose)
    and every ``heartbeat`` seconds whatever happens (0: never without a change).

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
        last_status = -math.inf
        last_key: tuple[object, ...] | None = None
        gap = 0.0 if reporter.verbose else MIN_STATUS_GAP
        while not stopped.is_set():
            await source.tick()
            snap = _drain(source, reporter)
            if source.settled():
                break
            now = clock()
            key = status_key(snap)
            changed = key != last_key and now - last_status >= gap
            if changed or (heartbeat > 0 and now - last_status >= heartbeat):
                last_status, last_key = now, key
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
    retry_hint = reporter.retry_hint
    if received:
        sig = signal.Signals(received[0])
        left = sum(1 for a in snap.assets if a.state not in DONE_STATES)
        return 128 + sig.value, (
            f"stopped by {sig.name}: {fmt.plural(left, 'unfinished upload')}, "
            f"resumable with `{resume_hint}`"
        )
    failed = [a for a in snap.assets if a.state == "failed"]
    took = fmt.long_duration(elapsed)
    if source.job_error and all(a.asset_type == "download" for a in failed):
        return EXIT_FAILED, f"stopped: {source.job_error}"  # a download says what to do
    if failed:
        names = ", ".join(reporter.name(a.asset_id) for a in failed)
        return (
            EXIT_FAILED,
            f"done in {took}: {len(failed)} failed ({names}); `{retry_hint}` retries one "
            "(`methodic-tui discard ASSET` gives it up)",
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
