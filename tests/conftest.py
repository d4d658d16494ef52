"""Shared fixtures of the methodic test suite."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from faultproxy import FaultProxy
from helpers import connect, free_port, start_serve, stop_process
from s3helpers import REGION, DataProxy, moto_server, new_bucket

from methodic.server import EmbeddedServer, ServerConfig


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    """A real Chronicle server on a free 127.0.0.1 port, its data under tmp_path/server."""
    srv = EmbeddedServer(tmp_path / "server")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs of our own (the suite runs as root), always unmounted."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[EmbeddedServer]:
    """A server that calls an uploader session lost after 5 s without a beat (docs/monitor.md)."""
    config = ServerConfig(data_dir=tmp_path / "server", port=0, session_lost_after=5.0)
    srv = EmbeddedServer.from_config(config)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def api(server: EmbeddedServer) -> Iterator[httpx.Client]:
    """An API client on ``server`` (base URL: its control port), with its key."""
    with connect(server) as client:
        yield client


@dataclass
class Served:
    url: str
    api_key: str
    data_dir: Path
    proc: subprocess.Popen[str]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """`methodic serve` as a real subprocess on a free loopback port; always stopped."""
    data_dir = tmp_path / "served"
    proc, url = start_serve(data_dir)
    try:
        yield Served(url, (data_dir / "api_key").read_text().strip(), data_dir, proc)
    finally:
        stop_process(proc)


# ---- storage backends: the same tests on local storage and on S3 (moto) --------------------


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A moto S3 server on loopback for the whole session (always stopped); fake AWS env vars."""
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(moto_endpoint: str) -> str:
    """A fresh, empty bucket on the moto server."""
    return new_bucket(moto_endpoint)


@pytest.fixture
def s3_proxy(moto_endpoint: str) -> Iterator[FaultProxy]:
    """A FaultProxy in front of moto: presigned S3 URLs point at it, so tests see the bytes."""
    host, port = moto_endpoint.removeprefix("http://").split(":")
    with FaultProxy(host, int(port)) as proxy:
        yield proxy


@pytest.fixture(params=["local", "s3"])
def storage_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


_DATA_PROXY = pytest.StashKey[FaultProxy]()


def backend_config(
    storage_backend: str, data_dir: Path, request: pytest.FixtureRequest, **settings: Any
) -> ServerConfig:
    """A ServerConfig on a free port for ``storage_backend`` whose blob bytes cross a FaultProxy.

    Local: presigned URLs point at a proxy in front of the blob listener. S3: at a proxy in
    front of moto, with a fresh bucket. The proxy is the test's ``any_proxy``.
    """
    if storage_backend == "local":
        blob_port = free_port()
        proxy = FaultProxy("127.0.0.1", blob_port).__enter__()
        request.addfinalizer(proxy.stop)
        config = ServerConfig(
            data_dir=data_dir, port=0, blob_port=blob_port, public_blob_url=proxy.url, **settings
        )
    else:
        bucket = request.getfixturevalue("s3_bucket")
        proxy = request.getfixturevalue("s3_proxy")
        config = ServerConfig(
            data_dir=data_dir,
            port=0,
            storage=f"s3://{bucket}/chronicle",
            s3_endpoint_url=proxy.url,
            s3_region=REGION,
            **settings,
        )
    request.node.stash[_DATA_PROXY] = proxy
    return config


@pytest.fixture
def any_server(
    storage_backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[EmbeddedServer]:
    """Like ``server``, once per storage backend (local, s3)."""
    srv = EmbeddedServer.from_config(backend_config(storage_backend, tmp_path / "server", request))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def any_proxy(any_server: EmbeddedServer, request: pytest.FixtureRequest) -> DataProxy:
    """The FaultProxy on ``any_server``'s data path; give its ``url`` (the server's) to Chronicle."""
    assert any_server.url is not None
    return DataProxy(any_server.url, request.node.stash[_DATA_PROXY])
