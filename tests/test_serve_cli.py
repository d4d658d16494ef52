"""`methodic serve` as a real subprocess."""

from __future__ import annotations

import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import CEILING

_SCRIPT = Path(sys.executable).parent / "methodic"
METHODIC = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "methodic.server.cli"]


class Serve:
    """A running `methodic serve` whose stdout is read line by line in the background."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*METHODIC, "serve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.stdout: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for_url(self, timeout: float = CEILING) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            self.stdout.append(line)
            found = re.search(r"http://\S+:\d+", line)
            if found:
                return found.group(0)
        raise AssertionError(f"no URL printed; stderr: {self.stop()[1]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        assert self.proc.stderr is not None
        while not self.lines.empty():
            self.stdout.append(self.lines.get())
        return returncode, self.proc.stderr.read()


@pytest.fixture
def serve() -> Iterator[list[Serve]]:
    started: list[Serve] = []
    yield started
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


def run_to_exit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*METHODIC, *args], capture_output=True, text=True, timeout=CEILING)


def test_serve_prints_its_url_serves_and_stops_on_sigterm(
    tmp_path: Path, serve: list[Serve]
) -> None:
    data_dir = tmp_path / "data"
    s = Serve("--data-dir", str(data_dir), "--port", "0")
    serve.append(s)
    url = s.wait_for_url()
    assert url.startswith("http://127.0.0.1:")
    assert httpx.get(f"{url}/healthz", trust_env=False).status_code == 200

    key_file = data_dir / "api_key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert data_dir.stat().st_mode & 0o777 == 0o700
    key = key_file.read_text().strip()
    assert key.startswith("sk_agent_")
    headers = {"Authorization": f"Bearer {key}"}
    assert (
        httpx.get(f"{url}/api/v1/experiments", headers=headers, trust_env=False).status_code == 200
    )
    assert httpx.get(f"{url}/api/v1/experiments", trust_env=False).status_code == 401

    # Exits by itself (stop() kills it and fails the test if it has not within a minute: far
    # more than an idle server's shutdown takes, even on a loaded machine).
    returncode, stderr = s.stop(signal.SIGTERM)
    assert returncode == 0, stderr
    output = "".join(s.stdout)
    assert str(key_file) in output
    assert key not in output and key not in stderr
    assert "Traceback" not in stderr


def test_sigint_also_exits_0_and_the_key_is_kept(tmp_path: Path, serve: list[Serve]) -> None:
    data_dir = tmp_path / "data"
    first = Serve("--data-dir", str(data_dir), "--port", "0")
    serve.append(first)
    first.wait_for_url()
    assert first.stop(signal.SIGINT)[0] == 0
    key = (data_dir / "api_key").read_text()

    second = Serve("--data-dir", str(data_dir), "--port", "0")
    serve.append(second)
    url = second.wait_for_url()
    headers = {"Authorization": f"Bearer {key.strip()}"}
    assert (
        httpx.get(f"{url}/api/v1/experiments", headers=headers, trust_env=False).status_code == 200
    )
    assert second.stop()[0] == 0
    assert (data_dir / "api_key").read_text() == key


def test_given_api_key_is_accepted_and_not_printed(tmp_path: Path, serve: list[Serve]) -> None:
    key = "sk_agent_cli-given-key-for-tests"
    s = Serve("--data-dir", str(tmp_path / "d"), "--port", "0", "--api-key", key)
    serve.append(s)
    url = s.wait_for_url()
    headers = {"Authorization": f"Bearer {key}"}
    assert (
        httpx.get(f"{url}/api/v1/experiments", headers=headers, trust_env=False).status_code == 200
    )
    returncode, stderr = s.stop()
    assert returncode == 0
    assert key not in "".join(s.stdout) and key not in stderr


def test_non_loopback_bind_warns(tmp_path: Path, serve: list[Serve]) -> None:
    s = Serve("--data-dir", str(tmp_path / "d"), "--host", "0.0.0.0", "--port", "0")
    serve.append(s)
    s.wait_for_url()
    returncode, stderr = s.stop()
    assert returncode == 0
    assert "warning" in stderr and "not loopback" in stderr


def assert_one_line_usage_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0]


def test_port_in_use_is_exit_2_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_to_exit("serve", "--data-dir", str(tmp_path / "d"), "--port", str(port))
    assert_one_line_usage_error(result, str(port), "already in use")
    assert not (tmp_path / "d").exists()  # nothing was created for a server that never ran


def test_unusable_data_dir_is_exit_2_with_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = run_to_exit("serve", "--data-dir", str(blocker / "data"), "--port", "0")
    assert_one_line_usage_error(result, "data dir")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        # No credentials, or (with the suite's fake ones) nothing listening: one line either way.
        (["--storage", "s3://bucket", "--s3-endpoint-url", "http://127.0.0.1:9"], ["S3"]),
        (["--storage", "ftp"], ["--storage"]),
        (["--port", "70000"], ["port"]),
        (["--presign-ttl", "-1"], ["seconds"]),
        (["--public-url", "ftp://x"], ["public URL"]),
        (["--bogus"], ["--bogus"]),
    ],
)
def test_bad_options_are_exit_2_with_one_line(
    tmp_path: Path, args: list[str], words: list[str]
) -> None:
    result = run_to_exit("serve", "--data-dir", str(tmp_path / "d"), "--port", "0", *args)
    assert_one_line_usage_error(result, *words)


def test_version() -> None:
    result = run_to_exit("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("methodic ")
