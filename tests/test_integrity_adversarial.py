"""Adversarial tests of the integrity promise (docs/integrity.md), each of which broke it once."""

from __future__ import annotations

import mmap
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from helpers import (
    CEILING,
    Lines,
    connect,
    make_checkpoint,
    sha256_file,
    subprocess_env,
    wait_until,
)
from tui_helpers import remote_args, tui_cmd, tui_env

from methodic import Chronicle, ChronicleError
from methodic._api import ApiClient
from methodic.server import EmbeddedServer

MiB = 1 << 20
PARTED = dict(part_threshold=5 * MiB, part_size=5 * MiB)


def server_asset(server: EmbeddedServer, asset_id: str) -> dict[str, Any]:
    with connect(server) as api:
        reply = api.get(f"/api/v1/assets/{asset_id}")
        reply.raise_for_status()
        data: dict[str, Any] = reply.json()
        return data


UPLOADER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from methodic import Chronicle, UploadTracker
    url, key, tracker, ckpt = sys.argv[1:5]
    with Chronicle(url, key, part_threshold=5 << 20, part_size=5 << 20, max_bandwidth="4MB") as ch:
        run = ch.run(ch.create_experiment("x"), 0, 0)
        h = run.register_and_upload_async(Path(ckpt), upload_tracker=UploadTracker(Path(tracker)))
        print("ID", h.asset_id, flush=True)
        run.wait_for_uploads()
