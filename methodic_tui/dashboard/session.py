"""What the dashboard knows: the source it shows, the latest snapshot, the event log, the names.

The app owns one ``Session``; screens read it and the ``Operator`` decides on it. Nothing here
draws or imports Textual.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from rich.text import Text

from methodic import AssetSnapshot, AssetStateChanged, Event, PoolSnapshot
from methodic_tui import format as fmt
from methodic_tui.source import EMPTY, Source

LOG_KEPT = 2000
LEVEL_STYLES = {"ok": "green", "info": "", "warn": "yellow", "error": "bold red"}
LEVEL_MARKS = {"ok": "✓", "info": "·", "warn": "↻", "error": "✗"}


@dataclass(frozen=True)
class LogEntry:
    at: float
    level: str
    text: str
    asset_id: str | None = None

    def render(self) -> Text:
        style = LEVEL_STYLES.get(self.level, "")
        return Text.assemble(
            (fmt.clock(self.at), "dim"),
            " ",
            (LEVEL_MARKS.get(self.level, "·"), style),
            " ",
            (self.text, style),
        )


class Session:
    def __init__(self, source: Source, clock: Callable[[], float] = time.time) -> None:
        self.source = source
        self.clock = clock
        self.snapshot: PoolSnapshot = EMPTY
        self.entries: deque[LogEntry] = deque(maxlen=LOG_KEPT)
        self.names: dict[str, str] = {}
        self.states: dict[str, str] = {}  # each asset's state as its events told it
        self.selected: str | None = None
        self.ready = asyncio.Event()  # the source has started

    def entry(
        self, level: str, text: str, asset_id: str | None = None, at: float | None = None
    ) -> LogEntry:
        return LogEntry(self.clock() if at is None else at, level, text, asset_id)

    def asset_label(self, asset_id: str | None) -> str:
        if asset_id is None:
            return "-"
        return self.names.get(asset_id, asset_id[:13])

    def absorb(self, snap: PoolSnapshot, events: Iterable[Event]) -> list[LogEntry]:
        """Take a new snapshot; the log lines its events make (not yet in ``entries``)."""
        self.snapshot = snap
        for a in snap.assets:
            if a.asset_id not in self.names:
                self.names[a.asset_id] = fmt.name_of(a)
        entries = []
        for a in snap.assets:
            self.states.setdefault(a.asset_id, a.state)
        for event in events:
            was = self.states.get(event.asset_id) if event.asset_id else None
            if isinstance(event, AssetStateChanged) and event.asset_id:
                self.states[event.asset_id] = event.state
            described = fmt.describe_event(event, self.asset_label, was)
            if described is not None:
                entries.append(LogEntry(event.at, described[0], described[1], event.asset_id))
        return entries

    def fresh(self) -> PoolSnapshot:
        """Decide on the state of now, not of the last refresh (up to 1/refresh_hz old)."""
        if self.ready.is_set():
            self.snapshot = self.source.snapshot(self.selected)
        return self.snapshot

    def selected_asset(self) -> AssetSnapshot | None:
        return next((a for a in self.fresh().assets if a.asset_id == self.selected), None)
