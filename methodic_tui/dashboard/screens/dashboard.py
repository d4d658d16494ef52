"""The main screen: header, assets, the selected asset's files, bandwidth, events."""

from __future__ import annotations

from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Footer, Input, Static

from methodic import AssetSnapshot, PoolSnapshot
from methodic_tui import format as fmt
from methodic_tui.dashboard.screens.base import LiveScreen
from methodic_tui.dashboard.screens.details import DetailsScreen
from methodic_tui.dashboard.session import LogEntry
from methodic_tui.dashboard.widgets.panels import BandwidthPanel, EventLog, StatusHeader
from methodic_tui.dashboard.widgets.tables import AssetsTable, ComponentsTable
from methodic_tui.source import DETAIL_FILES


def matches(a: AssetSnapshot, needle: str) -> bool:
    if not needle:
        return True
    needle = needle.lower()
    fields = (fmt.name_of(a), a.state, fmt.shown_state(a), a.asset_type, a.asset_id)
    return any(needle in s.lower() for s in fields)


class DashboardScreen(LiveScreen):
    BINDINGS = [Binding("escape", "clear_filter", "Clear filter", show=False)]

    def __init__(self) -> None:
        super().__init__()
        self.filter = ""
        self._snap: PoolSnapshot | None = None
        self._selected: AssetSnapshot | None = None  # whose files the files pane shows

    def compose(self) -> ComposeResult:
        yield StatusHeader(id="header")
        with Horizontal(id="filter-bar"):
            yield Static("filter /", id="filter-label")
            yield Input(
                placeholder="part of a name, state or type; enter keeps it, escape clears it",
                id="filter",
            )
        with Vertical(id="assets-pane", classes="pane"):
            yield AssetsTable(id="assets")
        with Vertical(id="components-pane", classes="pane"):
            yield ComponentsTable(id="components")
        with Horizontal(id="bottom"):
            yield BandwidthPanel(id="bandwidth", classes="pane")
            yield EventLog(id="events")
        yield Footer(compact=True, show_command_palette=False)

    def on_mount(self) -> None:
        self.query_one("#assets-pane").border_title = "assets"
        self.query_one("#components-pane").border_title = "files"
        self.query_one("#events").border_title = "events"
        self.query_one("#filter-bar").display = False
        self.query_one(AssetsTable).focus()
        self.query_one(EventLog).add(self.session.entries)  # what happened before this screen
        self.go_live()

    # ------------------------------------------------------------ live updates

    def apply(self, snap: PoolSnapshot, entries: list[LogEntry]) -> None:
        interrupted = any(a.state == "interrupted" for a in snap.assets)
        if self._snap is None or interrupted != any(
            a.state == "interrupted" for a in self._snap.assets
        ):
            self.app.refresh_bindings()  # the footer shows u while there is something to resume
        self._snap = snap
        session = self.session
        source = session.source
        self.query_one(StatusHeader).show_status(source.labels, snap, source.read_only)
        table = self.query_one(AssetsTable)
        shown = [a for a in snap.assets if matches(a, self.filter)]
        table.show_assets(shown)
        self._title_assets(len(shown), len(snap.assets))
        key = table.cursor_key()
        if key is not None and key != session.selected and self.is_active:
            self.host.select(key)
        # The files of the selected asset, if the filter shows it: with no match, none.
        selected = next((a for a in shown if a.asset_id == session.selected), None)
        comps = self.query_one(ComponentsTable)
        if selected is None:
            comps.show_components(None, ())
        else:
            comps.show_components(selected.asset_id, selected.components)
        self._selected = selected
        self._title_files()
        self.call_after_refresh(self._title_files)  # with the rows laid out: how many fit
        self.query_one(BandwidthPanel).show(snap, source.labels)
        self.query_one(EventLog).add(entries)

    def _title_files(self) -> None:
        """The files pane's title: whose files, and how to reach those that do not fit.

        While the files have the focus, the highlighted one in full (its name and its last
        error are often cut in their columns on a narrow terminal).
        """
        selected = self._selected
        if selected is None:
            self._set_title("#components-pane", "files")
            return
        comps = self.query_one(ComponentsTable)
        title = f"files of {fmt.name_of(selected)}"
        rows = comps.row_count
        if comps.has_focus and rows:
            c = comps.highlighted()
            if c is not None:
                title += f" · {comps.cursor_row + 1}/{rows}: {c.path}"
                if c.last_error:
                    title += f" · {c.last_error}"
        else:
            title += f" ({selected.components_done}/{selected.component_count} stored)"
            shown = max(comps.size.height - 1, 0)  # the header row
            if comps.size.height and rows > shown:
                title += f" · {shown} of {rows} shown, tab scrolls"
            if DETAIL_FILES <= rows < selected.component_count:
                title += f" · {rows:,} listed, from the first unfinished"
        self._set_title("#components-pane", title)

    def on_descendant_focus(self) -> None:
        self._title_files()

    def on_descendant_blur(self) -> None:
        self._title_files()

    def _title_assets(self, shown: int, total: int) -> None:
        if self.filter:
            title = f"assets matching {self.filter!r}: {shown} of {total}"
        else:
            title = f"assets ({total})"
        self._set_title("#assets-pane", title)

    def _set_title(self, selector: str, title: str) -> None:
        pane = self.query_one(selector)
        if pane.border_title != title:
            pane.border_title = title

    def on_resize(self, event: events.Resize) -> None:
        # The event log and sparkline get more room on tall terminals.
        height = event.size.height
        self.query_one("#bottom").styles.height = 7 if height < 30 else 10 if height < 45 else 14

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table.id == "assets" and event.row_key.value is not None and self.is_active:
            self.host.select(event.row_key.value)
        elif event.data_table.id == "components":
            self._title_files()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.data_table.id == "assets":
            self.show_details()

    def show_details(self) -> None:
        a = self.host.operator.need_selected()
        if a is not None:
            self.app.push_screen(DetailsScreen(a.asset_id))

    # ------------------------------------------------------------ filter

    def open_filter(self) -> None:
        self.query_one("#filter-bar").display = True
        self.query_one("#filter", Input).focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        self._set_filter(event.value.strip())

    def on_input_submitted(self, _: Input.Submitted) -> None:
        self.query_one("#filter-bar").display = bool(self.filter)
        self.query_one(AssetsTable).focus()

    def action_clear_filter(self) -> None:
        bar = self.query_one("#filter-bar")
        if not bar.display and not self.filter:
            return
        self.query_one("#filter", Input).value = ""
        bar.display = False
        self._set_filter("")
        self.query_one(AssetsTable).focus()

    def _set_filter(self, text: str) -> None:
        if text == self.filter:
            return
        self.filter = text
        # A different set of rows, in order: the one place the table is rebuilt.
        self.query_one(AssetsTable).reset()
        if self._snap is not None:
            self.apply(self._snap, [])
