"""One asset in full: what it is, every file with parts and attempts, and its events."""

from __future__ import annotations

import time

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import Footer

from methodic import AssetSnapshot, AssetState, PoolSnapshot
from methodic_tui import format as fmt
from methodic_tui.dashboard.screens.base import LiveScreen
from methodic_tui.dashboard.session import LogEntry
from methodic_tui.dashboard.widgets.panels import EventLog, LiveText, StatusHeader
from methodic_tui.dashboard.widgets.tables import STATE_STYLES, ComponentsTable


def info_text(a: AssetSnapshot | None) -> Text:
    if a is None:
        return Text("this asset is no longer in the upload pool", style="dim")
    text = Text(no_wrap=False)
    text.append(f"{fmt.name_of(a)}  ", "bold")  # runs start with no space (SVG renderers drop it)
    text.append(f"{a.asset_type}  ", "dim")
    state = fmt.shown_state(a)
    text.append(state, STATE_STYLES.get(state, ""))
    text.append(f"\n{a.asset_id}", "dim")
    if a.local_dir:
        text.append(f"  {a.local_dir}", "dim")
    text.append(
        f"\n{a.components_done}/{a.component_count} files stored, "
        f"{fmt.size_pair(a.bytes_done, a.bytes_total)} ({fmt.percent(a.bytes_done, a.bytes_total)})"
    )
    if state == AssetState.UPLOADING and a.rate:  # queued: no file in flight, no rate
        text.append(f", {fmt.rate(a.rate)}, ETA {fmt.long_duration(a.eta)}")
    ranks = fmt.ranks_summary(a)
    if ranks is not None:
        text.append(f"\n{ranks}")
        if a.waiting:
            text.append(f"\n{a.waiting}", "yellow")
    if a.last_error:
        text.append(f"\nlast error: {a.last_error}", "red")
    return text


def ranks_text(a: AssetSnapshot | None) -> Text:
    """Each rank's contribution to a multi-rank asset, one a line (empty for other assets)."""
    lines = [] if a is None else fmt.contribution_lines(a, time.time())
    return Text("\n".join(lines), no_wrap=True, overflow="ellipsis")


class DetailsScreen(LiveScreen):
    BINDINGS = [Binding("escape", "back", "Back")]

    def __init__(self, asset_id: str) -> None:
        super().__init__()
        self.asset_id = asset_id

    def compose(self) -> ComposeResult:
        yield StatusHeader(id="header")
        yield LiveText(id="info")
        yield LiveText(id="ranks")
        with Vertical(id="details-files", classes="pane"):
            yield ComponentsTable(id="components")
        yield EventLog(id="asset-events")
        yield Footer(compact=True, show_command_palette=False)

    def on_mount(self) -> None:
        self.query_one("#details-files").border_title = "files"
        log = self.query_one(EventLog)
        log.border_title = "events of this asset"
        log.add(e for e in self.session.entries if e.asset_id == self.asset_id)
        self.query_one(ComponentsTable).focus()
        self.go_live()

    def apply(self, snap: PoolSnapshot, entries: list[LogEntry]) -> None:
        source = self.session.source
        self.query_one(StatusHeader).show_status(source.labels, snap, source.read_only)
        asset = next((a for a in snap.assets if a.asset_id == self.asset_id), None)
        self.query_one("#info", LiveText).show(info_text(asset))
        ranks = ranks_text(asset)
        self.query_one("#ranks", LiveText).display = bool(ranks.plain)
        self.query_one("#ranks", LiveText).show(ranks)
        if asset is not None:
            self.query_one(ComponentsTable).show_components(asset.asset_id, asset.components)
        self.query_one(EventLog).add(e for e in entries if e.asset_id == self.asset_id)

    def action_back(self) -> None:
        self.dismiss(None)
