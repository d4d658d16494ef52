"""Where blob bytes go never changes silently: a restart whose remembered blob port is taken is
refused (unless told to move), and presigned URLs name the server that issued them, so another
Chronicle server answers 421 and every blob answer says which server gave it."""

from __future__ import annotations

import re
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import httpx
import pytest
from helpers import methodic_cmd, subprocess_env

from methodic.server import EmbeddedServer
from methodic.server.assemble import ListenError

CEILING_S = 60.0
SERVER_HEADER = "X-Methodic-Server-Id"


def connect(srv: EmbeddedServer) -> httpx.Client:
    return httpx.Client(
        base_url=srv.url or "",
        headers={"Authorization": f"Bearer {srv.api_key}"},
        timeout=CEILING_S,
        trust_env=False,
    )


def new_target(srv: EmbeddedServer, body: bytes) -> dict[str, Any]:
    with connect(srv) as api:
        experiment = api.post("/api/v1/experiments", json={"name": uuid.uuid4().hex}).json()["id"]
        run = api.put(f"/api/v1/experiments/{experiment}/runs/0/0").json()["id"]
        spec = {
            "asset_id": uuid.uuid4().hex,
            "asset_type": "checkpoint",
            "components": [{"path": "model.bin", "size": len(body)}],
            "presign": True,
        }
        response = api.post(f"/api/v1/runs/{run}/assets", json=spec)
        assert response.status_code == 201, response.text
        target: dict[str, Any] = response.json()["targets"][0]
        return target


def stored(srv: EmbeddedServer) -> list[Path]:
    return [p for p in (srv.data_dir / "blobs").rglob("*") if p.is_file()]


@pytest.fixture
def squatter() -> Iterator[list[socket.socket]]:
    held: list[socket.socket] = []
    yield held
    for sock in held:
        sock.close()


def squat(held: list[socket.socket], port: int) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    sock.listen()
    held.append(sock)


def serve_to_exit(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        methodic_cmd("serve", "--data-dir", str(data_dir), "--port", "0", *args),
        capture_output=True,
        text=True,
        timeout=CEILING_S,
        env=subprocess_env(),
    )


def test_serve_refuses_to_move_a_taken_blob_port(
    tmp_path: Path, squatter: list[socket.socket]
) -> None:
    data_dir = tmp_path / "d"
    with EmbeddedServer(data_dir) as first:  # the data dir's first server picks a port
        port = first.blob_port
    assert port is not None and (data_dir / "blob_port").read_text().strip() == str(port)
    squat(squatter, port)
    result = serve_to_exit(data_dir)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(port) in lines[0] and "--blob-port 0" in lines[0], lines[0]
    assert (data_dir / "blob_port").read_text().strip() == str(port)  # still remembered


def test_an_embedded_server_refuses_too_and_moves_when_told(
    tmp_path: Path, squatter: list[socket.socket]
) -> None:
    data_dir = tmp_path / "d"
    with EmbeddedServer(data_dir) as first:
        port = first.blob_port
    assert port is not None
    squat(squatter, port)
    with pytest.raises(ListenError) as refused:
        EmbeddedServer(data_dir).start()
    assert str(port) in str(refused.value) and "blob_port=0" in str(refused.value)
    assert refused.value.remembered
    with EmbeddedServer(data_dir, blob_port=0) as moved:  # told to move
        assert moved.blob_port not in (None, port)
    assert (data_dir / "blob_port").read_text().strip() == str(moved.blob_port)


def test_a_url_presigned_by_another_server_is_421_and_stores_nothing(tmp_path: Path) -> None:
    body = b"checkpoint bytes"
    with EmbeddedServer(tmp_path / "a") as a, EmbeddedServer(tmp_path / "b") as b:
        target = new_target(a, body)
        url = urlsplit(target["url"])
        a_id = parse_qs(url.query)["sid"][0]
        # The same URL, reaching server b (e.g. b now listens where a used to).
        misdirected = urlunsplit(url._replace(netloc=f"127.0.0.1:{b.blob_port}"))
        response = httpx.put(misdirected, content=body, trust_env=False, timeout=CEILING_S)
        assert response.status_code == 421, response.text
        error = response.json()["error"]
        assert error["code"] == "misdirected"
        assert "presign again" in error["message"]
        b_id = response.headers[SERVER_HEADER]
        assert b_id != a_id and a_id in error["message"]
        assert stored(b) == []
        # Sent where it was meant to go, it is stored, and the answer names the issuer.
        ok = httpx.put(target["url"], content=body, trust_env=False, timeout=CEILING_S)
        assert ok.status_code == 201 and ok.headers[SERVER_HEADER] == a_id


def test_the_100_continue_names_the_server_before_a_byte_of_body_is_sent(
    server: EmbeddedServer,
) -> None:
    body = b"x" * 1000
    target = new_target(server, body)
    url = urlsplit(target["url"])
    sid = parse_qs(url.query)["sid"][0]
    assert url.hostname is not None and url.port is not None
    with socket.create_connection((url.hostname, url.port), timeout=CEILING_S) as sock:
        sock.sendall(
            f"PUT {url.path}?{url.query} HTTP/1.1\r\nHost: {url.netloc}\r\n"
            f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        interim = b""
        while b"\r\n\r\n" not in interim:
            chunk = sock.recv(4096)
            assert chunk, interim
            interim += chunk
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n")
        assert f"{SERVER_HEADER}: {sid}\r\n".encode() in interim
        sock.sendall(body)
        final = interim.partition(b"\r\n\r\n")[2]
        while b"\r\n\r\n" not in final:
            chunk = sock.recv(4096)
            assert chunk, final
            final += chunk
    assert final.startswith(b"HTTP/1.1 201")
    assert re.search(rf"{SERVER_HEADER}: {sid}\r\n".encode(), final)


def test_refusals_name_the_server_too(server: EmbeddedServer) -> None:
    target = new_target(server, b"abc")
    sid = parse_qs(urlsplit(target["url"]).query)["sid"][0]
    tampered = target["url"].replace("sig=", "sig=0")
    response = httpx.put(tampered, content=b"abc", trust_env=False, timeout=CEILING_S)
    assert response.status_code == 403 and response.headers[SERVER_HEADER] == sid
