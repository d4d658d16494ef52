"""Hardening of the server: auth on every route, keys at rest, signed URLs, limits, privacy, logs."""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from conftest import Served
from helpers import (
    CEILING,
    connect,
    free_port,
    make_checkpoint,
    methodic_cmd,
    stop_process,
    subprocess_env,
    with_query,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from methodic import Chronicle, UploadTracker
from methodic._paths import component_path_problem
from methodic.server import EmbeddedServer, ServerConfig

MiB = 1 << 20
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]


def new_asset(api: httpx.Client, components: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    exp = api.post("/api/v1/experiments", json={"name": "hardening"}).json()["id"]
    run = api.put(f"/api/v1/experiments/{exp}/runs/0/0").json()["id"]
    body = {
        "asset_id": uuid.uuid4().hex,
        "asset_type": "x",
        "components": components,
        "presign": True,
        **extra,
    }
    return dict(api.post(f"/api/v1/runs/{run}/assets", json=body).json())


def stored_files(srv: EmbeddedServer) -> list[Path]:
    return [p for p in (srv.data_dir / "blobs").rglob("*") if p.is_file()]


# ---- a key on every route but /healthz and the OpenAPI document -----------------------------


def test_every_route_but_healthz_and_openapi_requires_a_key(server: EmbeddedServer) -> None:
    anonymous = httpx.Client(base_url=server.url or "", trust_env=False, timeout=10)
    with anonymous:
        assert anonymous.get("/healthz").status_code == 200
        spec = anonymous.get("/openapi.json")
        assert spec.status_code == 200
        paths = [re.sub(r"\{[^}]+\}", "x1", p) for p in spec.json()["paths"] if p != "/healthz"]
        paths += [
            "/docs",
            "/docs/oauth2-redirect",
            "/redoc",
            "/",
            "/api/v1/no-such-route",
            "/admin",
        ]
        wrong = {"Authorization": "Bearer sk_agent_wrong-key-000000000000"}
        for path in paths:
            for method in METHODS:
                for headers in ({}, wrong):
                    response = anonymous.request(method, path, headers=headers)
                    assert response.status_code == 401, (method, path, response.status_code)
                    assert response.headers["www-authenticate"] == "Bearer"
    # With the key, /docs (the interactive page) is served.
    with connect(server) as api:
        assert api.get("/docs").status_code == 200


def test_keys_are_hashed_at_rest_and_never_written_elsewhere(tmp_path: Path) -> None:
    given_key = "sk_agent_given-" + uuid.uuid4().hex
    with EmbeddedServer(tmp_path / "generated") as srv, connect(srv) as api:
        api.post("/api/v1/experiments", json={"name": "e"}).raise_for_status()
        generated = srv.api_key
    with EmbeddedServer(tmp_path / "given", api_key=given_key) as srv, connect(srv) as api:
        api.post("/api/v1/experiments", json={"name": "e"}).raise_for_status()
    assert generated is not None
    for data_dir, key, allowed in (
        (tmp_path / "generated", generated, {"api_key"}),
        (tmp_path / "given", given_key, set()),
    ):
        holders = {
            p.name for p in data_dir.rglob("*") if p.is_file() and key.encode() in p.read_bytes()
        }
        assert holders == allowed


def test_keys_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    from methodic.server import keys

    calls: list[tuple[bytes, bytes]] = []
    real = keys.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(keys.hmac, "compare_digest", spy)
    ring = keys.KeyRing([keys.hash_api_key("sk_agent_right")])
    assert ring.verify("sk_agent_right") and not ring.verify("sk_agent_wrong")
    # Digests of equal length are compared, never the presented text itself.
    assert len(calls) == 2 and all(len(a) == len(b) == 32 for a, b in calls)
    assert not ring.verify(None) and not ring.verify("x" * 10_000)


# ---- presigned local URLs: bound to method, key, range and expiry ---------------------------


def test_tampered_re_pointed_or_misused_urls_are_403_and_store_nothing(
    server: EmbeddedServer, api: httpx.Client
) -> None:
    data = os.urandom(10)
    asset = new_asset(api, [{"path": "m", "size": 10, "part_size": 4}, {"path": "o", "size": 10}])
    other = new_asset(api, [{"path": "m", "size": 10, "part_size": 4}])
    part1 = next(t for t in asset["targets"] if t["part"] == 1)
    whole = next(t for t in asset["targets"] if t["path"] == "o")
    sig = parse_qs(urlsplit(part1["url"]).query)["sig"][0]
    attempts = [
        ("PUT", with_query(part1["url"], sig=sig[::-1]), data[:4]),  # tampered signature
        ("PUT", with_query(part1["url"], part="2", off="4"), data[4:8]),  # another part
        ("PUT", with_query(part1["url"], len="3"), data[:3]),  # another length
        (
            "PUT",
            with_query(part1["url"], exp=str(int(time.time()) + 86400)),
            data[:4],
        ),  # longer life
        ("PUT", part1["url"].replace("/m?", "/o?"), data[:4]),  # another component
        (
            "PUT",
            part1["url"].replace(asset["asset_id"], other["asset_id"]),
            data[:4],
        ),  # another asset
        ("PUT", whole["url"].split("&sig=")[0], data),  # no signature
        ("GET", whole["url"], b""),  # a PUT grant is not a GET grant
        ("POST", whole["url"], data),
    ]
    for method, url, body in attempts:
        response = httpx.request(method, url, content=body, trust_env=False)
        assert response.status_code in (403, 405), (method, url, response.status_code)
        if response.status_code == 403:
            assert response.json()["error"]["code"] == "forbidden"
    assert stored_files(server) == []
    for asset_id in (asset["asset_id"], other["asset_id"]):
        components = api.get(f"/api/v1/assets/{asset_id}").json()["components"]
        assert not any(c["stored"] or c["parts_stored"] for c in components)


def test_an_expired_url_is_403_and_stores_nothing(tmp_path: Path) -> None:
    with EmbeddedServer(tmp_path / "s", presign_ttl=1) as srv, connect(srv) as api:
        asset = new_asset(api, [{"path": "a", "size": 3}])
        target = asset["targets"][0]
        time.sleep(max(0.0, target["expires_at"] - time.time()) + 1.1)
        response = httpx.put(target["url"], content=b"abc", trust_env=False)
        assert response.status_code == 403 and "expired" in response.json()["error"]["message"]
        assert stored_files(srv) == []
        assert not api.get(f"/api/v1/assets/{asset['asset_id']}").json()["components"][0]["stored"]


# ---- limits and validation ------------------------------------------------------------------


def test_bodies_and_manifests_over_the_limits_are_413(tmp_path: Path) -> None:
    config = ServerConfig(
        data_dir=tmp_path / "s",
        port=0,
        max_json_body=64 * 1024,
        max_components_per_asset=10,
        max_presign_batch=5,
    )
    with EmbeddedServer.from_config(config) as srv, connect(srv) as api:
        big = {"name": "x" * (65 * 1024)}
        assert api.post("/api/v1/experiments", json=big).status_code == 413
        too_many = new_asset(api, [{"path": f"f{i}", "size": 1} for i in range(11)])
        assert too_many["error"]["code"] == "too_large"
        ok = new_asset(api, [{"path": f"f{i}", "size": 1} for i in range(10)], presign=False)
        batch = {"targets": [{"path": "f0", "part": None}] * 6}
        response = api.post(f"/api/v1/assets/{ok['asset_id']}/presign", json=batch)
        assert response.status_code == 413
        # A declared Content-Length over the limit is refused before a byte of body is sent.
        url = urlsplit(srv.url or "")
        assert url.hostname is not None and url.port is not None
        with socket.create_connection((url.hostname, url.port), timeout=CEILING) as sock:
            sock.sendall(
                f"POST /api/v1/experiments HTTP/1.1\r\nHost: {url.netloc}\r\n"
                f"Authorization: Bearer {srv.api_key}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {10 * MiB}\r\n\r\n".encode()
            )
            assert sock.recv(4096).startswith(b"HTTP/1.1 413")


@pytest.fixture(scope="module")
def path_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EmbeddedServer, str]]:
    with EmbeddedServer(tmp_path_factory.mktemp("paths")) as srv, connect(srv) as api:
        exp = api.post("/api/v1/experiments", json={"name": "paths"}).json()["id"]
        yield srv, api.put(f"/api/v1/experiments/{exp}/runs/0/0").json()["id"]


