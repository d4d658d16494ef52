"""The Textual app: runs a Source on Textual's own event loop and shows it.

Engine events are drained and applied a few times a second (``refresh_hz``) inside one
``batch_update()``; screens patch their tables instead of rebuilding them.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from rich.console import RenderableType
from textual.app import App
from textual.binding import Binding
from textual.screen import Screen

from methodic import ChronicleError, Event, PoolSnapshot
from methodic_tui import format as fmt
from methodic_tui.dashboard.actions import ACTIONS
from methodic_tui.dashboard.commands import MethodicCommands
from methodic_tui.dashboard.operator_actions import OperatorActions
from methodic_tui.dashboard.screens.base import LiveScreen
from methodic_tui.dashboard.screens.dashboard import DashboardScreen
from methodic_tui.dashboard.screens.recovery import RecoveryScreen
from methodic_tui.dashboard.widgets.panels import LogEntry
from methodic_tui.source import EMPTY, Source

EXIT_USAGE = 2
EXIT_HANGUP = 128 + signal.SIGHUP
# A dropped terminal (SIGHUP) or a scheduler's warning (SIGTERM): leave cleanly, 128 + signal.
STOP_SIGNALS = (signal.SIGHUP, signal.SIGTERM)
LOG_KEPT = 2000


def _bindings() -> list[Binding]:
    out = []
    for spec in ACTIONS:
        if not spec.keys:
            continue
        group = Binding.Group(spec.group, compact=True) if spec.group else None
        first, *rest = spec.keys.split(",")
        out.append(
            Binding(
                first,
                spec.action,
                spec.label,
                show=spec.show,
                key_display=spec.key_display,
                group=group,
            )
        )
        for key in rest:  # alternatives: same action, not repeated in the footer
            out.append(
                Binding(key, spec.action, spec.label, show=False, priority=key.startswith("ctrl+"))
            )
    return out


class MethodicApp(OperatorActions, App[int]):
    CSS_PATH = "methodic.tcss"
    TITLE = "methodic"
    BINDINGS = _bindings()
    COMMANDS = App.COMMANDS | {MethodicCommands}

    def __init__(
        self,
        source: Source,
        *,
        start_on_recovery: bool = False,
        refresh_hz: float = 4.0,
        clock: Callable[[], float] = time.time,
        watch_terminal: bool = True,
    ) -> None:
        super().__init__()
        self.source = source
        self.start_on_recovery = start_on_recovery
        self.refresh_hz = refresh_hz
        self.clock = clock
        self.watch_terminal = watch_terminal
        self.snapshot: PoolSnapshot = EMPTY
        self.entries: deque[LogEntry] = deque(maxlen=LOG_KEPT)
        self.names: dict[str, str] = {}
        self.selected: str | None = None
        self.error: str | None = None  # why it could not start (printed by the CLI)
        self.ready = asyncio.Event()
        self._ticking = False
        self._controls: set[asyncio.Task[Any]] = set()

    def get_default_screen(self) -> Screen[Any]:
        return DashboardScreen()

    # ------------------------------------------------------------ lifecycle

    def on_mount(self) -> None:
        self.theme = "textual-dark"
        self.entries.append(self._entry("info", "starting..."))
        self.run_worker(self._start(), name="start")
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self.leave, 128 + sig)
        if self.watch_terminal and not self.is_headless:
            self.set_interval(2.0, self._check_terminal)

    def on_unmount(self) -> None:
        for sig in STOP_SIGNALS:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                asyncio.get_running_loop().remove_signal_handler(sig)

    async def _start(self) -> None:
        try:
            await self.source.start()
        except ChronicleError as exc:
            self.error = " ".join(str(exc).split())
            self.leave(EXIT_USAGE)
            return
        await self.tick()
        self.set_interval(1 / self.refresh_hz, self.tick)
        self.ready.set()
        if self.start_on_recovery or self.source.pending():
            self.push_screen(RecoveryScreen())

    def leave(self, code: int) -> None:
        self.exit(code, return_code=code)

    def hang_up(self) -> None:
        """The terminal went away (SSH dropped): leave now; the tracker keeps everything."""
        self.leave(EXIT_HANGUP)

    def terminal_gone(self) -> bool:
        if self.is_headless:
            return False
        import termios

        try:
            termios.tcgetattr(sys.__stdin__.fileno())  # type: ignore[union-attr]
        except (OSError, ValueError, AttributeError, termios.error):
            return True
        return False

    def _check_terminal(self) -> None:
        # A hung-up terminal does not always deliver SIGHUP to us (e.g. not the session leader).
        if self.terminal_gone():
            self.hang_up()

    def panic(self, *renderables: RenderableType) -> None:
        # Textual's input thread panics when a read from a hung-up terminal fails; that is the
        # same dropped session as SIGHUP (whichever comes first), not a crash.
        if self.terminal_gone():
            self.hang_up()
            return
        super().panic(*renderables)

    # ------------------------------------------------------------ refresh

    def _entry(
        self, level: str, text: str, asset_id: str | None = None, at: float | None = None
    ) -> LogEntry:
        return LogEntry(self.clock() if at is None else at, level, text, asset_id)

    def asset_label(self, asset_id: str | None) -> str:
        if asset_id is None:
            return "-"
        return self.names.get(asset_id, asset_id[:13])

    async def tick(self) -> None:
        if self._ticking or not self.is_running:
            return
        self._ticking = True
        try:
            await self.source.tick()
            events = self.source.poll_events()
            snap = self.source.snapshot(self.selected)
            self._apply(snap, events)
        finally:
            self._ticking = False

    def _apply(self, snap: PoolSnapshot, events: Iterable[Event]) -> None:
        self.snapshot = snap
        for a in snap.assets:
            if a.asset_id not in self.names:
                self.names[a.asset_id] = fmt.name_of(a)
        entries = []
        for event in events:
            described = fmt.describe_event(event, self.asset_label)
            if described is not None:
                entries.append(LogEntry(event.at, described[0], described[1], event.asset_id))
        self._publish(entries)

    def _publish(self, entries: list[LogEntry]) -> None:
        self.entries.extend(entries)
        with self.batch_update():
            for screen in self.screen_stack:
                if isinstance(screen, LiveScreen):
                    screen.feed(self.snapshot, entries)

    def note(self, level: str, text: str, asset_id: str | None = None) -> None:
        """A line in the event log from the dashboard itself (what a key did)."""
        self._publish([self._entry(level, text, asset_id)])

    def refresh_now(self) -> None:
        self.call_later(self.tick)

    def select(self, asset_id: str) -> None:
        if asset_id != self.selected:
            self.selected = asset_id
            self.refresh_now()


def run_app(source: Source, *, start_on_recovery: bool = False) -> int:
    """Run the dashboard until it exits; the source is closed after it (tracker flushed)."""
    from methodic_tui.cli import PROG

    app = MethodicApp(source, start_on_recovery=start_on_recovery)

    async def main() -> int | None:
        try:
            return await app.run_async()
        finally:
            await source.close()

    try:
        code = asyncio.run(main())
    except OSError:  # the terminal vanished while the app was restoring it
        code = EXIT_HANGUP
    if app.error:
        print(f"{PROG}: error: {app.error}", file=sys.stderr)
    return app.return_code or 0 if code is None else code
