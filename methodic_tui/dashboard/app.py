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
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

from rich.console import RenderableType
from textual.app import App
from textual.binding import Binding, BindingType
from textual.screen import ModalScreen, Screen

from methodic import ChronicleError, Event, PoolSnapshot
from methodic_tui.dashboard.actions import ACTIONS
from methodic_tui.dashboard.commands import MethodicCommands
from methodic_tui.dashboard.operator import Operator
from methodic_tui.dashboard.screens.base import LiveScreen
from methodic_tui.dashboard.screens.dashboard import DashboardScreen
from methodic_tui.dashboard.screens.modals import HelpScreen
from methodic_tui.dashboard.screens.recovery import RecoveryScreen
from methodic_tui.dashboard.session import LogEntry, Session
from methodic_tui.source import Source
from methodic_tui.watchdog import TerminalWatchdog

EXIT_USAGE = 2
EXIT_HANGUP = 128 + signal.SIGHUP
# A scheduler's warning (SIGTERM), or SIGINT sent to the process (in the dashboard ctrl+c is a
# key, which asks first): leave cleanly, 128 + signal. SIGHUP (a dropped terminal) is the
# watchdog's, which does not depend on this loop running (see methodic_tui.watchdog).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
OUR_ACTIONS = frozenset(spec.action for spec in ACTIONS)
# What the recovery screen lets through of the app's keys; the rest is the dashboard's.
RECOVERY_ACTIONS = frozenset(
    {"resume_pending", "force_finalize", "discard", "help", "request_quit", "recovery"}
)


def _bindings() -> list[BindingType]:
    out: list[BindingType] = []
    for spec in ACTIONS:
        if not spec.keys:
            continue
        group = Binding.Group(spec.group, compact=True) if spec.group else None
        first, *rest = spec.keys.split(",")
        out.append(
            Binding(
                first,
                f"{spec.action}({spec.footer_when!r})" if spec.footer_when else spec.action,
                spec.label,
                show=spec.show,
                key_display=spec.key_display,
                group=group,
            )
        )
        if spec.footer_when:  # shown while check_action allows it; the key works always
            out.append(Binding(first, spec.action, spec.label, show=False))
        for key in rest:  # alternatives: same action, not repeated in the footer
            out.append(
                Binding(key, spec.action, spec.label, show=False, priority=key.startswith("ctrl+"))
            )
    return out


