"""methodic in one file: an embedded Chronicle server, a synthetic checkpoint, upload, download, verify.

    python examples/quickstart.py [--size-mb 256] [--workers 8]

Everything runs on this machine: the server listens on 127.0.0.1 only and keeps its data in a
temporary directory that is removed at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import humanize

from methodic import Chronicle, UploadTracker
from methodic.server.embedded import EmbeddedServer


def write_checkpoint(root: Path, total: int, shards: int) -> Path:
    root.mkdir(parents=True)
    per = total // shards
    for i in range(shards):
        with open(root / f"model-{i + 1:05d}-of-{shards:05d}.safetensors", "wb") as f:
            left = per
            while left:
                n = min(left, 4 << 20)
                f.write(os.urandom(n))
                left -= n
    (root / "config.json").write_text('{"step": 1000, "arch": "demo"}\n')
    return root


def digest(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            out[p.relative_to(root).as_posix()] = h.hexdigest()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--size-mb", type=int, default=256, help="checkpoint size in MB (default 256)"
    )
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="methodic-quickstart-") as tmp:
        base = Path(tmp)
        ckpt = write_checkpoint(base / "out" / "checkpoint-1000", args.size_mb * 10**6, shards=4)
        size = sum(p.stat().st_size for p in ckpt.iterdir())
        with EmbeddedServer(base / "server") as server:
            print(f"embedded Chronicle server at {server.url} (data in {server.data_dir})")
            tracker = UploadTracker(db_path=base / "uploads.sqlite")
            with Chronicle(
                server_url=server.url, api_key=server.api_key, max_upload_workers=args.workers
            ) as chronicle:
                exp_id = chronicle.create_experiment("quickstart")
                run = chronicle.run(exp_id, variation=0, run=0)
                started = time.perf_counter()
                handle = run.register_and_upload_async(
                    local_dir=ckpt, asset_type="checkpoint", upload_tracker=tracker
                )
                print(
                    f"registered {ckpt.name} as asset {handle.asset_id}; uploading in the background"
                )
                run.wait_for_uploads()
                run.succeed()
                elapsed = time.perf_counter() - started
                print(
                    f"finalized {humanize.naturalsize(size)} in {elapsed:.2f} s "
                    f"({humanize.naturalsize(size / elapsed)}/s); run is {run.status}"
                )
                assert tracker.get_pending_uploads() == []
                dest = run.download_asset(handle.asset_id, base / "download")
        same = digest(dest) == digest(ckpt)
        print("downloaded copy is byte-identical (sha256)" if same else "DOWNLOAD DIFFERS")
        return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
