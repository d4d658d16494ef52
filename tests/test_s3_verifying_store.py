"""The engine and `methodic serve` on an S3 that verifies checksums itself (LocalStack, not
moto): the store refuses bytes that are not the digest bound into a presigned URL, a finalized
object carries the file's CRC-64/NVME, and a crash mid-upload is recovered byte-identical with
only the missing parts sent again (issue #12)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from faultproxy import FaultProxy
from helpers import make_checkpoint, sha256_file, tree_checksums
from killharness import kill_round
from localstack import (
    ACCESS_KEY,
    REGION,
    SECRET_KEY,
    localstack_s3,
    new_versioned_bucket,
    s3_client,
)

from methodic import Chronicle
from methodic import _checksum as checksums
from methodic._api import ApiClient
from methodic.server import EmbeddedServer, ServerConfig

MiB = 1 << 20
PARTED = dict(part_threshold=5 * MiB, part_size=5 * MiB)
PREFIX = "chronicle"


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with localstack_s3() as url:
        yield url


@pytest.fixture
def store(
    endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[EmbeddedServer, FaultProxy, str]]:
    """`methodic serve` (embedded) on a fresh versioned LocalStack bucket, its S3 traffic
    through a byte-counting proxy; LocalStack's credentials (moto's may be in the env)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    bucket = new_versioned_bucket(endpoint)
    host, port = endpoint.removeprefix("http://").split(":")
    with FaultProxy(host, int(port)) as proxy:
        srv = EmbeddedServer.from_config(
            ServerConfig(
                data_dir=tmp_path / "server",
                port=0,
                storage=f"s3://{bucket}/{PREFIX}",
                s3_endpoint_url=proxy.url,
                s3_region=REGION,
            )
        )
        srv.start()
        try:
            yield srv, proxy, bucket
        finally:
            srv.stop()


def stored_checksums(endpoint: str, bucket: str, asset_id: str) -> set[tuple[str, str]]:
    """(ChecksumCRC64NVME, ChecksumType) of every object LocalStack holds for the asset."""
    s3 = s3_client(endpoint)
    keys = [
        o["Key"]
        for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"{PREFIX}/{asset_id}/")["Contents"]
    ]
    heads = [s3.head_object(Bucket=bucket, Key=k, ChecksumMode="ENABLED") for k in keys]
    return {(h["ChecksumCRC64NVME"], h["ChecksumType"]) for h in heads}


def test_objects_on_a_verifying_store_carry_the_files_crc64nvme(
    endpoint: str, store: tuple[EmbeddedServer, FaultProxy, str], tmp_path: Path
) -> None:
    srv, _proxy, bucket = store
    ckpt = make_checkpoint(tmp_path / "ckpt", {"model.bin": 12 * MiB + 5, "meta.json": 3000})
    with Chronicle(srv.url, srv.api_key, **PARTED) as chronicle:
        run = chronicle.run(chronicle.create_experiment("x"), 0, 0)
        asset = run.register_and_upload_async(ckpt).result()
        dest = run.download_asset(asset.asset_id, tmp_path / "back")
    for name in ("model.bin", "meta.json"):
        assert sha256_file(dest / name) == sha256_file(ckpt / name)
    published = tree_checksums(ckpt)
    want = {(checksums.to_base64(v.partition(":")[2]), "FULL_OBJECT") for v in published.values()}
    assert stored_checksums(endpoint, bucket, asset.asset_id) == want


def test_leaked_urls_replayed_with_other_bytes_are_refused_by_the_store(
    endpoint: str,
    store: tuple[EmbeddedServer, FaultProxy, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    srv, _proxy, bucket = store
    ckpt = make_checkpoint(tmp_path / "ckpt", {"model.bin": 12 * MiB, "meta.json": 3000})
    leaked: list[Any] = []
    answers: list[httpx.Response] = []
    presign, finalize = ApiClient.presign, ApiClient.finalize

    async def leaky_presign(self: ApiClient, *args: Any, **kwargs: Any) -> Any:
        targets = await presign(self, *args, **kwargs)
        leaked.extend(targets)
        return targets

    async def finalize_after_replay(self: ApiClient, *args: Any, **kwargs: Any) -> Any:
        if not answers:  # once the real bytes arrived: every URL again, with other bytes
            with httpx.Client(timeout=60) as http:
                for t in leaked:
                    answers.append(http.put(t.url, content=os.urandom(t.length), headers=t.headers))
        return await finalize(self, *args, **kwargs)

    monkeypatch.setattr(ApiClient, "presign", leaky_presign)
    monkeypatch.setattr(ApiClient, "finalize", finalize_after_replay)
    with Chronicle(srv.url, srv.api_key, **PARTED) as chronicle:
        run = chronicle.run(chronicle.create_experiment("x"), 0, 0)
        asset = run.register_and_upload_async(ckpt).result()
        dest = run.download_asset(asset.asset_id, tmp_path / "back")
    # The store itself refused them (S3's BadDigest), not methodic.
    assert len(answers) == 4
    assert all(a.status_code == 400 and "BadDigest" in a.text for a in answers), answers
    for name in ("model.bin", "meta.json"):
        assert sha256_file(dest / name) == sha256_file(ckpt / name)
    published = tree_checksums(ckpt)
    want = {(checksums.to_base64(v.partition(":")[2]), "FULL_OBJECT") for v in published.values()}
    assert stored_checksums(endpoint, bucket, asset.asset_id) == want


def test_sigkill_mid_upload_then_drain_on_a_verifying_store(
    store: tuple[EmbeddedServer, FaultProxy, str], tmp_path: Path
) -> None:
    srv, proxy, _bucket = store
    assert srv.url is not None
    # Killed once 7 MiB crossed to the store: mid-way through the big file's parts.
    result = kill_round(tmp_path, srv.url, srv.url, srv.api_key, 0.0, proxy, kill_at_bytes=7 * MiB)
    # kill_round checked: nothing pending visible, drained byte-identical, and every byte
    # crossed to the store at most once plus one part per worker (only missing parts resent).
    assert result.registered and not result.finished_before_kill
    assert result.report["finalized"], result.report
