"""Uploads an earlier process left unfinished: what, how old, what is missing, why it stopped.

``u`` resumes all, enter resumes the selected one, ``d`` discards and ``f`` force-finalizes it
(both ask first); escape goes to the dashboard and leaves them held.
"""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import DataTable, Footer

from methodic import PoolSnapshot, TrackedAsset
from methodic_tui import format as fmt
from methodic_tui.dashboard.screens.base import LiveScreen
from methodic_tui.dashboard.session import LogEntry
from methodic_tui.dashboard.widgets.panels import LiveText
from methodic_tui.dashboard.widgets.tables import Col, LiveTable, cell, name_cell, state_cell
from methodic_tui.engine_source import missing_summary, stopped_reason

MAX_LISTED = 8  # missing files listed under the table


class PendingTable(LiveTable[TrackedAsset]):
    COLUMNS = (
        Col("name", "Asset", 16, flex=1.0, most=30),
        Col("state", "State", 12),
        Col("age", "Started", 15),
        Col("missing", "Missing", 19),
        Col("why", "Why it stopped", 14, flex=1.5),
    )

    now = 0.0  # ages are relative to this

    def row(self, t: TrackedAsset) -> list[Text]:
        now = self.now
        return [
            name_cell(fmt.asset_name(t.asset_id, t.local_dir), t.asset_type, self.width_of("name")),
            state_cell(t.state),
            cell(fmt.age(t.created_at, now)),
            cell(missing_summary(t)),
            cell(stopped_reason(t), "yellow"),
        ]

    def same(self, a: TrackedAsset, b: TrackedAsset) -> bool:
        return False  # a handful of rows, and their ages move


def missing_text(t: TrackedAsset | None) -> Text:
    if t is None:
        return Text("")
    text = Text()
    text.append(f"{fmt.asset_name(t.asset_id, t.local_dir)}  ", "bold")  # runs start with no space
    text.append(t.asset_id, "dim")
    if t.local_dir:
        text.append(f"  {t.local_dir}", "dim")
    missing = t.missing
    text.append(f"\nnot yet stored ({len(missing)}): ")
    text.append(
        ", ".join(c.path for c in missing[:MAX_LISTED]) or "nothing: force-finalize can finish it"
    )
    if len(missing) > MAX_LISTED:
        text.append(f" and {len(missing) - MAX_LISTED} more", "dim")
    text.append("\nwhy it stopped: ")
    text.append(stopped_reason(t), "yellow")
    return text


class RecoveryScreen(LiveScreen):
    BINDINGS = [
        Binding("u", "app.resume_pending", "Resume all"),
        Binding("enter", "resume_one", "Resume one"),
        Binding("escape", "leave", "Later"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._seen_any = False

    def compose(self) -> ComposeResult:
        yield LiveText(id="recovery-intro")
        with Vertical(id="recovery-pane", classes="pane"):
            yield PendingTable(id="pending")
        yield LiveText(id="recovery-detail")
        yield Footer(compact=True, show_command_palette=False)

    def on_mount(self) -> None:
        tracker = self.session.source.labels.tracker
        self.query_one("#recovery-pane").border_title = f"unfinished uploads in {tracker}"
        self.query_one(PendingTable).focus()
        self.go_live()

    def apply(self, snap: PoolSnapshot, entries: list[LogEntry]) -> None:
        session = self.session
        pending = session.source.pending()
        self._seen_any = self._seen_any or bool(pending)
        table = self.query_one(PendingTable)
        table.now = session.clock()
        table.show((t.asset_id, t) for t in pending)
        self.query_one("#recovery-intro", LiveText).show(self._intro(len(pending)))
        key = table.cursor_key()
        if key is not None and key != session.selected and self.is_active:
            self.host.select(key)
        chosen = next((t for t in pending if t.asset_id == key), None)
        self.query_one("#recovery-detail", LiveText).show(missing_text(chosen))

    def _intro(self, n: int) -> Text:
        if n:
            return Text.assemble(
                (f"{fmt.plural(n, 'unfinished upload')} from an earlier process.", "bold"),
                " The server kept what was stored: resuming sends only the rest.\n",
                ("u", "bold cyan"),
                " resume all · ",
                ("enter", "bold cyan"),
                " resume one · ",
                ("d", "bold cyan"),
                " discard · ",
                ("f", "bold cyan"),
                " force-finalize · ",
                ("esc", "bold cyan"),
                " later",
            )
        tracker = self.session.source.labels.tracker
        note = "all handled" if self._seen_any else f"no unfinished uploads in {tracker}"
        return Text.assemble((note, "bold"), ". ", ("escape", "bold cyan"), " for the dashboard")

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key.value is not None and self.is_active:
            self.host.select(event.row_key.value)

    def on_data_table_row_selected(self, _: DataTable.RowSelected) -> None:
        self.action_resume_one()

    def action_resume_one(self) -> None:
        key = self.query_one(PendingTable).cursor_key()
        if key is not None:
            self.host.operator.resume_assets([key])

    def action_leave(self) -> None:
        self.dismiss(None)
