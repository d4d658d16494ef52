"""Secrets of `methodic serve`: the API key need not be on the command line (where `ps` shows
it), and every file and directory the server writes is private whatever the umask."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import free_port, make_checkpoint, methodic_cmd, subprocess_env, wait_healthy

from methodic import Chronicle

CEILING_S = 60.0
KEY = "sk_agent_not-on-the-command-line-0123456789"


class Served:
    def __init__(self, data_dir: Path, *args: str, umask: int = 0o022, **env: str) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.proc = subprocess.Popen(
            methodic_cmd("serve", "--data-dir", str(data_dir), "--port", str(self.port), *args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=subprocess_env(**env),
            umask=umask,  # not preexec_fn: unsafe in a process with threads
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> Served:
        wait_healthy(self.url, proc=self.proc)
        return self

    def status(self, key: str) -> int:
        headers = {"Authorization": f"Bearer {key}"}
        url = f"{self.url}/api/v1/experiments"
        return httpx.get(url, headers=headers, trust_env=False, timeout=CEILING_S).status_code

    def cmdline(self) -> str:
        return Path(f"/proc/{self.proc.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()

    def stop(self) -> tuple[str, str]:
        if self.proc.poll() is None:
            self.proc.terminate()
        out, err = self.proc.communicate(timeout=CEILING_S)
        return out, err


@pytest.fixture
def started() -> Iterator[list[Served]]:
    servers: list[Served] = []
    yield servers
    for s in servers:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


def test_the_key_from_the_environment_is_accepted_and_not_in_ps(
    tmp_path: Path, started: list[Served]
) -> None:
    served = Served(tmp_path / "d", METHODIC_API_KEY=KEY)
    started.append(served)
    served.start()
    assert served.status(KEY) == 200
    assert served.status("sk_agent_another-key-000000000000") == 401
    assert KEY not in served.cmdline()
    assert not (tmp_path / "d" / "api_key").exists()  # nothing generated
    out, err = served.stop()
    assert "METHODIC_API_KEY" in out and KEY not in out + err


def test_the_key_from_a_file_is_accepted_and_not_in_ps(
    tmp_path: Path, started: list[Served]
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(f"{KEY}\n")
    key_file.chmod(0o600)
    served = Served(tmp_path / "d", "--api-key-file", str(key_file))
    started.append(served)
    served.start()
    assert served.status(KEY) == 200
    assert KEY not in served.cmdline()
    out, err = served.stop()
    assert str(key_file) in out and KEY not in out + err


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--api-key-file", "/nonexistent/key"], ["/nonexistent/key"]),
        (["--api-key-file", "EMPTY"], ["empty"]),
        (["--api-key", KEY, "--api-key-file", "EMPTY"], ["--api-key", "--api-key-file"]),
    ],
)
def test_unusable_key_options_are_exit_2_with_one_line(
    tmp_path: Path, args: list[str], words: list[str]
) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    args = [str(empty) if a == "EMPTY" else a for a in args]
    result = subprocess.run(
        methodic_cmd("serve", "--data-dir", str(tmp_path / "d"), "--port", "0", *args),
        capture_output=True,
        text=True,
        timeout=CEILING_S,
        env=subprocess_env(),
    )
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0]


def test_the_help_says_the_api_key_option_is_visible_to_other_users() -> None:
    result = subprocess.run(
        methodic_cmd("serve", "--help"), capture_output=True, text=True, timeout=CEILING_S
    )
    text = " ".join(result.stdout.split())
    assert "visible to other users" in text
    assert "--api-key-file" in text and "METHODIC_API_KEY" in text


def test_every_file_and_directory_the_server_writes_is_private(
    tmp_path: Path, started: list[Served]
) -> None:
    data_dir = tmp_path / "d"
    served = Served(data_dir, umask=0o022)
    started.append(served)
    served.start()
    key = (data_dir / "api_key").read_text().strip()
    checkpoint = make_checkpoint(
        tmp_path / "ckpt", {"model.bin": 70 * 1024 * 1024, "config.json": 300, "a/b/c.txt": 10}
    )
    with Chronicle(served.url, api_key=key) as chronicle:
        run = chronicle.run(chronicle.create_experiment("modes"))
        asset = run.upload_asset(checkpoint, asset_type="checkpoint")
        assert asset.state == "finalized"
    served.stop()
    assert served.proc.returncode == 0
    seen = {p.name for p in data_dir.iterdir()}
    assert {"api_key", "blob_port", "lock", "secret", "metadata.sqlite"} <= seen, seen
    loose = []
    for root, dirs, files in os.walk(data_dir):
        for name in dirs + files:
            path = Path(root, name)
            mode = stat.S_IMODE(path.lstat().st_mode)
            wanted = 0o700 if path.is_dir() else 0o600
            if mode != wanted:
                loose.append(f"{path.relative_to(data_dir)}: {mode:o}")
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert loose == []
