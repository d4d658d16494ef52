"""The sendfile PUT path: used for plain-HTTP targets, keeps connections alive, falls back."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import socket
import uuid
from pathlib import Path

import httpx
import pytest
from helpers import CEILING, make_checkpoint, tree_digest, wait_until_async

import methodic._transfer as transfer
from methodic import Chronicle, UploadTracker
from methodic._bandwidth import TokenBucket
from methodic._sendfile import Connections
from methodic._transfer import FileChangedError, FileIdentity, TransferError, send_range
from methodic._types import UploadTarget
from methodic.server import EmbeddedServer

MiB = 1 << 20


@pytest.mark.parametrize(
    "storage_backend", ["local"]
)  # moto's proxy also carries the server's calls
def test_bodies_go_by_sendfile_over_one_kept_alive_connection(
    any_server, any_proxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = transfer.put_file_range

    async def counting(*args, **kwargs):
        calls.append(args[1].length)
        return await real(*args, **kwargs)

    monkeypatch.setattr(transfer, "put_file_range", counting)
    sizes = {f"w{i}.bin": 3 * MiB + i for i in range(4)}
    ckpt = make_checkpoint(tmp_path / "ckpt", sizes)
    with Chronicle(any_proxy.url, any_server.api_key, max_upload_workers=1) as chronicle:
        run = chronicle.run(chronicle.create_experiment("sendfile"), 0, 0)
        handle = run.register_and_upload_async(
            ckpt, upload_tracker=UploadTracker(tmp_path / "u.sqlite")
        )
        handle.result(timeout=CEILING)
        connections, sent = any_proxy.connections, any_proxy.bytes_up
        dest = run.download_asset(handle.asset_id, tmp_path / "dl")
    assert sorted(calls) == sorted(sizes.values())
    assert tree_digest(dest) == tree_digest(ckpt)
    assert connections == 1  # one worker, one kept-alive connection for all four bodies
    assert sum(sizes.values()) <= sent < sum(sizes.values()) + 64 * 1024


@pytest.mark.parametrize(
    ("url", "env", "direct"),
    [
        ("http://127.0.0.1:9/b", {}, True),
        ("https://127.0.0.1:9/b", {}, False),
        ("http://127.0.0.1:9/b", {"HTTP_PROXY": "http://proxy:3128"}, False),
        ("http://127.0.0.1:9/b", {"ALL_PROXY": "http://proxy:3128"}, False),
        (
            "http://127.0.0.1:9/b",
            {"HTTP_PROXY": "http://proxy:3128", "NO_PROXY": "127.0.0.1"},
            True,
        ),
    ],
)
def test_sendfile_only_where_no_proxy_applies(
    url: str, env: dict[str, str], direct: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert transfer._direct(url) is direct


class _OneShotServer:
    """Answers each PUT with 200 and its sha256 as ETag, then closes: a keep-alive that ends."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.connections = 0
        self.closed = 0  # connections this side has closed (FIN sent)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        body = await reader.readexactly(length)
        self.bodies.append(body)
        etag = hashlib.sha256(body).hexdigest()
        writer.write(f'HTTP/1.1 200 OK\r\nContent-Length: 0\r\nETag: "{etag}"\r\n\r\n'.encode())
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        self.closed += 1


