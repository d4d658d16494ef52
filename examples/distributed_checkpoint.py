"""The DCP/FSDP pattern end to end, without torch: N rank processes save sharded checkpoints
into one shared directory, and each checkpoint becomes ONE atomic asset on the server.

    python examples/distributed_checkpoint.py [--ranks 4] [--steps 3] [--shard-mb 8]

This script is the launcher (as ``torchrun`` would be): it starts an embedded Chronicle server
(127.0.0.1, data in a temporary directory), runs ``--ranks`` copies of itself as the ranks
(``RANK``/``WORLD_SIZE`` in their environment), then checks what the server holds: one
finalized asset per kept checkpoint, each byte-identical to the files the ranks wrote.

Each rank, at every checkpoint step, does what ``torch.distributed.checkpoint.save`` leaves on
disk: ``__<rank>_0.distcp`` per rank, and ``.metadata`` from rank 0 (the coordinator). Then,
with no barrier and no talk between ranks, it registers its own files as its contribution and
trains on; the server finalizes the checkpoint when every rank's contribution is stored.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from methodic import Chronicle, UploadTracker


def rank_main(out: Path, steps: int, shard_bytes: int) -> None:
    """One rank of the training job."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # One tracker file per rank (on node-local disk in a real job): a rank that dies resumes
    # its own contribution from it with drain_incomplete_uploads.
    tracker = UploadTracker(db_path=out / f"uploads-rank{rank}.sqlite")
    with Chronicle(max_upload_workers=4) as chronicle:  # METHODIC_SERVER_URL, METHODIC_API_KEY
        run = chronicle.run(chronicle.create_experiment("distributed-example"), 0, 0)
        if rank == 0:
            # Keep the newest 2 finalized checkpoints on the server; an older one goes only
            # once a newer one is finalized, so the latest is never deleted.
            run.set_retention(asset_type="checkpoint", keep_last=2)
        for step in range(1, steps + 1):
            # ... train ... then save, as dcp.save(state_dict, checkpoint_id=ckpt) does:
            ckpt = out / f"checkpoint-{step * 100}"
            ckpt.mkdir(parents=True, exist_ok=True)
            (ckpt / f"__{rank}_0.distcp").write_bytes(
                hashlib.sha256(f"{step}/{rank}".encode()).digest() * (shard_bytes // 32)
            )
            mine = [f"__{rank}_*.distcp"]
            if rank == 0:
                (ckpt / ".metadata").write_bytes(f"step {step}, {world_size} ranks\n".encode())
                mine.append(".metadata")
            handle = run.register_and_upload_async(
                local_dir=ckpt,
                asset_type="checkpoint",
                upload_tracker=tracker,
                asset_name=ckpt.name,  # every rank derives the same asset id from it
                rank=rank,
                world_size=world_size,
                include=mine,
                delete_local=False,  # True: remove these files once the asset is finalized
            )
            # Called once, on the uploader's thread, when the whole checkpoint is durable
            # (or failed): the place to move a `latest` pointer or prune older local copies.
            handle.add_done_callback(
                lambda h, name=ckpt.name: print(
                    f"rank {rank}: {name} " + ("finalized" if h.done() and _ok(h) else "FAILED"),
                    flush=True,
                )
            )
        run.wait_for_uploads()  # before exit: every checkpoint of this rank finalized


def _ok(handle: object) -> bool:
    try:
        handle.result(0)  # type: ignore[attr-defined]
        return True
    except Exception:
        return False


def launch(ranks: int, steps: int, shard_mb: int) -> int:
    from methodic.server.embedded import EmbeddedServer

    with tempfile.TemporaryDirectory(prefix="methodic-distributed-") as tmp:
        base = Path(tmp)
        out = base / "out"
        out.mkdir()
        with EmbeddedServer(base / "server") as server:
            print(f"embedded Chronicle server at {server.url}; {ranks} ranks, {steps} checkpoints")
            env = dict(
                os.environ,
                WORLD_SIZE=str(ranks),
                METHODIC_SERVER_URL=str(server.url),
                METHODIC_API_KEY=str(server.api_key),
            )
            procs = [
                subprocess.Popen(
                    [sys.executable, __file__, "--rank-of", str(out), str(steps), str(shard_mb)],
                    env={**env, "RANK": str(r)},
                )
                for r in range(ranks)
            ]
            codes = [p.wait() for p in procs]
            if any(codes):
                print(f"a rank failed: exit codes {codes}", file=sys.stderr)
                return 1
            with Chronicle(server.url, server.api_key) as chronicle:
                run = chronicle.run(chronicle.create_experiment("distributed-example"), 0, 0)
                assets = run.list_assets()  # finalized only: a pending checkpoint is invisible
                names = [a.asset_name for a in assets]
                print(f"on the server: {names} (retention keep_last=2)")
                for asset in assets:
                    assert asset.asset_name is not None
                    dest = run.download_asset(asset.asset_id, base / "download" / asset.asset_name)
                    if _digest(dest) != _digest(out / asset.asset_name):
                        print(f"{asset.asset_name}: download differs!", file=sys.stderr)
                        return 1
                    print(
                        f"{asset.asset_name}: {asset.component_count} files from "
                        f"{asset.world_size} ranks, downloaded copy is byte-identical (sha256)"
                    )
    return 0


def _digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--rank-of":
        out, steps, shard_mb = sys.argv[2:5]
        rank_main(Path(out), int(steps), int(shard_mb) * 10**6)
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--shard-mb", type=int, default=8)
    args = parser.parse_args()
    return launch(args.ranks, args.steps, args.shard_mb)


if __name__ == "__main__":
    sys.exit(main())
