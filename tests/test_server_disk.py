"""The data directory under pressure: a full disk answers 507 (not 500 with a traceback), and
one data directory is served by one server at a time. Real servers, real HTTP."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest
from helpers import free_port, methodic_cmd, subprocess_env, wait_healthy

from methodic.server import EmbeddedServer

CEILING_S = 60.0  # only to fail a hung call


def fill(path: Path) -> None:
    """Write ``path`` until the disk is full."""
    with open(path, "wb", buffering=0) as f:
        for size in (1 << 16, 1 << 12, 1 << 9, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno in (errno.ENOSPC, errno.EDQUOT)


class Served:
    def __init__(self, data_dir: Path, log: Path) -> None:
        self.port = free_port()
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                methodic_cmd("serve", "--data-dir", str(data_dir), "--port", str(self.port)),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=subprocess_env(),
            )
        self.url = f"http://127.0.0.1:{self.port}"
        wait_healthy(self.url, proc=None)
        key = (data_dir / "api_key").read_text().strip()
        self.api = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {key}"},
            timeout=CEILING_S,
            trust_env=False,
        )

    def stop(self) -> str:
        self.api.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(CEILING_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.log.read_text(errors="replace")


def test_a_full_disk_answers_507_with_the_error_shape_and_no_traceback(
    tmp_path: Path, small_disk: Path
) -> None:
    served = Served(small_disk / "data", tmp_path / "serve.log")
    try:
        api = served.api
        experiment = api.post("/api/v1/experiments", json={"name": "e"}).json()["id"]
        run = api.put(f"/api/v1/experiments/{experiment}/runs/0/0").json()["id"]
        blob = {
            "asset_id": uuid.uuid4().hex,
            "asset_type": "checkpoint",
            "components": [{"path": "model.bin", "size": 256 * 1024}],
            "presign": True,
        }
        target = api.post(f"/api/v1/runs/{run}/assets", json=blob).json()["targets"][0]
        filler = small_disk / "filler"
        fill(filler)
        put = httpx.put(target["url"], content=b"w" * (256 * 1024), trust_env=False)
        assert put.status_code == 507, put.text[:500]
        assert put.json()["error"]["code"] == "insufficient_storage"
        spec = {
            "asset_id": uuid.uuid4().hex,
            "asset_type": "checkpoint",
            "components": [
                {"path": f"layer-{i:06d}/{'w' * 80}.bin", "size": i, "sha256": "a" * 64}
                for i in range(5_000)
            ],
        }
        full = api.post(f"/api/v1/runs/{run}/assets", json=spec)
        assert full.status_code == 507, full.text[:500]
        error = full.json()["error"]
        assert error["code"] == "insufficient_storage"
        assert "full" in error["message"]
        small = api.post("/api/v1/experiments", json={"name": "x" * 900 + uuid.uuid4().hex})
        assert small.status_code in (201, 507), small.text[:500]
        # Room again: the same requests succeed, nothing half-done in the way.
        filler.unlink()
        assert api.post(f"/api/v1/runs/{run}/assets", json=spec).status_code == 201
        put = httpx.put(target["url"], content=b"w" * (256 * 1024), trust_env=False)
        assert put.status_code == 201, put.text[:500]
        assert api.get("/healthz").status_code == 200
    finally:
        log = served.stop()
    assert served.proc.returncode == 0, log
    assert "Traceback" not in log, log
    assert "internal error" not in log, log


def assert_one_line_refusal(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def serve_to_exit(data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        methodic_cmd("serve", "--data-dir", str(data_dir), "--port", "0"),
        capture_output=True,
        text=True,
        timeout=CEILING_S,
        env=subprocess_env(),
    )


def test_a_second_serve_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = Served(data_dir, tmp_path / "first.log")
    try:
        second = serve_to_exit(data_dir)
        assert_one_line_refusal(second, str(data_dir), str(first.proc.pid), "in use")
        # The first one is untouched.
        assert first.api.get("/healthz").status_code == 200
        assert first.api.post("/api/v1/experiments", json={"name": "e"}).status_code == 201
    finally:
        first.stop()
    # Stopped cleanly: the data dir is free again.
    again = Served(data_dir, tmp_path / "again.log")
    try:
        # Killed: the OS releases the lock with the process.
        again.proc.kill()
        again.proc.wait()
    finally:
        again.stop()
    third = Served(data_dir, tmp_path / "third.log")
    third.stop()
    assert third.proc.returncode == 0
    lock = data_dir / "lock"
    assert lock.stat().st_mode & 0o777 == 0o600


def test_an_embedded_server_refuses_a_data_dir_in_use(tmp_path: Path) -> None:
    from methodic.server.state import DataDirError

    with EmbeddedServer(tmp_path / "s") as first:
        with pytest.raises(DataDirError) as refused:
            EmbeddedServer(tmp_path / "s").start()
        message = str(refused.value)
        assert str(tmp_path / "s") in message and str(os.getpid()) in message
        assert "in use" in message
        assert httpx.get(f"{first.url}/healthz", trust_env=False).status_code == 200
    with EmbeddedServer(tmp_path / "s") as second:  # stopped: free again
        assert httpx.get(f"{second.url}/healthz", trust_env=False).status_code == 200
