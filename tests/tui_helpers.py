"""Helpers (not tests) for driving the real dashboard with Pilot on a real engine and server."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from helpers import CEILING, subprocess_env, wait_until_async
from textual.pilot import Pilot

from methodic import RetryPolicy
from methodic_tui.dashboard.app import MethodicApp
from methodic_tui.engine_source import EngineSource
from methodic_tui.jobs import ResumeJob, UploadJob
from methodic_tui.options import Options

MiB = 1 << 20
FAST_RETRY = RetryPolicy(max_attempts=4, base=0.05, cap=0.2)


def options(server, tmp_path: Path, **kw: object) -> Options:
    opts = Options(
        server_url=server.url,
        api_key=server.api_key,
        tracker=tmp_path / "u.sqlite",
        workers=2,
        retry=FAST_RETRY,
        experiment="tui",
    )
    for k, v in kw.items():
        setattr(opts, k, v)
    return opts


def upload_source(server, tmp_path: Path, dirs: Sequence[Path], **kw: object) -> EngineSource:
    return EngineSource(options(server, tmp_path, **kw), UploadJob(list(dirs)))


def resume_source(server, tmp_path: Path, **kw: object) -> EngineSource:
    return EngineSource(options(server, tmp_path, **kw), ResumeJob())


async def until(
    pilot: Pilot, predicate: Callable[[], object], timeout: float = CEILING, what: str = "condition"
) -> None:
    """Until ``predicate()`` holds, the app handling its messages meanwhile (never a fixed pause)."""
    await wait_until_async(predicate, timeout=timeout, what=what, pause=lambda: pilot.pause(0.05))


async def settled(pilot: Pilot) -> None:
    """Once every key pressed so far is handled and every engine control it started is done:
    then what a key did not do, it will not do (a check that nothing happened may follow)."""
    await pilot.pause()
    await until(
        pilot, lambda: not pilot.app.operator._controls, what="the controls started by keys done"
    )


@contextlib.asynccontextmanager
async def running(
    source: EngineSource | object, size: tuple[int, int] = (120, 40), **app_kw: object
) -> AsyncIterator[tuple[MethodicApp, Pilot]]:
    """The app on the source, started (engine open); the source is closed afterwards."""
    app = MethodicApp(source, watch_terminal=False, **app_kw)  # type: ignore[arg-type]
    try:
        async with app.run_test(size=size) as pilot:
            await asyncio.wait_for(app.session.ready.wait(), CEILING)
            await pilot.pause()
            yield app, pilot
    finally:
        await source.close()  # type: ignore[attr-defined]


def states(app: MethodicApp) -> dict[str, str]:
    """Asset name -> state, as the engine has them right now."""
    return {
        app.session.asset_label(a.asset_id): a.state for a in app.session.source.snapshot().assets
    }


def cell_text(app: MethodicApp, table_id: str, row: str, column: str) -> str:
    table = app.screen.query_one(f"#{table_id}")
    return table.get_cell(row, column).plain.strip()  # type: ignore[attr-defined]


def asset_id(app: MethodicApp, name: str) -> str:
    return next(
        a.asset_id
        for a in app.session.source.snapshot().assets
        if app.session.asset_label(a.asset_id) == name
    )


async def select(pilot: Pilot, app: MethodicApp, name: str) -> str:
    """Wait until the dashboard has asset ``name`` selected (its table is refreshed on a timer,
    after the engine knows the asset: a key pressed before acts on nothing); its id."""
    await until(pilot, lambda: name in states(app), what=f"{name} known")
    wanted = asset_id(app, name)
    await until(pilot, lambda: app.session.selected == wanted, what=f"{name} selected")
    return wanted


def tui_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "methodic_tui", *args]


def remote_args(server, tracker_path: Path) -> list[str]:
    """The command-line options that point a ``methodic-tui`` at ``server`` and a tracker."""
    return ["--server-url", server.url, "--api-key", server.api_key, "--tracker", str(tracker_path)]


def tui_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    # The embedded server's default data dir must not be the real user's.
    return subprocess_env(XDG_DATA_HOME=str(tmp_path / "xdg"), **extra)


def screen_text(app: MethodicApp) -> str:
    """What the terminal shows now, as plain text (the app's whole screen, dialogs included)."""
    strips = app.screen._compositor.render_strips()
    return "\n".join("".join(seg.text for seg in strip) for strip in strips)
