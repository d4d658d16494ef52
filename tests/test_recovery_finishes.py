"""Recovery that always finishes: unsealed assets, reused pids, live owners and take-over.

Real processes (SIGKILLed registrars and uploaders, unrelated `sleep` processes that squat a
pid), a real server on 127.0.0.1 and real SQLite trackers. Drains that used to hang run in
child processes under a generous ceiling, so a regression fails instead of hanging the suite.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest
from helpers import claim_in_child, make_checkpoint
from killharness import (
    Api,
    counted_server,
    drain_in_child,
    register_unsealed_and_die,
    reuse_owner_pid,
    reused_pid_round,
    unsealed_round,
)
from tui_helpers import tui_cmd, tui_env

from methodic import Chronicle, UploadTracker, drain_incomplete_uploads
from methodic import _tracker_ops as ops
from methodic import _tracker_schema as schema
from methodic._owner import owner_alive, process_start

CEILING = 120  # fails a hung child; a working one returns long before


def tui(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        tui_cmd(*args),
        capture_output=True,
        text=True,
        timeout=CEILING,
        env=tui_env(tmp_path),
        cwd=tmp_path,
    )


@contextlib.contextmanager
def squatter() -> subprocess.Popen[bytes]:  # type: ignore[misc]
    """A live process unrelated to methodic, whose pid a tracker row can be made to name."""
    proc = subprocess.Popen(["sleep", "600"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(30)


# ---------------------------------------------------------------- 1. unsealed assets


def test_drain_reports_an_unsealed_asset_and_returns_then_finalizes_it_once_sealed(
    server, tmp_path: Path
) -> None:
    unsealed_round(tmp_path, server.url, server.api_key)


def test_upload_unsealed_sends_what_is_registered_without_finalizing(
    server, tmp_path: Path
) -> None:
    asset_id, _ = register_unsealed_and_die(tmp_path, server.url, server.api_key)
    tracker_path = tmp_path / "uploads.sqlite"
    api = Api(server.url, server.api_key)
    report = drain_in_child(server.url, server.api_key, tracker_path, "upload_unsealed")
    assert list(report["unsealed"]) == [asset_id], report
    assert "stored on the server, not finalized" in report["unsealed"][asset_id]
    assert report["finalized"] == [] and report["failed"] == {}
    (remote,) = api.assets(include_pending=True)
    assert remote["state"] == "pending"
    full = api.client.get(f"/assets/{asset_id}").json()
    assert all(c["stored"] for c in full["components"]), full
    with UploadTracker(tracker_path) as tracker:
        assert [t.asset_id for t in tracker.get_pending_uploads()] == [asset_id]  # resumable
        tracker.seal(asset_id)
    report = drain_in_child(server.url, server.api_key, tracker_path)
    assert report["finalized"] == [asset_id] and report["bytes_resent"] == 0, report


def test_upload_unsealed_then_seal_in_the_same_process(server, tmp_path: Path) -> None:
    asset_id, _ = register_unsealed_and_die(tmp_path, server.url, server.api_key)
    tracker = UploadTracker(tmp_path / "uploads.sqlite")
    with Chronicle(server.url, server.api_key) as chronicle:
        report = drain_incomplete_uploads(chronicle, tracker, upload_unsealed=True)
        assert list(report.unsealed) == [asset_id]
        tracker.seal(asset_id)
        report = drain_incomplete_uploads(chronicle, tracker)
        assert report.finalized == [asset_id] and report.skipped == {}, report


def test_a_discarded_unsealed_asset_is_left_alone(server, tmp_path: Path) -> None:
    asset_id, _ = register_unsealed_and_die(tmp_path, server.url, server.api_key)
    tracker = UploadTracker(tmp_path / "uploads.sqlite")
    with Chronicle(server.url, server.api_key) as chronicle:
        report = drain_incomplete_uploads(chronicle, tracker, upload_unsealed=True)
        assert list(report.unsealed) == [asset_id]
        tracker.discard(asset_id)
        report = drain_incomplete_uploads(chronicle, tracker)
        assert report.unsealed == {} and report.finalized == []
    assert tracker.get_pending_uploads() == []


def test_resume_no_ui_returns_on_an_unsealed_asset_and_names_seal_and_discard(
    server, tmp_path: Path
) -> None:
    asset_id, _ = register_unsealed_and_die(tmp_path, server.url, server.api_key)
    tracker_path = tmp_path / "uploads.sqlite"
    res = tui(
        tmp_path,
        "resume",
        "--no-ui",
        "--server-url",
        server.url,
        "--api-key",
        server.api_key,
        "--tracker",
        str(tracker_path),
    )
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert f"methodic-tui seal {asset_id}" in out and f"methodic-tui discard {asset_id}" in out
    with UploadTracker(tracker_path) as tracker:
        assert tracker.get_asset(asset_id).state == "registered"  # untouched, still resumable


async def test_the_recovery_screen_shows_an_asset_as_unsealed(server, tmp_path: Path) -> None:
    from tui_helpers import resume_source, running, screen_text, until

    from methodic_tui.dashboard.screens.recovery import RecoveryScreen
    from methodic_tui.engine_source import stopped_reason

    asset_id, _ = register_unsealed_and_die(
        tmp_path, server.url, server.api_key, tracker=tmp_path / "u.sqlite"
    )
    async with running(resume_source(server, tmp_path), start_on_recovery=True) as (app, pilot):
        await until(pilot, lambda: isinstance(app.screen, RecoveryScreen))
        table = app.screen.query_one("#pending")
        await until(pilot, lambda: table.row_count == 1)
        (t,) = app.session.source.pending()
        assert t.asset_id == asset_id
        why = stopped_reason(t)
        assert why.startswith("unsealed") and f"methodic-tui seal {asset_id}" in why
        await until(pilot, lambda: "unsealed" in screen_text(app), what="unsealed on screen")


def test_registering_more_into_an_asset_whose_part_was_uploaded_is_refused(
    server, tmp_path: Path
) -> None:
    """The server fixes an asset's manifest when it is created: after ``upload_unsealed`` the
    asset can only be sealed as it is, or discarded."""
    from methodic import ComponentSpec, InvalidInputError

    asset_id, _ = register_unsealed_and_die(tmp_path, server.url, server.api_key)
    tracker = UploadTracker(tmp_path / "uploads.sqlite")
    with Chronicle(server.url, server.api_key) as chronicle:
        drain_incomplete_uploads(chronicle, tracker, upload_unsealed=True)
    extra = tmp_path / "late.bin"
    extra.write_bytes(b"x" * 10)
    with pytest.raises(InvalidInputError, match="seal"):
        tracker.register_components(
            asset_id, [ComponentSpec("late.bin", extra, 10)], asset_type="checkpoint", seal=False
        )


# ---------------------------------------------------------------- 2. owners: pid + start time


def test_owner_alive_tells_a_reused_pid_from_its_owner() -> None:
    with squatter() as proc:
        start = process_start(proc.pid)
        assert start is not None
        assert owner_alive(proc.pid, start)
        assert owner_alive(proc.pid)  # start unknown (no procfs, old row): the pid decides
        assert not owner_alive(proc.pid, start - 1)  # another process had this pid
    assert not owner_alive(proc.pid, start)


def test_drain_takes_over_an_asset_whose_dead_owners_pid_a_live_process_reuses(
    tmp_path: Path,
) -> None:
    with counted_server(tmp_path / "server") as (srv, proxy):
        # Killed mid-upload: once 3 MiB of the 14 MiB crossed the proxy.
        result = reused_pid_round(
            tmp_path, srv.url, srv.url, srv.api_key, 0, proxy, seed=3, kill_at_bytes=3 << 20
        )
    assert result.registered and not result.finished_before_kill, result
    assert result.report["skipped"] == {} and result.report["resumed"], result.report


def test_a_live_owner_is_named_with_its_pid_and_take_over_takes_it(server, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", {"a": 300_000})
    tracker_path = tmp_path / "u.sqlite"
    tracker = UploadTracker(tracker_path)
    with Chronicle(server.url, server.api_key, max_bandwidth="1KB") as chronicle:
        run = chronicle.run(chronicle.create_experiment("x"), 0, 0)
        asset_id = run.register_and_upload_async(ckpt, upload_tracker=tracker).asset_id
    live = claim_in_child(tracker_path, asset_id, hold=True)
    try:
        report = drain_in_child(server.url, server.api_key, tracker_path)
        why = report["skipped"][asset_id]
        assert f"pid {live.pid} is still running" in why and "--take-over" in why, why
        res = tui(
            tmp_path,
            "resume",
            "--no-ui",
            "--take-over",
            "--server-url",
            server.url,
            "--api-key",
            server.api_key,
            "--tracker",
            str(tracker_path),
        )
        assert res.returncode == 0, res.stdout + res.stderr
        assert tracker.get_asset(asset_id).state == "finalized"
    finally:
        live.kill()
        live.wait(30)


def test_take_over_in_the_api(server, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", {"a": 300_000})
    tracker_path = tmp_path / "u.sqlite"
    tracker = UploadTracker(tracker_path)
    with Chronicle(server.url, server.api_key, max_bandwidth="1KB") as chronicle:
        run = chronicle.run(chronicle.create_experiment("x"), 0, 0)
        asset_id = run.register_and_upload_async(ckpt, upload_tracker=tracker).asset_id
    live = claim_in_child(tracker_path, asset_id, hold=True)
    try:
        with Chronicle(server.url, server.api_key) as chronicle:
            report = drain_incomplete_uploads(chronicle, tracker)
            assert asset_id in report.skipped
            report = drain_incomplete_uploads(chronicle, tracker, take_over=True)
        assert report.finalized == [asset_id], report
        assert tracker.get_asset(asset_id).owner_pid == os.getpid()
    finally:
        live.kill()
        live.wait(30)


def test_the_tracker_records_its_owner_by_pid_and_start_time(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", {"a": 10})
    with UploadTracker(tmp_path / "u.sqlite") as tracker:
        from methodic import ComponentSpec

        tracker.register_components("A", [ComponentSpec("a", ckpt / "a", 10)], asset_type="c")
        t = tracker.get_asset("A")
        assert t.owner_pid == os.getpid()
        assert t.owner_start == process_start(os.getpid())
        with squatter() as proc:
            reuse_owner_pid(tmp_path / "u.sqlite", "A", proc.pid)
            t = tracker.get_asset("A")
            assert t.owner_pid == proc.pid and not t.owner_alive
            assert tracker._execute(ops.claim("A")) is None  # a reused pid holds nothing


def test_a_version_1_tracker_is_migrated_and_its_owners_judged_by_pid(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executescript(schema.MIGRATIONS[0])
        conn.execute(
            "INSERT INTO assets (asset_id, asset_type, state, created_at, updated_at, owner_pid)"
            " VALUES ('A', 'c', 'uploading', 0, 0, ?)",
            (os.getpid(),),
        )
        conn.execute("PRAGMA user_version = 1")
        conn.commit()
    with squatter() as proc, UploadTracker(path) as tracker:
        assert tracker._conn.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
        with contextlib.closing(sqlite3.connect(path)) as conn, conn:
            conn.execute("UPDATE assets SET owner_pid = ?", (proc.pid,))
        t = tracker.get_asset("A")
        assert t.owner_start is None and t.owner_alive  # pid only: it runs, it owns
