"""Restore (issue #16): downloads that always finish or say why, verified and resumable.

Faults are injected on the data path by the FaultProxy in front of the blob listener (local)
or moto (S3); bytes served are counted there, at the server's side of the wire.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import CEILING, make_checkpoint, subprocess_env, tree_digest, wait_until

from methodic import Chronicle, DownloadError, InvalidInputError, RetryPolicy

MiB = 1 << 20
FAST_RETRY = RetryPolicy(max_attempts=6, base=0.05, cap=0.5)
SIDE = ".methodic-download"


def fresh_run(chronicle: Chronicle, name: str = "restore"):
    return chronicle.run(chronicle.create_experiment(name), 0, 0)


def chronicle_for(srv, url: str | None = None, **kw) -> Chronicle:
    kw.setdefault("retry", FAST_RETRY)
    kw.setdefault("part_threshold", 8 * MiB)
    kw.setdefault("part_size", 5 * MiB)
    return Chronicle(url or srv.url, srv.api_key, **kw)


def upload(chronicle: Chronicle, ckpt: Path, asset_type: str = "checkpoint", run=None) -> str:
    run = run or fresh_run(chronicle)
    handle = run.register_and_upload_async(ckpt, asset_type=asset_type)
    handle.result(timeout=CEILING)
    return str(handle.asset_id)


def final_files(dest: Path) -> dict[str, str]:
    """The files under their final names (the side directory is not the checkpoint)."""
    return {k: v for k, v in tree_digest(dest).items() if not k.startswith(SIDE + "/")}


@pytest.mark.parametrize("path", ["threads", "httpx"])
def test_cuts_503_429_and_stalls_end_byte_identical(
    any_server, any_proxy, tmp_path: Path, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if path == "httpx":  # what an https:// or proxied URL takes
        monkeypatch.setattr("methodic._download_fetch.direct", lambda url: False)
    ckpt = make_checkpoint(
        tmp_path / "ckpt",
        {"big.bin": 23 * MiB, **{f"rank{i}/shard.bin": 1 * MiB + i for i in range(5)}},
    )
    with chronicle_for(any_server, max_upload_workers=3, stall_timeout=2.0) as chronicle:
        asset_id = upload(chronicle, ckpt)
        fired = any_proxy.faults_fired
        any_proxy.cut_down_after(700_000, connections=2)
        any_proxy.answer(503, retry_after=0)
        any_proxy.answer(429, retry_after=0)
        any_proxy.stall_down(30.0, after=300_000)  # only the stall timeout ends it
        sub = chronicle.subscribe()
        dest = fresh_run(chronicle).download_asset(asset_id, tmp_path / "dl")
        retries = [e for e in sub.get_nowait() if e.kind == "RetryScheduled"]
    assert any_proxy.faults_fired - fired == 5
    assert len(retries) >= 5, retries
    assert tree_digest(dest) == tree_digest(ckpt)  # nothing else left behind (no side dir)


def test_tampered_bytes_are_refused_and_nothing_is_left_under_the_final_name(
    any_server, any_proxy, tmp_path: Path
) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", {"a.bin": 3 * MiB, "b.bin": 2 * MiB})
    with chronicle_for(any_server) as chronicle:
        asset_id = upload(chronicle, ckpt)
        run = fresh_run(chronicle)
        any_proxy.corrupt_down(after=1 * MiB)
        with pytest.raises(DownloadError) as caught:
            run.download_asset(asset_id, tmp_path / "dl")
        err = caught.value
        assert err.cause == "corrupt" and err.path in ("a.bin", "b.bin")
        assert err.path in str(err) and "corrupt" in str(err)
        left = final_files(tmp_path / "dl")
        assert err.path not in left  # never an unverified file under its final name
        assert all(left[k] == v for k, v in tree_digest(ckpt).items() if k in left)
        # The damaged file left no partial; a second call fetches it and finishes.
        dest = run.download_asset(asset_id, tmp_path / "dl")
    assert tree_digest(dest) == tree_digest(ckpt)


_CHILD = """
import sys
from methodic import Chronicle
url, key, asset_id, dest = sys.argv[1:5]
with Chronicle(url, key, max_upload_workers=2, max_bandwidth="6MB") as c:
    run = c.run(c.create_experiment("child"), 0, 0)
    run.download_asset(asset_id, dest)
