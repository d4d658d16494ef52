"""Crash recovery proven by killing real processes: the uploader, and the server."""

from __future__ import annotations

import contextlib
import random
import signal
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    CEILING,
    claim_in_child,
    free_port,
    make_checkpoint,
    start_serve,
    stop_process,
    subprocess_env,
    tree_digest,
    wait_until,
)
from killharness import Api, counted_server, kill_round

from methodic import Chronicle, RetryPolicy, UploadTracker, drain_incomplete_uploads

ROUNDS = 20
# Spread kills over start-up, registration, transfers (mid-part) and finalize; seeded, so a
# failing round can be replayed with the same instant.
KILL_TIMES = [round(0.2 + 3.0 * random.Random(i).random(), 3) for i in range(ROUNDS)]


def uploading(chronicle: Chronicle, *asset_ids: str) -> bool:
    """Every one of these assets registered on the server and its transfers started."""
    states = {a.asset_id: a.state for a in chronicle.snapshot().assets}
    return all(states.get(a) == "uploading" for a in asset_ids)


@pytest.mark.parametrize("round_no", range(ROUNDS))
def test_sigkill_at_any_instant_then_drain(tmp_path: Path, round_no: int) -> None:
    with counted_server(tmp_path / "server") as (srv, proxy):
        result = kill_round(
            tmp_path, srv.url, srv.url, srv.api_key, KILL_TIMES[round_no], proxy, seed=round_no
        )
    if result.finished_before_kill:
        assert result.resent == 0


def test_drain_of_an_asset_the_server_already_finalized_sends_nothing(
    server, tmp_path: Path
) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", {"a": 1000, "b": 2000})
    tracker = UploadTracker(tmp_path / "u.sqlite")
    with Chronicle(server.url, server.api_key) as chronicle:
        run = chronicle.run(chronicle.create_experiment("x"), 0, 0)
        handle = run.register_and_upload_async(ckpt, upload_tracker=tracker)
        handle.result(timeout=CEILING)
    # As if the process died after the server finalized but before the tracker heard of it.
    from methodic import _tracker_ops as ops

    tracker._execute(ops.set_asset_state(handle.asset_id, "finalizing"))
    with Chronicle(server.url, server.api_key) as chronicle:
        report = drain_incomplete_uploads(chronicle, tracker)
    assert report.already_finalized == [handle.asset_id]
    assert report.bytes_resent == 0
    assert tracker.get_asset(handle.asset_id).state == "finalized"


def test_drain_with_a_vanished_file_fails_that_asset_only(server, tmp_path: Path) -> None:
    good = make_checkpoint(tmp_path / "good", {"a": 500_000})
    bad = make_checkpoint(tmp_path / "bad", {"a": 500_000, "gone.bin": 400_000})
    tracker = UploadTracker(tmp_path / "u.sqlite")
    with Chronicle(server.url, server.api_key, max_bandwidth="1KB") as chronicle:
        run = chronicle.run(chronicle.create_experiment("x"), 0, 0)
        h_good = run.register_and_upload_async(good, upload_tracker=tracker)
        h_bad = run.register_and_upload_async(bad, upload_tracker=tracker)
        wait_until(lambda: uploading(chronicle, h_good.asset_id, h_bad.asset_id))
    (bad / "gone.bin").unlink()
    with Chronicle(server.url, server.api_key) as chronicle:
        report = drain_incomplete_uploads(chronicle, tracker)
        assert report.finalized == [h_good.asset_id]
        assert list(report.failed) == [h_bad.asset_id]
        assert "gone.bin" in report.failed[h_bad.asset_id]
        run = chronicle.run(chronicle.create_experiment("x"), 0, 0)
        assert [a.asset_id for a in run.list_assets()] == [h_good.asset_id]
    failed = tracker.get_asset(h_bad.asset_id)
    assert failed.state == "failed" and "vanished" in (failed.last_error or "")


def left_uploading(server, tmp_path: Path) -> tuple[Path, UploadTracker, str]:
    """An asset whose earlier process stopped mid-upload: created on the server, state
    ``uploading`` in the tracker, part of it stored."""
    ckpt = make_checkpoint(tmp_path / "ckpt", {f"f{i}.bin": 20_000 for i in range(20)})
    tracker = UploadTracker(tmp_path / "u.sqlite")
    with Chronicle(server.url, server.api_key, max_bandwidth="100KB") as chronicle:
        run = chronicle.run(chronicle.create_experiment("x"), 0, 0)
        handle = run.register_and_upload_async(ckpt, upload_tracker=tracker)
        wait_until(lambda: uploading(chronicle, handle.asset_id), what="uploading")
        wait_until(lambda: chronicle.snapshot().bytes_done >= 40_000, what="two files sent")
    assert tracker.get_asset(handle.asset_id).state == "uploading"
    return ckpt, tracker, handle.asset_id


