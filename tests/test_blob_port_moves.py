"""Targets are presigned again after connection failures, 421s and server restarts (issue item 3).

A server restarted on another blob port must not leave the uploader sending to whatever now
listens on the old one: the upload finishes byte-identical, and the squatter gets nothing.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from helpers import free_port, make_checkpoint, tree_digest

from methodic import Chronicle, RetryPolicy, UploadTracker
from methodic.server import EmbeddedServer

MiB = 1 << 20
FAST_RETRY = RetryPolicy(max_attempts=8, base=0.05, cap=0.5)
CEILING = 120.0  # only to fail a hung test


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + CEILING
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.02)


class Squatter:
    """A listener on a port the server left: counts every byte sent to it, answers 421."""

    def __init__(self, port: int, *, forward_to: int | None = None, misdirect: int = 1 << 30):
        self.bytes = 0
        self.connections = 0
        self.misdirected = 0
        self._forward_to = forward_to
        self._misdirect = misdirect  # connections answered 421 before forwarding the rest
        self._sock = socket.create_server(("127.0.0.1", port))
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                misdirect = self.connections <= self._misdirect
            threading.Thread(target=self._handle, args=(conn, misdirect), daemon=True).start()

    def _handle(self, conn: socket.socket, misdirect: bool) -> None:
        with conn:
            if not misdirect and self._forward_to is not None:
                self._pipe(conn)
                return
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(65536)
                if not data:
                    return
                head += data
                with self._lock:
                    self.bytes += len(data)
            with self._lock:
                self.misdirected += 1
            body = (
                b'{"error": {"code": "misdirected", "message": "not the server that signed this"}}'
            )
            conn.sendall(
                b"HTTP/1.1 421 Misdirected Request\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
            )

    def _pipe(self, conn: socket.socket) -> None:
        assert self._forward_to is not None
        with socket.create_connection(("127.0.0.1", self._forward_to)) as up:

            def pump(a: socket.socket, b: socket.socket) -> None:
                try:
                    while data := a.recv(65536):
                        b.sendall(data)
                except OSError:
                    pass
                finally:
                    with contextlib.suppress(OSError):
                        b.shutdown(socket.SHUT_WR)

            t = threading.Thread(target=pump, args=(up, conn), daemon=True)
            t.start()
            pump(conn, up)
            t.join(CEILING)

    def close(self) -> None:
        self._sock.close()


def test_server_restarted_on_another_blob_port_gets_every_byte_and_the_old_port_none(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "server"
    old_blob = free_port()
    srv = EmbeddedServer(data_dir, blob_port=old_blob).start()
    api_port = srv.port
    ckpt = make_checkpoint(tmp_path / "ckpt", {"model.bin": 40 * MiB, "small.json": 1000})
    tracker = UploadTracker(tmp_path / "u.sqlite")
    squatter: Squatter | None = None
    try:
        assert srv.url is not None and srv.api_key is not None
        with Chronicle(
            srv.url,
            srv.api_key,
            max_upload_workers=2,
            max_bandwidth="8MB",
            part_threshold=5 * MiB,
            part_size=5 * MiB,
            retry=FAST_RETRY,
        ) as chronicle:
            run = chronicle.run(chronicle.create_experiment("moved"), 0, 0)
            handle = run.register_and_upload_async(ckpt, upload_tracker=tracker)
            wait_until(lambda: chronicle.snapshot().bytes_done > 6 * MiB, "some parts sent")
            srv.stop()
            squatter = Squatter(old_blob)
            srv = EmbeddedServer(data_dir, port=api_port, blob_port=free_port()).start()
            assert srv.blob_port != old_blob
            handle.result(timeout=CEILING)
            dest = run.download_asset(handle.asset_id, tmp_path / "dl")
        assert tree_digest(dest) == tree_digest(ckpt)
        assert squatter.bytes == 0, f"{squatter.bytes} bytes went to the old blob port"
        tracked = tracker.get_asset(handle.asset_id)
        assert tracked is not None and tracked.state == "finalized"
    finally:
        if squatter is not None:
            squatter.close()
        srv.stop()


def test_a_421_from_a_blob_target_is_presigned_again_and_retried(tmp_path: Path) -> None:
    blob = free_port()
    front = free_port()
    squatter = Squatter(front, forward_to=blob, misdirect=2)
    srv = EmbeddedServer(
        tmp_path / "server", blob_port=blob, public_blob_url=f"http://127.0.0.1:{front}"
    ).start()
    ckpt = make_checkpoint(tmp_path / "ckpt", {"a.bin": 300_000, "b.bin": 200_000})
    try:
        assert srv.url is not None and srv.api_key is not None
        with Chronicle(srv.url, srv.api_key, max_upload_workers=1, retry=FAST_RETRY) as chronicle:
            run = chronicle.run(chronicle.create_experiment("misdirected"), 0, 0)
            handle = run.register_and_upload_async(ckpt)
            handle.result(timeout=CEILING)
            dest = run.download_asset(handle.asset_id, tmp_path / "dl")
        assert squatter.misdirected == 2
        assert tree_digest(dest) == tree_digest(ckpt)
    finally:
        srv.stop()
        squatter.close()