""")


def test_a_file_rewritten_through_a_shared_mapping_across_a_crash_is_never_published_torn(
    server: EmbeddedServer, tmp_path: Path
) -> None:
    """A trainer that keeps its checkpoint in a numpy.memmap / mmap rewrites it in place: writes
    to pages that are already dirty change neither mtime nor ctime, so the identity check passes,
    and resume publishes the parts the server held (version A) + the rest re-hashed (version B)."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    f = ckpt / "model.bin"
    size = 15 * MiB
    f.write_bytes(b"\0" * size)
    fd = os.open(f, os.O_RDWR)
    mapping = mmap.mmap(fd, size)
    version_a, version_b = b"\xaa" * size, b"\xbb" * size
    mapping[:] = version_a  # the trainer writes checkpoint A through its mapping
    # (Where a filesystem updates ctime on writes through a mapping, the identity check is
    # what catches this; here it does not, and only reading the bytes again can.)
    tracker = tmp_path / "u.sqlite"
    child = subprocess.Popen(
        [sys.executable, "-c", UPLOADER, server.url, server.api_key, str(tracker), str(ckpt)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    out = Lines(child.stdout)
    out.wait_for("ID")
    asset_id = next(line.split()[1] for line in out.lines if line.startswith("ID"))
    wait_until(
        lambda: server_asset(server, asset_id)["components"][0]["parts_stored"],
        what="a stored part",
    )
    child.send_signal(signal.SIGKILL)
    child.wait(CEILING)
    mapping[:] = version_b  # the next checkpoint, into the same mapping (no ctime change)
    mapping.flush()
    done = subprocess.run(
        tui_cmd("resume", "--no-ui", "--take-over", *remote_args(server, tracker)),
        capture_output=True,
        text=True,
        timeout=CEILING,
        env=tui_env(tmp_path),
        cwd=tmp_path,
    )
    state = server_asset(server, asset_id)["state"]
    if state == "finalized":
        with Chronicle(server.url, server.api_key) as chronicle:
            run = chronicle.run(chronicle.create_experiment("x"), 0, 0)
            published = (run.download_asset(asset_id, tmp_path / "back") / "model.bin").read_bytes()
        consistent = published in (version_a, version_b)
        assert consistent, (
            f"resume (exit {done.returncode}) published a torn model.bin: its 5 MiB parts start "
            f"with {[published[o : o + 1].hex() for o in range(0, size, 5 * MiB)]}"
        )
    else:
        assert done.returncode == 1 and "model.bin" in done.stdout + done.stderr


@pytest.mark.parametrize("size", [12 * MiB, 3 * MiB], ids=["parted", "whole"])
def test_stored_bytes_changed_before_finalize_with_their_mtime_put_back_are_not_published(
    server: EmbeddedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """The server trusts its receipts while a stored file's (inode, size, mtime) stamp holds;
    the client learned that utime() puts an mtime back, the server's stamp did not (no ctime)."""
    ckpt = make_checkpoint(tmp_path / "ckpt", {"model.bin": size})
    finalize = ApiClient.finalize
    damaged: list[Path] = []

    async def damage_then_finalize(self: ApiClient, *args: Any, **kwargs: Any) -> Any:
        if not damaged:  # between the last part and finalize: bit rot, or a tamperer
            blob = next(
                p
                for p in (tmp_path / "server" / "blobs").rglob("*")
                if p.is_file() and p.stat().st_size == size
            )
            st = blob.stat()
            with open(blob, "r+b") as f:
                f.seek(1000)
                f.write(b"\x00" * 16)
            os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))
            damaged.append(blob)
        return await finalize(self, *args, **kwargs)

    monkeypatch.setattr(ApiClient, "finalize", damage_then_finalize)
    with Chronicle(server.url, server.api_key, **PARTED) as chronicle:
        run = chronicle.run(chronicle.create_experiment("x"), 0, 0)
        try:
            asset = run.register_and_upload_async(ckpt).result()
        except ChronicleError:
            return  # refused: the promise held
    assert damaged
    assert sha256_file(damaged[0]) == sha256_file(ckpt / "model.bin"), (
        f"asset {asset.asset_id} was finalized, but the stored model.bin is not the bytes "
        "that were uploaded (finalize trusted a stamp whose mtime was put back)"
    )


def test_a_leaked_part_url_held_open_does_not_stop_the_real_upload(
    server: EmbeddedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/integrity.md: 'A leaked upload URL replayed with other bytes is refused; the real
    upload still finishes.' A replay that sends a few bytes and then stalls keeps a part writer
    open; finalize answers 'upload in progress' and the client gives up after 3 resends."""
    ckpt = make_checkpoint(tmp_path / "ckpt", {"model.bin": 12 * MiB})
    started, release = threading.Event(), threading.Event()
    presign = ApiClient.presign

    def stall(target: Any) -> None:
        u = urlsplit(target.url)
        with socket.create_connection((u.hostname, u.port)) as s:
            head = (
                f"PUT {u.path}?{u.query} HTTP/1.1\r\nHost: x\r\nContent-Length: {target.length}\r\n"
            )
            head += "".join(f"{k}: {v}\r\n" for k, v in target.headers.items())
            s.sendall((head + "\r\n").encode() + b"\xee" * 4096)
            started.set()
            release.wait(CEILING)

    async def leaky(self: ApiClient, asset_id: str, keys: Any) -> Any:
        targets = await presign(self, asset_id, keys)
        for t in targets:
            if t.part == 2 and not started.is_set():
                threading.Thread(target=stall, args=(t,), daemon=True).start()
                wait_until(started.is_set, what="the replay to start")
        return targets

    monkeypatch.setattr(ApiClient, "presign", leaky)
    try:
        with Chronicle(server.url, server.api_key, **PARTED) as chronicle:
            run = chronicle.run(chronicle.create_experiment("x"), 0, 0)
            asset = run.register_and_upload_async(ckpt).result()
            dest = run.download_asset(asset.asset_id, tmp_path / "back")
    finally:
        release.set()
    assert sha256_file(dest / "model.bin") == sha256_file(ckpt / "model.bin")


@pytest.mark.parametrize("changed", [0, 70, 199])
async def test_a_resume_rereads_every_small_file_it_sent_and_names_one_that_changed(
    tmp_path: Path, changed: int
) -> None:
    """After a crash every range the server holds is read again (small files in batches of a
    thread hop): one file of 200 with other bytes, wherever it falls in the batches, is named;
    with none changed the check passes."""
    from methodic import _checksum as checksums
    from methodic._digests import verify_stored
    from methodic._states import ComponentState
    from methodic._transfer import FileChangedError
    from methodic._types import ComponentSpec, RunBinding
    from methodic._uploads import AssetUpload, plan_components

    ckpt = make_checkpoint(tmp_path / "ckpt", {f"r{i:03d}.bin": 3000 + i for i in range(200)})
    specs = [ComponentSpec.from_file(p.name, p) for p in sorted(ckpt.iterdir())]
    comps = plan_components(specs, part_threshold=1 << 30, part_size=16 << 20)
    for c in comps.values():
        c.state = ComponentState.COMPLETED
        c.digests[None] = checksums.hash_range(c.identity.local_path, 0, c.size, "sha256")
    up = AssetUpload("a", "checkpoint", RunBinding("u", "r", "e", 0, 0), {}, comps, None)
    up.algorithm = "sha256"
    await verify_stored(up)
    victim = ckpt / f"r{changed:03d}.bin"
    victim.write_bytes(b"\x01" + victim.read_bytes()[1:])
    with pytest.raises(FileChangedError, match=f"r{changed:03d}.bin changed since it was sent"):
        await verify_stored(up)