def counting_creates(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    from methodic._api import ApiClient

    created: list[str] = []
    create = ApiClient.create_asset

    async def counted(self: ApiClient, run_id: str, **kw: Any) -> Any:
        created.append(kw["asset_id"])
        return await create(self, run_id, **kw)

    monkeypatch.setattr(ApiClient, "create_asset", counted)
    return created


def drained_and_downloaded(server, tracker: UploadTracker, asset_id: str, dest: Path) -> Path:
    with Chronicle(server.url, server.api_key) as chronicle:
        report = drain_incomplete_uploads(chronicle, tracker)
        assert report.finalized == [asset_id], report
        run = chronicle.run(chronicle.create_experiment("x"), 0, 0)
        return run.download_asset(asset_id, dest)


def test_a_resumed_asset_the_server_has_is_read_not_created_again(
    server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At 100,000 components the create of the whole manifest costs seconds of a resume."""
    ckpt, tracker, asset_id = left_uploading(server, tmp_path)
    created = counting_creates(monkeypatch)
    dest = drained_and_downloaded(server, tracker, asset_id, tmp_path / "dl")
    assert created == []
    assert tree_digest(dest) == tree_digest(ckpt)


def test_a_resumed_asset_the_server_no_longer_has_is_created_again(
    server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt, tracker, asset_id = left_uploading(server, tmp_path)
    Api(server.url, server.api_key).client.delete(f"/assets/{asset_id}").raise_for_status()
    created = counting_creates(monkeypatch)
    dest = drained_and_downloaded(server, tracker, asset_id, tmp_path / "dl")
    assert created == [asset_id]
    assert tree_digest(dest) == tree_digest(ckpt)


@pytest.mark.parametrize("change", ["size = size + 1", f"sha256 = '{'ab' * 32}'"])
def test_a_resumed_asset_whose_server_manifest_differs_fails_with_what_to_do(
    server, tmp_path: Path, change: str
) -> None:
    """As a create of another manifest under the same id would be refused: nothing published.
    Another size, or a declared sha256 the server's manifest does not have."""
    _ckpt, tracker, asset_id = left_uploading(server, tmp_path)
    with contextlib.closing(sqlite3.connect(tracker.db_path, timeout=60)) as conn, conn:
        # The tracker's manifest is no longer the server's.
        conn.execute(f"UPDATE components SET {change} WHERE path = 'f0.bin'")
    with Chronicle(server.url, server.api_key) as chronicle:
        report = drain_incomplete_uploads(chronicle, tracker)
    assert report.finalized == [] and list(report.failed) == [asset_id]
    why = report.failed[asset_id]
    assert "another manifest" in why and f"methodic-tui discard {asset_id}" in why
    pending = Api(server.url, server.api_key).client.get(f"/assets/{asset_id}").json()
    assert pending["state"] == "pending"


def test_drain_leaves_assets_a_live_process_owns_and_claims_the_others(
    server, tmp_path: Path
) -> None:
    import os

    owned_dir = make_checkpoint(tmp_path / "owned", {"a": 300_000})
    orphan_dir = make_checkpoint(tmp_path / "orphan", {"a": 300_000})
    tracker_path = tmp_path / "u.sqlite"
    tracker = UploadTracker(tracker_path)
    with Chronicle(server.url, server.api_key, max_bandwidth="1KB") as chronicle:
        run = chronicle.run(chronicle.create_experiment("x"), 0, 0)
        owned = run.register_and_upload_async(owned_dir, upload_tracker=tracker).asset_id
        orphan = run.register_and_upload_async(orphan_dir, upload_tracker=tracker).asset_id
        wait_until(lambda: uploading(chronicle, owned, orphan))
    dead = claim_in_child(tracker_path, orphan, hold=False)  # claimed, then died
    live = claim_in_child(tracker_path, owned, hold=True)  # claimed, still running
    try:
        assert tracker.get_asset(orphan).owner_pid == dead.pid
        with Chronicle(server.url, server.api_key) as chronicle:
            report = drain_incomplete_uploads(chronicle, tracker)
        assert report.resumed == [orphan] and report.finalized == [orphan]
        assert f"pid {live.pid} is still running" in report.skipped[owned]
        left = tracker.get_asset(owned)
        assert left.state != "finalized" and left.owner_pid == live.pid
        taken = tracker.get_asset(orphan)
        assert taken.state == "finalized" and taken.owner_pid == os.getpid()
    finally:
        live.kill()
        live.wait(CEILING)
    # Once its owner is gone, the next drain takes it.
    with Chronicle(server.url, server.api_key) as chronicle:
        report = drain_incomplete_uploads(chronicle, tracker)
    assert report.finalized == [owned] and report.skipped == {}
    assert tracker.get_asset(owned).owner_pid == os.getpid()


def test_an_owner_killed_but_not_yet_reaped_does_not_hold_its_uploads(
    server, tmp_path: Path
) -> None:
    """A SIGKILLed uploader is a zombie until its parent reaps it: it uploads nothing any more."""
    ckpt = make_checkpoint(tmp_path / "ckpt", {"a": 300_000})
    tracker_path = tmp_path / "u.sqlite"
    tracker = UploadTracker(tracker_path)
    with Chronicle(server.url, server.api_key, max_bandwidth="1KB") as chronicle:
        run = chronicle.run(chronicle.create_experiment("x"), 0, 0)
        asset_id = run.register_and_upload_async(ckpt, upload_tracker=tracker).asset_id
        wait_until(lambda: uploading(chronicle, asset_id))
    owner = claim_in_child(tracker_path, asset_id, hold=True)
    owner.kill()  # not waited for: a zombie, as after `kill -9` under a supervisor that is slow to reap
    try:
        wait_until(
            lambda: Path(f"/proc/{owner.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z",
            what="the killed owner a zombie",
        )
        with Chronicle(server.url, server.api_key) as chronicle:
            report = drain_incomplete_uploads(chronicle, tracker)
        assert report.skipped == {} and report.finalized == [asset_id]
    finally:
        owner.wait(CEILING)


def test_server_sigkilled_mid_upload_and_restarted_the_uploader_finishes(tmp_path: Path) -> None:
    data_dir, port = tmp_path / "served", free_port()
    proc, url = start_serve(data_dir, port=port)
    try:
        key = (data_dir / "api_key").read_text().strip()
        ckpt = make_checkpoint(tmp_path / "ckpt", {f"s{i}.bin": 1_500_000 for i in range(8)})
        tracker = UploadTracker(tmp_path / "u.sqlite")
        with Chronicle(
            url,
            key,
            max_upload_workers=2,
            max_bandwidth="4MB",
            # Retries for longer than a restart takes on a loaded machine (~4 min).
            retry=RetryPolicy(max_attempts=500, base=0.1, cap=0.5),
        ) as chronicle:
            run = chronicle.run(chronicle.create_experiment("server-kill"), 0, 0)
            handle = run.register_and_upload_async(ckpt, upload_tracker=tracker)
            # Mid-upload: bytes are flowing (12 MB at 4 MB/s: seconds more to go).
            wait_until(lambda: chronicle.snapshot().bytes_done > 1_000_000, what="1 MB sent")
            assert not handle.done()
            proc.send_signal(signal.SIGKILL)
            proc.wait(CEILING)
            proc, _ = start_serve(data_dir, port=port)
            asset = handle.result(timeout=CEILING)
            assert asset.state == "finalized"
            dest = run.download_asset(handle.asset_id, tmp_path / "dl")
        assert tree_digest(dest) == tree_digest(ckpt)
    finally:
        stop_process(proc)


PRODUCER = """
import sys
from pathlib import Path
from methodic import Chronicle, UploadTracker
url, key, tracker_path, base, n = sys.argv[1:6]
tracker = UploadTracker(Path(tracker_path))
with Chronicle(url, key, max_upload_workers=4) as chronicle:
    run = chronicle.run(chronicle.create_experiment("many-writers"), 1, 0)
    for i in range(int(n)):
        run.register_and_upload_async(Path(base) / f"ckpt-{i}", upload_tracker=tracker)
    run.wait_for_uploads()
"""


def test_many_producer_threads_and_processes_share_one_tracker(server, tmp_path: Path) -> None:
    import sys
    import threading

    tracker_path = tmp_path / "uploads.sqlite"
    tracker = UploadTracker(tracker_path)
    for p in range(2):
        for i in range(6):
            make_checkpoint(
                tmp_path / f"proc{p}" / f"ckpt-{i}",
                {f"f{j}": 20_000 + j for j in range(15)},
                seed=i,
            )
    for t in range(6):
        for i in range(4):
            make_checkpoint(
                tmp_path / f"thread{t}" / f"ckpt-{i}", {f"f{j}": 10_000 + j for j in range(10)}
            )
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                PRODUCER,
                server.url,
                server.api_key,
                str(tracker_path),
                str(tmp_path / f"proc{p}"),
                "6",
            ],
            env=subprocess_env(),
            stderr=subprocess.PIPE,
            text=True,
        )
        for p in range(2)
    ]
    errors: list[BaseException] = []
    with Chronicle(server.url, server.api_key, max_upload_workers=4) as chronicle:
        run = chronicle.run(chronicle.create_experiment("many-writers"), 0, 0)

        def produce(t: int) -> None:
            try:
                for i in range(4):
                    run.register_and_upload_async(
                        tmp_path / f"thread{t}" / f"ckpt-{i}", upload_tracker=tracker
                    )
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=produce, args=(t,)) for t in range(6)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        run.wait_for_uploads(timeout=CEILING)
        assert len(run.list_assets()) == 24
    for proc in procs:
        _, err = proc.communicate(timeout=CEILING)
        assert proc.returncode == 0, err
        assert "locked" not in err
    assert errors == []
    assets = tracker.list_assets()
    assert len(assets) == 24 + 12
    assert {a.state for a in assets} == {"finalized"}
    assert sorted(a.component_count for a in assets) == [10] * 24 + [15] * 12
