"""Snapshot tests of the main states at 80x24 and 120x40, on fixed data (no live rates, times).

Regenerate after an intended change: pytest tests/test_tui_snapshots.py --snapshot-update
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
from textual.pilot import Pilot
from tui_data import NOW, recovery_source, sample_source

from methodic_tui.dashboard.app import MethodicApp
from methodic_tui.source import StaticSource

SIZES = [(80, 24), (120, 40)]


@pytest.fixture(autouse=True)
def utc() -> Iterator[None]:
    """Event times are shown in local time: make it UTC so the snapshots do not depend on it."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    yield
    if old is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = old
    time.tzset()


def app_on(source: StaticSource, *, recovery: bool = False) -> MethodicApp:
    return MethodicApp(source, clock=lambda: NOW, start_on_recovery=recovery, watch_terminal=False)


async def ready(pilot: Pilot) -> None:
    await pilot.app.session.ready.wait()  # type: ignore[attr-defined]
    await pilot.pause()  # until the app has handled every message (the first paint)


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "120x40"])
def test_dashboard_mid_upload(snap_compare, size: tuple[int, int]) -> None:
    assert snap_compare(
        app_on(sample_source()), press=["down"], terminal_size=size, run_before=ready
    )


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "120x40"])
def test_asset_details(snap_compare, size: tuple[int, int]) -> None:
    assert snap_compare(
        app_on(sample_source()),
        press=["down", "down", "enter"],
        terminal_size=size,
        run_before=ready,
    )


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "120x40"])
def test_recovery_screen(snap_compare, size: tuple[int, int]) -> None:
    assert snap_compare(
        app_on(recovery_source(), recovery=True),
        press=["down"],
        terminal_size=size,
        run_before=ready,
    )


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "120x40"])
def test_force_finalize_confirmation(snap_compare, size: tuple[int, int]) -> None:
    assert snap_compare(
        app_on(sample_source()), press=["down", "f"], terminal_size=size, run_before=ready
    )


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "120x40"])
def test_help(snap_compare, size: tuple[int, int]) -> None:
    assert snap_compare(
        app_on(sample_source()), press=["question_mark"], terminal_size=size, run_before=ready
    )


def test_filter(snap_compare) -> None:
    assert snap_compare(app_on(sample_source()), press=["slash", "p", "a", "u"], run_before=ready)
