"""The embedded Chronicle server over real HTTP on 127.0.0.1 (docs/http-api.md)."""

from __future__ import annotations

import hashlib
import os
import socket
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from helpers import CEILING, connect, receiving_a_body, uploads_released, wait_until, with_query

from methodic.server import EmbeddedServer, ServerConfig


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ck(data: bytes) -> str:
    """The finalize checksum of a component sent in one PUT, for a sha256 asset."""
    return f"sha256:{sha(data)}"


def make_run(api: httpx.Client, name: str = "exp") -> str:
    experiment = api.post("/api/v1/experiments", json={"name": name}).json()
    return api.put(f"/api/v1/experiments/{experiment['id']}/runs/0/0").json()["id"]


@pytest.fixture
def run_id(api: httpx.Client) -> str:
    return make_run(api)


def create_asset(
    api: httpx.Client,
    run_id: str,
    components: list[dict[str, Any]],
    *,
    asset_id: str | None = None,
    asset_type: str = "checkpoint",
    presign: bool = True,
    algorithm: str | None = "sha256",
) -> httpx.Response:
    body: dict[str, Any] = {
        "asset_id": uuid.uuid4().hex if asset_id is None else asset_id,
        "asset_type": asset_type,
        "metadata": {"step": 1},
        "components": components,
        "presign": presign,
    }
    if algorithm is not None:
        body["checksum_algorithm"] = algorithm
    return api.post(f"/api/v1/runs/{run_id}/assets", json=body)


def put(target: dict[str, Any], data: bytes) -> httpx.Response:
    start = target["offset"]
    return httpx.put(target["url"], content=data[start : start + target["length"]], trust_env=False)


def stored_files(srv: EmbeddedServer) -> list[Path]:
    return sorted(p for p in (srv.data_dir / "blobs").rglob("*") if p.is_file())


def temp_files(srv: EmbeddedServer) -> list[Path]:
    return sorted((srv.data_dir / "tmp").iterdir())


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    return error


# ---- basics --------------------------------------------------------------------------------


def test_healthz_answers_without_a_key(server: EmbeddedServer) -> None:
    response = httpx.get(f"{server.url}/healthz", trust_env=False)
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_openapi_lists_the_control_routes(server: EmbeddedServer) -> None:
    paths = httpx.get(f"{server.url}/openapi.json", trust_env=False).json()["paths"]
    assert "/api/v1/runs/{run_id}/assets" in paths
    assert "/api/v1/assets/{asset_id}/finalize" in paths


@pytest.mark.parametrize("header", [None, "Bearer sk_agent_not-the-key-42", "Basic Zm9vOmJhcg=="])
def test_missing_or_wrong_key_is_401_and_never_echoed(
    server: EmbeddedServer, header: str | None
) -> None:
    headers = {"Authorization": header} if header else {}
    response = httpx.get(f"{server.url}/api/v1/experiments", headers=headers, trust_env=False)
    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"
    assert "not-the-key-42" not in response.text
    assert server.api_key is not None and server.api_key not in response.text


def test_unknown_route_has_the_error_shape(api: httpx.Client) -> None:
    assert_error(api.get("/api/v1/nothing-here"), 404, "not_found")


def test_schema_violation_is_422_with_the_error_shape(api: httpx.Client) -> None:
    error = assert_error(api.post("/api/v1/experiments", json={"name": 5}), 422, "invalid_request")
    assert error["errors"][0]["loc"] == ["body", "name"]


# ---- experiments and runs ------------------------------------------------------------------


def test_experiment_get_or_create_by_name(api: httpx.Client) -> None:
    first = api.post("/api/v1/experiments", json={"name": "resnet"})
    again = api.post("/api/v1/experiments", json={"name": "resnet"})
    other = api.post("/api/v1/experiments", json={"name": "vit"})
    assert (first.status_code, again.status_code, other.status_code) == (201, 200, 201)
    assert first.json() == again.json()
    assert first.json()["id"] != other.json()["id"]
    assert api.get("/api/v1/experiments", params={"name": "resnet"}).json() == {
        "experiments": [first.json()]
    }
    assert len(api.get("/api/v1/experiments").json()["experiments"]) == 2
    assert api.get(f"/api/v1/experiments/{first.json()['id']}").json() == first.json()
    assert_error(api.get("/api/v1/experiments/nope"), 404, "not_found")


