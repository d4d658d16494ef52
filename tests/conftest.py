"""Shared fixtures of the methodic test suite."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import free_port, methodic_cmd, subprocess_env, wait_healthy
from methodic.server import EmbeddedServer


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    """A real Chronicle server on a free 127.0.0.1 port, its data under tmp_path/server."""
    srv = EmbeddedServer(tmp_path / "server")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


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
    port = free_port()
    proc = subprocess.Popen(
        methodic_cmd("serve", "--data-dir", str(data_dir), "--port", str(port)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(),
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc=proc)
        yield Served(url, (data_dir / "api_key").read_text().strip(), data_dir, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