class MethodicApp(App[int]):
    """Owns the ``Session`` (what is shown) and the ``Operator`` (what the keys do)."""

    CSS_PATH = "methodic.tcss"
    TITLE = "methodic"
    BINDINGS: ClassVar[list[BindingType]] = _bindings()
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
        self.session = Session(source, clock)
        self.operator = Operator(self)
        self.start_on_recovery = start_on_recovery
        self.refresh_hz = refresh_hz
        self.watch_terminal = watch_terminal
        self.error: ChronicleError | None = None  # why it could not start (run_app raises it)
        self._ticking = False

    def get_default_screen(self) -> Screen[Any]:
        return DashboardScreen()

    # ------------------------------------------------------------ lifecycle

    def on_mount(self) -> None:
        self.theme = "textual-dark"
        self.session.entries.append(self.session.entry("info", "starting..."))
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
        source = self.session.source
        try:
            await source.start()
        except ChronicleError as exc:
            self.error = exc
            self.leave(EXIT_USAGE)
            return
        await self.tick()
        self.set_interval(1 / self.refresh_hz, self.tick)
        self.session.ready.set()
        if self.start_on_recovery or source.pending():
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

    async def tick(self) -> None:
        if self._ticking or not self.is_running:
            return
        self._ticking = True
        try:
            source = self.session.source
            await source.tick()
            if not self.is_running:  # the app began shutting down meanwhile: no widgets left
                return
            events = source.poll_events()
            self._apply(source.snapshot(self.session.selected), events)
        finally:
            self._ticking = False

    def _apply(self, snap: PoolSnapshot, events: Iterable[Event]) -> None:
        self._publish(self.session.absorb(snap, events))

    def _publish(self, entries: list[LogEntry]) -> None:
        self.session.entries.extend(entries)
        with self.batch_update():
            for screen in self.screen_stack:
                if isinstance(screen, LiveScreen):
                    screen.feed(self.session.snapshot, entries)

    def note(self, level: str, text: str, asset_id: str | None = None) -> None:
        """A line in the event log from the dashboard itself (what a key did)."""
        self._publish([self.session.entry(level, text, asset_id)])

    def refresh_now(self) -> None:
        self.call_later(self.tick)

    def select(self, asset_id: str) -> None:
        if asset_id != self.session.selected:
            self.session.selected = asset_id
            self.refresh_now()

    # ------------------------------------------------------------ keys (actions.ACTIONS)
    # The controls are the operator's; the app only moves between screens.

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action not in OUR_ACTIONS:
            return True
        screen = self.screen
        if isinstance(screen, ModalScreen):
            return False  # a dialog is open: keys belong to it
        if parameters == ("interrupted",):  # a footer key shown while such assets exist
            return any(a.state == "interrupted" for a in self.session.snapshot.assets)
        if isinstance(screen, RecoveryScreen):
            return action in RECOVERY_ACTIONS
        if action in ("details", "filter"):
            return isinstance(screen, DashboardScreen)
        return True

    def action_toggle_pause(self) -> None:
        self.operator.toggle_pause()

    def action_toggle_pause_all(self) -> None:
        self.operator.toggle_pause_all()

    def action_resume_pending(self, _footer_when: str = "") -> None:
        self.operator.resume_pending()

    def action_retry_failed(self) -> None:
        self.operator.retry_failed()

    def action_force_finalize(self) -> None:
        self.operator.force_finalize()

    def action_discard(self) -> None:
        self.operator.discard()

    def action_bandwidth_up(self) -> None:
        self.operator.bandwidth_up()

    def action_bandwidth_down(self) -> None:
        self.operator.bandwidth_down()

    def action_request_quit(self) -> None:
        self.operator.request_quit()

    def action_details(self) -> None:
        if isinstance(self.screen, DashboardScreen):
            self.screen.show_details()

    def action_filter(self) -> None:
        if isinstance(self.screen, DashboardScreen):
            self.screen.open_filter()

    def action_recovery(self) -> None:
        if not isinstance(self.screen, RecoveryScreen):
            self.push_screen(RecoveryScreen())

    def action_help(self) -> None:
        self.push_screen(HelpScreen())


def run_app(source: Source, *, start_on_recovery: bool = False) -> tuple[int, int]:
    """Run the dashboard until it exits; the source is closed after it (tracker flushed).

    Returns (exit status, how many uploads it left unfinished and resumable). Raises the
    ``ChronicleError`` that kept the source from starting (a setup problem). A dropped terminal
    ends the process within a few seconds (status 129) even if Textual is stuck writing to it:
    see ``methodic_tui.watchdog``.
    """
    app = MethodicApp(source, start_on_recovery=start_on_recovery)
    left = 0
    loop: asyncio.AbstractEventLoop | None = None

    def leave() -> None:
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(app.hang_up)

    def flush(timeout: float) -> None:
        close_now = getattr(source, "close_now", None)
        if close_now is not None:
            close_now(timeout)

    watchdog = TerminalWatchdog(leave, flush)

    async def main() -> int | None:
        nonlocal left, loop
        loop = asyncio.get_running_loop()
        try:
            return await app.run_async()
        finally:
            left = _resumable_left(source)
            await source.close()

    watchdog.start()
    try:
        code = asyncio.run(main())
    except OSError:  # the terminal vanished while the app was restoring it
        code = EXIT_HANGUP
    finally:
        watchdog.stop()
    if watchdog.lost:
        code = EXIT_HANGUP
    if app.error is not None:
        raise app.error
    return (app.return_code or 0 if code is None else code), left


def _resumable_left(source: Source) -> int:
    """Uploads left unfinished that ``resume`` can continue (none for the demo or attach)."""
    if source.read_only or not source.resumable:
        return 0
    try:
        return sum(source.unfinished().values())
    except Exception:  # never started, or already stopping: nothing to say
        return 0
