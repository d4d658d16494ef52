"""Confirmation and help dialogs. Escape always means "no": nothing destructive hides behind it."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Static

from methodic_tui.dashboard.actions import ACTIONS


class ConfirmScreen(ModalScreen[bool]):
    """Yes or no. The focus starts on "no", so a stray enter over a laggy link does nothing."""

    BINDINGS = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(
        self,
        title: str,
        body: str | Text,
        *,
        yes: str = "Yes",
        no: str = "Cancel",
        danger: bool = True,
    ) -> None:
        super().__init__()
        self.title_text = title
        self.body = body if isinstance(body, Text) else Text(body)
        self.yes_label = yes
        self.no_label = no
        self.danger = danger

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog", classes="danger" if self.danger else ""):
            yield Static(Text(self.title_text, style="bold"), id="dialog-title")
            yield Static(self.body, id="dialog-body")
            with Horizontal(id="dialog-buttons"):
                yield Button(Text(f"{self.no_label} [n]"), id="no")
                yield Button(
                    Text(f"{self.yes_label} [y]"),
                    id="yes",
                    variant="error" if self.danger else "primary",
                )

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "close", "Close")]

    def compose(self) -> ComposeResult:
        with Vertical(id="help"):
            yield Static(Text("methodic-tui keys", style="bold"), id="help-title")
            with VerticalScroll(id="help-body"):
                yield Static(help_table())
            yield Static(Text("escape closes · ctrl+p: command palette", style="dim"))

    def on_mount(self) -> None:
        self.query_one("#help-body").focus()  # arrows and page keys scroll it

    def action_close(self) -> None:
        self.dismiss(None)


def help_table() -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(justify="right", style="bold cyan", no_wrap=True)
    table.add_column(ratio=1)
    for spec in ACTIONS:
        key = "a / P" if spec.action == "toggle_pause_all" else spec.key_display or "palette"
        table.add_row(key, Text.assemble((spec.title, "bold"), "\n", (spec.help, "dim")))
    table.add_row(
        "escape",
        Text.assemble(
            ("Back, or close a dialog", "bold"),
            "\n",
            ("Never destructive; dialogs answer no.", "dim"),
        ),
    )
    return table
