"""What the operator's keys (and the command palette) do: one method per action of ``ACTIONS``.

Every control runs in the background and reports what it did, or why it could not, in a
notification; destructive ones ask first in a ``ModalScreen[bool]``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from textual.screen import ModalScreen

from methodic import AssetIncompleteError, AssetSnapshot, ChronicleError, PoolSnapshot
from methodic_tui import bandwidth
from methodic_tui import format as fmt
from methodic_tui.dashboard.actions import ACTIONS
from methodic_tui.dashboard.screens.dashboard import DashboardScreen
from methodic_tui.dashboard.screens.details import DetailsScreen
from methodic_tui.dashboard.screens.modals import ConfirmScreen, HelpScreen
from methodic_tui.dashboard.screens.recovery import RecoveryScreen
from methodic_tui.source import ReadOnlyError

if TYPE_CHECKING:
    from methodic_tui.dashboard.app import MethodicApp

OUR_ACTIONS = frozenset(spec.action for spec in ACTIONS)
RECOVERY_ACTIONS = frozenset(
    {"resume_pending", "force_finalize", "discard", "help", "request_quit", "recovery"}
)


class OperatorActions:
    """Mixed into ``MethodicApp``: the ``action_*`` methods and their helpers."""

    def check_action(self: MethodicApp, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action not in OUR_ACTIONS:
            return True
        screen = self.screen
        if isinstance(screen, ModalScreen):
            return False  # a dialog is open: keys belong to it
        if isinstance(screen, RecoveryScreen):
            return action in RECOVERY_ACTIONS
        if action in ("details", "filter"):
            return isinstance(screen, DashboardScreen)
        return True

    def _fresh(self: MethodicApp) -> PoolSnapshot:
        """Decide on the state of now, not of the last refresh (up to 1/refresh_hz old)."""
        if self.ready.is_set():
            self.snapshot = self.source.snapshot(self.selected)
        return self.snapshot

    def _selected_asset(self: MethodicApp) -> AssetSnapshot | None:
        return next((a for a in self._fresh().assets if a.asset_id == self.selected), None)

    def _need_selected(self: MethodicApp) -> AssetSnapshot | None:
        a = self._selected_asset()
        if a is None:
            self.notify("No asset selected.", severity="warning")
        return a

    def control(
        self: MethodicApp, coro: Awaitable[Any], done: Callable[[Any], None] | None = None
    ) -> None:
        """Run an engine control in the background; report what it did, or why it could not."""

        async def run() -> None:
            try:
                result = await coro
            except ReadOnlyError as exc:
                self.notify(str(exc), title="read-only", severity="warning")
            except AssetIncompleteError as exc:
                missing = ", ".join(exc.missing[:5]) + (" ..." if len(exc.missing) > 5 else "")
                self.notify(
                    f"The server refused: not every file is stored (missing {missing}).",
                    title="not finalized",
                    severity="error",
                    timeout=8,
                )
            except ChronicleError as exc:
                self.notify(str(exc), title="failed", severity="error", timeout=8)
            else:
                if done is not None:
                    done(result)
            await self.source.refresh_pending()
            await self.tick()

        task = asyncio.get_running_loop().create_task(run())
        self._controls.add(task)
        task.add_done_callback(self._controls.discard)

    def _blocked(self: MethodicApp) -> bool:
        if self.source.read_only:
            self.notify(self.source.read_only, title="read-only", severity="warning")
            return True
        return False

    # ------------------------------------------------------------ actions

    def action_toggle_pause(self: MethodicApp) -> None:
        a = self._need_selected()
        if a is None or self._blocked():
            return
        name = self.asset_label(a.asset_id)
        if a.state in ("registered", "uploading"):
            self.control(self.source.pause(a.asset_id))  # the engine's event says it
        elif a.state in ("paused", "interrupted"):
            self.resume_assets([a.asset_id])
        else:
            self.notify(f"{name} is {a.state}: nothing to pause or resume.")

    def action_toggle_pause_all(self: MethodicApp) -> None:
        if self._blocked():
            return
        states = fmt.count_states(self._fresh())
        if states.get("uploading", 0) + states.get("registered", 0):
            self.control(self.source.pause(None))
            return
        paused = [a.asset_id for a in self.snapshot.assets if a.state == "paused"]
        if paused:
            self.resume_assets(paused)
        else:
            self.notify("Nothing is uploading or paused.")

    def resume_assets(self: MethodicApp, asset_ids: list[str]) -> None:
        if self._blocked():
            return

        async def resume_each() -> list[str]:
            done: list[str] = []
            for asset_id in asset_ids:
                done += await self.source.resume(asset_id)
            return done

        def report(ids: list[str]) -> None:
            names = ", ".join(self.asset_label(i) for i in ids[:4]) + (
                " ..." if len(ids) > 4 else ""
            )
            self.note("info", f"resumed {names}" if ids else "nothing to resume")

        self.control(resume_each(), report)

    def action_resume_pending(self: MethodicApp) -> None:
        held = [t.asset_id for t in self.source.pending()]
        if not held:
            self.notify("No uploads from an earlier process are waiting.")
            return
        self.resume_assets(held)

    def action_retry_failed(self: MethodicApp) -> None:
        if self._blocked():
            return
        if not any(a.state == "failed" for a in self._fresh().assets):
            self.notify("Nothing has failed.")
            return
        self.control(
            self.source.retry_failed(None),
            lambda ids: self.note(
                "info", f"retrying {len(ids)} failed asset{'s' if len(ids) != 1 else ''}"
            ),
        )

    def action_force_finalize(self: MethodicApp) -> None:
        a = self._need_selected()
        if a is None or self._blocked():
            return
        name = self.asset_label(a.asset_id)
        if a.state == "finalized":
            self.notify(f"{name} is already finalized.")
            return
        body = (
            f"Ask the server to finalize {name} now, whatever the local tracker says "
            f"({a.components_done}/{a.component_count} files stored here).\n\nThe server "
            "still checks that every file is in storage; if any is missing it refuses and "
            "nothing changes. Consumers see the asset as soon as it is finalized."
        )

        def answered(yes: bool | None) -> None:
            if yes:
                self.control(
                    self.source.force_finalize(a.asset_id),
                    lambda _: self.note("ok", f"force-finalized {name}", a.asset_id),
                )

        self.push_screen(ConfirmScreen(f"Force-finalize {name}?", body, yes="Finalize"), answered)

    def action_discard(self: MethodicApp) -> None:
        a = self._need_selected()
        if a is None or self._blocked():
            return
        name = self.asset_label(a.asset_id)
        if a.state in ("finalized", "discarded"):
            self.notify(f"{name} is {a.state}: it cannot be discarded.")
            return
        body = (
            f"Stop uploading {name}, forget it in the tracker and delete the pending asset "
            "on the server, with every byte already sent.\n\nThe local files are not "
            "touched. This cannot be undone."
        )

        def answered(yes: bool | None) -> None:
            if yes:
                self.control(self.source.discard(a.asset_id))

        self.push_screen(ConfirmScreen(f"Discard {name}?", body, yes="Discard"), answered)

    def _set_cap(self: MethodicApp, cap: float | None) -> None:
        if self._blocked():
            return
        try:
            self.source.set_bandwidth(cap)
        except ChronicleError as exc:
            self.notify(str(exc), severity="error")
            return
        self.note("info", f"bandwidth {fmt.cap(cap)}")
        self.refresh_now()

    def action_bandwidth_up(self: MethodicApp) -> None:
        current = self._fresh().bandwidth_cap
        if current is None:
            self.notify("There is no bandwidth cap to raise.")
            return
        self._set_cap(bandwidth.raise_cap(current))

    def action_bandwidth_down(self: MethodicApp) -> None:
        snap = self._fresh()
        self._set_cap(bandwidth.lower_cap(snap.bandwidth_cap, snap.rate))

    def action_details(self: MethodicApp) -> None:
        if not isinstance(self.screen, DashboardScreen):
            return
        a = self._need_selected()
        if a is not None:
            self.push_screen(DetailsScreen(a.asset_id))

    def action_filter(self: MethodicApp) -> None:
        if isinstance(self.screen, DashboardScreen):
            self.screen.open_filter()

    def action_recovery(self: MethodicApp) -> None:
        if not isinstance(self.screen, RecoveryScreen):
            self.push_screen(RecoveryScreen())

    def action_help(self: MethodicApp) -> None:
        self.push_screen(HelpScreen())

    def action_request_quit(self: MethodicApp) -> None:
        left = self.source.unfinished() if self.ready.is_set() else {}
        if not left or self.source.read_only:  # attached: the uploads go on elsewhere
            self.leave(0)
            return
        total = sum(left.values())
        what = ", ".join(f"{n} {state}" for state, n in sorted(left.items()))
        job = getattr(self.source, "job", None)
        if job is not None and not job.resumable:
            body = (
                f"{total} uploads are not finished ({what}). The demo deletes its temporary "
                "server and checkpoints when it exits."
            )
        else:
            tracker = self.source.labels.tracker
            body = (
                f"{total} uploads are not finished ({what}). They stay resumable: "
                f"`methodic-tui resume --tracker {tracker}` sends only what the server lacks."
            )

        def answered(yes: bool | None) -> None:
            if yes:
                self.leave(0)

        self.push_screen(
            ConfirmScreen("Quit now?", body, yes="Quit", no="Stay", danger=False), answered
        )
