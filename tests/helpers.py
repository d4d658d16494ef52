"""Helpers shared by the tests: synthetic checkpoints, hashing, free ports, a served subprocess."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def tree_digest(root: Path) -> dict[str, str]:
    """{relative posix path: sha256} for every regular file under root."""
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def make_checkpoint(root: Path, sizes: dict[str, int], seed: int = 0) -> Path:
    """Write files of the given sizes (pseudo-random bytes, reproducible per seed) under root."""
    root.mkdir(parents=True, exist_ok=True)
    for i, (rel, size) in enumerate(sizes.items()):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        block = hashlib.sha256(f"{seed}/{i}/{rel}".encode()).digest() * 2048  # 64 KiB
        with open(path, "wb") as f:
            left = size
            while left > 0:
                n = min(left, len(block))
                f.write(block[:n])
                left -= n
                block = hashlib.sha256(block[:32]).digest() * 2048
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(
    url: str, timeout: float = 20.0, proc: subprocess.Popen[str] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"server exited with {proc.returncode}: {proc.stderr and proc.stderr.read()}"
            )
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not become healthy")


def methodic_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "methodic", *args]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METHODIC_")}
    env.update(extra)
    return env


_CLAIMER = """
import os, sqlite3, sys, time
# As a process that registered or took over the asset: the tracker records it as the owner.
with sqlite3.connect(sys.argv[1], timeout=60) as conn:
    conn.execute("UPDATE assets SET owner_pid = ? WHERE asset_id = ?", (os.getpid(), sys.argv[2]))
print("claimed", flush=True)
if sys.argv[3] == "hold":
    time.sleep(300)
"""


def claim_in_child(tracker_path: Path, asset_id: str, *, hold: bool) -> subprocess.Popen[str]:
    """Another process becomes the tracker owner of ``asset_id``; with ``hold`` it stays alive
    (kill it), without it has exited and been reaped when this returns (its pid is dead)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _CLAIMER, str(tracker_path), asset_id, "hold" if hold else "exit"],
        stdout=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "claimed"
    if not hold:
        assert proc.wait(30) == 0
    return proc
