"""The integrity chain, end to end: a published checkpoint is exactly the bytes that were
registered (issue #12). Real servers on 127.0.0.1, real trackers, real files rewritten under
the uploader's feet, leaked URLs replayed with other bytes."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import CEILING, connect, make_checkpoint, sha256_file, wait_until
from tui_helpers import remote_args, tui_cmd, tui_env

from methodic import (
    Chronicle,
    ChronicleError,
    ComponentSpec,
    UploadFailedError,
    UploadTracker,
    drain_incomplete_uploads,
)
from methodic import _checksum as checksums
from methodic._api import ApiClient
from methodic.server import EmbeddedServer

MiB = 1 << 20
PARTED = dict(part_threshold=5 * MiB, part_size=5 * MiB)


def in_flight(chronicle: Chronicle, asset_id: str) -> bool:
    snap = chronicle.snapshot()
    return any(a.asset_id == asset_id and a.bytes_done > 0 for a in snap.assets)


def server_asset(server: EmbeddedServer, asset_id: str) -> dict[str, Any]:
    with connect(server) as api:
        reply = api.get(f"/api/v1/assets/{asset_id}")
        reply.raise_for_status()
        data: dict[str, Any] = reply.json()
        return data


def rewrite_same_size_keep_mtime(path: Path, offset: int = 0) -> None:
    """Change bytes of ``path`` in place, then put its mtime back (as a sneaky tool would)."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(4096)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in old))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_size == st.st_size


# ---------------------------------------------------------------- files that change


def test_a_file_rewritten_while_it_is_sent_is_never_published(
    server: EmbeddedServer, tmp_path: Path
) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", {"model.bin": 12 * MiB})
    tracker = UploadTracker(tmp_path / "u.sqlite")
    with Chronicle(server.url, server.api_key, max_bandwidth="2MB", **PARTED) as chronicle:
        run = chronicle.run(chronicle.create_experiment("x"), 0, 0)
        handle = run.register_and_upload_async(ckpt, upload_tracker=tracker)
        wait_until(lambda: in_flight(chronicle, handle.asset_id), what="the send to start")
        rewrite_same_size_keep_mtime(ckpt / "model.bin", 6 * MiB)  # in a part not yet sent
        with pytest.raises(UploadFailedError, match=r"model\.bin"):
            handle.result()
    assert server_asset(server, handle.asset_id)["state"] == "pending"
    # Nothing an operator can do afterwards publishes the torn file.
    with Chronicle(server.url, server.api_key, **PARTED) as chronicle:
        report = drain_incomplete_uploads(chronicle, tracker)
        assert handle.asset_id in report.failed and "model.bin" in report.failed[handle.asset_id]
        assert "changed" in report.failed[handle.asset_id]
        with pytest.raises(ChronicleError, match=r"model\.bin"):
            chronicle.force_finalize(handle.asset_id)
    assert server_asset(server, handle.asset_id)["state"] == "pending"


def test_a_same_size_rewrite_with_its_mtime_put_back_is_caught_after_a_crash(
    server: EmbeddedServer, tmp_path: Path
) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", {"model.bin": 12 * MiB, "meta.json": 300})
    tracker = UploadTracker(tmp_path / "u.sqlite")
    with Chronicle(server.url, server.api_key, max_bandwidth="4MB", **PARTED) as chronicle:
        run = chronicle.run(chronicle.create_experiment("x"), 0, 0)
        handle = run.register_and_upload_async(ckpt, upload_tracker=tracker)
        # Stop (as a crash would) once the server holds a part of the big file.
        wait_until(
            lambda: server_asset(server, handle.asset_id)["components"][1]["parts_stored"],
            what="a stored part",
        )
    rewrite_same_size_keep_mtime(ckpt / "model.bin", 0)  # the part the server already holds
    with Chronicle(server.url, server.api_key, **PARTED) as chronicle:
        report = drain_incomplete_uploads(chronicle, tracker)
    assert list(report.failed) == [handle.asset_id]
    assert "model.bin" in report.failed[handle.asset_id]
    assert "change time" in report.failed[handle.asset_id]
    assert server_asset(server, handle.asset_id)["state"] == "pending"
    assert tracker.get_asset(handle.asset_id).state == "failed"


