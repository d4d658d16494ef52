"""Every binding of the dashboard, driven by Pilot on a real engine and a real server.

Each test checks the key's effect on the engine (pool snapshot, tracker, server) and on screen.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from helpers import make_checkpoint
from textual.command import CommandList, CommandPalette
from textual.pilot import Pilot
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

from methodic import AsyncChronicle, NotFoundError, UploadTracker
from methodic_tui.dashboard.app import MethodicApp
from methodic_tui.dashboard.screens.dashboard import DashboardScreen
from methodic_tui.dashboard.screens.details import DetailsScreen
from methodic_tui.dashboard.screens.modals import ConfirmScreen, HelpScreen
from methodic_tui.engine_source import EngineSource

SLOW = 50_000  # bytes/s: 8 MiB take ~3 min, so they stay in flight for the whole test


def ckpts(tmp_path: Path, n: int = 1, size: int = 3 * MiB, files: int = 2) -> list[Path]:
    return [
        make_checkpoint(
            tmp_path / f"checkpoint-{i}000",
            {f"shard-{j}.bin": size // files for j in range(files)},
            seed=i,
        )
        for i in range(1, n + 1)
    ]


@contextlib.asynccontextmanager
async def slow_uploads(
    server, tmp_path: Path, n: int = 1
) -> AsyncIterator[tuple[MethodicApp, Pilot, EngineSource]]:
    """The app on ``n`` checkpoints of 8 MiB sent at SLOW, once all of them are uploading."""
    src = upload_source(server, tmp_path, ckpts(tmp_path, n=n, size=8 * MiB), max_bandwidth=SLOW)
    names = [f"checkpoint-{i}000" for i in range(1, n + 1)]
    async with running(src) as (app, pilot):
        await until(pilot, lambda: all(states(app).get(name) == "uploading" for name in names))
        await select(pilot, app, names[0])  # the first row is selected once the table has it
        yield app, pilot, src


def palette_hits(app) -> list[str]:
    """The commands the open palette lists now, as plain text."""
    hits = app.screen.query_one(CommandList)
    prompts = [hits.get_option_at_index(i).prompt for i in range(hits.option_count)]
    return [str(getattr(p, "plain", p)) for p in prompts]


def tracked_state(tmp_path: Path, aid: str) -> str:
    with UploadTracker(tmp_path / "u.sqlite") as tracker:
        t = tracker.get_asset(aid)
        assert t is not None
        return t.state


async def test_uploads_show_live_and_finalize(server, tmp_path: Path) -> None:
    dirs = ckpts(tmp_path, n=2, size=200_000)
    async with running(upload_source(server, tmp_path, dirs)) as (app, pilot):
        await until(
            pilot,
            lambda: states(app) == {"checkpoint-1000": "finalized", "checkpoint-2000": "finalized"},
            what="finalized",
        )
        aid = asset_id(app, "checkpoint-1000")
        await until(pilot, lambda: cell_text(app, "assets", aid, "state") == "finalized")
        assert cell_text(app, "assets", aid, "files") == "2/2"
        await until(
            pilot, lambda: tracked_state(tmp_path, aid) == "finalized", what="tracked finalized"
        )
        await until(
            pilot, lambda: any("finalized checkpoint-2000" in e.text for e in app.session.entries)
        )
        await until(pilot, lambda: "all finalized" in screen_text(app))


async def test_p_pauses_and_resumes_the_selected_asset(server, tmp_path: Path) -> None:
    async with slow_uploads(server, tmp_path) as (app, pilot, src):
        aid = asset_id(app, "checkpoint-1000")
        await pilot.press("p")
        await until(pilot, lambda: states(app)["checkpoint-1000"] == "paused", what="paused")
        await until(pilot, lambda: tracked_state(tmp_path, aid) == "paused", what="tracked paused")
        await until(pilot, lambda: cell_text(app, "assets", aid, "state") == "paused")
        await until(pilot, lambda: "PAUSED" in screen_text(app))
        await pilot.press("p")
        await until(pilot, lambda: states(app)["checkpoint-1000"] == "uploading", what="resumed")
        src.set_bandwidth(None)
        await until(pilot, lambda: states(app)["checkpoint-1000"] == "finalized", what="finalized")


async def test_a_and_shift_p_pause_and_resume_everything(server, tmp_path: Path) -> None:
    async with slow_uploads(server, tmp_path, n=2) as (app, pilot, _):
        await pilot.press("a")
        await until(pilot, lambda: set(states(app).values()) == {"paused"}, what="all paused")
        await pilot.press("P")
        await until(pilot, lambda: set(states(app).values()) == {"uploading"}, what="all resumed")
        logged = [e.text for e in app.session.entries]
        assert "paused checkpoint-1000" in logged and "paused checkpoint-2000" in logged


async def test_r_retries_failed_uploads(server, tmp_path: Path) -> None:
    dirs = ckpts(tmp_path, n=1, size=100_000, files=1)
    server.faults.add(status=400, count=1)  # not transient: the asset fails at once
    async with running(upload_source(server, tmp_path, dirs)) as (app, pilot):
        await until(pilot, lambda: states(app).get("checkpoint-1000") == "failed", what="failed")
        aid = asset_id(app, "checkpoint-1000")
        await until(pilot, lambda: cell_text(app, "assets", aid, "state") == "failed")
        await until(
            pilot, lambda: any(e.level == "error" and "400" in e.text for e in app.session.entries)
        )
        await pilot.press("r")
        await until(pilot, lambda: states(app)["checkpoint-1000"] == "finalized", what="retried")
        await until(
            pilot, lambda: tracked_state(tmp_path, aid) == "finalized", what="tracked finalized"
        )


async def test_f_asks_first_and_the_server_still_verifies(server, tmp_path: Path) -> None:
    async with slow_uploads(server, tmp_path) as (app, pilot, _):
        aid = asset_id(app, "checkpoint-1000")
        await pilot.press("f")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirmation")
        await pilot.press("escape")  # escape says no
        await until(pilot, lambda: isinstance(app.screen, DashboardScreen))
        assert states(app)["checkpoint-1000"] == "uploading"
        await pilot.press("f")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("enter")  # the focus starts on "Cancel": enter says no too
        await until(pilot, lambda: isinstance(app.screen, DashboardScreen))
        assert states(app)["checkpoint-1000"] == "uploading"
        await pilot.press("f")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        # Not every byte is stored: the server refuses and says what is missing.
        await until(pilot, lambda: any("missing" in str(n.message) for n in app._notifications))
        # ...and, as the dialog says, that changes nothing: the upload goes on.
        assert states(app)["checkpoint-1000"] in ("uploading", "finalized")
        async with AsyncChronicle(server.url, server.api_key) as chronicle:
            assert (await chronicle.get_asset(aid)).state == "pending"


def _last_error(tmp_path: Path, aid: str) -> str:
    with UploadTracker(tmp_path / "u.sqlite") as tracker:
        t = tracker.get_asset(aid)
        return (t.last_error or "") if t else ""


async def test_f_finalizes_once_storage_holds_every_byte(server, tmp_path: Path) -> None:
    (d,) = ckpts(tmp_path, n=1, size=200_000)
    server.faults.add(status=400, count=1)  # not transient: the asset fails, files unsent
    async with running(upload_source(server, tmp_path, [d], workers=1)) as (app, pilot):
        await until(pilot, lambda: states(app).get("checkpoint-1000") == "failed")
        aid = asset_id(app, "checkpoint-1000")
        # Another tool stores every file out of band: now the server can finalize.
        auth = {"Authorization": f"Bearer {server.api_key}"}
        paths = sorted(p.name for p in d.iterdir())
        async with httpx.AsyncClient() as http:
            r = await http.post(
                f"{server.url}/api/v1/assets/{aid}/presign",
                headers=auth,
                json={"targets": [{"path": p, "part": None} for p in paths]},
            )
            for t in r.json()["targets"]:
                (await http.put(t["url"], content=(d / t["path"]).read_bytes())).raise_for_status()
        await pilot.press("f")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await until(pilot, lambda: states(app)["checkpoint-1000"] == "finalized", what="finalized")
        await until(
            pilot, lambda: tracked_state(tmp_path, aid) == "finalized", what="tracked finalized"
        )
        assert any("force-finalized checkpoint-1000" in e.text for e in app.session.entries)
        await pilot.press("f")  # already finalized: nothing to ask, it says so
        await until(
            pilot, lambda: any("already finalized" in str(n.message) for n in app._notifications)
        )
        await settled(pilot)
        assert not isinstance(app.screen, ConfirmScreen)


async def test_d_discards_after_confirmation(server, tmp_path: Path) -> None:
    async with slow_uploads(server, tmp_path) as (app, pilot, _):
        aid = asset_id(app, "checkpoint-1000")
        await pilot.press("d")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("n")
        await until(pilot, lambda: isinstance(app.screen, DashboardScreen))
        assert states(app)["checkpoint-1000"] == "uploading"
        await pilot.press("d")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.click("#yes")
        await until(pilot, lambda: states(app)["checkpoint-1000"] == "discarded", what="discarded")
        await until(pilot, lambda: cell_text(app, "assets", aid, "state") == "discarded")
        await until(
            pilot, lambda: tracked_state(tmp_path, aid) == "discarded", what="tracked discarded"
        )
        async with AsyncChronicle(server.url, server.api_key) as chronicle:
            with pytest.raises(NotFoundError):
                await chronicle.get_asset(aid)


async def test_plus_and_minus_move_the_bandwidth_cap(server, tmp_path: Path) -> None:
    dirs = ckpts(tmp_path, n=1, size=4 * MiB)
    src = upload_source(server, tmp_path, dirs, max_bandwidth=2_000_000)
    async with running(src) as (app, pilot):
        bucket = src.chronicle.bucket
        await pilot.press("plus")
        await until(pilot, lambda: bucket.rate == 5_000_000, what="raised")
        await pilot.press("minus")
        await pilot.press("minus")
        await until(pilot, lambda: bucket.rate == 1_000_000, what="lowered")
        await until(pilot, lambda: "cap 1 MB/s" in screen_text(app))
        said = sum("bandwidth" in e.text for e in app.session.entries)
        await pilot.press("minus")  # the bottom step stays (and the log says the cap again)
        await until(pilot, lambda: sum("bandwidth" in e.text for e in app.session.entries) > said)
        assert bucket.rate == 1_000_000
        # Undoing the two "-" first (back to 1 MB/s, then 2), then up the ladder: past the top
        # step the cap is lifted.
        for _ in range(14):
            await pilot.press("plus")
        await until(pilot, lambda: bucket.rate is None, what="lifted")
        assert any("no cap" in e.text for e in app.session.entries)


async def test_enter_opens_details_and_escape_goes_back(server, tmp_path: Path) -> None:
    dirs = ckpts(tmp_path, n=2, size=300_000, files=3)
    async with running(upload_source(server, tmp_path, dirs)) as (app, pilot):
        await until(
            pilot, lambda: set(states(app).values()) == {"finalized"} and len(states(app)) == 2
        )
        await until(pilot, lambda: app.screen.query_one("#assets").row_count == 2)
        await pilot.press("down")
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, DetailsScreen), what="details")
        details = app.screen
        assert details.asset_id == asset_id(app, "checkpoint-2000")
        await until(pilot, lambda: details.query_one("#components").row_count == 3)
        assert cell_text(app, "components", "shard-0.bin", "state") == "completed"
        assert "checkpoint-2000" in screen_text(app)
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, DashboardScreen))


async def test_slash_filters_the_assets(server, tmp_path: Path) -> None:
    dirs = ckpts(tmp_path, n=3, size=100_000)
    async with running(upload_source(server, tmp_path, dirs)) as (app, pilot):
        table = app.screen.query_one("#assets")
        await until(pilot, lambda: table.row_count == 3)
        await pilot.press("slash", "2", "0", "0")
        await until(pilot, lambda: table.row_count == 1, what="filtered")
        assert table.get_row_at(0)[0].plain.strip().startswith("checkpoint-2000")
        await pilot.press("enter")  # keeps the filter, back to the table
        assert table.has_focus and table.row_count == 1
        await pilot.press("escape")  # clears it
        await until(pilot, lambda: table.row_count == 3, what="unfiltered")


async def test_help_and_the_command_palette(server, tmp_path: Path) -> None:
    async with slow_uploads(server, tmp_path) as (app, pilot, _):
        await pilot.press("question_mark")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen), what="help")
        assert "Force-finalize the selected asset" in screen_text(app)
        await pilot.press("p")  # keys belong to the dialog: nothing is paused
        await settled(pilot)
        assert states(app)["checkpoint-1000"] == "uploading"
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, DashboardScreen))
        await settled(pilot)
        assert states(app)["checkpoint-1000"] == "uploading"
        await pilot.press("ctrl+p")
        await until(pilot, lambda: isinstance(app.screen, CommandPalette), what="palette")
        await pilot.press(*"pause or resume every")
        await until(
            pilot,
            lambda: len(hits := palette_hits(app)) == 1 and "every" in hits[0].lower(),
            what="the one matching command listed",
        )
        await pilot.press("enter")
        await until(
            pilot, lambda: states(app)["checkpoint-1000"] == "paused", what="paused via palette"
        )


async def test_q_with_uploads_in_flight_asks_and_they_stay_resumable(
    server, tmp_path: Path
) -> None:
    async with slow_uploads(server, tmp_path) as (app, pilot, _):
        aid = asset_id(app, "checkpoint-1000")
        await pilot.press("q")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="quit dialog")
        assert "Resumable:" in screen_text(app)
        await pilot.press("n")
        await until(pilot, lambda: isinstance(app.screen, DashboardScreen))
        assert app.is_running
        await pilot.press("q")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await until(pilot, lambda: not app.is_running, what="exit")
    assert app.return_code == 0
    with UploadTracker(tmp_path / "u.sqlite") as tracker:
        assert [t.asset_id for t in tracker.get_pending_uploads()] == [aid]


async def test_q_asks_too_when_uploads_are_only_paused(server, tmp_path: Path) -> None:
    async with slow_uploads(server, tmp_path) as (app, pilot, _):
        await pilot.press("p")
        await until(pilot, lambda: states(app)["checkpoint-1000"] == "paused")
        await pilot.press("q")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        assert "Not finished: 1 upload (1 paused)" in screen_text(app)
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, DashboardScreen))
        assert app.is_running


async def test_q_when_nothing_is_in_flight_quits_at_once(server, tmp_path: Path) -> None:
    dirs = ckpts(tmp_path, n=1, size=10_000)
    async with running(upload_source(server, tmp_path, dirs)) as (app, pilot):
        await until(pilot, lambda: states(app).get("checkpoint-1000") == "finalized")
        await pilot.press("q")
        await until(pilot, lambda: not app.is_running, what="exit")
    assert app.return_code == 0


async def test_escape_and_alt_keys_never_destroy(server, tmp_path: Path) -> None:
    async with slow_uploads(server, tmp_path) as (app, pilot, _):
        for key in ("escape", "alt+d", "alt+f", "alt+q", "escape", "ctrl+d", "delete"):
            await pilot.press(key)
        await settled(pilot)
        assert app.is_running and isinstance(app.screen, DashboardScreen)
        assert states(app)["checkpoint-1000"] == "uploading"


async def test_a_bracket_in_a_name_is_not_markup(server, tmp_path: Path) -> None:
    d = make_checkpoint(tmp_path / "ckpt[bold]red", {"rng_state[0].pth": 1000})
    async with running(upload_source(server, tmp_path, [d])) as (app, pilot):
        await until(pilot, lambda: states(app) == {"ckpt[bold]red": "finalized"})
        aid = asset_id(app, "ckpt[bold]red")
        await until(pilot, lambda: cell_text(app, "assets", aid, "state") == "finalized")
        assert cell_text(app, "assets", aid, "name").startswith("ckpt[bold]red")
        await until(pilot, lambda: app.screen.query_one("#components").row_count == 1)
        assert cell_text(app, "components", "rng_state[0].pth", "path") == "rng_state[0].pth"


async def test_an_asset_of_many_files_lists_a_bounded_block_of_them(
    server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dashboard is given (and lays out) at most DETAIL_FILES files of the selected asset,
    not every one of its 100,000: the block that holds the first unfinished file; the pane says
    so. (Here DETAIL_FILES is 5 and the asset has 12 files.)"""
    import methodic_tui.dashboard.screens.dashboard as dashboard
    import methodic_tui.engine_source as engine_source
    from methodic._uploads import AssetUpload

    monkeypatch.setattr(engine_source, "DETAIL_FILES", 5)
    monkeypatch.setattr(dashboard, "DETAIL_FILES", 5)
    built: list[int] = []
    real = AssetUpload._component_snapshots

    def counting(self, limit):
        out = real(self, limit)
        built.append(len(out))
        return out

    monkeypatch.setattr(AssetUpload, "_component_snapshots", counting)
    dirs = ckpts(tmp_path, n=1, size=12_000, files=12)
    async with running(upload_source(server, tmp_path, dirs)) as (app, pilot):
        await until(pilot, lambda: set(states(app).values()) == {"finalized"})
        files = app.screen.query_one("#components")
        await until(pilot, lambda: files.row_count == 5)
        await until(pilot, lambda: "5 listed, from the first unfinished" in screen_text(app))
        # The table is refreshed on a timer: it may still list an earlier block for a moment.
        await until(pilot, lambda: "shard-9.bin" in files.rows, what="the last block listed")
        # Every file completed: the last block (files 8-12 of 12), its rows patched on the
        # next refresh (a row can appear with the state of the snapshot it came from).
        await until(
            pilot,
            lambda: cell_text(app, "components", "shard-9.bin", "state") == "completed",
            what="the last block's states",
        )
        assert built and max(built) == 5
