"""The S3 storage backend against moto's standalone S3 server (real HTTP, real S3 protocol)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import (
    CEILING,
    connect,
    make_checkpoint,
    start_serve,
    stop_process,
    subprocess_env,
    tree_digest,
)
from s3helpers import REGION, bucket_keys, multipart_uploads, new_bucket, s3_client, s3_config

from methodic import Chronicle, UploadTracker, _checksum
from methodic.server import EmbeddedServer, ServerConfig

MiB = 1 << 20
PART = 5 * MiB


@pytest.fixture
def s3_server(tmp_path: Path, moto_endpoint: str, s3_bucket: str) -> Iterator[EmbeddedServer]:
    config = s3_config(tmp_path / "server", moto_endpoint, s3_bucket)
    with EmbeddedServer.from_config(config) as srv:
        yield srv


@pytest.fixture
def api(s3_server: EmbeddedServer) -> Iterator[httpx.Client]:
    assert s3_server.url is not None
    with connect(s3_server) as client:
        yield client


def make_run(api: httpx.Client) -> str:
    experiment = api.post("/api/v1/experiments", json={"name": "s3"}).json()
    return str(api.put(f"/api/v1/experiments/{experiment['id']}/runs/0/0").json()["id"])


def create(
    api: httpx.Client,
    components: list[dict[str, Any]],
    presign: bool = True,
    algorithm: str | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "asset_id": uuid.uuid4().hex,
        "asset_type": "checkpoint",
        "components": components,
        "presign": presign,
    }
    if algorithm is not None:
        body["checksum_algorithm"] = algorithm
    response = api.post(f"/api/v1/runs/{make_run(api)}/assets", json=body)
    assert response.status_code == 201, response.text
    return dict(response.json())


def crc64(data: bytes) -> str:
    hasher = _checksum.new_hasher("crc64nvme")
    hasher.update(data)
    return f"crc64nvme:{hasher.hexdigest()}"


def put(target: dict[str, Any], data: bytes) -> httpx.Response:
    body = data[target["offset"] : target["offset"] + target["length"]]
    return httpx.put(target["url"], content=body, headers=target["headers"], trust_env=False)


def component(api: httpx.Client, asset_id: str, index: int = 0) -> dict[str, Any]:
    return dict(api.get(f"/api/v1/assets/{asset_id}").json()["components"][index])


def test_targets_are_sigv4_presigned_s3_urls_bound_to_the_length(
    api: httpx.Client, moto_endpoint: str, s3_bucket: str
) -> None:
    asset = create(
        api, [{"path": "a.bin", "size": 10}, {"path": "big", "size": PART + 1, "part_size": PART}]
    )
    one, part1, part2 = asset["targets"]
    for target in (one, part1, part2):
        assert target["url"].startswith(f"{moto_endpoint}/{s3_bucket}/pfx/{asset['asset_id']}/")
        assert "X-Amz-Signature=" in target["url"]
        assert "content-length" in target["url"].split("X-Amz-SignedHeaders=")[1].split("&")[0]
    assert "uploadId=" in part1["url"] and "partNumber=1" in part1["url"]
    assert "uploadId=" not in one["url"]
    # The multipart upload was created once, for the one multipart component.
    assert len(multipart_uploads(moto_endpoint, s3_bucket)) == 1


def test_multipart_is_created_lazily_and_completed_at_finalize_from_list_parts(
    api: httpx.Client, s3_server: EmbeddedServer, moto_endpoint: str, s3_bucket: str
) -> None:
    data = os.urandom(2 * PART + 123)
    asset = create(api, [{"path": "w.bin", "size": len(data), "part_size": PART}], presign=False)
    asset_id = asset["asset_id"]
    assert multipart_uploads(moto_endpoint, s3_bucket) == []  # nothing until a part is presigned
    presign = f"/api/v1/assets/{asset_id}/presign"
    targets = {
        n: api.post(presign, json={"targets": [{"path": "w.bin", "part": n}]}).json()["targets"][0]
        for n in (3, 1)
    }
    [(key, upload_id)] = multipart_uploads(moto_endpoint, s3_bucket)
    assert key == f"pfx/{asset_id}/0000000"
    again = api.post(presign, json={"targets": [{"path": "w.bin", "part": 2}]}).json()["targets"][0]
    assert f"uploadId={upload_id}" in again["url"]  # the UploadId was remembered
    targets[2] = again

    for n in (3, 1):
        assert put(targets[n], data).status_code == 200
    assert (component(api, asset_id)["stored"], component(api, asset_id)["parts_stored"]) == (
        False,
        [1, 3],
    )
    error = api.post(f"/api/v1/assets/{asset_id}/finalize").json()["error"]
    assert error["missing"] == [{"path": "w.bin", "reason": "not stored", "parts_missing": [2]}]

    # A part stored behind the server's back (not through its presign) is seen too: S3 is asked.
    s3_client(moto_endpoint).upload_part(
        Bucket=s3_bucket, Key=key, UploadId=upload_id, PartNumber=2, Body=data[PART : 2 * PART]
    )
    assert component(api, asset_id)["stored"] is True
    finalized = api.post(f"/api/v1/assets/{asset_id}/finalize")
    assert finalized.status_code == 200, finalized.text
    assert multipart_uploads(moto_endpoint, s3_bucket) == []
    head = s3_client(moto_endpoint).head_object(Bucket=s3_bucket, Key=key)
    assert head["ContentLength"] == len(data)
    download = api.get(f"/api/v1/assets/{asset_id}/download").json()["components"][0]
    assert httpx.get(download["url"], trust_env=False).content == data
    # Finalize is idempotent: the completed upload is not completed again.
    assert api.post(f"/api/v1/assets/{asset_id}/finalize").json() == finalized.json()


def test_a_part_of_the_wrong_size_is_sent_again(api: httpx.Client, moto_endpoint: str) -> None:
    data = os.urandom(PART + 10)
    asset = create(api, [{"path": "w", "size": len(data), "part_size": PART}])
    first, second = asset["targets"]
    assert put(first, data).status_code == 200
    # moto does not enforce the signed length; real S3 would refuse this body outright.
    assert httpx.put(second["url"], content=b"short", trust_env=False).status_code == 200
    assert component(api, asset["asset_id"])["parts_stored"] == [1]
    assert put(second, data).status_code == 200
    assert api.post(f"/api/v1/assets/{asset['asset_id']}/finalize").status_code == 200


def test_a_wrong_size_object_is_reported_at_finalize_and_deleted(
    api: httpx.Client, moto_endpoint: str, s3_bucket: str
) -> None:
    asset = create(api, [{"path": "a", "size": 4}, {"path": "b", "size": 4}])
    asset_id = asset["asset_id"]
    a, b = asset["targets"]
    assert httpx.put(a["url"], content=b"abc", trust_env=False).status_code == 200
    assert put(b, b"bbbb").status_code == 200
    error = api.post(f"/api/v1/assets/{asset_id}/finalize").json()["error"]
    assert error["code"] == "asset_incomplete"
    assert error["missing"] == [
        {"path": "a", "reason": "size mismatch: stored 3 bytes, the manifest says 4"}
    ]
    assert bucket_keys(moto_endpoint, s3_bucket) == [f"pfx/{asset_id}/0000001"]
    assert put(a, b"aaaa").status_code == 200
    assert api.post(f"/api/v1/assets/{asset_id}/finalize").status_code == 200


def test_checksums_the_client_computed_are_recorded_and_checked_against_the_manifest(
    api: httpx.Client,
) -> None:
    import hashlib

    good, other = hashlib.sha256(b"abc").hexdigest(), hashlib.sha256(b"xyz").hexdigest()
    asset = create(
        api,
        [{"path": "a", "size": 3, "sha256": good}, {"path": "b", "size": 3}],
        algorithm="sha256",
    )
    asset_id = asset["asset_id"]
    for target in asset["targets"]:
        assert put(target, b"abc").status_code == 200
    refused = api.post(
        f"/api/v1/assets/{asset_id}/finalize", json={"checksums": {"a": f"sha256:{other}"}}
    )
    assert refused.json()["error"]["missing"][0]["reason"].startswith("checksum mismatch")
    target = api.post(
        f"/api/v1/assets/{asset_id}/presign", json={"targets": [{"path": "a", "part": None}]}
    ).json()["targets"][0]
    assert put(target, b"abc").status_code == 200
    done = api.post(
        f"/api/v1/assets/{asset_id}/finalize", json={"checksums": {"b": f"sha256:{good}"}}
    ).json()
    assert {c["path"]: c["sha256"] for c in done["components"]} == {"a": good, "b": good}
    assert [c["checksum"] for c in done["components"]] == [None, f"sha256:{good}"]


def test_delete_aborts_multipart_uploads_and_removes_objects(
    api: httpx.Client, moto_endpoint: str, s3_bucket: str
) -> None:
    data = os.urandom(PART + 1)
    asset = create(
        api, [{"path": "a", "size": 3}, {"path": "m", "size": len(data), "part_size": PART}]
    )
    asset_id = asset["asset_id"]
    one, part1, _ = asset["targets"]
    assert put(one, b"abc").status_code == 200 and put(part1, data).status_code == 200
    # A stray upload, as a crash between CreateMultipartUpload and recording its id leaves.
    s3_client(moto_endpoint).create_multipart_upload(
        Bucket=s3_bucket, Key=f"pfx/{asset_id}/0000001"
    )
    assert len(multipart_uploads(moto_endpoint, s3_bucket)) == 2
    assert api.delete(f"/api/v1/assets/{asset_id}").status_code == 204
    assert multipart_uploads(moto_endpoint, s3_bucket) == []
    assert bucket_keys(moto_endpoint, s3_bucket) == []


def test_part_size_below_the_s3_minimum_is_400(api: httpx.Client) -> None:
    body = {
        "asset_id": uuid.uuid4().hex,
        "asset_type": "x",
        "components": [{"path": "a", "size": 10, "part_size": 4}],
    }
    response = api.post(f"/api/v1/runs/{make_run(api)}/assets", json=body)
    assert response.status_code == 400
    assert "minimum" in response.json()["error"]["message"]
    # One part of any size is fine (S3 has no minimum for the last part).
    body["components"] = [{"path": "a", "size": 3, "part_size": 4}]
    body["asset_id"] = uuid.uuid4().hex
    assert api.post(f"/api/v1/runs/{make_run(api)}/assets", json=body).status_code == 201


def test_a_finalize_that_crashed_after_completing_the_upload_is_finished(
    api: httpx.Client, s3_server: EmbeddedServer
) -> None:
    data = os.urandom(PART + 7)
    asset = create(api, [{"path": "m", "size": len(data), "part_size": PART}])
    for target in asset["targets"]:
        assert put(target, data).status_code == 200
    catalog = s3_server._state.catalog  # type: ignore[union-attr]
    _, components = s3_server._state.records.load(asset["asset_id"])  # type: ignore[union-attr]
    # Completed, not committed:
    assert catalog.storage.seal(asset["asset_id"], components, 2, {}) == []
    assert api.post(f"/api/v1/assets/{asset['asset_id']}/finalize").status_code == 200
    url = api.get(f"/api/v1/assets/{asset['asset_id']}/download").json()["components"][0]["url"]
    assert httpx.get(url, trust_env=False).content == data


def test_storage_errors_are_503_and_retryable(api: httpx.Client, s3_server: EmbeddedServer) -> None:
    asset = create(api, [{"path": "a", "size": 1}], presign=False)
    storage = s3_server._state.catalog.storage  # type: ignore[union-attr]
    real, storage.bucket = storage.bucket, "no-such-bucket-here"
    try:
        response = api.get(f"/api/v1/assets/{asset['asset_id']}")
    finally:
        storage.bucket = real
    assert response.status_code == 503 and response.headers["retry-after"]
    assert response.json()["error"]["code"] == "storage_unavailable"
    assert api.get(f"/api/v1/assets/{asset['asset_id']}").status_code == 200


# ---- the control API answers the same on both backends -------------------------------------


def _script(api: httpx.Client) -> list[Any]:
    """A fixed sequence of control calls; returns the answers with ids and URLs normalized."""
    data = b"m" * (PART + 3)  # the same bytes, so the same checksums, on both backends
    answers: list[Any] = []

    def shape(value: Any) -> Any:
        if isinstance(value, dict) and "sha256" in value:
            # The local backend hashes what it receives; S3 knows only the manifest's and
            # the client's sha256 (see docs/deployment.md).
            value = {**value, "sha256": "*"}
        if isinstance(value, dict):
            return {
                k: (
                    type(v).__name__
                    if k
                    in {
                        "id",
                        "asset_id",
                        "run_id",
                        "experiment_id",
                        "manifest_digest",  # of the run's id among the rest
                        "url",
                        "created_at",
                        "updated_at",
                        "finalized_at",
                        "expires_at",
                        "message",
                    }
                    else shape(v)
                )
                for k, v in value.items()
            }
        if isinstance(value, list):
            return [shape(v) for v in value]
        return value

    def record(response: httpx.Response) -> dict[str, Any]:
        body = response.json() if response.content else None
        answers.append((response.status_code, shape(body)))
        return body or {}

    run = make_run(api)
    asset_id = uuid.uuid4().hex
    manifest = {
        "asset_id": asset_id,
        "asset_type": "ckpt",
        "metadata": {"step": 3},
        "components": [
            {"path": "x/a", "size": 3},
            {"path": "m", "size": len(data), "part_size": PART},
        ],
        "presign": True,
    }
    created = record(api.post(f"/api/v1/runs/{run}/assets", json=manifest))
    targets = {(t["path"], t["part"]): t for t in created["targets"]}
    record(api.post(f"/api/v1/runs/{run}/assets", json=manifest))
    record(api.post(f"/api/v1/assets/{asset_id}/finalize"))
    put(targets[("x/a", None)], b"abc")
    put(targets[("m", 2)], data)
    record(api.get(f"/api/v1/assets/{asset_id}"))
    record(api.post(f"/api/v1/assets/{asset_id}/finalize"))
    record(
        api.post(f"/api/v1/assets/{asset_id}/presign", json={"targets": [{"path": "m", "part": 1}]})
    )
    put(targets[("m", 1)], data)
    record(api.get(f"/api/v1/runs/{run}/assets"))
    checksums = {"x/a": crc64(b"abc"), "m": crc64(data)}  # a FULL_OBJECT CRC is the file's
    record(api.post(f"/api/v1/assets/{asset_id}/finalize", json={"checksums": checksums}))
    record(api.post(f"/api/v1/assets/{asset_id}/finalize", json={"checksums": checksums}))
    record(api.get(f"/api/v1/assets/{asset_id}/download"))
    record(api.delete(f"/api/v1/assets/{asset_id}"))
    record(api.get(f"/api/v1/runs/{run}/assets"))
    return answers


def test_the_control_api_answers_the_same_json_on_both_backends(
    tmp_path: Path, moto_endpoint: str, s3_bucket: str
) -> None:
    configs = {
        "local": ServerConfig(data_dir=tmp_path / "local", port=0),
        "s3": ServerConfig(
            data_dir=tmp_path / "s3",
            port=0,
            storage=f"s3://{s3_bucket}",
            s3_endpoint_url=moto_endpoint,
            s3_region=REGION,
        ),
    }
    answers = {}
    for name, config in configs.items():
        with (
            EmbeddedServer.from_config(config) as srv,
            connect(srv) as client,
        ):
            answers[name] = _script(client)
    assert answers["local"] == answers["s3"]


# ---- `methodic serve --storage s3://...` ---------------------------------------------------


def test_methodic_serve_on_s3_end_to_end(
    tmp_path: Path, moto_endpoint: str, s3_bucket: str
) -> None:
    data_dir = tmp_path / "served"
    proc, url = start_serve(
        data_dir,
        "--storage",
        f"s3://{s3_bucket}/ckpts",
        "--s3-endpoint-url",
        moto_endpoint,
        "--s3-region",
        REGION,
    )
    try:
        key = (data_dir / "api_key").read_text().strip()
        ckpt = make_checkpoint(tmp_path / "ckpt", {"big.bin": 11 * MiB, "small/a.json": 100})
        with Chronicle(url, key, part_threshold=8 * MiB, part_size=PART) as chronicle:
            run = chronicle.run(chronicle.create_experiment("served-s3"), 0, 0)
            handle = run.register_and_upload_async(
                ckpt, upload_tracker=UploadTracker(tmp_path / "u.sqlite")
            )
            handle.result(timeout=CEILING)
            dest = run.download_asset(handle.asset_id, tmp_path / "dl")
        assert tree_digest(dest) == tree_digest(ckpt)
        assert len(bucket_keys(moto_endpoint, s3_bucket)) == 2
        assert not list((data_dir).glob("blobs/*"))  # the data dir keeps only metadata
    finally:
        out, err = stop_process(proc)
    assert proc.returncode == 0, err
    assert f"s3://{s3_bucket}/ckpts/" in out


def _serve_error(
    *args: str, env: dict[str, str] | None = None, pre: str = ""
) -> subprocess.CompletedProcess[str]:
    code = f"{pre}import sys; from methodic.server.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, "serve", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=CEILING,
        env=env or subprocess_env(),
    )


def _one_line(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_serve_refuses_a_bucket_that_does_not_exist(tmp_path: Path, moto_endpoint: str) -> None:
    result = _serve_error(
        "--data-dir",
        str(tmp_path / "d"),
        "--storage",
        "s3://no-such-bucket-x",
        "--s3-endpoint-url",
        moto_endpoint,
    )
    _one_line(result, "no-such-bucket-x", "does not exist")


def test_serve_refuses_missing_credentials(tmp_path: Path, moto_endpoint: str) -> None:
    bucket = new_bucket(moto_endpoint)
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("AWS_")}
    env.update(
        AWS_CONFIG_FILE="/dev/null",
        AWS_SHARED_CREDENTIALS_FILE="/dev/null",
        AWS_EC2_METADATA_DISABLED="true",
        HOME=str(tmp_path),
    )
    result = _serve_error(
        "--data-dir",
        str(tmp_path / "d"),
        "--storage",
        f"s3://{bucket}",
        "--s3-endpoint-url",
        moto_endpoint,
        "--s3-region",
        REGION,
        env=env,
    )
    _one_line(result, "credentials")


def test_serve_without_boto3_says_what_to_install(tmp_path: Path) -> None:
    result = _serve_error(
        "--data-dir",
        str(tmp_path / "d"),
        "--storage",
        "s3://some-bucket",
        pre="import sys; sys.modules['boto3'] = None; ",
    )
    _one_line(result, "methodic[s3]")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--storage", "s3://"], ["bucket"]),
        (["--storage", "s3://UPPER_case"], ["bucket"]),
        (["--storage", "gs://bucket"], ["storage"]),
        (["--s3-endpoint-url", "http://127.0.0.1:1"], ["s3://"]),
        (["--storage", "s3://some-bucket", "--s3-endpoint-url", "ftp://x"], ["endpoint"]),
        (["--storage", "s3://some-bucket", "--presign-ttl", "700000"], ["7 days"]),
    ],
)
def test_serve_refuses_bad_s3_options(tmp_path: Path, args: list[str], words: list[str]) -> None:
    _one_line(_serve_error("--data-dir", str(tmp_path / "d"), *args), *words)


@pytest.mark.parametrize(
    ("endpoint", "region", "token"),
    [
        ("http://127.0.0.1:9", "us-east-1", None),  # path-style, as for MinIO or rclone
        (None, "eu-west-3", "a-session-token"),  # AWS: virtual-host style, regional scope
    ],
)
def test_batch_presigning_makes_the_url_botocore_makes(
    monkeypatch: pytest.MonkeyPatch, endpoint: str | None, region: str, token: str | None
) -> None:
    """presign_puts signs with botocore's query signer on an address botocore chose: at
    the same instant its URLs are generate_presigned_url's, signature included."""
    import datetime

    import boto3
    import botocore.auth  # noqa: F401  # imports awscrt's signer module, when installed
    from botocore.config import Config

    from methodic.server.config import S3Location
    from methodic.server.storage.base import Component, Slot
    from methodic.server.storage.s3 import S3Storage

    now = datetime.datetime(2026, 1, 2, 3, 4, 5)
    # botocore signs with awscrt's signer when awscrt is installed (botocore.auth imports it).
    for name in ("botocore.auth", "botocore.crt.auth"):
        if name in sys.modules:
            monkeypatch.setattr(sys.modules[name], "get_current_datetime", lambda **_: now)
    session = boto3.session.Session(
        aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="secret", aws_session_token=token
    )
    config = Config(
        signature_version="s3v4", s3={"addressing_style": "path" if endpoint else "auto"}
    )
    client = session.client("s3", endpoint_url=endpoint, region_name=region, config=config)
    storage = S3Storage(
        client,
        S3Location("bucket", "pre fix/"),
        None,  # type: ignore[arg-type]  # one-PUT slots need no database
        endpoint_url=endpoint,
        credentials=session.get_credentials(),
    )
    monkeypatch.setattr(storage, "_bind", lambda *_: None)  # what it records: test_s3_integrity
    asset_id = "0123456789abcdef"
    digest = "00112233445566ff"
    slots = [
        Slot(Component(7, "a", 10, None, None, None), None, 0, 10),
        Slot(Component(12345, "b", 99, None, None, None), None, 0, 99, f"crc64nvme:{digest}"),
    ]
    expires = int(now.replace(tzinfo=datetime.UTC).timestamp()) + 600
    monkeypatch.setattr("methodic.server.storage.s3.time.time", lambda: expires - 600)
    got = storage.presign_puts(asset_id, slots, expires, "unused")
    want = [
        client.generate_presigned_url(
            "put_object",
            Params={"Bucket": "bucket", "Key": f"pre fix/{asset_id}/0000007", "ContentLength": 10},
            ExpiresIn=600,
        ),
        client.generate_presigned_url(
            "put_object",
            Params={
                "Bucket": "bucket",
                "Key": f"pre fix/{asset_id}/0012345",
                "ContentLength": 99,
                "ChecksumCRC64NVME": _checksum.to_base64(digest),
            },
            ExpiresIn=600,
        ),
    ]

    def parsed(url: str) -> tuple[str, dict[str, list[str]]]:
        from urllib.parse import parse_qs, urlsplit

        u = urlsplit(url)
        return f"{u.scheme}://{u.netloc}{u.path}", parse_qs(u.query)

    for p, u in zip(got, want, strict=True):
        assert parsed(p.url) == parsed(u), (p.url, u)
    assert [p.headers for p in got] == [
        {},
        {"x-amz-checksum-crc64nvme": _checksum.to_base64(digest)},
    ]
