"""What the app feeds: a screen that shows pool snapshots and new event-log entries."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from textual.screen import Screen

from methodic import PoolSnapshot
from methodic_tui.dashboard.widgets.panels import LogEntry

if TYPE_CHECKING:
    from methodic_tui.dashboard.app import MethodicApp


class LiveScreen(Screen[None]):
    live = False  # set by the subclass once its widgets exist

    @property
    def mapp(self) -> MethodicApp:
        return cast("MethodicApp", self.app)

    def feed(self, snap: PoolSnapshot, entries: list[LogEntry]) -> None:
        if self.live:
            self.apply(snap, entries)

    def go_live(self) -> None:
        self.live = True
        self.apply(self.mapp.snapshot, [])

    def apply(self, snap: PoolSnapshot, entries: list[LogEntry]) -> None:
        raise NotImplementedError