def test_run_get_or_create_is_idempotent_and_takes_status(api: httpx.Client) -> None:
    experiment_id = api.post("/api/v1/experiments", json={"name": "e"}).json()["id"]
    first = api.put(f"/api/v1/experiments/{experiment_id}/runs/1/2")
    again = api.put(f"/api/v1/experiments/{experiment_id}/runs/1/2")
    other = api.put(f"/api/v1/experiments/{experiment_id}/runs/1/3")
    assert (first.status_code, again.status_code, other.status_code) == (201, 200, 201)
    run = first.json()
    assert again.json() == run
    assert (run["experiment_id"], run["variation"], run["run"], run["status"]) == (
        experiment_id,
        1,
        2,
        "running",
    )
    assert other.json()["id"] != run["id"]

    done = api.post(f"/api/v1/runs/{run['id']}/status", json={"status": "succeeded"})
    assert done.status_code == 200
    assert done.json()["status"] == "succeeded"
    assert done.json()["updated_at"] >= run["updated_at"]
    assert api.get(f"/api/v1/runs/{run['id']}").json()["status"] == "succeeded"
    assert api.put(f"/api/v1/experiments/{experiment_id}/runs/1/2").json()["status"] == "succeeded"

    assert_error(
        api.post(f"/api/v1/runs/{run['id']}/status", json={"status": "exploded"}),
        422,
        "invalid_request",
    )
    assert_error(api.put("/api/v1/experiments/nope/runs/0/0"), 404, "not_found")
    assert_error(api.put(f"/api/v1/experiments/{experiment_id}/runs/-1/0"), 422, "invalid_request")
    assert_error(api.get("/api/v1/runs/nope"), 404, "not_found")


# ---- assets: manifests ---------------------------------------------------------------------


def test_create_asset_is_idempotent_and_conflicts_on_another_manifest(
    api: httpx.Client, run_id: str
) -> None:
    components = [
        {"path": "model.bin", "size": 10, "sha256": None, "part_size": None},
        {"path": "cfg/config.json", "size": 3, "sha256": sha(b"abc"), "part_size": None},
    ]
    asset_id = uuid.uuid4().hex
    first = create_asset(api, run_id, components, asset_id=asset_id, presign=False)
    assert first.status_code == 201, first.text
    asset = first.json()
    assert asset["state"] == "pending"
    assert (asset["component_count"], asset["total_size"]) == (2, 13)
    assert [c["path"] for c in asset["components"]] == ["model.bin", "cfg/config.json"]
    assert "targets" not in asset

    again = create_asset(api, run_id, list(reversed(components)), asset_id=asset_id)
    assert again.status_code == 200
    assert again.json()["created_at"] == asset["created_at"]
    assert len(again.json()["targets"]) == 2

    changed = [dict(components[0], size=11), components[1]]
    assert_error(create_asset(api, run_id, changed, asset_id=asset_id), 409, "conflict")
    assert_error(
        create_asset(api, run_id, components, asset_id=asset_id, asset_type="config"),
        409,
        "conflict",
    )
    other_run = make_run(api, name="other")
    assert_error(create_asset(api, other_run, components, asset_id=asset_id), 409, "conflict")
    assert_error(create_asset(api, "no-such-run", components), 404, "not_found")


BAD_PATHS = {
    "absolute": ["/etc/passwd"],
    "dotdot": ["a/../../b"],
    "bare dotdot": [".."],
    "NUL": ["a\x00b"],
    "overlong": ["x" * 1100],
    "empty segment": ["a//b"],
    "backslash": ["a\\b"],
    "duplicate": ["same.bin", "same.bin"],
    "file and dir": ["a", "a/b"],
}


def test_bad_component_paths_are_400(
    server: EmbeddedServer, api: httpx.Client, run_id: str
) -> None:
    for case, paths in BAD_PATHS.items():
        response = create_asset(api, run_id, [{"path": p, "size": 1} for p in paths])
        assert response.status_code == 400, case
        assert_error(response, 400, "invalid_request")
    assert api.get(f"/api/v1/runs/{run_id}/assets", params={"include_pending": "true"}).json() == {
        "assets": []
    }
    assert stored_files(server) == []


def test_bad_asset_id_is_400(api: httpx.Client, run_id: str) -> None:
    for bad in ["", "../x", "a/b", ".hidden", "x" * 200]:
        assert_error(create_asset(api, run_id, [], asset_id=bad), 400, "invalid_request")


# ---- upload, finalize, download ------------------------------------------------------------


def test_presign_put_finalize_download_is_byte_identical(
    server: EmbeddedServer, api: httpx.Client, run_id: str
) -> None:
    files = {
        "model/shard-0.bin": os.urandom(300_000),
        "model/shard-1.bin": os.urandom(2_500_000),  # more than one 1 MiB batch
        "weird name [x] %20 ?#.json": b'{"lr": 0.1}',
        "empty": b"",
    }
    components = [{"path": p, "size": len(d), "sha256": sha(d)} for p, d in files.items()]
    created = create_asset(api, run_id, components)
    assert created.status_code == 201
    asset_id = created.json()["asset_id"]
    targets = created.json()["targets"]
    assert {t["path"] for t in targets} == set(files)
    for target in targets:
        assert target["method"] == "PUT" and target["part"] is None and target["offset"] == 0
        response = put(target, files[target["path"]])
        assert response.status_code == 201, response.text
        assert response.json() == {
            "size": len(files[target["path"]]),
            "checksum": ck(files[target["path"]]),
            "bound": False,
            "sha256": sha(files[target["path"]]),
        }
        assert response.headers["etag"] == f'"{sha(files[target["path"]])}"'

    status = api.get(f"/api/v1/assets/{asset_id}").json()
    assert all(c["stored"] for c in status["components"])

    finalized = api.post(
        f"/api/v1/assets/{asset_id}/finalize",
        json={"checksums": {p: ck(d) for p, d in files.items()}},
    )
    assert finalized.status_code == 200, finalized.text
    assert finalized.json()["state"] == "finalized"
    assert finalized.json()["finalized_at"] is not None

    download = api.get(f"/api/v1/assets/{asset_id}/download")
    assert download.status_code == 200
    assert download.json()["asset"]["asset_id"] == asset_id
    for component in download.json()["components"]:
        body = httpx.get(component["url"], trust_env=False)
        assert body.status_code == 200
        assert sha(body.content) == sha(files[component["path"]]) == component["sha256"]
        assert body.content == files[component["path"]]
    assert temp_files(server) == []


