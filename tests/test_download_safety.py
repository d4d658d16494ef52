"""Downloads that restore long names and never write outside the destination (issue item 5)."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import blake3
import httpx
import pytest
from helpers import tree_digest

from methodic import Chronicle, ChronicleError, RetryPolicy
from methodic._api import ApiClient
from methodic._download import download_asset
from methodic.server import EmbeddedServer

BODY = b"payload bytes\n" * 100


class FakeServer:
    """A Chronicle stand-in on 127.0.0.1 whose download manifest is whatever the test says."""

    def __init__(self) -> None:
        self.manifest: list[str] = []
        self.body = BODY  # what each blob GET answers
        self.declared: dict[str, Any] = {"sha256": hashlib.sha256(BODY).hexdigest()}
        self.size = len(BODY)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.startswith("/api/v1/assets/"):
                    base = f"http://127.0.0.1:{fake.port}/blob"
                    comps = [
                        {"path": p, "url": f"{base}/{i}", "size": fake.size, **fake.declared}
                        for i, p in enumerate(fake.manifest)
                    ]
                    data = json.dumps({"components": comps}).encode()
                else:
                    data = fake.body
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    srv = FakeServer()
    try:
        yield srv
    finally:
        srv.close()


async def fetch(fake: FakeServer, dest: Path) -> Path:
    async with httpx.AsyncClient(trust_env=False) as http:
        api = ApiClient(f"http://127.0.0.1:{fake.port}", "sk_test", http, RetryPolicy())
        return await download_asset(api, http, "asset-1", dest, concurrency=4)


def everything_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


@pytest.mark.parametrize(
    ("manifest", "words"),
    [
        (["ok.bin", "a/b.bin", "a/b.bin"], "twice"),
        (["ok.bin", "a", "a/b.bin"], "both as a file and as a directory"),
        (["ok.bin", "a/b.bin", "a"], "both as a file and as a directory"),
        (["ok.bin", "../escape.bin"], "'..' segment"),
        (["ok.bin", "/etc/escape.bin"], "absolute"),
    ],
)
async def test_a_malicious_manifest_is_refused_before_anything_is_written(
    fake: FakeServer, tmp_path: Path, manifest: list[str], words: str
) -> None:
    fake.manifest = manifest
    dest = tmp_path / "box" / "dest"
    with pytest.raises(ChronicleError, match=words) as info:
        await fetch(fake, dest)
    assert "nothing was written" in str(info.value)
    assert everything_under(tmp_path) == []


async def test_a_symlink_inside_the_destination_is_never_followed(
    fake: FakeServer, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "sub").symlink_to(outside)
    (dest / "link.bin").symlink_to(outside / "victim.bin")
    fake.manifest = ["sub/x.bin"]
    with pytest.raises(ChronicleError, match="symlink") as info:
        await fetch(fake, dest)
    assert "sub/x.bin" in str(info.value)
    assert list(outside.iterdir()) == []
    # A link at a file's own name is replaced by the file, not written through.
    fake.manifest = ["link.bin"]
    await fetch(fake, dest)
    assert list(outside.iterdir()) == []
    assert not (dest / "link.bin").is_symlink() and (dest / "link.bin").read_bytes() == BODY
    assert sorted(p.name for p in dest.iterdir()) == ["link.bin", "sub"]  # no temporary left


def test_names_of_255_bytes_upload_and_download(server: EmbeddedServer, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    longest = "検" * 85  # 255 bytes in UTF-8
    (ckpt / longest).mkdir(parents=True)
    (ckpt / longest / ("重" * 80 + ".bin")).write_bytes(b"a" * 5000)
    (ckpt / ("x" * 255)).write_bytes(b"b" * 7000)
    assert server.url is not None and server.api_key is not None
    with Chronicle(server.url, server.api_key) as chronicle:
        run = chronicle.run(chronicle.create_experiment("long"), 0, 0)
        handle = run.register_and_upload_async(ckpt)
        handle.result(timeout=120)
        dest = run.download_asset(handle.asset_id, tmp_path / "dl")
    assert tree_digest(dest) == tree_digest(ckpt)
    assert not [p for p in dest.rglob(".methodic-*")]


async def test_a_server_that_sends_more_than_a_component_has_is_cut_off(
    fake: FakeServer, tmp_path: Path
) -> None:
    fake.manifest = ["small.bin"]
    fake.size, fake.declared = 10, {}
    fake.body = b"\0" * (30 << 20)  # 30 MB for a 10-byte component
    with pytest.raises(ChronicleError, match="more than its 10 bytes"):
        await fetch(fake, tmp_path / "dest")
    assert everything_under(tmp_path / "dest") == []


@pytest.mark.parametrize(
    "declared",
    [
        {"sha256": hashlib.sha256(b"other").hexdigest()},
        {"checksum": "crc64nvme:0123456789abcdef", "part_size": None},
        {"checksum": "blake3:" + "ab" * 32 + "-1", "part_size": 1 << 20},
    ],
)
async def test_bytes_that_are_not_the_published_checksum_are_never_kept(
    fake: FakeServer, tmp_path: Path, declared: dict[str, Any]
) -> None:
    fake.manifest = ["model.bin"]
    fake.declared = declared
    with pytest.raises(ChronicleError, match="corrupt"):
        await fetch(fake, tmp_path / "dest")
    assert everything_under(tmp_path / "dest") == []


async def test_bytes_that_match_the_published_checksum_are_kept(
    fake: FakeServer, tmp_path: Path
) -> None:
    fake.manifest = ["model.bin"]
    fake.declared = {"checksum": "blake3:" + blake3.blake3(BODY).hexdigest(), "part_size": None}
    dest = await fetch(fake, tmp_path / "dest")
    assert (dest / "model.bin").read_bytes() == BODY