_PATH_ALPHABET = st.sampled_from(
    ["a", "b", "/", ".", "..", "\\", "\x00", " ", "é", "\ud800", "~", "x" * 300]
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(parts=st.lists(_PATH_ALPHABET, min_size=0, max_size=8))
def test_component_paths_are_validated_by_the_server(
    path_server: tuple[EmbeddedServer, str], parts: list[str]
) -> None:
    srv, run_id = path_server
    path = "".join(parts)
    body = {
        "asset_id": uuid.uuid4().hex,
        "asset_type": "x",
        "components": [{"path": path, "size": 1}],
    }
    with connect(srv) as api:
        try:
            content = httpx.Request("POST", "/", json=body).content
        except UnicodeEncodeError:  # a lone surrogate cannot even be sent as JSON text
            content = None
        if content is None:
            return
        response = api.post(
            f"/api/v1/runs/{run_id}/assets",
            content=content,
            headers={"Content-Type": "application/json"},
        )
    bad = component_path_problem(path) is not None
    assert response.status_code == (400 if bad else 201), (path, response.text)


# ---- a private data dir, loopback by default --------------------------------------------------


def test_the_data_dir_and_its_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        with EmbeddedServer(tmp_path / "d") as srv, connect(srv) as api:
            asset = new_asset(api, [{"path": "a", "size": 1}])
            httpx.put(asset["targets"][0]["url"], content=b"1", trust_env=False).raise_for_status()
    finally:
        os.umask(old)
    d = tmp_path / "d"
    assert d.stat().st_mode & 0o777 == 0o700
    for name in ("blobs", "tmp"):
        assert (d / name).stat().st_mode & 0o777 == 0o700
    for name in ("api_key", "secret", "metadata.sqlite"):
        assert (d / name).stat().st_mode & 0o777 == 0o600, name
    for path in (d / "blobs").rglob("*"):
        assert path.stat().st_mode & 0o077 == 0, path


def test_the_server_binds_loopback_unless_told() -> None:
    from methodic.server.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1"
    assert EmbeddedServer("/nonexistent").host == "127.0.0.1"


def _serve_stderrs(tmp_path: Path, *variants: list[str]) -> list[str]:
    """Start `methodic serve` once per variant (at the same time), stop each once it serves."""
    procs = [
        subprocess.Popen(
            methodic_cmd(
                "serve", "--data-dir", str(tmp_path / f"d{i}"), "--port", str(free_port()), *args
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=subprocess_env(),
        )
        for i, args in enumerate(variants)
    ]
    errs = []
    for proc in procs:
        try:
            assert proc.stdout is not None
            # Until it serves (or exits): readline blocks until a line or EOF, no deadline needed.
            while (line := proc.stdout.readline()) and "listening" not in line:
                pass
        finally:
            errs.append(stop_process(proc)[1])
    return errs


def test_a_non_loopback_bind_without_tls_warns_and_with_tls_does_not(tmp_path: Path) -> None:
    plain, behind_tls = _serve_stderrs(
        tmp_path,
        ["--host", "0.0.0.0"],
        ["--host", "0.0.0.0", "--public-url", "https://chronicle.example"],
    )
    assert "warning" in plain and "TLS" in plain
    assert "warning" not in behind_tls


# ---- no secret in any log line --------------------------------------------------------------


SECRET_PATTERNS = (r"sig=[0-9a-f]{16}", r"X-Amz-Signature=[0-9a-f]{16}", r"sk_agent_\w{8}")


def _secrets_in(lines: list[str], extra: list[str]) -> list[str]:
    return [
        line
        for line in lines
        if any(re.search(p, line) for p in SECRET_PATTERNS) or any(s in line for s in extra)
    ]


def _full_upload(url: str, key: str, tmp_path: Path) -> None:
    """An upload with parts, a download, and refused requests (401, 403): every code path logs."""
    ckpt = make_checkpoint(tmp_path / "ckpt", {"a.bin": 1000, "big.bin": 11 * MiB})
    with Chronicle(url, key, part_threshold=8 * MiB, part_size=5 * MiB) as chronicle:
        run = chronicle.run(chronicle.create_experiment("logs"), 0, 0)
        handle = run.register_and_upload_async(
            ckpt, upload_tracker=UploadTracker(tmp_path / "u.sqlite")
        )
        handle.result(timeout=CEILING)
        data = httpx.get(
            f"{url}/api/v1/assets/{handle.asset_id}/download",
            headers={"Authorization": f"Bearer {key}"},
            trust_env=False,
        ).json()
        run.download_asset(handle.asset_id, tmp_path / "dl")
    httpx.get(
        f"{url}/api/v1/experiments",
        headers={"Authorization": "Bearer sk_agent_nope-nope-nope"},
        trust_env=False,
    )
    tampered = data["components"][0]["url"].replace("sig=", "sig=0")
    httpx.get(tampered, trust_env=False)


def test_no_secret_in_the_servers_or_methodics_log_lines(
    any_server: EmbeddedServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    assert any_server.url is not None and any_server.api_key is not None
    _full_upload(any_server.url, any_server.api_key, tmp_path)
    ours = [
        r.getMessage() for r in caplog.records if r.name.split(".")[0] in ("methodic", "uvicorn")
    ]
    # (A session token is no such secret: SigV4 puts it in every presigned URL, by design.)
    aws = [v for v in (os.environ.get("AWS_SECRET_ACCESS_KEY"),) if v]
    assert _secrets_in(ours, [any_server.api_key, *aws]) == []
    everything = [r.getMessage() for r in caplog.records]
    assert not [line for line in everything if any(s in line for s in [any_server.api_key, *aws])]


def test_no_presigned_signature_in_any_info_log_line(
    server: EmbeddedServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    assert server.url is not None and server.api_key is not None
    _full_upload(server.url, server.api_key, tmp_path)
    assert _secrets_in([r.getMessage() for r in caplog.records], [server.api_key]) == []


def test_methodic_serve_logs_no_secret(served: Served, tmp_path: Path) -> None:
    _full_upload(served.url, served.api_key, tmp_path)
    out, err = stop_process(served.proc)
    assert _secrets_in((out + err).splitlines(), [served.api_key]) == []
