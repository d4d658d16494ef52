"""What the operator's controls do to the uploads: one method per control key.

Every control runs in the background and reports what it did, or why it could not, in a
notification; destructive ones ask first in a ``ModalScreen[bool]``. The app owns one
``Operator`` and hands it its keys; the recovery screen calls it too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from textual.notifications import SeverityLevel

from methodic import (
    DONE_STATES,
    HELD_STATES,
    AssetIncompleteError,
    AssetSnapshot,
    AssetState,
    ChronicleError,
    DownloadState,
)
from methodic_tui import bandwidth
from methodic_tui import format as fmt
from methodic_tui.dashboard.screens.modals import ConfirmScreen
from methodic_tui.dashboard.session import Session
from methodic_tui.source import ReadOnlyError

PAUSABLE_STATES = frozenset(
    {AssetState.REGISTERED, AssetState.UPLOADING, DownloadState.DOWNLOADING}
)


class Host(Protocol):
    """What the operator needs of the app it serves (``MethodicApp``)."""

    session: Session

    async def tick(self) -> None: ...

    def note(self, level: str, text: str, asset_id: str | None = None) -> None: ...

    def refresh_now(self) -> None: ...

    def leave(self, code: int) -> None: ...

    def notify(
        self,
        message: str,
        *,
        title: str = "",
        severity: SeverityLevel = "information",
        timeout: float | None = None,
    ) -> None: ...

    def push_screen(
        self, screen: ConfirmScreen, callback: Callable[[bool | None], None]
    ) -> object: ...


class Operator:
    def __init__(self, app: Host) -> None:
        self.app = app
        self.session = app.session
        self._controls: set[asyncio.Task[Any]] = set()
        self._cap_steps = bandwidth.CapSteps()  # + and - undo each other

    def need_selected(self) -> AssetSnapshot | None:
        a = self.session.selected_asset()
        if a is None:
            self.app.notify("No asset selected.", severity="warning")
        return a

    def control(self, coro: Awaitable[Any], done: Callable[[Any], None] | None = None) -> None:
        """Run an engine control in the background; report what it did, or why it could not."""
        app = self.app

        async def run() -> None:
            try:
                result = await coro
            except ReadOnlyError as exc:
                app.notify(str(exc), title="read-only", severity="warning")
            except AssetIncompleteError as exc:
                missing = ", ".join(exc.missing[:5]) + (" ..." if len(exc.missing) > 5 else "")
                app.notify(
                    f"The server refused: not every file is stored (missing {missing}).",
                    title="not finalized",
                    severity="error",
                    timeout=8,
                )
            except ChronicleError as exc:
                app.notify(str(exc), title="failed", severity="error", timeout=8)
            else:
                if done is not None:
                    done(result)
            await self.session.source.refresh_pending()
            await app.tick()

        task = asyncio.get_running_loop().create_task(run())
        self._controls.add(task)
        task.add_done_callback(self._controls.discard)

    def _blocked(self) -> bool:
        read_only = self.session.source.read_only
        if read_only:
            self.app.notify(read_only, title="read-only", severity="warning")
            return True
        return False

    def _selected_control(self) -> AssetSnapshot | None:
        """The selected asset, if there is one and the controls work here."""
        a = self.need_selected()
        if a is None or self._blocked():
            return None
        return a

    def _confirm(self, title: str, body: str, yes: str, then: Callable[[], None]) -> None:
        def answered(confirmed: bool | None) -> None:
            if confirmed:
                then()

        self.app.push_screen(ConfirmScreen(title, body, yes=yes), answered)

    # ------------------------------------------------------------ controls

    def toggle_pause(self) -> None:
        a = self._selected_control()
        if a is None:
            return
        name = self.session.asset_label(a.asset_id)
        if a.state in PAUSABLE_STATES:
            self.control(self.session.source.pause(a.asset_id))  # the engine's event says it
        elif a.state in HELD_STATES:
            self.resume_assets([a.asset_id])
        else:
            self.app.notify(f"{name} is {a.state}: nothing to pause or resume.")

    def toggle_pause_all(self) -> None:
        if self._blocked():
            return
        snap = self.session.fresh()
        if any(a.state in PAUSABLE_STATES for a in snap.assets):
            self.control(self.session.source.pause(None))
            return
        paused = [a.asset_id for a in snap.assets if a.state == AssetState.PAUSED]
        if paused:
            self.resume_assets(paused)
        else:
            self.app.notify("Nothing is uploading or paused.")

    def resume_assets(self, asset_ids: list[str]) -> None:
        if self._blocked():
            return
        source, label = self.session.source, self.session.asset_label

        async def resume_each() -> list[str]:
            done: list[str] = []
            for asset_id in asset_ids:
                done += await source.resume(asset_id)
            return done

        def report(ids: list[str]) -> None:
            names = ", ".join(label(i) for i in ids[:4]) + (" ..." if len(ids) > 4 else "")
            self.app.note("info", f"resumed {names}" if ids else "nothing to resume")

        self.control(resume_each(), report)

    def resume_pending(self) -> None:
        held = [t.asset_id for t in self.session.source.pending()]
        if not held:
            self.app.notify("No uploads from an earlier process are waiting.")
            return
        self.resume_assets(held)

    def retry_failed(self) -> None:
        if self._blocked():
            return
        if not any(a.state == AssetState.FAILED for a in self.session.fresh().assets):
            self.app.notify("Nothing has failed.")
            return
        self.control(
            self.session.source.retry_failed(None),
            lambda ids: self.app.note("info", f"retrying {fmt.plural(len(ids), 'failed asset')}"),
        )

    def force_finalize(self) -> None:
        a = self._selected_control()
        if a is None:
            return
        name = self.session.asset_label(a.asset_id)
        if a.state == AssetState.FINALIZED:
            self.app.notify(f"{name} is already finalized.")
            return
        body = (
            f"Ask the server to finalize {name} now, whatever the local tracker says "
            f"({a.components_done}/{a.component_count} files stored here).\n\nThe server "
            "still checks that every file is in storage; if any is missing it refuses and "
            "nothing changes. Consumers see the asset as soon as it is finalized."
        )
        self._confirm(
            f"Force-finalize {name}?",
            body,
            "Finalize",
            lambda: self.control(
                self.session.source.force_finalize(a.asset_id),
                lambda _: self.app.note("ok", f"force-finalized {name}", a.asset_id),
            ),
        )

    def discard(self) -> None:
        a = self._selected_control()
        if a is None:
            return
        name = self.session.asset_label(a.asset_id)
        if a.state in DONE_STATES:
            self.app.notify(f"{name} is {a.state}: it cannot be discarded.")
            return
        body = (
            f"Stop uploading {name}, forget it in the tracker and delete the pending asset "
            "on the server, with every byte already sent.\n\nThe local files are not "
            "touched. This cannot be undone."
        )
        if a.asset_type == "download":
            body = (
                f"Stop downloading {name}. What was verified stays in {a.local_dir}; "
                "downloading again fetches only the rest. The asset on the server is untouched."
            )
        self._confirm(
            f"{'Cancel' if a.asset_type == 'download' else 'Discard'} {name}?",
            body,
            "Cancel download" if a.asset_type == "download" else "Discard",
            lambda: self.control(self.session.source.discard(a.asset_id)),
        )

    def _step_cap(self, direction: bandwidth.Direction) -> None:
        if self._blocked():
            return
        snap = self.session.fresh()
        start = snap.bandwidth_cap
        cap = self._cap_steps.next(direction, start, snap.rate)
        if direction == "up" and start is None and cap is None:
            # Nothing above "no cap"; recorded all the same, so that "-" now returns here.
            self._cap_steps.went(direction, start, cap)
            self.app.notify("There is no bandwidth cap to raise.")
            return
        try:
            self.session.source.set_bandwidth(cap)
        except ChronicleError as exc:
            self.app.notify(str(exc), severity="error")
            return
        self._cap_steps.went(direction, start, cap)
        self.app.note("info", f"bandwidth {fmt.cap(cap)}")
        self.app.refresh_now()

    def bandwidth_up(self) -> None:
        self._step_cap("up")

    def bandwidth_down(self) -> None:
        self._step_cap("down")

    def request_quit(self) -> None:
        source = self.session.source
        left = source.unfinished() if self.session.ready.is_set() else {}
        if not left or source.read_only:  # attached: the uploads go on elsewhere
            self.app.leave(0)
            return
        total = sum(left.values())
        what = ", ".join(f"{n} {state}" for state, n in sorted(left.items()))
        unfinished = f"Not finished: {fmt.plural(total, 'upload')}"
        if not source.resumable:
            body = (
                f"{unfinished} ({what}). The demo deletes its temporary "
                "server and checkpoints when it exits."
            )
        else:
            body = (
                f"{unfinished} ({what}). Resumable: "
                f"`methodic-tui resume --tracker {source.labels.tracker}` sends only what "
                "the server lacks."
            )

        def answered(yes: bool | None) -> None:
            if yes:
                self.app.leave(0)

        self.app.push_screen(
            ConfirmScreen("Quit now?", body, yes="Quit", no="Stay", danger=False), answered
        )
