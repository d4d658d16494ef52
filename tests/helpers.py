"""Helpers shared by the tests: synthetic checkpoints, hashing, free ports, waiting on a
condition, API clients, signed-URL tampering, a served subprocess."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import httpx

from methodic import _checksum as checksums

T = TypeVar("T")

# How long a test waits for something that should happen. Only a failing test ever waits this
# long: every wait polls the condition itself, so a loaded machine is slower, never red.
CEILING = 120.0


def wait_until(
    predicate: Callable[[], T],
    *,
    timeout: float = CEILING,
    interval: float = 0.02,
    what: str = "condition",
) -> T:
    """Poll ``predicate`` until it returns something truthy (which is returned), or fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout:.0f} s")
        time.sleep(interval)


async def wait_until_async(
    predicate: Callable[[], T | Awaitable[T]],
    *,
    timeout: float = CEILING,
    what: str = "condition",
    pause: Callable[[], Awaitable[object]] | None = None,
) -> T:
    """``wait_until`` for a test on an event loop: between looks it yields to the loop (or
    awaits ``pause()``, e.g. a Textual Pilot's, so the app handles its messages). The predicate
    may be a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout:.0f} s")
        await (pause() if pause is not None else asyncio.sleep(0.02))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ---- checksums of bytes in memory, as the engine derives them from a file


def digest(algorithm: str, data: bytes) -> str:
    hasher = checksums.new_hasher(algorithm)
    hasher.update(data)
    return hasher.hexdigest()


def ranges(size: int, part_size: int | None) -> list[tuple[int | None, int, int]]:
    """(part, offset, length) of every PUT of a component."""
    if part_size is None:
        return [(None, 0, size)]
    count = max(1, -(-size // part_size))
    return [
        (n, (n - 1) * part_size, min(part_size, size - (n - 1) * part_size))
        for n in range(1, count + 1)
    ]


def whole(algorithm: str, data: bytes, part_size: int | None) -> str:
    """The finalize checksum ("algo:value") of ``data`` sent with ``part_size``."""
    pieces = ranges(len(data), part_size)
    digests = [digest(algorithm, data[o : o + n]) for _, o, n in pieces]
    value = checksums.whole_file(
        algorithm, digests, [n for _, _, n in pieces], parted=part_size is not None
    )
    return f"{algorithm}:{value}"


def tree_checksums(root: Path, algorithm: str = "crc64nvme") -> dict[str, str]:
    """{relative posix path: "algo:hex" of the whole file} for every regular file under root
    (crc64nvme: what methodic publishes for a file, parted or not)."""
    return {
        p.relative_to(root).as_posix(): f"{algorithm}:"
        + checksums.hash_range(p, 0, p.stat().st_size, algorithm)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


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
    url: str, timeout: float = CEILING, proc: subprocess.Popen[str] | None = None
) -> None:
    def healthy() -> bool:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"server exited with {proc.returncode}: {proc.stderr and proc.stderr.read()}"
            )
        try:
            return httpx.get(f"{url}/healthz", timeout=5, trust_env=False).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(healthy, timeout=timeout, interval=0.05, what=f"{url} healthy")


def connect(srv: Any, timeout: float = 60.0) -> httpx.Client:
    """An httpx client on an EmbeddedServer's control port, with its API key."""
    assert srv.url is not None
    return httpx.Client(
        base_url=srv.url,
        headers={"Authorization": f"Bearer {srv.api_key}"},
        timeout=timeout,
        trust_env=False,
    )


def with_query(url: str, **changes: str) -> str:
    """``url`` with some of its query fields changed (to tamper with a signed URL)."""
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query.update(changes)
    return urlunsplit(parts._replace(query=urlencode(query)))


def tracked_assets(tracker_path: Path) -> list[Any]:
    """What an upload tracker holds now ([] while no process has created it yet)."""
    from methodic import UploadTracker

    if not tracker_path.exists():
        return []
    with UploadTracker(tracker_path) as tracker:
        return list(tracker.list_assets())


class Lines:
    """A child process's text stream, read line by line in the background, so that a test can
    wait for what the child says instead of sleeping."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: Any) -> None:
        for line in stream:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)

    def count(self, needle: str) -> int:
        return sum(needle in line for line in list(self.lines))

    def wait_for(self, needle: str, times: int = 1) -> None:
        wait_until(lambda: self.count(needle) >= times, what=f"{times} x {needle!r}")

    def rest(self) -> str:
        """Everything, once the child has closed the stream (it exited)."""
        self._thread.join(CEILING)
        assert not self._thread.is_alive(), "the stream was not closed"
        return self.text()


def receiving_a_body(srv: Any) -> bool:
    """An EmbeddedServer's blob listener is receiving a request body right now."""
    assert srv._blobs is not None
    try:
        return any(c.body is not None for c in list(srv._blobs.server.connections))
    except RuntimeError:  # the set changed while copied (the listener's thread): look again
        return False


def uploads_released(srv: Any) -> bool:
    """No body is being received, no part upload is held and no temp file is left behind."""
    assert srv._state is not None
    try:
        busy = srv._blobs is not None and any(
            c.body is not None for c in list(srv._blobs.server.connections)
        )
    except RuntimeError:
        busy = True
    return not (
        busy or srv._state.catalog.locks.part_writers or any((srv.data_dir / "tmp").iterdir())
    )


def stop_process(proc: subprocess.Popen[str], timeout: float = CEILING) -> tuple[str, str]:
    """SIGTERM, then its (stdout, stderr); killed if it does not exit within ``timeout``."""
    if proc.poll() is None:
        proc.terminate()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return out or "", err or ""


def start_serve(
    data_dir: Path, *args: str, port: int | None = None
) -> tuple[subprocess.Popen[str], str]:
    """`methodic serve` as a real subprocess on a loopback port, once it answers /healthz."""
    port = free_port() if port is None else port
    proc = subprocess.Popen(
        methodic_cmd("serve", "--data-dir", str(data_dir), "--port", str(port), *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc=proc)
    except BaseException:
        stop_process(proc)
        raise
    return proc, url


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