def test_presigned_urls_use_the_public_url(tmp_path: Path) -> None:
    with (
        EmbeddedServer(tmp_path / "s", public_url="https://chronicle.example.org/") as srv,
        connect(srv) as api,
    ):
        targets = create_asset(api, make_run(api), [{"path": "a", "size": 1}]).json()["targets"]
        assert targets[0]["url"].startswith("https://chronicle.example.org/blobs/")


def test_presigned_urls_follow_the_request_host(
    server: EmbeddedServer, api: httpx.Client, run_id: str
) -> None:
    assert server.url is not None
    localhost = server.url.replace("127.0.0.1", "localhost")
    response = api.post(
        f"{localhost}/api/v1/runs/{run_id}/assets",
        json={
            "asset_id": "a1",
            "asset_type": "t",
            "components": [{"path": "a", "size": 1}],
            "presign": True,
        },
    )
    blobs = f"http://localhost:{server.blob_port}"  # the blob listener, on the host the client used
    assert response.json()["targets"][0]["url"].startswith(f"{blobs}/blobs/a1/a?")


def test_finalize_incomplete_is_409_listing_what_is_missing(api: httpx.Client, run_id: str) -> None:
    data = b"x" * 100
    created = create_asset(
        api,
        run_id,
        [{"path": "a", "size": 100}, {"path": "b", "size": 100}, {"path": "c", "size": 1}],
    )
    asset_id = created.json()["asset_id"]
    by_path = {t["path"]: t for t in created.json()["targets"]}
    assert put(by_path["a"], data).status_code == 201

    error = assert_error(
        api.post(f"/api/v1/assets/{asset_id}/finalize", json={}), 409, "asset_incomplete"
    )
    assert error["missing"] == [
        {"path": "b", "reason": "not stored"},
        {"path": "c", "reason": "not stored"},
    ]
    assert api.get(f"/api/v1/assets/{asset_id}").json()["state"] == "pending"


def test_finalize_twice_returns_the_same_asset(api: httpx.Client, run_id: str) -> None:
    created = create_asset(api, run_id, [{"path": "a", "size": 5}])
    asset_id = created.json()["asset_id"]
    assert put(created.json()["targets"][0], b"hello").status_code == 201
    first = api.post(f"/api/v1/assets/{asset_id}/finalize")
    second = api.post(
        f"/api/v1/assets/{asset_id}/finalize", json={"checksums": {"a": ck(b"hello")}}
    )
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    assert first.json()["components"][0]["sha256"] == sha(b"hello")
    # The same manifest again answers 200 with the finalized asset and nothing to upload.
    again = create_asset(api, run_id, [{"path": "a", "size": 5}], asset_id=asset_id)
    assert again.status_code == 200
    assert (again.json()["state"], again.json()["targets"]) == ("finalized", [])
    assert_error(
        api.post(f"/api/v1/assets/{asset_id}/finalize", json={"checksums": {"a": ck(b"other")}}),
        409,
        "conflict",
    )
    assert_error(api.post("/api/v1/assets/nope/finalize"), 404, "not_found")


def test_pending_assets_are_invisible_until_finalized(api: httpx.Client, run_id: str) -> None:
    first = create_asset(api, run_id, [{"path": "a", "size": 1}], asset_type="checkpoint")
    second = create_asset(api, run_id, [{"path": "b", "size": 1}], asset_type="config")
    first_id, second_id = first.json()["asset_id"], second.json()["asset_id"]
    listing = f"/api/v1/runs/{run_id}/assets"

    assert api.get(listing).json() == {"assets": []}
    assert_error(api.get(f"/api/v1/assets/{first_id}/download"), 404, "not_found")
    pending = api.get(listing, params={"include_pending": "true"}).json()["assets"]
    assert [a["asset_id"] for a in pending] == [first_id, second_id]
    assert all("components" not in a for a in pending)
    assert api.get(f"/api/v1/assets/{first_id}").json()["state"] == "pending"

    # A GET URL cannot be forged from a PUT target of a pending asset either.
    target = first.json()["targets"][0]
    assert httpx.get(target["url"], trust_env=False).status_code == 403

    for created, body in ((first, b"1"), (second, b"2")):
        assert put(created.json()["targets"][0], body).status_code == 201
    assert api.post(f"/api/v1/assets/{second_id}/finalize").status_code == 200
    assert [a["asset_id"] for a in api.get(listing).json()["assets"]] == [second_id]
    assert api.post(f"/api/v1/assets/{first_id}/finalize").status_code == 200
    assert [a["asset_id"] for a in api.get(listing).json()["assets"]] == [first_id, second_id]
    only = api.get(listing, params={"asset_type": "config"}).json()["assets"]
    assert [a["asset_id"] for a in only] == [second_id]
    assert api.get(f"/api/v1/assets/{first_id}/download").status_code == 200
    assert_error(api.get("/api/v1/runs/nope/assets"), 404, "not_found")