@pytest.mark.parametrize("by_sendfile", [True, False], ids=["sendfile", "httpx"])
async def test_ranges_arrive_whole_and_a_closed_connection_is_not_reused(
    by_sendfile: bool, tmp_path: Path
) -> None:
    """Both body paths: the sendfile one (pool connections) and httpx's (https, proxies)."""
    data = os.urandom(3 * MiB)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    st = path.stat()
    identity = FileIdentity(str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    peer = _OneShotServer()
    server = await asyncio.start_server(peer.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    connections = Connections()
    try:
        async with httpx.AsyncClient() as http:
            for offset, length in ((0, 2 * MiB), (MiB, 2 * MiB)):
                target = UploadTarget(
                    path="f.bin",
                    part=None,
                    method="PUT",
                    url=f"http://127.0.0.1:{port}/b",
                    headers={},
                    offset=offset,
                    length=length,
                    expires_at=0.0,
                )
                # The server has closed the previous connection (so it must not be reused).
                await wait_until_async(lambda: peer.closed == peer.connections, what="closed")
                etag = await send_range(
                    http,
                    target,
                    identity,
                    TokenBucket(None),
                    lambda n: None,
                    connections if by_sendfile else None,
                )
                digest = hashlib.sha256(data[offset : offset + length]).hexdigest()
                assert etag is not None and etag.strip('"') == digest  # what arrived, whole
    finally:
        connections.close()
        server.close()
        await server.wait_closed()
    assert peer.connections == 2
    assert peer.bodies == [data[: 2 * MiB], data[MiB : 3 * MiB]]


@pytest.mark.parametrize("by_sendfile", [True, False], ids=["sendfile", "httpx"])
async def test_a_range_past_the_end_of_the_file_fails_as_changed(
    by_sendfile: bool, tmp_path: Path
) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(2 * MiB))  # the registered size is right; the range is not:
    identity = FileIdentity(str(path), 2 * MiB, None, None)  # as if it shrank during the send
    peer = _OneShotServer()
    server = await asyncio.start_server(peer.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    target = UploadTarget(
        path="f.bin",
        part=None,
        method="PUT",
        url=f"http://127.0.0.1:{port}/b",
        headers={},
        offset=0,
        length=3 * MiB,
        expires_at=0.0,
    )
    progress: list[int] = []
    connections = Connections()
    try:
        async with httpx.AsyncClient() as http:
            with pytest.raises(FileChangedError, match="shrank"):
                await send_range(
                    http,
                    target,
                    identity,
                    TokenBucket(None),
                    progress.append,
                    connections if by_sendfile else None,
                )
    finally:
        connections.close()
        server.close()
        await server.wait_closed()
    assert sum(progress) == 0 and peer.bodies == []


def _granted_target(srv: EmbeddedServer, size: int) -> UploadTarget:
    """A presigned PUT target for one ``size``-byte component of a new pending asset."""
    with httpx.Client(
        base_url=srv.url or "", headers={"Authorization": f"Bearer {srv.api_key}"}, trust_env=False
    ) as api:
        experiment = api.post("/api/v1/experiments", json={"name": "refusals"}).json()
        run_id = api.put(f"/api/v1/experiments/{experiment['id']}/runs/0/0").json()["id"]
        created = api.post(
            f"/api/v1/runs/{run_id}/assets",
            json={
                "asset_id": uuid.uuid4().hex,
                "asset_type": "checkpoint",
                "metadata": {},
                "components": [{"path": "f.bin", "size": size}],
                "presign": True,
            },
        )
        assert created.status_code == 201, created.text
        return UploadTarget.from_json(created.json()["targets"][0])


@pytest.mark.parametrize("case", ["expired", "tampered"])
async def test_a_refusal_before_the_body_reaches_the_caller_with_the_servers_words(
    case: str, tmp_path: Path
) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(6 * MiB))
    st = path.stat()
    identity = FileIdentity(str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    with EmbeddedServer(tmp_path / "srv", presign_ttl=1.0) as srv:
        target = await asyncio.to_thread(_granted_target, srv, 6 * MiB)
        if case == "expired":
            await asyncio.sleep(2.2)
        else:
            target = dataclasses.replace(target, url=target.url.replace("sig=", "sig=0"))
        progress: list[int] = []
        connections = Connections()
        try:
            async with httpx.AsyncClient() as http:
                with pytest.raises(TransferError) as caught:
                    await send_range(
                        http, target, identity, TokenBucket(None), progress.append, connections
                    )
        finally:
            connections.close()
    assert "HTTP 403" in str(caught.value)
    assert caught.value.expired is (case == "expired")
    assert not caught.value.transient
    assert sum(progress) == 0  # whatever was handed to the socket is taken back


async def test_a_slow_link_is_not_a_stall(tmp_path: Path) -> None:
    """The stall timeout counts from the last byte the socket took, not per 4 MiB slice."""
    data = os.urandom(12 * MiB)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    st = path.stat()
    identity = FileIdentity(str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    received = bytearray()

    async def slow_reader(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"content-length: %d" % len(data) in head.lower()
        # At most ~1.3 MB/s (slower on a loaded machine, never faster): a 4 MiB slice takes
        # over 3 s, more than the 2 s stall timeout, while bytes keep moving every ~50 ms.
        while len(received) < len(data):
            received.extend(await reader.read(64 * 1024))
            await asyncio.sleep(0.05)
        etag = hashlib.sha256(received).hexdigest()
        writer.write(f'HTTP/1.1 200 OK\r\nContent-Length: 0\r\nETag: "{etag}"\r\n\r\n'.encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(slow_reader, "127.0.0.1", 0)
    for sock in server.sockets:  # small buffers, so the reader's pace is the sender's
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    port = server.sockets[0].getsockname()[1]
    target = UploadTarget(
        path="f.bin",
        part=None,
        method="PUT",
        url=f"http://127.0.0.1:{port}/b",
        headers={},
        offset=0,
        length=len(data),
        expires_at=0.0,
    )
    progress: list[int] = []
    connections = Connections()
    try:
        async with httpx.AsyncClient(timeout=2.0) as http:  # the stall timeout: 2 s
            etag = await send_range(
                http, target, identity, TokenBucket(None), progress.append, connections
            )
    finally:
        connections.close()
        server.close()
        await server.wait_closed()
    assert etag == f'"{hashlib.sha256(data).hexdigest()}"' and bytes(received) == data
    assert sum(progress) == len(data) and len(progress) > 4  # finer than one per 4 MiB slice


async def test_every_address_of_a_name_is_tried(tmp_path: Path) -> None:
    """``localhost`` may resolve to ::1 first while the server listens on 127.0.0.1 only."""
    peer = _OneShotServer()
    server = await asyncio.start_server(peer.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo

    async def v6_first(host, port, **kwargs):  # type: ignore[no-untyped-def]
        v6 = (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0))
        return [v6, *await real("127.0.0.1", port, **kwargs)]

    loop.getaddrinfo = v6_first  # type: ignore[method-assign]
    connections = Connections()
    try:
        conn, reused = await connections.acquire("localhost", port, 5.0)
        assert not reused and conn.sock.getpeername()[:2] == ("127.0.0.1", port)
        conn.sock.close()
    finally:
        del loop.getaddrinfo
        connections.close()
        server.close()
        await server.wait_closed()
