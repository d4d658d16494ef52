"""One checkpoint from 8 rank processes into one asset, vs the same files from one process.

    python bench/multirank.py [--ranks 8] [--shards 4] [--shard-mib 4] [--repeat 3]

A DCP-style directory (``__<rank>_<i>.distcp`` for each rank, plus ``.metadata``) on tmpfs,
and ``methodic serve`` on local storage. Alternating, ``--repeat`` rounds of:

- **ranks**: ``--ranks`` processes, each a rank with its own tracker and Chronicle
  (``--rank-workers`` transfers), registering its own shards (``include`` globs; rank 0 also
  ``.metadata``) as a contribution to one asset; the server finalizes it once all are stored.
- **single**: one process (``--single-workers`` transfers) uploading the whole directory as one
  ordinary asset.

Measured per round: wall time from the first registration to the last handle resolved (each
process stamps ``time.time()`` after it opened its Chronicle, so interpreter start-up is not
counted), throughput (bytes / wall), and the time from the last byte stored (the last
component completed, from the engine's events) to the asset finalized on the server
(``finalized_at``), and to the last handle resolved (a rank whose contribution is stored polls
the asset). Integrity stays on (every range digested, finalize verifies). Medians; the figures
are ratios to the single process measured in the same run. Writes bench/results/multirank.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from harness import MB, ROOT, MiB, Server, machine, pick_base

CHILD = "--child"


async def child(args: list[str]) -> None:
    """One uploader: a rank (rank >= 0) or the single process (rank < 0). Prints JSON."""
    from methodic import AsyncChronicle, ComponentStateChanged, UploadTracker

    url, key, ckpt, tracker, name, rank_s, world_s, workers = args
    rank, world = int(rank_s), int(world_s)
    last_byte = 0.0
    async with AsyncChronicle(url, key, max_upload_workers=int(workers)) as chronicle:
        run = await chronicle.run(await chronicle.create_experiment("multirank-bench"), 0, 0)
        events = chronicle.subscribe()

        async def watch() -> None:
            nonlocal last_byte
            async for event in events:
                if isinstance(event, ComponentStateChanged) and event.state == "completed":
                    last_byte = event.at

        watcher = asyncio.create_task(watch())
        # Every uploader starts at once, as the ranks of a training job save at one step.
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        started = time.time()
        if rank >= 0:
            include = [f"__{rank}_*.distcp"] + ([".metadata"] if rank == 0 else [])
            handle = await run.register_and_upload_async(
                Path(ckpt),
                upload_tracker=UploadTracker(Path(tracker)),
                asset_name=name,
                rank=rank,
                world_size=world,
                include=include,
            )
        else:
            handle = await run.register_and_upload_async(
                Path(ckpt), upload_tracker=UploadTracker(Path(tracker))
            )
        asset = await handle.result()
        resolved = time.time()
        watcher.cancel()
        events.close()
    out = {
        "started": started,
        "last_byte": last_byte,
        "resolved": resolved,
        "finalized_at": asset.finalized_at,
        "bytes": sum(c.size for c in asset.components) if rank < 0 else None,
        "total_size": asset.total_size,
    }
    print(json.dumps(out), flush=True)


def write_checkpoint(root: Path, ranks: int, shards: int, shard_bytes: int) -> int:
    root.mkdir(parents=True)
    total = 0
    block = os.urandom(MiB)
    for r in range(ranks):
        for i in range(shards):
            with open(root / f"__{r}_{i}.distcp", "wb") as f:
                left = shard_bytes
                while left > 0:
                    n = min(left, len(block))
                    f.write(block[:n])
                    left -= n
            total += shard_bytes
    (root / ".metadata").write_bytes(os.urandom(64 * 1024))
    return total + 64 * 1024


def spawn(argv: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, CHILD, *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def collect(procs: list[subprocess.Popen[str]]) -> list[dict[str, Any]]:
    """Once every uploader is ready (Chronicle open, run known), start them all together."""
    for p in procs:
        assert p.stdout is not None
        line = p.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(
                f"uploader not ready: {line!r} {p.stderr.read() if p.stderr else ''}"
            )
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise RuntimeError(f"uploader failed ({p.returncode}): {stderr[-2000:]}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def round_ranks(
    server: Server, ckpt: Path, work: Path, name: str, ranks: int, workers: int
) -> dict[str, float]:
    procs = [
        spawn(
            [
                server.url,
                server.api_key,
                str(ckpt),
                str(work / f"{name}-rank{r}.sqlite"),
                name,
                str(r),
                str(ranks),
                str(workers),
            ]
        )
        for r in range(ranks)
    ]
    results = collect(procs)
    return summarize(results)


def round_single(
    server: Server, ckpt: Path, work: Path, name: str, workers: int
) -> dict[str, float]:
    proc = spawn(
        [
            server.url,
            server.api_key,
            str(ckpt),
            str(work / f"{name}.sqlite"),
            name,
            "-1",
            "1",
            str(workers),
        ]
    )
    return summarize(collect([proc]))


def summarize(results: list[dict[str, Any]]) -> dict[str, float]:
    first = min(r["started"] for r in results)
    last_byte = max(r["last_byte"] for r in results)
    finalized = results[0]["finalized_at"]
    resolved = max(r["resolved"] for r in results)
    return {
        "wall_s": resolved - first,
        "bytes": float(results[0]["total_size"]),
        "last_byte_to_finalized_s": finalized - last_byte,
        "last_byte_to_all_resolved_s": resolved - last_byte,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        asyncio.run(child(sys.argv[2:]))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--shard-mib", type=int, default=4)
    parser.add_argument("--rank-workers", type=int, default=2)
    parser.add_argument("--single-workers", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "multirank.json")
    opts = parser.parse_args()

    total_need = opts.ranks * opts.shards * opts.shard_mib * MiB
    base = pick_base(4 * total_need + 256 * MiB)
    server = Server(base).start()
    try:
        ckpt = base / "ckpt"
        size = write_checkpoint(ckpt, opts.ranks, opts.shards, opts.shard_mib * MiB)
        rounds: dict[str, list[dict[str, float]]] = {"ranks": [], "single": []}
        for i in range(opts.repeat):
            order = ("ranks", "single") if i % 2 == 0 else ("single", "ranks")
            for kind in order:
                work = base / f"work-{kind}-{i}"
                work.mkdir()
                if kind == "ranks":
                    r = round_ranks(server, ckpt, work, f"ckpt-{i}", opts.ranks, opts.rank_workers)
                else:
                    r = round_single(server, ckpt, work, f"single-{i}", opts.single_workers)
                r["throughput_MBps"] = r["bytes"] / r["wall_s"] / MB
                rounds[kind].append(r)
                print(kind, i, json.dumps({k: round(v, 3) for k, v in r.items()}), flush=True)
                shutil.rmtree(work)
                server.clear_blobs()
        med = {
            kind: {
                key: statistics.median(r[key] for r in rs)
                for key in (
                    "wall_s",
                    "throughput_MBps",
                    "last_byte_to_finalized_s",
                    "last_byte_to_all_resolved_s",
                )
            }
            for kind, rs in rounds.items()
        }
        report = {
            "benchmark": "multirank",
            "machine": machine(),
            "load_note": (
                "2-core machine shared with three other engineers' builds, tests and "
                "benchmarks during the run: absolute figures are noisy, compare the ratios"
            ),
            "config": {
                "ranks": opts.ranks,
                "shards_per_rank": opts.shards,
                "shard_mib": opts.shard_mib,
                "bytes": size,
                "rank_workers": opts.rank_workers,
                "single_workers": opts.single_workers,
                "repeat": opts.repeat,
                "storage": "local (tmpfs)",
                "integrity": "on (crc64nvme range digests, finalize verifies)",
            },
            "rounds": rounds,
            "median": med,
            "ratio_ranks_to_single": {
                "throughput": med["ranks"]["throughput_MBps"] / med["single"]["throughput_MBps"],
                "wall": med["ranks"]["wall_s"] / med["single"]["wall_s"],
            },
        }
        opts.output.parent.mkdir(parents=True, exist_ok=True)
        opts.output.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps({"median": med, "ratio": report["ratio_ranks_to_single"]}, indent=2))
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
