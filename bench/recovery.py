"""Recovery benchmark: drain a 10,000-component asset that a killed process left half uploaded.

    python bench/recovery.py [--components 10000] [--size 4096] [--repeat 3] [--scan-only]

A child process uploads the asset with a bandwidth cap and is SIGKILLed once its tracker
records half of the components completed. Then
``drain_incomplete_uploads_async`` runs in a child process of its own; we time how long until
the first missing component is being sent again (goal: within 2 s), the whole drain, its peak
RSS, and check that no byte of a stored component is sent again. ``--scan-only`` stops at the
first file sent again (the recovery scan: e.g. 10,000 against 100,000 components). Writes
bench/results/recovery.json (not with --scan-only).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from harness import peak_rss_mb

from methodic import (
    AsyncChronicle,
    ComponentStateChanged,
    UploadTracker,
    drain_incomplete_uploads_async,
)
from methodic.server import EmbeddedServer

CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from methodic import Chronicle, UploadTracker
    url, key, tracker, ckpt, rate = sys.argv[1:6]
    with Chronicle(url, key, max_bandwidth=rate, max_upload_workers=8) as chronicle:
        run = chronicle.run(chronicle.create_experiment("recovery-bench"), 0, 0)
        run.register_and_upload_async(Path(ckpt), upload_tracker=UploadTracker(Path(tracker)))
        print("registered", flush=True)
        run.wait_for_uploads()
""")


def make_files(root: Path, n: int, size: int) -> None:
    for i in range(n):
        d = root / f"shard-{i // 1000:03d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"tensor-{i:05d}.bin").write_bytes(os.urandom(size))


async def drain(url: str, key: str, tracker: UploadTracker, scan_only: bool) -> dict[str, float]:
    """In a child process of its own (its peak RSS is the engine's): the drain, or with
    ``scan_only`` only the recovery scan (tracker read, create, the server's account, the
    first missing file sent again), then the process ends."""
    async with AsyncChronicle(url, key, max_upload_workers=8) as chronicle:
        sub = chronicle.subscribe()
        first: list[float] = []

        async def watch() -> None:
            async for ev in sub:
                if isinstance(ev, ComponentStateChanged) and ev.state == "uploading":
                    first.append(time.perf_counter())
                    sub.close()
                    return

        watcher = asyncio.create_task(watch())
        start = time.perf_counter()
        draining = asyncio.create_task(drain_incomplete_uploads_async(chronicle, tracker))
        if scan_only:
            await asyncio.wait({watcher, draining}, return_when=asyncio.FIRST_COMPLETED)
            scan = {"first_upload_s": first[0] - start, "peak_rss_mb": peak_rss_mb()}
            print(json.dumps(scan), flush=True)
            os._exit(0)  # transfers are left behind: no orderly close
        report = await draining
        total = time.perf_counter() - start
        watcher.cancel()
        assert report.ok and len(report.finalized) == 1, report
        return {
            "first_upload_s": (first[0] - start) if first else float("nan"),
            "drain_s": total,
            "bytes_resent": report.bytes_resent,
            "bytes_skipped": report.bytes_skipped,
            "peak_rss_mb": peak_rss_mb(),
        }


def drain_child(url: str, key: str, tracker_path: Path, scan_only: bool) -> dict[str, float]:
    argv = [sys.executable, __file__, "--drain-child", url, key, str(tracker_path)]
    out = subprocess.run(
        [*argv, *(["--scan-only"] if scan_only else [])], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise RuntimeError(f"drain failed: {out.stderr[-3000:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def completed(tracker_path: Path) -> int:
    with contextlib.closing(sqlite3.connect(tracker_path, timeout=60)) as conn:
        (n,) = conn.execute("SELECT count(*) FROM components WHERE state = 'completed'").fetchone()
    return int(n)


def one_round(n: int, size: int, tmp: Path, scan_only: bool) -> dict[str, float]:
    ckpt = tmp / "ckpt"
    make_files(ckpt, n, size)
    with EmbeddedServer(tmp / "server") as srv:
        tracker_path = tmp / "u.sqlite"
        total = n * size
        rate = str(int(total / 8))  # about 8 s for everything: kill after ~4 s
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, srv.url, srv.api_key, str(tracker_path), str(ckpt), rate],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        child.stdout.readline()
        while completed(tracker_path) < n // 2:  # about halfway, however long the create took
            time.sleep(0.2)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        tracker = UploadTracker(tracker_path)
        pending = tracker.get_pending_uploads()[0]
        stored_before = sum(1 for c in pending.components if c.state == "completed")
        tracker.close()
        del pending
        result = drain_child(srv.url, srv.api_key, tracker_path, scan_only)
        result["stored_components_before"] = stored_before
        if not scan_only:
            result["missing_bytes"] = total - result["bytes_skipped"]
            assert result["bytes_resent"] == result["missing_bytes"], result
        return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--components", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--scan-only",
        action="store_true",
        help="time the recovery scan only (until the first missing file is sent again)",
    )
    parser.add_argument("--drain-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drain_child:
        url, key, tracker = args.drain_child
        tr = UploadTracker(Path(tracker))
        print(json.dumps(asyncio.run(drain(url, key, tr, args.scan_only))), flush=True)
        return
    rounds = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="methodic-recovery-") as tmp:
            rounds.append(one_round(args.components, args.size, Path(tmp), args.scan_only))
    first = statistics.median(r["first_upload_s"] for r in rounds)
    rss = statistics.median(r["peak_rss_mb"] for r in rounds)
    print(f"{args.components} components of {args.size} B, {args.repeat} rounds (medians)")
    print(f"  uploading again after   {first:.2f} s   (goal < 2 s)")
    print(f"  drain's peak RSS        {rss:.0f} MB")
    if args.scan_only:
        return
    whole = statistics.median(r["drain_s"] for r in rounds)
    print(f"  whole drain             {whole:.2f} s")
    print(
        f"  stored bytes re-sent    {sum(r['bytes_resent'] - r['missing_bytes'] for r in rounds)} B"
    )
    out = Path(__file__).parent / "results" / "recovery.json"
    out.write_text(
        json.dumps(
            {
                "components": args.components,
                "size": args.size,
                "first_upload_s": first,
                "drain_s": whole,
                "rounds": rounds,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
