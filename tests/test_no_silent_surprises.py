"""What the operator is told is what happens: a refused force-finalize changes nothing, and
leaving a Chronicle with uploads unfinished says so, with the way to resume them."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from helpers import CEILING, make_checkpoint, tree_digest, wait_until

from methodic import AssetIncompleteError, AsyncChronicle, Chronicle, UploadTracker

MiB = 1 << 20


def test_a_refused_force_finalize_leaves_the_asset_as_it_was(server, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", {"a.bin": 3 * MiB, "b.bin": 1000})
    tracker = UploadTracker(tmp_path / "u.sqlite")
    with Chronicle(
        server.url, server.api_key, max_upload_workers=1, max_bandwidth="1MB"
    ) as chronicle:
        run = chronicle.run(chronicle.create_experiment("truth"), 0, 0)
        handle = run.register_and_upload_async(ckpt, upload_tracker=tracker)
        wait_until(lambda: chronicle.snapshot().bytes_done > 0, what="bytes sent")
        before = chronicle.snapshot().bytes_done
        with pytest.raises(AssetIncompleteError) as info:
            chronicle.force_finalize(handle.asset_id)
        assert "a.bin" in info.value.missing  # the server's answer: what is missing
        (a,) = chronicle.snapshot().assets
        assert a.state == "uploading", a.state
        assert tracker.get_asset(handle.asset_id).state == "uploading"
        assert chronicle.snapshot().bytes_done >= before  # progress not reset
        # The transfer was never stopped: the upload finishes by itself, byte-identical.
        assert handle.result(timeout=CEILING).state == "finalized"
        dest = run.download_asset(handle.asset_id, tmp_path / "dl")
    assert tree_digest(dest) == tree_digest(ckpt)
    assert tracker.get_asset(handle.asset_id).state == "finalized"


def test_leaving_a_chronicle_with_uploads_unfinished_says_how_to_resume(
    server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", {"a.bin": 4 * MiB})
    tracker_path = tmp_path / "u.sqlite"
    caplog.set_level(logging.WARNING, logger="methodic")
    with (
        UploadTracker(tracker_path) as tracker,
        Chronicle(server.url, server.api_key, max_bandwidth="500KB") as chronicle,
    ):
        run = chronicle.run(chronicle.create_experiment("truth"), 0, 0)
        run.register_and_upload_async(ckpt, upload_tracker=tracker)
        wait_until(lambda: chronicle.snapshot().bytes_done > 0, what="bytes sent")
    (record,) = [r for r in caplog.records if "unfinished" in r.getMessage()]
    text = record.getMessage()
    assert record.levelno == logging.WARNING
    assert "1 upload unfinished" in text
    assert f"methodic-tui resume --tracker {tracker_path}" in text
    assert "drain_incomplete_uploads" in text


def test_leaving_an_async_chronicle_unfinished_warns_too(
    server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", {"a.bin": 4 * MiB})
    caplog.set_level(logging.WARNING, logger="methodic")

    async def main() -> None:
        with UploadTracker(tmp_path / "u.sqlite") as tracker:
            async with AsyncChronicle(
                server.url, server.api_key, max_bandwidth="500KB"
            ) as chronicle:
                run = await chronicle.run(await chronicle.create_experiment("truth"), 0, 0)
                await run.register_and_upload_async(ckpt, upload_tracker=tracker)
                while (await chronicle.snapshot()).bytes_done == 0:
                    await asyncio.sleep(0.02)

    asyncio.run(asyncio.wait_for(main(), CEILING))
    assert any("1 upload unfinished" in r.getMessage() for r in caplog.records)


def test_leaving_with_everything_finalized_says_nothing(
    server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", {"a.bin": 1000})
    caplog.set_level(logging.WARNING, logger="methodic")
    with (
        UploadTracker(tmp_path / "u.sqlite") as tracker,
        Chronicle(server.url, server.api_key) as chronicle,
    ):
        run = chronicle.run(chronicle.create_experiment("truth"), 0, 0)
        run.register_and_upload_async(ckpt, upload_tracker=tracker)
        run.wait_for_uploads()
    assert not [r for r in caplog.records if "unfinished" in r.getMessage()]
