"""The tracker under abuse (issue item 4): a full disk, a close mid-upload, a deleted file."""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import make_checkpoint, tree_digest

from methodic import (
    Chronicle,
    RetryPolicy,
    TrackerError,
    UploadFailedError,
    UploadTracker,
    drain_incomplete_uploads,
)
from methodic.server import EmbeddedServer

MiB = 1 << 20
FAST_RETRY = RetryPolicy(max_attempts=6, base=0.05, cap=0.5)
CEILING = 120.0  # only to fail a hung test


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + CEILING
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.01)


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs of our own, to fill up (the suite runs as root); always unmounted."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


def unhandled(records: list[logging.LogRecord]) -> list[str]:
    return [
        r.getMessage()
        for r in records
        if r.name == "asyncio" or "never retrieved" in r.getMessage() or r.exc_info
    ]


def test_a_full_tracker_disk_does_not_fail_an_asset_the_server_finalized(
    server: EmbeddedServer, tiny_fs: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    ckpt = make_checkpoint(tmp_path / "ckpt", {f"s{i}.bin": 300_000 for i in range(4)})
    db = tiny_fs / "u.sqlite"
    tracker = UploadTracker(db)
    assert server.url is not None and server.api_key is not None
    with Chronicle(
        server.url, server.api_key, max_upload_workers=2, max_bandwidth="1MB", retry=FAST_RETRY
    ) as chronicle:
        run = chronicle.run(chronicle.create_experiment("full"), 0, 0)
        handle = run.register_and_upload_async(ckpt, upload_tracker=tracker)
        filler = fill(tiny_fs)  # every tracker write from here on fails: disk full
        asset = handle.result(timeout=CEILING)
        assert asset.asset_id == handle.asset_id and asset.state == "finalized"
        dest = run.download_asset(handle.asset_id, tmp_path / "dl")
    gc.collect()
    assert tree_digest(dest) == tree_digest(ckpt)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("tracker could not record" in w and str(db) in w for w in warnings), warnings
    assert unhandled(caplog.records) == []
    # The next process fixes the row up from the server, without sending a byte.
    filler.unlink()
    with Chronicle(server.url, server.api_key) as chronicle:
        report = drain_incomplete_uploads(chronicle, tracker)
    assert report.ok and report.already_finalized == [handle.asset_id]
    assert report.bytes_resent == 0
    tracked = tracker.get_asset(handle.asset_id)
    assert tracked is not None and tracked.state == "finalized"


def test_closing_a_chronicle_mid_upload_keeps_the_tracker_consistent(
    server: EmbeddedServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    assert server.url is not None and server.api_key is not None
    ckpt = make_checkpoint(tmp_path / "ckpt", {f"s{i:02}.bin": 40_000 + i for i in range(40)})
    for i in range(30):
        tracker = UploadTracker(tmp_path / f"u{i}.sqlite")
        with Chronicle(server.url, server.api_key, max_upload_workers=8) as chronicle:
            run = chronicle.run(chronicle.create_experiment("close"), 0, i)
            handle = run.register_and_upload_async(ckpt, upload_tracker=tracker)
            # Close at a different point of the upload each time.
            threshold = (i % 10) * 100_000
            wait_until(
                lambda c=chronicle, h=handle, t=threshold: c.snapshot().bytes_done > t or h.done(),
                "some bytes sent",
            )
        problems = [
            r.getMessage()
            for r in caplog.records
            if r.levelno >= logging.WARNING
            and r.name.startswith("methodic")
            # Closing mid-upload says so on purpose (how many, and how to resume them).
            and not r.getMessage().startswith("closing with ")
        ]
        assert problems == [], f"iteration {i}: {problems}"
        tracked = tracker.get_asset(handle.asset_id)
        assert tracked is not None and tracked.state not in ("failed", "discarded")
        for c in tracked.components:
            assert 0 <= c.bytes_sent <= c.size
            assert c.state != "completed" or c.bytes_sent == c.size
        with Chronicle(server.url, server.api_key) as chronicle:
            report = drain_incomplete_uploads(chronicle, tracker)
            assert report.ok, report.failed
            run = chronicle.run(chronicle.create_experiment("close"), 0, i)
            dest = run.download_asset(handle.asset_id, tmp_path / f"dl{i}")
        assert tree_digest(dest) == tree_digest(ckpt)
        assert tracker.get_asset(handle.asset_id).state == "finalized"  # type: ignore[union-attr]
        tracker.close()
    assert unhandled(caplog.records) == []


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_tracker_deleted_mid_upload_fails_the_upload_loudly(
    server: EmbeddedServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    caplog.set_level(logging.WARNING)
    assert server.url is not None and server.api_key is not None
    ckpt = make_checkpoint(tmp_path / "ckpt", {f"s{i}.bin": 1 * MiB for i in range(16)})
    db = tmp_path / "u.sqlite"
    tracker = UploadTracker(db)
    with Chronicle(
        server.url, server.api_key, max_upload_workers=2, max_bandwidth="1MB"
    ) as chronicle:
        run = chronicle.run(chronicle.create_experiment("deleted"), 0, 0)
        handle = run.register_and_upload_async(ckpt, upload_tracker=tracker)
        wait_until(lambda: chronicle.snapshot().bytes_done > 0, "upload started")
        if how == "deleted":
            os.unlink(db)
        else:
            UploadTracker(tmp_path / "other.sqlite").close()
            os.replace(tmp_path / "other.sqlite", db)
        with pytest.raises(UploadFailedError) as info:
            handle.result(timeout=CEILING)
        sent_at_failure = chronicle.snapshot().bytes_done
    assert isinstance(info.value.cause, TrackerError)
    assert str(db) in str(info.value) and "removed or replaced" in str(info.value)
    assert sent_at_failure < 16 * MiB  # it stopped, it did not upload into an unlinked file
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("removed or replaced" in w for w in warnings), warnings


async def test_a_tracker_operation_cancelled_mid_transaction_leaves_no_transaction_open(
    tmp_path: Path,
) -> None:
    """The root of the close race: a task cancelled while aiosqlite runs its BEGIN."""
    import asyncio

    from methodic import ComponentSpec
    from methodic import _tracker_ops as ops
    from methodic._tracker import AsyncTracker

    f = tmp_path / "f.bin"
    f.write_bytes(b"x")
    UploadTracker(tmp_path / "u.sqlite").register_components(
        "a", [ComponentSpec("f.bin", f, 1)], asset_type="checkpoint"
    )
    tracker = await AsyncTracker(tmp_path / "u.sqlite").open()
    try:
        for i in range(300):
            task = asyncio.create_task(tracker.run(ops.set_asset_state("a", "uploading")))
            for _ in range(i % 7):
                await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await tracker.run(ops.list_assets(None))  # raised "within a transaction" before
    finally:
        await tracker.close()