def test_headless_resume_of_a_torn_file_exits_1_naming_it_and_publishes_nothing(
    server: EmbeddedServer, tmp_path: Path
) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", {"model.bin": 12 * MiB})
    tracker_path = tmp_path / "u.sqlite"
    with Chronicle(server.url, server.api_key, max_bandwidth="4MB", **PARTED) as chronicle:
        run = chronicle.run(chronicle.create_experiment("x"), 0, 0)
        handle = run.register_and_upload_async(ckpt, upload_tracker=UploadTracker(tracker_path))
        wait_until(
            lambda: server_asset(server, handle.asset_id)["components"][0]["parts_stored"],
            what="a stored part",
        )
    rewrite_same_size_keep_mtime(ckpt / "model.bin", 0)
    done = subprocess.run(
        tui_cmd("resume", "--no-ui", "--take-over", *remote_args(server, tracker_path)),
        capture_output=True,
        text=True,
        timeout=CEILING,
        env=tui_env(tmp_path),
        cwd=tmp_path,
    )
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "model.bin" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert server_asset(server, handle.asset_id)["state"] == "pending"


def test_a_declared_checksum_that_is_wrong_fails_before_a_byte_is_sent(
    server: EmbeddedServer, tmp_path: Path
) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(os.urandom(100_000))
    wrong = ComponentSpec.from_file("w.bin", f, checksum="blake3:" + "0" * 64)
    tracker = UploadTracker(tmp_path / "u.sqlite")
    with Chronicle(server.url, server.api_key) as chronicle:
        run = chronicle.run(chronicle.create_experiment("x"), 0, 0)
        tracker.register_components("decl", [wrong], asset_type="c", binding=run.core.binding)
        report = drain_incomplete_uploads(chronicle, tracker)
    assert "w.bin" in report.failed["decl"] and "not the 0000" in report.failed["decl"]
    component = server_asset(server, "decl")["components"][0]
    assert not component["stored"]


@pytest.mark.parametrize("declared", ["md5:abcd", "sha256:xyz", "sha256:" + "a" * 64 + "-2"])
def test_a_malformed_declared_checksum_is_refused_at_registration(
    tmp_path: Path, declared: str
) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"x")
    tracker = UploadTracker(tmp_path / "u.sqlite")
    with pytest.raises(ChronicleError, match=r"w\.bin"):
        tracker.register_components(
            "a", [ComponentSpec.from_file("w.bin", f, checksum=declared)], asset_type="c"
        )
    assert tracker.get_asset("a") is None


# ---------------------------------------------------------------- leaked URLs


