"""The dashboard tells the truth at a glance: states, tries, rates, the chart, panes, footer.

Fixed-data tests drive the real app on a ``StaticSource``; engine tests run it on a real
engine and server (see tui_helpers). Every wait is on a condition.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

from helpers import CEILING, make_checkpoint
from textual.widgets import Sparkline
from tui_data import MB, asset, held_snapshot, labels, sample_snapshot, sample_source
from tui_helpers import (
    MiB,
    asset_id,
    cell_text,
    running,
    screen_text,
    select,
    settled,
    states,
    until,
    upload_source,
)

from methodic import AssetFinalized, AssetStateChanged
from methodic._events import RateMeter
from methodic_tui import format as fmt
from methodic_tui.attach import AttachSource
from methodic_tui.dashboard.app import MethodicApp
from methodic_tui.dashboard.screens.details import info_text
from methodic_tui.dashboard.session import Session
from methodic_tui.dashboard.widgets.panels import StatusHeader, header_text
from methodic_tui.dashboard.widgets.tables import AssetsTable, ComponentsTable
from methodic_tui.source import StaticSource

SLOW = 50_000  # bytes/s: 8 MiB stay in flight for the whole test


# ------------------------------------------------------------------ format and snapshots


def test_plurals() -> None:
    assert fmt.plural(1, "file") == "1 file"
    assert fmt.plural(0, "file") == "0 files"
    line = fmt.describe_event(AssetFinalized("a", "checkpoint", 10, 1), lambda _: "ck")
    assert line == ("ok", "finalized ck: 1 file, 10 B")


def test_an_asset_with_no_file_in_flight_is_queued() -> None:
    waiting = replace(asset(1, "uploading", 0, MB, (0, 2)), files_uploading=0)
    assert fmt.shown_state(waiting) == "queued"
    assert fmt.shown_state(replace(waiting, files_uploading=1)) == "uploading"
    # Not known (a tracker read by attach): as the engine says.
    assert fmt.shown_state(replace(waiting, files_uploading=None)) == "uploading"


def test_details_of_a_queued_asset_show_no_rate() -> None:
    a = replace(asset(1, "uploading", MB, 2 * MB, (0, 2), rate=MB, eta=1.0), files_uploading=0)
    text = info_text(a).plain
    assert "queued" in text and "MB/s" not in text
    assert "1 MB/s" in info_text(replace(a, files_uploading=1)).plain


def test_a_rate_meter_settles_after_one_full_interval() -> None:
    meter = RateMeter()
    meter.add(1000)
    meter.sample()  # the first sample with bytes: its interval was only partly busy
    meter.add(1000)
    meter.sample()
    assert meter.settled and meter.rate > 0


def test_resumed_is_a_line_of_the_log() -> None:
    session = Session(StaticSource())
    a = sample_snapshot().assets[3]
    snap = replace(sample_snapshot(), assets=(a,))
    session.absorb(snap, [AssetStateChanged(a.asset_id, "paused")])
    entries = session.absorb(snap, [AssetStateChanged(a.asset_id, "uploading")])
    assert [e.text for e in entries] == ["resumed checkpoint-4000"]


def test_header_rate_is_paused_at_once_when_nothing_uploads() -> None:
    snap = sample_snapshot()
    paused = replace(
        snap, assets=tuple(replace(a, state="paused") for a in snap.assets), rate=20 * MB
    )
    first = header_text(labels(), paused, None).plain.split("\n")[1]
    assert first.startswith(" ↑ paused"), first
    assert "MB/s" not in first.split("│")[0]
    done = replace(snap, assets=tuple(replace(a, state="finalized") for a in snap.assets))
    assert header_text(labels(), done, None).plain.split("\n")[1].startswith(" ↑ idle")


def test_attach_says_the_cap_is_unknown(tmp_path: Path) -> None:
    source = AttachSource(tmp_path / "u.sqlite")
    text = header_text(source.labels, replace(sample_snapshot(), bandwidth_cap=None), None)
    assert "cap unknown" in text.plain and "no cap" not in text.plain


# ------------------------------------------------------------------ fixed data, real app


async def test_chart_is_empty_before_samples_and_names_its_scale() -> None:
    empty = replace(sample_snapshot(), history=(), rate=0.0)
    async with running(StaticSource(empty, labels=labels()), size=(120, 40)) as (app, _):
        spark = app.screen.query_one(Sparkline)
        assert list(spark.data or []) == []
        assert "no samples yet" in screen_text(app)
    async with running(sample_source(), size=(120, 40)) as (app, _):
        spark = app.screen.query_one(Sparkline)
        data = list(spark.data or [])
        assert data[0] == 0.0 and len(data) == 61  # bars from 0, not from the lowest sample
        assert f"peak {fmt.rate(max(sample_snapshot().history))}" in screen_text(app)


async def test_a_filter_with_no_match_empties_the_files_pane() -> None:
    snap = sample_snapshot()
    files_of_all = tuple(replace(a, components=snap.assets[1].components) for a in snap.assets)
    source = StaticSource(replace(snap, assets=files_of_all), labels=labels())
    async with running(source, size=(120, 40)) as (app, pilot):
        files = app.screen.query_one(ComponentsTable)
        await until(pilot, lambda: files.row_count > 0)
        await pilot.press("slash", "z", "z", "z")
        await until(pilot, lambda: "0 of 5" in screen_text(app))
        assert files.row_count == 0


async def test_assets_pane_takes_the_rows_it_needs() -> None:
    async with running(sample_source(), size=(80, 24)) as (app, pilot):
        pane = app.screen.query_one("#assets-pane")
        await until(pilot, lambda: pane.outer_size.height == 5 + 2)  # title rule, header, 5 assets
        await pilot.press("down")  # checkpoint-2000: 6 files
        files = app.screen.query_one(ComponentsTable)
        await until(pilot, lambda: files.row_count == 6)
        assert files.outer_size.height == 24 - 2 - 7 - 1 - 7 - 1  # the rest: 5 of 6 files


async def test_footer_shows_u_while_interrupted_assets_exist() -> None:
    async with running(sample_source(), size=(120, 40)) as (app, pilot):
        # The footer is drawn once its bindings are known: wait for it, then read it.
        await until(pilot, lambda: screen_text(app).split("\n")[-1].strip() != "")
        footer = screen_text(app).split("\n")[-1]
        assert "u Resume" not in footer
        assert "Cap / Filter" in footer  # a group's label and the next key not run together
    held = StaticSource(held_snapshot(), labels=labels())
    async with running(held, size=(120, 40)) as (app, pilot):
        await until(pilot, lambda: "u Resume" in screen_text(app).split("\n")[-1])


# ------------------------------------------------------------------ real engine


async def test_tries_count_attempts_of_the_file_not_of_its_parts(server, tmp_path: Path) -> None:
    ck = make_checkpoint(tmp_path / "checkpoint-1000", {"big.bin": 3 * 5 * MiB + 10})
    src = upload_source(server, tmp_path, [ck], part_threshold=8 * MiB, part_size=5 * MiB)
    async with running(src) as (app, pilot):
        await until(pilot, lambda: states(app).get("checkpoint-1000") == "finalized")
        aid = asset_id(app, "checkpoint-1000")
        comps = src.snapshot(aid).assets[0].components
        assert [(c.part_count, c.attempts) for c in comps] == [(4, 1)]
        await until(pilot, lambda: cell_text(app, "components", "big.bin", "parts") == "4/4")
        assert cell_text(app, "components", "big.bin", "attempts") == "1"


async def test_assets_waiting_for_a_worker_say_queued(server, tmp_path: Path) -> None:
    dirs = [
        make_checkpoint(tmp_path / f"checkpoint-{i}000", {"a.bin": 8 * MiB}, seed=i)
        for i in (1, 2, 3)
    ]
    src = upload_source(server, tmp_path, dirs, workers=1, max_bandwidth=SLOW)
    async with running(src) as (app, pilot):
        await until(pilot, lambda: all(s == "uploading" for s in states(app).values()))
        ids = {name: asset_id(app, name) for name in states(app)}

        def shown() -> list[str]:
            table = app.screen.query_one(AssetsTable)
            if table.row_count < len(ids):
                return []
            return [cell_text(app, "assets", ids[n], "state") for n in sorted(ids)]

        await until(pilot, lambda: sorted(shown()) == ["queued", "queued", "uploading"])


async def test_header_says_paused_at_once_after_pause_all(server, tmp_path: Path) -> None:
    dirs = [make_checkpoint(tmp_path / "checkpoint-1000", {"a.bin": 8 * MiB})]
    src = upload_source(server, tmp_path, dirs, max_bandwidth=SLOW)
    async with running(src) as (app, pilot):
        # Settled (past the first sample's plain average, which is 0 when the first 64 KiB
        # burst is all that was sent): from then on the EWMA only decays, never to 0.
        await until(
            pilot,
            lambda: src.snapshot().rate > 0 and src.snapshot().assets[0].rate is not None,
            what="a settled, measured rate",
        )
        await pilot.press("a")
        await settled(pilot)
        await until(pilot, lambda: "PAUSED" in screen_text(app))
        assert src.snapshot().rate > 0  # the meter still averages the last seconds
        rate_line = screen_text(app).split("\n")[1]
        assert rate_line.startswith(" ↑ paused"), rate_line


async def test_pause_does_not_move_bytes_back(server, tmp_path: Path) -> None:
    dirs = [make_checkpoint(tmp_path / "checkpoint-1000", {"a.bin": 8 * MiB})]
    src = upload_source(server, tmp_path, dirs, max_bandwidth=SLOW)
    async with running(src) as (app, pilot):
        await until(pilot, lambda: src.snapshot().assets and src.snapshot().bytes_done > 0)
        await select(pilot, app, "checkpoint-1000")
        before = src.snapshot().bytes_done
        await pilot.press("p")
        await settled(pilot)
        await until(pilot, lambda: states(app)["checkpoint-1000"] == "paused")
        paused = src.snapshot(asset_id(app, "checkpoint-1000")).assets[0]
        assert paused.bytes_done >= before
        assert [c.state for c in paused.components] == ["queued"]  # none listed as uploading
        await pilot.press("p")  # resumed: the attempt sent again moves on from there
        await until(pilot, lambda: src.snapshot().bytes_done > paused.bytes_done)


async def test_a_refresh_still_running_when_the_app_shuts_down_touches_no_widget() -> None:
    """The refresh timer awaits the source; if the app shuts down meanwhile (q, a lost
    terminal), the screens' widgets are gone when that await returns: nothing may be
    published to them (it raised NoMatches and the app ended on a traceback)."""
    entered, gate = asyncio.Event(), asyncio.Event()

    class Held(StaticSource):
        hold = False

        async def tick(self) -> None:
            if self.hold:
                entered.set()
                await gate.wait()

    source = Held(sample_snapshot(), labels=labels())
    app = MethodicApp(source, watch_terminal=False)

    async def release_once_the_header_is_gone() -> None:
        while dashboard.query(StatusHeader):
            await asyncio.sleep(0.01)
        gate.set()

    async with app.run_test(size=(120, 40)) as pilot:
        await asyncio.wait_for(app.session.ready.wait(), CEILING)
        await until(pilot, lambda: bool(app.screen.query(StatusHeader)), what="the dashboard")
        dashboard = app.screen
        source.hold = True
        await until(pilot, entered.is_set, what="a refresh waiting on the source")
        releasing = asyncio.create_task(release_once_the_header_is_gone())
    await releasing  # the app shut down with that refresh still running, and raised nothing
    assert gate.is_set()
