"""Bounded work per request: what one request may ask of the server, and the event loop stays
responsive while a big (legal) manifest is stored. Real servers on 127.0.0.1, real HTTP."""

from __future__ import annotations

import json
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from helpers import free_port, methodic_cmd, subprocess_env, wait_healthy

from methodic.server import EmbeddedServer, ServerConfig

CEILING_S = 300.0  # only to fail a hung test; nothing here asserts a speed


def connect(srv: EmbeddedServer) -> httpx.Client:
    return httpx.Client(
        base_url=srv.url or "",
        headers={"Authorization": f"Bearer {srv.api_key}"},
        timeout=CEILING_S,
        trust_env=False,
    )


def new_run(api: httpx.Client) -> str:
    experiment = api.post("/api/v1/experiments", json={"name": uuid.uuid4().hex}).json()["id"]
    return str(api.put(f"/api/v1/experiments/{experiment}/runs/0/0").json()["id"])


def manifest(n: int, **extra: Any) -> dict[str, Any]:
    return {
        "asset_id": uuid.uuid4().hex,
        "asset_type": "checkpoint",
        "components": [{"path": f"shard-{i:07d}/weights.bin", "size": i} for i in range(n)],
        **extra,
    }


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[EmbeddedServer]:
    with EmbeddedServer(tmp_path / "s") as server:
        yield server


def test_the_default_limits_are_the_documented_ones(tmp_path: Path) -> None:
    config = ServerConfig(data_dir=tmp_path)
    assert config.max_components_per_asset == 200_000  # >= 100,000-file checkpoints
    assert config.max_json_body == 64 * 1024 * 1024
    assert config.max_presign_batch == 1000
    docs = Path(__file__).parent.parent / "docs"
    for page in ("http-api.md", "deployment.md"):
        text = (docs / page).read_text()
        assert "200,000" in text and "64 MiB" in text and "1000" in text, page


def test_presign_on_create_returns_at_most_one_batch_and_says_how_many_remain(
    srv: EmbeddedServer,
) -> None:
    # A 2 KB request used to make the server sign every part of every component.
    parts = 1000
    spec = {
        "asset_id": uuid.uuid4().hex,
        "asset_type": "checkpoint",
        "components": [
            {"path": f"c{i}", "size": parts * 1024, "part_size": 1024} for i in range(30)
        ],
        "presign": True,
    }
    assert len(json.dumps(spec)) < 2048
    with connect(srv) as api:
        run = new_run(api)
        response = api.post(f"/api/v1/runs/{run}/assets", json=spec)
        assert response.status_code == 201, response.text
        body = response.json()
        assert len(body["targets"]) == 1000
        assert body["targets_remaining"] == 30 * parts - 1000
        # The first batch is the manifest's first PUTs, in order.
        assert [(t["path"], t["part"]) for t in body["targets"][:2]] == [("c0", 1), ("c0", 2)]
        # The rest comes from the presign call, in batches of at most 1000.
        rest = api.post(
            f"/api/v1/assets/{spec['asset_id']}/presign",
            json={"targets": [{"path": "c29", "part": n} for n in range(1, 1001)]},
        )
        assert rest.status_code == 200 and len(rest.json()["targets"]) == 1000
        # The idempotent re-create answers the same way.
        again = api.post(f"/api/v1/runs/{run}/assets", json=spec).json()
        assert len(again["targets"]) == 1000 and again["targets_remaining"] == 29_000
        # A small asset gets all of its targets and nothing remaining.
        small = api.post(f"/api/v1/runs/{run}/assets", json={**manifest(3), "presign": True})
        assert len(small.json()["targets"]) == 3 and small.json()["targets_remaining"] == 0


def test_a_manifest_over_the_component_limit_is_413_naming_the_limit(
    srv: EmbeddedServer,
) -> None:
    with connect(srv) as api:
        run = new_run(api)
        response = api.post(f"/api/v1/runs/{run}/assets", json=manifest(200_001))
        assert response.status_code == 413, response.text[:300]
        error = response.json()["error"]
        assert error["code"] == "too_large"
        assert "200000" in error["message"] and "200001" in error["message"]
        # Nothing was stored.
        assert api.get(f"/api/v1/runs/{run}/assets?include_pending=true").json()["assets"] == []