def test_leaked_urls_replayed_with_other_bytes_are_refused_and_the_upload_finishes(
    server: EmbeddedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", {"model.bin": 12 * MiB, "meta.json": 3000})
    leaked: list[Any] = []
    refused: list[int] = []

    def replay_all() -> None:
        with httpx.Client(timeout=60) as http:
            for t in leaked:
                other = os.urandom(t.length)
                reply = http.put(t.url, content=other, headers=t.headers)
                refused.append(reply.status_code)

    presign = ApiClient.presign
    finalize = ApiClient.finalize

    async def leaky_presign(self: ApiClient, *args: Any, **kwargs: Any) -> Any:
        targets = await presign(self, *args, **kwargs)
        leaked.extend(targets)
        return targets

    async def finalize_after_replay(self: ApiClient, *args: Any, **kwargs: Any) -> Any:
        if not refused:  # every URL again, with other bytes, once the real bytes arrived
            replay_all()
        return await finalize(self, *args, **kwargs)

    monkeypatch.setattr(ApiClient, "presign", leaky_presign)
    monkeypatch.setattr(ApiClient, "finalize", finalize_after_replay)
    with Chronicle(server.url, server.api_key, **PARTED) as chronicle:
        run = chronicle.run(chronicle.create_experiment("x"), 0, 0)
        asset = run.register_and_upload_async(ckpt).result()
        dest = run.download_asset(asset.asset_id, tmp_path / "back")
    assert len(leaked) == 4 and refused == [400] * 4
    for name in ("model.bin", "meta.json"):
        assert sha256_file(dest / name) == sha256_file(ckpt / name)


# ---------------------------------------------------------------- algorithms


@pytest.mark.parametrize("algorithm", ["crc64nvme", "sha256", "blake3"])
def test_every_algorithm_publishes_checksums_derived_without_a_second_read(
    server: EmbeddedServer, tmp_path: Path, algorithm: str
) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", {"model.bin": 11 * MiB, "meta.json": 3000})
    with Chronicle(server.url, server.api_key, checksum_algorithm=algorithm, **PARTED) as chronicle:
        run = chronicle.run(chronicle.create_experiment("x"), 0, 0)
        asset = run.register_and_upload_async(ckpt).result()
        dest = run.download_asset(asset.asset_id, tmp_path / "back")
    published = {
        c["path"]: c["checksum"] for c in server_asset(server, asset.asset_id)["components"]
    }
    small = ckpt / "meta.json"
    assert published["meta.json"] == f"{algorithm}:" + checksums.hash_range(
        small, 0, small.stat().st_size, algorithm
    )
    big = ckpt / "model.bin"
    lengths = checksums.range_lengths(big.stat().st_size, 5 * MiB)
    offsets = [sum(lengths[:i]) for i in range(len(lengths))]
    parts = [
        checksums.hash_range(big, o, n, algorithm) for o, n in zip(offsets, lengths, strict=True)
    ]
    want = checksums.whole_file(algorithm, parts, lengths, parted=True)
    assert published["model.bin"] == f"{algorithm}:{want}"
    if algorithm == "crc64nvme":  # the combined CRC is the whole file's own CRC
        assert want == checksums.hash_range(big, 0, big.stat().st_size, algorithm)
    else:
        assert want.endswith("-3")
    assert sha256_file(dest / "model.bin") == hashlib.sha256(big.read_bytes()).hexdigest()


def test_an_unknown_algorithm_is_a_clear_error(server: EmbeddedServer) -> None:
    with pytest.raises(ChronicleError, match="crc64nvme, sha256, blake3"):
        Chronicle(server.url, server.api_key, checksum_algorithm="md5")


# ---------------------------------------------------------------- downloads


def test_a_download_of_bytes_damaged_in_storage_is_refused(
    server: EmbeddedServer, tmp_path: Path
) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", {"model.bin": 2 * MiB})
    with Chronicle(server.url, server.api_key) as chronicle:
        run = chronicle.run(chronicle.create_experiment("x"), 0, 0)
        asset = run.register_and_upload_async(ckpt).result()
        stored = [
            p
            for p in (tmp_path / "server").rglob("*")
            if p.is_file() and p.stat().st_size == 2 * MiB
        ]
        assert len(stored) == 1
        with open(stored[0], "r+b") as f:  # bit rot (or a tamperer) in the store
            f.seek(1000)
            f.write(b"\x00" * 16)
        with pytest.raises(ChronicleError, match="corrupt"):
            run.download_asset(asset.asset_id, tmp_path / "back")
    assert not (tmp_path / "back" / "model.bin").exists()


# ---------------------------------------------------------------- what a store's refusal means


@pytest.mark.parametrize(
    ("status", "code", "expired", "transient", "mismatch"),
    [
        (400, "ExpiredToken", True, False, False),  # real S3: an expired session token
        (400, "RequestTimeout", False, True, False),  # real S3: a body that came too slowly
        (400, "AccessDenied</Code><Message>Request has expired", True, False, False),  # rclone
        (403, "AccessDenied</Code><Message>Request has expired", True, False, False),
        (404, "NoSuchUpload", True, False, False),  # the server aborted the multipart upload
        (400, "BadDigest", False, True, True),  # S3 refused bytes that are not the bound digest
        (403, "SignatureDoesNotMatch", False, False, False),
    ],
)
def test_a_stores_refusal_says_whether_to_presign_again_retry_or_give_up(
    status: int, code: str, expired: bool, transient: bool, mismatch: bool
) -> None:
    from methodic._transfer import TransferError, _accepted

    body = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>m</Message></Error>"
    with pytest.raises(TransferError) as caught:
        _accepted(httpx.Response(status, text=body))
    exc = caught.value
    assert (exc.expired, exc.transient, exc.mismatch) == (expired, transient, mismatch)


def test_a_sent_range_keeps_no_upload_target_in_memory(
    server: EmbeddedServer, tmp_path: Path
) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", {f"f{i}.bin": 1000 for i in range(300)})
    with Chronicle(server.url, server.api_key) as chronicle:
        run = chronicle.run(chronicle.create_experiment("x"), 0, 0)
        handle = run.register_and_upload_async(ckpt)
        handle.result()
        up = chronicle.core._pool.assets[handle.asset_id]
        assert up.targets == {} and up.use_until == {}