print("finished", flush=True)
"""


def _verified_on_disk(dest: Path, sizes: dict[str, int]) -> int:
    """Bytes a second call may keep: files under their final names, and recorded ranges."""
    import json

    kept = sum(sizes[k] for k in final_files(dest))
    side = dest / SIDE
    for record in side.glob("*.r") if side.is_dir() else []:
        ranges = json.loads(record.read_text())["ranges"]
        kept += len(ranges) * 5 * MiB  # every recorded range but a file's last is a full part
    return kept


@pytest.mark.parametrize("storage_backend", ["local"])
def test_sigkill_mid_download_then_again_fetches_only_what_is_missing(
    any_server, any_proxy, tmp_path: Path
) -> None:
    sizes = {**{f"a{i}.bin": 2 * MiB for i in range(4)}, "big.bin": 30 * MiB}
    ckpt = make_checkpoint(tmp_path / "ckpt", sizes)
    dest = tmp_path / "dl"
    with chronicle_for(any_server) as chronicle:
        asset_id = upload(chronicle, ckpt)
        served0 = any_proxy.bytes_down
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, any_server.url, any_server.api_key, asset_id, str(dest)],
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            wait_until(
                lambda: final_files(dest) and list((dest / SIDE).glob("*.r")),
                what="a file finished and a range recorded",
            )
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        served_first = any_proxy.bytes_down - served0
        kept = _verified_on_disk(dest, sizes)
        total = sum(sizes.values())
        assert 0 < kept < total
        before = any_proxy.bytes_down
        fresh_run(chronicle).download_asset(asset_id, dest)
        served_again = any_proxy.bytes_down - before
    assert tree_digest(dest) == tree_digest(ckpt)
    # Only what was missing crossed the wire again (plus response heads).
    assert served_again <= total - kept + 64 * 1024, (served_again, total, kept)
    assert served_first + served_again < total + 12 * MiB  # never the whole asset twice


def test_a_full_disk_says_so_and_a_second_call_finishes(
    server, small_disk: Path, tmp_path: Path
) -> None:
    sizes = {"big.bin": 11 * MiB, "a.bin": 1 * MiB, "b.bin": 1 * MiB}
    ckpt = make_checkpoint(tmp_path / "ckpt", sizes)
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (6 * MiB))  # 10 MiB left for 13 MiB
    dest = small_disk / "restore"
    with chronicle_for(server) as chronicle:
        asset_id = upload(chronicle, ckpt)
        run = fresh_run(chronicle)
        with pytest.raises(DownloadError) as caught:
            run.download_asset(asset_id, dest)
        err = caught.value
        assert err.cause == "disk_full", err
        assert "disk full" in str(err) and str(err.path) in str(err) and str(dest) in str(err)
        left = final_files(dest)
        assert all(left[k] == v for k, v in tree_digest(ckpt).items() if k in left)
        filler.unlink()
        run.download_asset(asset_id, dest)
    assert tree_digest(dest) == tree_digest(ckpt)


def test_names_of_255_bytes_in_ranges_and_directories(server, tmp_path: Path) -> None:
    long = "n" * 251 + ".bin"
    nested = "d" * 255 + "/" + "é" * 127 + "x"  # 255 bytes in UTF-8
    ckpt = make_checkpoint(tmp_path / "ckpt", {long: 12 * MiB, nested: 1000})
    with chronicle_for(server) as chronicle:
        asset_id = upload(chronicle, ckpt)
        dest = fresh_run(chronicle).download_asset(asset_id, tmp_path / "dl")
    assert tree_digest(dest) == tree_digest(ckpt)


def test_latest_follows_finalize_and_asset_type(server, tmp_path: Path) -> None:
    with chronicle_for(server) as chronicle:
        run = fresh_run(chronicle)
        assert run.latest() is None
        first = upload(chronicle, make_checkpoint(tmp_path / "c1", {"a": 10}), run=run)
        second = upload(chronicle, make_checkpoint(tmp_path / "c2", {"a": 20}), run=run)
        log = upload(chronicle, make_checkpoint(tmp_path / "l", {"x": 5}), "log", run=run)
        # A pending checkpoint (created, never finalized) is never the latest.
        from methodic import ComponentSpec

        run.create_asset_presigned("checkpoint", [ComponentSpec("p", str(tmp_path / "c1/a"), 10)])
        assert first != second
        latest = run.latest("checkpoint")
        assert latest is not None and latest.asset_id == second
        newest = run.latest()
        assert newest is not None and newest.asset_id == log
        assert run.latest("nothing-of-this-type") is None


def test_a_subset_by_glob_into_a_directory_holding_part_of_it(
    any_server, any_proxy, tmp_path: Path
) -> None:
    sizes = {f"__{r}_{s}.distcp": 1 * MiB + 7 * r + s for r in range(3) for s in range(2)}
    sizes[".metadata"] = 1234
    ckpt = make_checkpoint(tmp_path / "ckpt", sizes)
    dest = tmp_path / "dl"
    dest.mkdir()
    # Already here: one file with the right bytes (kept, not fetched), one with wrong bytes.
    (dest / "__1_0.distcp").write_bytes((ckpt / "__1_0.distcp").read_bytes())
    (dest / "__1_1.distcp").write_bytes(b"stale bytes of an older checkpoint")
    with chronicle_for(any_server) as chronicle:
        asset_id = upload(chronicle, ckpt)
        run = fresh_run(chronicle)
        before = any_proxy.bytes_down
        run.download_asset(asset_id, dest, include=["__1_*", ".metadata"])
        served = any_proxy.bytes_down - before
        with pytest.raises(InvalidInputError, match="no component"):
            run.download_asset(asset_id, tmp_path / "none", include="__9_*")
    want = {k: v for k, v in tree_digest(ckpt).items() if k.startswith("__1_") or k == ".metadata"}
    assert tree_digest(dest) == want
    assert served < sizes["__1_1.distcp"] + sizes[".metadata"] + 64 * 1024  # __1_0 was kept
    assert not (tmp_path / "none").exists() or not any((tmp_path / "none").iterdir())


def test_the_cap_is_shared_and_a_download_shows_in_the_pool_snapshot(
    server, tmp_path: Path
) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", {"a.bin": 3 * MiB})
    with chronicle_for(server) as chronicle:
        asset_id = upload(chronicle, ckpt)
        run = fresh_run(chronicle)
        chronicle.set_bandwidth("1MB")
        handle = chronicle._loop.submit(run.core.download_asset(asset_id, tmp_path / "dl"))
        snap = wait_until(
            lambda: [
                a
                for a in chronicle.snapshot(with_components=True).assets
                if a.asset_id == f"download:{asset_id}"
                and a.state == "downloading"
                and a.bytes_done
            ],
            what="the download in the snapshot",
        )[0]
        assert snap.asset_type == "download" and snap.local_dir == str(tmp_path / "dl")
        assert [c.path for c in snap.components] == ["a.bin"]
        row = snap.asset_id  # the asset is also this pool's upload: the row id tells them apart
        assert chronicle.pause(row) == [asset_id]
        assert chronicle.resume(row) == [asset_id]
        chronicle.set_bandwidth(None)
        handle.result(CEILING)
        done = next(a for a in chronicle.snapshot().assets if a.asset_id == row)
        assert done.state == "downloaded" and done.bytes_done == done.bytes_total == 3 * MiB
    assert tree_digest(tmp_path / "dl") == tree_digest(ckpt)
    assert os.path.getsize(tmp_path / "dl" / "a.bin") == 3 * MiB


def test_a_cancelled_download_says_so_and_the_next_call_finishes(server, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", {"a.bin": 12 * MiB, "b.bin": 1000})
    with chronicle_for(server, max_bandwidth="2MB") as chronicle:
        asset_id = upload(chronicle, ckpt)
        chronicle.set_bandwidth("2MB")
        run = fresh_run(chronicle)
        handle = chronicle._loop.submit(run.core.download_asset(asset_id, tmp_path / "dl"))
        row = f"download:{asset_id}"
        wait_until(
            lambda: any(
                a.asset_id == row and a.bytes_done > 6 * MiB for a in chronicle.snapshot().assets
            ),
            what="part of the download",
        )
        chronicle.discard(row)  # the dashboard's "cancel": the server's asset is untouched
        with pytest.raises(DownloadError) as caught:
            handle.result(CEILING)
        assert caught.value.cause == "cancelled" and "cancelled" in str(caught.value)
        snap = next(a for a in chronicle.snapshot().assets if a.asset_id == row)
        assert snap.state == "cancelled"
        assert "a.bin" not in final_files(tmp_path / "dl")
        chronicle.set_bandwidth(None)
        run.download_asset(asset_id, tmp_path / "dl")
    assert tree_digest(tmp_path / "dl") == tree_digest(ckpt)


def test_expired_get_urls_are_presigned_again(tmp_path: Path) -> None:
    from methodic.server import EmbeddedServer

    ckpt = make_checkpoint(tmp_path / "ckpt", {f"f{i}.bin": 300_000 for i in range(6)})
    with (
        EmbeddedServer(tmp_path / "srv", presign_ttl=1.0) as srv,
        chronicle_for(srv, max_upload_workers=1) as chronicle,
    ):
        asset_id = upload(chronicle, ckpt)
        chronicle.set_bandwidth("400KB")  # ~4 s of transfers with 1 s URLs
        sub = chronicle.subscribe()
        dest = fresh_run(chronicle).download_asset(asset_id, tmp_path / "dl")
        causes = [e.cause for e in sub.get_nowait() if e.kind == "RetryScheduled"]
    assert tree_digest(dest) == tree_digest(ckpt)
    assert any("expired" in c for c in causes), causes


def test_a_finished_download_is_on_disk_files_and_their_directories_fsynced(
    server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from methodic._download_state import short_name

    ckpt = make_checkpoint(tmp_path / "ckpt", {"a.bin": 12 * MiB, "sub/deep/b.bin": 1000})
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    with chronicle_for(server) as chronicle:
        asset_id = upload(chronicle, ckpt)
        monkeypatch.setattr(os, "fsync", recording_fsync)
        dest = fresh_run(chronicle).download_asset(asset_id, tmp_path / "dl")
    assert tree_digest(dest) == tree_digest(ckpt)
    side = dest / SIDE
    # each file's bytes were synced under its partial name, i.e. before its rename
    for path in ("a.bin", "sub/deep/b.bin"):
        assert str(side / short_name(path)) in synced, synced
    for d in (dest, dest / "sub", dest / "sub" / "deep"):
        assert str(d) in synced, synced