def test_a_body_over_the_default_limit_is_413_naming_it(srv: EmbeddedServer) -> None:
    limit = 64 * 1024 * 1024
    url = urlsplit(srv.url or "")
    assert url.hostname is not None and url.port is not None
    with socket.create_connection((url.hostname, url.port), timeout=CEILING_S) as sock:
        # Declared, not sent: the answer comes before a byte of the body.
        sock.sendall(
            f"POST /api/v1/experiments HTTP/1.1\r\nHost: {url.netloc}\r\n"
            f"Authorization: Bearer {srv.api_key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {limit + 1}\r\n\r\n".encode()
        )
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert str(limit).encode() in answer


def test_a_validation_error_deep_in_a_big_manifest_names_its_index(srv: EmbeddedServer) -> None:
    spec = manifest(12_345)
    spec["components"][12_000]["size"] = -1
    with connect(srv) as api:
        run = new_run(api)
        response = api.post(f"/api/v1/runs/{run}/assets", json=spec)
        assert response.status_code == 422
        error = response.json()["error"]
        assert error["code"] == "invalid_request"
        assert error["errors"][0]["loc"] == ["body", "components", "12000", "size"]
        bad_json = api.post(
            f"/api/v1/runs/{run}/assets",
            content=b'{"asset_id": ',
            headers={"Content-Type": "application/json"},
        )
        assert bad_json.status_code == 422 and bad_json.json()["error"]["code"] == "invalid_request"


def test_the_limits_are_serve_options(tmp_path: Path) -> None:
    import subprocess

    port = free_port()
    proc = subprocess.Popen(
        methodic_cmd(
            "serve",
            "--data-dir",
            str(tmp_path / "d"),
            "--port",
            str(port),
            "--max-components-per-asset",
            "5",
            "--max-request-bytes",
            "100000",
            "--max-presign-batch",
            "2",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc=proc)
        key = (tmp_path / "d" / "api_key").read_text().strip()
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=url, headers=headers, timeout=60, trust_env=False) as api:
            run = new_run(api)
            too_many = api.post(f"/api/v1/runs/{run}/assets", json=manifest(6))
            assert too_many.status_code == 413 and "at most 5" in too_many.text
            ok = api.post(f"/api/v1/runs/{run}/assets", json={**manifest(5), "presign": True})
            assert len(ok.json()["targets"]) == 2 and ok.json()["targets_remaining"] == 3
            big = api.post("/api/v1/experiments", json={"name": "x" * 100_001})
            assert big.status_code == 413 and "100000 bytes" in big.text
    finally:
        proc.terminate()
        proc.wait(30)


def test_cheap_calls_keep_answering_while_a_big_manifest_is_stored(srv: EmbeddedServer) -> None:
    """Other clients are served while the server parses, validates and stores 200,000
    components: cheap calls complete while the big create is still in flight."""
    n = 200_000
    with connect(srv) as api:
        run = new_run(api)
        small = manifest(1)
        assert api.post(f"/api/v1/runs/{run}/assets", json=small).status_code == 201
        body = json.dumps(manifest(n)).encode()
        sent = threading.Event()
        done = threading.Event()
        result: dict[str, Any] = {}

        def chunks() -> Iterator[bytes]:
            for i in range(0, len(body), 1 << 20):
                yield body[i : i + (1 << 20)]
            sent.set()

        def create() -> None:
            try:
                with connect(srv) as other:
                    response = other.post(
                        f"/api/v1/runs/{run}/assets",
                        content=chunks(),
                        headers={
                            "Content-Type": "application/json",
                            "Content-Length": str(len(body)),
                        },
                    )
                result["status"] = response.status_code
                result["count"] = response.json().get("component_count")
            finally:
                done.set()

        big = threading.Thread(target=create)
        big.start()
        try:
            assert sent.wait(CEILING_S)
            answered_meanwhile = 0
            while not done.is_set():
                assert api.get("/healthz").status_code == 200
                presign = api.post(
                    f"/api/v1/assets/{small['asset_id']}/presign",
                    json={"targets": [{"path": "shard-0000000/weights.bin", "part": None}]},
                )
                assert presign.status_code == 200
                if not done.is_set():
                    answered_meanwhile += 1
        finally:
            big.join(CEILING_S)
        assert result == {"status": 201, "count": n}
        assert answered_meanwhile >= 1