# ---- presigned URL integrity ---------------------------------------------------------------


@pytest.fixture
def one_target(api: httpx.Client, run_id: str) -> tuple[str, dict[str, Any]]:
    created = create_asset(
        api, run_id, [{"path": "a.bin", "size": 8}, {"path": "b.bin", "size": 8}]
    )
    return created.json()["asset_id"], created.json()["targets"][0]


def assert_nothing_stored(server: EmbeddedServer, api: httpx.Client, asset_id: str) -> None:
    asset = api.get(f"/api/v1/assets/{asset_id}").json()
    assert not any(c["stored"] for c in asset["components"])
    assert stored_files(server) == []
    assert temp_files(server) == []


def test_tampered_signature_is_403(
    server: EmbeddedServer, api: httpx.Client, one_target: tuple[str, dict[str, Any]]
) -> None:
    asset_id, target = one_target
    sig = parse_qs(urlsplit(target["url"]).query)["sig"][0]
    flipped = ("0" if sig[0] != "0" else "1") + sig[1:]
    for url in (
        with_query(target["url"], sig=flipped),
        with_query(target["url"], exp=str(int(target["expires_at"]) + 3600)),
        with_query(target["url"], len="4"),
        target["url"].split("&sig=")[0],
    ):
        response = httpx.put(
            url,
            content=b"12345678"[: int(parse_qs(urlsplit(url).query)["len"][0])],
            trust_env=False,
        )
        assert_error(response, 403, "forbidden")
    assert_nothing_stored(server, api, asset_id)


def test_url_re_pointed_at_another_path_or_asset_is_403(
    server: EmbeddedServer, api: httpx.Client, run_id: str, one_target: tuple[str, dict[str, Any]]
) -> None:
    asset_id, target = one_target
    other = create_asset(api, run_id, [{"path": "a.bin", "size": 8}]).json()["asset_id"]
    for url in (
        target["url"].replace("/a.bin?", "/b.bin?"),
        target["url"].replace(f"/blobs/{asset_id}/", f"/blobs/{other}/"),
    ):
        assert_error(httpx.put(url, content=b"12345678", trust_env=False), 403, "forbidden")
    # A PUT URL is not a GET URL.
    assert_error(httpx.get(target["url"], trust_env=False), 403, "forbidden")
    assert stored_files(server) == []


def test_wrong_length_is_400_and_stores_nothing(
    server: EmbeddedServer, api: httpx.Client, one_target: tuple[str, dict[str, Any]]
) -> None:
    asset_id, target = one_target
    for body in (b"1234567", b"123456789"):
        assert_error(
            httpx.put(target["url"], content=body, trust_env=False), 400, "invalid_request"
        )

    def chunked() -> Iterator[bytes]:
        yield b"12345678"

    assert_error(
        httpx.put(target["url"], content=chunked(), trust_env=False), 411, "length_required"
    )
    assert_nothing_stored(server, api, asset_id)


