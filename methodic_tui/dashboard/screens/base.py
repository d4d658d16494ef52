"""What the app feeds: a screen that shows pool snapshots and new event-log entries."""

from __future__ import annotations

from typing import Protocol, cast

from textual.screen import Screen

from methodic import PoolSnapshot
from methodic_tui.dashboard.operator import Operator
from methodic_tui.dashboard.session import LogEntry, Session


class Host(Protocol):
    """What a screen asks of the app it runs in (``MethodicApp``), which it does not import."""

    session: Session
    operator: Operator

    def select(self, asset_id: str) -> None: ...


class LiveScreen(Screen[None]):
    live = False  # set by the subclass once its widgets exist

    @property
    def host(self) -> Host:
        return cast(Host, self.app)

    @property
    def session(self) -> Session:
        return self.host.session

    def feed(self, snap: PoolSnapshot, entries: list[LogEntry]) -> None:
        if self.live:
            self.apply(snap, entries)

    def go_live(self) -> None:
        self.live = True
        self.apply(self.session.snapshot, [])

    def apply(self, snap: PoolSnapshot, entries: list[LogEntry]) -> None:
        raise NotImplementedError