def test_expired_url_is_403(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from methodic.server import catalog as catalog_module
    from methodic.server import signing

    with EmbeddedServer(tmp_path / "s", presign_ttl=1) as srv, connect(srv) as api:
        created = create_asset(api, make_run(api), [{"path": "a", "size": 3}])
        target = created.json()["targets"][0]
        wait_until(lambda: time.time() > target["expires_at"] + 0.1, what="the URL's expiry")
        error = assert_error(put(target, b"abc"), 403, "forbidden")
        assert "expired" in error["message"]
        assert_nothing_stored(srv, api, created.json()["asset_id"])
        # A fresh presign works. (Given an hour, not the 1 s TTL: a loaded machine may take
        # longer than that between the presign and the PUT.)
        real_expiry = signing.expiry
        monkeypatch.setattr(catalog_module, "expiry", lambda ttl, now=None: real_expiry(3600, now))
        fresh = api.post(
            f"/api/v1/assets/{created.json()['asset_id']}/presign",
            json={"targets": [{"path": "a", "part": None}]},
        ).json()["targets"][0]
        assert put(fresh, b"abc").status_code == 201


def test_body_cut_short_leaves_nothing_stored(
    server: EmbeddedServer, api: httpx.Client, one_target: tuple[str, dict[str, Any]]
) -> None:
    asset_id, target = one_target
    url = urlsplit(target["url"])
    assert url.hostname is not None and url.port is not None
    with socket.create_connection((url.hostname, url.port), timeout=CEILING) as sock:
        head = (
            f"PUT {url.path}?{url.query} HTTP/1.1\r\nHost: {url.netloc}\r\n"
            f"Content-Length: {target['length']}\r\n\r\n"
        )
        sock.sendall(head.encode() + b"1234")
        wait_until(lambda: receiving_a_body(server), what="the server receiving the body")
    wait_until(lambda: uploads_released(server), what="the cut upload released")
    assert_nothing_stored(server, api, asset_id)
    assert put(target, b"12345678").status_code == 201


def test_put_to_a_finalized_asset_is_409(api: httpx.Client, run_id: str) -> None:
    created = create_asset(api, run_id, [{"path": "a", "size": 1}])
    target = created.json()["targets"][0]
    assert put(target, b"1").status_code == 201
    assert api.post(f"/api/v1/assets/{created.json()['asset_id']}/finalize").status_code == 200
    assert_error(put(target, b"1"), 409, "conflict")


def test_put_whose_checksum_differs_from_the_manifest_is_400(
    server: EmbeddedServer, api: httpx.Client, run_id: str
) -> None:
    created = create_asset(api, run_id, [{"path": "a", "size": 3, "sha256": sha(b"abc")}])
    error = assert_error(put(created.json()["targets"][0], b"abd"), 400, "invalid_request")
    assert "checksum mismatch" in error["message"]
    assert_nothing_stored(server, api, created.json()["asset_id"])


# ---- batch presign -------------------------------------------------------------------------


def test_batch_presign(api: httpx.Client, run_id: str) -> None:
    created = create_asset(
        api,
        run_id,
        [{"path": "a", "size": 10}, {"path": "big", "size": 10, "part_size": 4}],
        presign=False,
    )
    asset_id = created.json()["asset_id"]
    url = f"/api/v1/assets/{asset_id}/presign"
    asked = [{"path": "big", "part": 3}, {"path": "a", "part": None}, {"path": "big", "part": 1}]
    targets = api.post(url, json={"targets": asked}).json()["targets"]
    assert [(t["path"], t["part"], t["offset"], t["length"]) for t in targets] == [
        ("big", 3, 8, 2),
        ("a", None, 0, 10),
        ("big", 1, 0, 4),
    ]
    assert all(t["expires_at"] > time.time() for t in targets)
    assert_error(
        api.post(url, json={"targets": [{"path": "nope", "part": None}]}), 404, "not_found"
    )
    for bad in (
        {"path": "big", "part": 4},
        {"path": "big", "part": None},
        {"path": "a", "part": 1},
    ):
        assert_error(api.post(url, json={"targets": [bad]}), 400, "invalid_request")
    too_many = [{"path": "a", "part": None}] * 1001
    assert_error(api.post(url, json={"targets": too_many}), 413, "too_large")
    assert_error(api.post("/api/v1/assets/nope/presign", json={"targets": []}), 404, "not_found")


# ---- multipart -----------------------------------------------------------------------------


def test_multipart_parts_out_of_order(
    server: EmbeddedServer, api: httpx.Client, run_id: str
) -> None:
    data = os.urandom(3500)
    created = create_asset(
        api, run_id, [{"path": "weights.bin", "size": 3500, "part_size": 1000, "sha256": sha(data)}]
    )
    asset_id = created.json()["asset_id"]
    targets = {t["part"]: t for t in created.json()["targets"]}
    assert sorted(targets) == [1, 2, 3, 4]
    assert [targets[n]["length"] for n in (1, 2, 3, 4)] == [1000, 1000, 1000, 500]

    for n in (3, 1):
        response = put(targets[n], data)
        assert response.status_code == 201
        assert response.json()["sha256"] == sha(data[(n - 1) * 1000 : n * 1000])
    component = api.get(f"/api/v1/assets/{asset_id}").json()["components"][0]
    assert (component["stored"], component["parts_stored"]) == (False, [1, 3])

    error = assert_error(api.post(f"/api/v1/assets/{asset_id}/finalize"), 409, "asset_incomplete")
    assert error["missing"] == [
        {"path": "weights.bin", "reason": "not stored", "parts_missing": [2, 4]}
    ]

    for n in (4, 2, 2):  # re-sending a part is safe
        assert put(targets[n], data).status_code == 201
    component = api.get(f"/api/v1/assets/{asset_id}").json()["components"][0]
    assert (component["stored"], component["parts_stored"]) == (True, [1, 2, 3, 4])

    # A parted sha256 file's checksum is the composite: sha256 of its parts' raw digests, -N.
    parts = [hashlib.sha256(data[o : o + 1000]).digest() for o in range(0, 3500, 1000)]
    composite = f"sha256:{hashlib.sha256(b''.join(parts)).hexdigest()}-4"
    finalized = api.post(
        f"/api/v1/assets/{asset_id}/finalize", json={"checksums": {"weights.bin": composite}}
    )
    assert finalized.status_code == 200, finalized.text
    assert finalized.json()["components"][0]["sha256"] == sha(data)
    assert finalized.json()["components"][0]["checksum"] == composite
    url = api.get(f"/api/v1/assets/{asset_id}/download").json()["components"][0]["url"]
    assert httpx.get(url, trust_env=False).content == data
    assert len(stored_files(server)) == 1  # parts were written in place, not concatenated


def test_multipart_empty_component_is_one_empty_part(api: httpx.Client, run_id: str) -> None:
    created = create_asset(api, run_id, [{"path": "e", "size": 0, "part_size": 16}])
    [target] = created.json()["targets"]
    assert (target["part"], target["offset"], target["length"]) == (1, 0, 0)
    assert put(target, b"").status_code == 201
    assert api.post(f"/api/v1/assets/{created.json()['asset_id']}/finalize").status_code == 200


def test_too_many_parts_is_413(api: httpx.Client, run_id: str) -> None:
    response = create_asset(api, run_id, [{"path": "a", "size": 10**9, "part_size": 1000}])
    assert_error(response, 413, "too_large")


# ---- verification at finalize --------------------------------------------------------------


def test_checksum_mismatch_at_finalize_forgets_the_component(
    server: EmbeddedServer, api: httpx.Client, run_id: str
) -> None:
    good, sent = b"right bytes", b"wrong bytes"
    created = create_asset(
        api, run_id, [{"path": "a", "size": len(good)}, {"path": "b", "size": 1}]
    )
    asset_id = created.json()["asset_id"]
    targets = {t["path"]: t for t in created.json()["targets"]}
    assert put(targets["a"], sent).status_code == 201
    assert put(targets["b"], b"b").status_code == 201

    error = assert_error(
        api.post(f"/api/v1/assets/{asset_id}/finalize", json={"checksums": {"a": ck(good)}}),
        409,
        "asset_incomplete",
    )
    [missing] = error["missing"]
    assert missing["path"] == "a"
    assert missing["reason"].startswith("checksum mismatch")
    components = {c["path"]: c for c in api.get(f"/api/v1/assets/{asset_id}").json()["components"]}
    assert (components["a"]["stored"], components["b"]["stored"]) == (False, True)
    assert len(stored_files(server)) == 1

    assert put(targets["a"], good).status_code == 201
    finalized = api.post(f"/api/v1/assets/{asset_id}/finalize", json={"checksums": {"a": ck(good)}})
    assert finalized.status_code == 200


def test_multipart_manifest_checksum_mismatch_forgets_all_parts(
    server: EmbeddedServer, api: httpx.Client, run_id: str
) -> None:
    expected = b"A" * 10
    created = create_asset(
        api, run_id, [{"path": "m", "size": 10, "part_size": 4, "sha256": sha(expected)}]
    )
    asset_id = created.json()["asset_id"]
    for target in created.json()["targets"]:
        assert put(target, b"B" * 10).status_code == 201
    error = assert_error(api.post(f"/api/v1/assets/{asset_id}/finalize"), 409, "asset_incomplete")
    assert error["missing"][0]["reason"].startswith("checksum mismatch")
    component = api.get(f"/api/v1/assets/{asset_id}").json()["components"][0]
    assert (component["stored"], component["parts_stored"]) == (False, [])
    assert stored_files(server) == []


def test_bytes_lost_after_upload_are_caught_at_finalize(
    server: EmbeddedServer, api: httpx.Client, run_id: str
) -> None:
    created = create_asset(api, run_id, [{"path": "a", "size": 4}, {"path": "b", "size": 4}])
    asset_id = created.json()["asset_id"]
    for target in created.json()["targets"]:
        assert put(target, b"data").status_code == 201
    first, second = stored_files(server)
    first.write_bytes(b"dat")  # truncated, as a power cut before fsync could leave it
    second.write_bytes(b"DATA")  # same size, other bytes
    server.stop()  # a power cut restarts the server: it trusts no receipt of an earlier process
    server.start()
    error = assert_error(api.post(f"/api/v1/assets/{asset_id}/finalize"), 409, "asset_incomplete")
    reasons = {m["path"]: m["reason"] for m in error["missing"]}
    assert reasons["a"].startswith("size mismatch")
    assert reasons["b"].startswith("checksum mismatch")


def _store_then_alter_behind_the_servers_back(
    server: EmbeddedServer, api: httpx.Client, run_id: str, component: dict[str, Any]
) -> str:
    """A pending asset whose stored bytes were changed in place, with their mtime put back."""
    data = b"d" * component["size"]
    created = create_asset(api, run_id, [component])
    asset_id = created.json()["asset_id"]
    for target in created.json()["targets"]:
        assert put(target, data).status_code == 201
    [stored] = [p for p in stored_files(server) if asset_id in str(p)]
    st = stored.stat()
    with open(stored, "r+b") as f:
        f.write(b"D")
    os.utime(stored, ns=(st.st_atime_ns, st.st_mtime_ns))
    return asset_id


@pytest.mark.parametrize("part_size", [None, 4], ids=["whole", "parts"])
def test_finalize_reads_back_files_changed_behind_the_servers_back_even_with_mtime_restored(
    server: EmbeddedServer, api: httpx.Client, run_id: str, part_size: int | None
) -> None:
    """Finalize trusts its receipts only while a stored file's stamp (device, inode, size,
    mtime and ctime) is what it was when this process hashed the bytes. Bytes changed behind the
    server's back with their mtime put back change the ctime: they are read back and caught, in
    the same process as after a restart (which trusts no stamp at all)."""
    component = {"path": "a", "size": 10, "part_size": part_size}
    for restart in (False, True):
        altered = _store_then_alter_behind_the_servers_back(server, api, run_id, component)
        if restart:
            server.stop()
            server.start()
        error = assert_error(
            api.post(f"/api/v1/assets/{altered}/finalize"), 409, "asset_incomplete"
        )
        [missing] = error["missing"]
        assert missing["reason"].startswith("checksum mismatch")
        if part_size:
            assert missing["parts_missing"] == [1]


def test_a_part_resend_cut_short_makes_finalize_read_the_file_back(
    server: EmbeddedServer, api: httpx.Client, run_id: str
) -> None:
    """A failed PUT that overwrote part of a stored part: the receipts no longer vouch for it."""
    size, part = 4 * 1024 * 1024, 2 * 1024 * 1024
    created = create_asset(api, run_id, [{"path": "m", "size": size, "part_size": part}])
    asset_id = created.json()["asset_id"]
    targets = created.json()["targets"]
    for target in targets:
        assert put(target, b"m" * size).status_code == 201
    [stored] = stored_files(server)
    st = stored.stat()
    url = urlsplit(targets[0]["url"])
    assert url.hostname is not None and url.port is not None
    with socket.create_connection((url.hostname, url.port), timeout=CEILING) as sock:
        head = f"PUT {url.path}?{url.query} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Length: {part}\r\n\r\n"
        sock.sendall(head.encode() + b"X" * (part * 3 // 4))  # other bytes, then the line drops
        # The listener writes the buffers it filled into the stored part.
        wait_until(lambda: stored.read_bytes()[:1] == b"X", what="the resent bytes written")
    wait_until(lambda: uploads_released(server), what="the aborted upload released")
    # As if it all happened within one tick of the file clock: the stamp alone cannot tell.
    os.utime(stored, ns=(st.st_atime_ns, st.st_mtime_ns))
    error = assert_error(api.post(f"/api/v1/assets/{asset_id}/finalize"), 409, "asset_incomplete")
    [missing] = error["missing"]
    assert missing["reason"].startswith("checksum mismatch") and missing["parts_missing"] == [1]


def test_unknown_path_in_checksums_is_400(api: httpx.Client, run_id: str) -> None:
    created = create_asset(api, run_id, [{"path": "a", "size": 1}])
    response = api.post(
        f"/api/v1/assets/{created.json()['asset_id']}/finalize",
        json={"checksums": {"zzz": ck(b"")}},
    )
    assert_error(response, 400, "invalid_request")


# ---- delete --------------------------------------------------------------------------------


def test_delete_aborts_a_pending_asset(
    server: EmbeddedServer, api: httpx.Client, run_id: str
) -> None:
    created = create_asset(
        api, run_id, [{"path": "a", "size": 4}, {"path": "p", "size": 8, "part_size": 4}]
    )
    asset_id = created.json()["asset_id"]
    for target in created.json()["targets"]:
        assert put(target, b"12345678").status_code == 201
    assert len(stored_files(server)) == 2

    response = api.delete(f"/api/v1/assets/{asset_id}")
    assert response.status_code == 204
    assert stored_files(server) == []
    assert_error(api.get(f"/api/v1/assets/{asset_id}"), 404, "not_found")
    assert_error(put(created.json()["targets"][0], b"12345678"), 404, "not_found")
    assert_error(api.delete(f"/api/v1/assets/{asset_id}"), 404, "not_found")
    # The id is free again.
    assert (
        create_asset(api, run_id, [{"path": "x", "size": 1}], asset_id=asset_id).status_code == 201
    )


def test_delete_of_a_finalized_asset_is_409(api: httpx.Client, run_id: str) -> None:
    created = create_asset(api, run_id, [{"path": "a", "size": 1}])
    asset_id = created.json()["asset_id"]
    assert put(created.json()["targets"][0], b"1").status_code == 201
    assert api.post(f"/api/v1/assets/{asset_id}/finalize").status_code == 200
    assert_error(api.delete(f"/api/v1/assets/{asset_id}"), 409, "conflict")
    assert api.get(f"/api/v1/assets/{asset_id}/download").status_code == 200


# ---- keys and data dir ---------------------------------------------------------------------


def test_generated_key_is_written_once_and_survives_restarts(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with EmbeddedServer(data_dir) as first:
        key = first.api_key
    key_file = data_dir / "api_key"
    assert key is not None and key.startswith("sk_agent_")
    assert key_file.read_text().strip() == key
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert (data_dir / "secret").stat().st_mode & 0o777 == 0o600
    assert data_dir.stat().st_mode & 0o777 == 0o700
    mtime = key_file.stat().st_mtime_ns

    with EmbeddedServer(data_dir) as second, connect(second) as api:
        assert second.api_key == key
        assert api.get("/api/v1/experiments").status_code == 200
    assert key_file.stat().st_mtime_ns == mtime
    # Only hashes are kept in the metadata database.
    assert key.encode() not in (data_dir / "metadata.sqlite").read_bytes()


def test_given_key_is_the_one_accepted(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with EmbeddedServer(data_dir) as srv:
        generated = srv.api_key
    with EmbeddedServer(data_dir, api_key="sk_agent_given-for-this-test") as srv:
        assert srv.api_key == "sk_agent_given-for-this-test"
        with connect(srv) as api:
            assert api.get("/api/v1/experiments").status_code == 200
        wrong = httpx.get(
            f"{srv.url}/api/v1/experiments",
            headers={"Authorization": f"Bearer {generated}"},
            trust_env=False,
        )
        assert wrong.status_code == 401


def test_a_restart_keeps_the_data(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with EmbeddedServer(data_dir) as srv, connect(srv) as api:
        created = create_asset(api, make_run(api), [{"path": "a", "size": 2}])
        asset_id = created.json()["asset_id"]
        assert put(created.json()["targets"][0], b"ok").status_code == 201
    with EmbeddedServer(data_dir) as srv, connect(srv) as api:
        assert api.get(f"/api/v1/assets/{asset_id}").json()["components"][0]["stored"]
        assert api.post(f"/api/v1/assets/{asset_id}/finalize").status_code == 200
        url = api.get(f"/api/v1/assets/{asset_id}/download").json()["components"][0]["url"]
        assert httpx.get(url, trust_env=False).content == b"ok"


# ---- limits --------------------------------------------------------------------------------


def test_limits_are_413(tmp_path: Path) -> None:
    config = ServerConfig(
        data_dir=tmp_path / "s", port=0, max_json_body=10_000, max_components_per_asset=3
    )
    with EmbeddedServer.from_config(config) as srv, connect(srv) as api:
        run_id = make_run(api)
        too_many = [{"path": f"f{i}", "size": 1} for i in range(4)]
        assert_error(create_asset(api, run_id, too_many), 413, "too_large")
        huge = [{"path": "x" * 200 + str(i), "size": 1} for i in range(3)] * 20
        assert_error(create_asset(api, run_id, huge), 413, "too_large")

        def chunked() -> Iterator[bytes]:
            yield b'{"name": "'
            for _ in range(20):
                yield b"y" * 1000
            yield b'"}'

        response = api.post(
            "/api/v1/experiments", content=chunked(), headers={"Content-Type": "application/json"}
        )
        assert_error(response, 413, "too_large")
        # Without the key the body is not even read: 401 before 413.
        anonymous = httpx.post(
            f"{srv.url}/api/v1/experiments", content=b"x" * 20_000, trust_env=False
        )
        assert_error(anonymous, 401, "unauthorized")
        names = [e["name"] for e in api.get("/api/v1/experiments").json()["experiments"]]
        assert names == ["exp"]


# ---- concurrency ---------------------------------------------------------------------------


def test_concurrent_uploads_of_many_components_and_parts(api: httpx.Client, run_id: str) -> None:
    files = {f"shard-{i:02d}.bin": os.urandom(1000 + i) for i in range(24)}
    components: list[dict[str, Any]] = [{"path": p, "size": len(d)} for p, d in files.items()]
    components[0]["part_size"] = 100  # one component in 11 parts, sent at the same time
    created = create_asset(api, run_id, components)
    asset_id = created.json()["asset_id"]
    with ThreadPoolExecutor(max_workers=8) as pool:
        codes = list(
            pool.map(lambda t: put(t, files[t["path"]]).status_code, created.json()["targets"])
        )
    assert codes == [201] * len(created.json()["targets"])
    assert api.post(f"/api/v1/assets/{asset_id}/finalize").status_code == 200
    for component in api.get(f"/api/v1/assets/{asset_id}/download").json()["components"]:
        assert httpx.get(component["url"], trust_env=False).content == files[component["path"]]


def test_finalize_during_a_part_upload_reports_it_in_progress(
    api: httpx.Client, run_id: str
) -> None:
    created = create_asset(api, run_id, [{"path": "p", "size": 8, "part_size": 8}])
    asset_id = created.json()["asset_id"]
    [target] = created.json()["targets"]
    url = urlsplit(target["url"])
    assert url.hostname is not None and url.port is not None
    with socket.create_connection((url.hostname, url.port), timeout=CEILING) as sock:
        head = f"PUT {url.path}?{url.query} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Length: 8\r\n\r\n"
        sock.sendall(head.encode() + b"1234")
        wait_until(
            lambda: (
                api.post(f"/api/v1/assets/{asset_id}/finalize").json()["error"]["missing"][0][
                    "reason"
                ]
                == "upload in progress"
            ),
            what="finalize saying the upload is in progress",
        )
        sock.sendall(b"5678")
        assert sock.recv(4096).startswith(b"HTTP/1.1 201")
    assert api.post(f"/api/v1/assets/{asset_id}/finalize").status_code == 200
