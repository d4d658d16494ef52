"""Throughput benchmark: the engine against curl, into the same receivers, in one run.

    python bench/throughput.py [--quick] [--repeat 5] [--workers 8] [--only nginx,server,rss]

(a) nginx: the engine's PUT path (per range: ``_checksum.hash_range`` in a thread, then
    ``methodic._transfer.send_range`` on the engine's own ``httpx.AsyncClient`` and
    ``TokenBucket``; each ``--checksum`` algorithm) and ``curl --parallel`` into an nginx
    WebDAV sink on loopback, for 16 files of 128 MiB and one 2 GiB file (one stream each, and
    in 16 MiB parts with the same number of parallel streams; curl sends pre-split part files).
(b) server: the engine end to end (``Chronicle`` + ``UploadTracker``,
    ``register_and_upload_async``, wait, finalize) against ``methodic serve``, and curl PUTting
    the same files to the same server's presigned URLs, bound to the ranges' digests (create,
    presign with ``checksum``, curl with each URL's ``x-methodic-checksum``, finalize).
(c) rss: peak RSS of the engine end to end for a 1 GiB and an 8 GiB (sparse) file.

Every client runs in its own process: MB/s is bytes / wall time of the transfer (median of
``--repeat`` runs, variants alternating), CPU s/GB is the client's user+system time per 10^9
bytes (the engine: its whole process over the transfer window; curl: the curl process), peak RSS
is the client process's ru_maxrss. Needs ``nginx`` (Debian's nginx-light has the dav module) and
``curl`` on PATH. Prints a markdown table and writes bench/results/throughput.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

from harness import (
    GB,
    MB,
    ROOT,
    GiB,
    MiB,
    Nginx,
    Server,
    clear_dir,
    machine,
    pick_base,
)
from throughput_clients import child_main
from throughput_report import evaluate, median_rows, print_report
from throughput_runs import Bench, make_workload

# --------------------------------------------------------------------------- child processes


# --------------------------------------------------------------------------- process helpers


# --------------------------------------------------------------------------- receivers


# --------------------------------------------------------------------------- workloads


# --------------------------------------------------------------------------- runners


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run, < 1 min")
    parser.add_argument(
        "--repeat", type=int, default=None, help="runs per variant (default 5; --quick 2)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="unrecorded rounds before each workload (default 1; --quick 0)",
    )
    parser.add_argument("--workers", type=int, default=8, help="parallel streams for both clients")
    parser.add_argument("--part-size", type=int, default=16, help="MiB (the engine's default)")
    parser.add_argument("--only", default="nginx,server,rss", help="comma list of nginx,server,rss")
    parser.add_argument(
        "--checksum",
        default="crc64nvme,sha256",
        help="the engine's checksum algorithm(s), comma list, each run in the same rounds "
        "(default crc64nvme,sha256; the first is also the one of the rss section)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="JSON results (default bench/results/throughput.json; --quick: none)",
    )
    parser.add_argument(
        "--server-pythonpath",
        default=None,
        metavar="DIR",
        help="run `methodic serve` from another source tree (DIR/methodic)",
    )
    parser.add_argument(
        "--engine-tree",
        action="append",
        default=[],
        metavar="NAME=DIR",
        type=lambda v: tuple(v.split("=", 1)),
        help="also run every engine variant with DIR first on PYTHONPATH "
        "(an engine change to compare, in the same run); repeatable",
    )
    parser.add_argument("--child", nargs=2, metavar=("MODE", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(*args.child)
        return
    from methodic import ChronicleError as ChronicleErrorType

    if args.repeat is None:
        args.repeat = 2 if args.quick else 5
    if args.warmup is None:
        args.warmup = 0 if args.quick else 1
    args.part_size *= MiB
    args.checksums = args.checksum.split(",")
    from methodic._checksum import check_algorithm

    for a in args.checksums:
        check_algorithm(a)
    sections = set(args.only.split(","))
    if args.quick:
        many, single, rss_sizes = (16, 4 * MiB), 64 * MiB, [128 * MiB, 512 * MiB]
    else:
        many, single, rss_sizes = (16, 128 * MiB), 2 * GiB, [1 * GiB, 8 * GiB]
    if not shutil.which("curl"):
        raise SystemExit("curl not found: apt-get install -y curl")

    total = many[0] * many[1] + 2 * single  # sources and single-file parts
    # Sources plus one run's sink; the sources are deleted before the RSS runs' sinks fill up.
    need = max(total + max(many[0] * many[1], single), max(rss_sizes) if "rss" in sections else 0)
    base = pick_base(need + GiB)

    # SIGTERM/SIGHUP clean up like Ctrl-C does.
    def interrupted(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupted)
    nginx: Nginx | None = None
    server: Server | None = None
    chronicles: list[Any] = []
    bench = Bench(args, base)
    rss: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    try:
        print(f"scratch in {base}; writing test files...", file=sys.stderr, flush=True)
        block = os.urandom(16 * MiB)
        label = lambda n, s: f"{n} x {s // GiB} GiB" if s >= GiB else f"{n} x {s // MiB} MiB"  # noqa: E731
        workloads = [
            make_workload(base, "many", label(*many), many[0], many[1], block, args.part_size),
            make_workload(base, "single", label(1, single), 1, single, block, args.part_size),
        ]
        labels = {w.name: w.label for w in workloads}

        def section(name: str, body: Any) -> None:
            """Run one section; if it breaks (a server being edited), keep the others' figures."""
            try:
                body()
            except (RuntimeError, OSError, ValueError, ChronicleErrorType) as exc:
                bench.failed[(name, "*", "*")] = f"{type(exc).__name__}: {exc}"
                print(f"  {name}: FAILED: {exc}", file=sys.stderr, flush=True)

        def run_nginx() -> None:
            nonlocal nginx
            nginx = Nginx(base).start()
            print(
                f"(a) nginx {nginx.version()} WebDAV at {nginx.origin}", file=sys.stderr, flush=True
            )
            for w in workloads:
                bench.alternate(
                    "nginx", w, bench.nginx_variants(nginx, w), lambda: clear_dir(nginx.sink)
                )
            nginx.stop()

        def run_server() -> None:
            from methodic import Chronicle

            runs = {}
            for algorithm in args.checksums:
                for layout, opts in (
                    ("whole", {"part_threshold": 1 << 62}),
                    ("parts", {"part_size": args.part_size}),
                ):
                    c = Chronicle(
                        server_url=server.url,
                        api_key=server.api_key,
                        checksum_algorithm=algorithm,
                        **opts,
                    )
                    chronicles.append(c)
                    runs[(layout, algorithm)] = c.run(
                        c.create_experiment("throughput-bench-curl"), 0, len(runs)
                    )
            for w in workloads:
                bench.alternate(
                    "server", w, bench.server_variants(server, w, runs), server.clear_blobs
                )

        def run_rss() -> None:
            shutil.rmtree(base / "src", ignore_errors=True)  # room for the stored copies
            for size in rss_sizes:
                d = base / "src" / f"rss-{size}"
                d.mkdir(parents=True)
                with open(d / "model.safetensors", "wb") as f:
                    f.truncate(size)  # sparse: reads as zeros, costs no memory on tmpfs
                bench.counter += 1
                spec = {
                    "server_url": server.url,
                    "api_key": server.api_key,
                    "workers": args.workers,
                    "local_dir": str(d),
                    "tracker": str(bench.scratch / f"t{bench.counter}.sqlite"),
                    "run": 1000 + bench.counter,
                    "checksum": args.checksums[0],
                }
                try:
                    m = bench._child("e2e", spec, [server.proc.pid])
                finally:
                    server.clear_blobs()
                    shutil.rmtree(d, ignore_errors=True)
                rss.append(
                    {
                        "size_gib": size / GiB,
                        "checksum": args.checksums[0],
                        "workers": args.workers,
                        "mb_s": m.bytes / m.wall / MB,
                        "cpu_s_per_gb": m.cpu / (m.bytes / GB),
                        "peak_rss_mb": m.rss_mb,
                    }
                )
                print(
                    f"  rss    {size / GiB:g} GiB: {m.rss_mb:.0f} MB peak RSS, "
                    f"{m.bytes / m.wall / MB:.0f} MB/s",
                    file=sys.stderr,
                    flush=True,
                )

        def start_server() -> None:
            nonlocal server
            server = Server(base, args.server_pythonpath).start()
            print(f"(b) methodic serve at {server.url}", file=sys.stderr, flush=True)

        if "nginx" in sections:
            section("nginx", run_nginx)
        if sections & {"server", "rss"}:
            section("server", start_server)
        if server is not None and server.url:
            if "server" in sections:
                section("server", run_server)
            if "rss" in sections:
                section("rss", run_rss)
    finally:
        for c in chronicles:
            with contextlib.suppress(Exception):
                c.close()
        if server is not None:
            server.stop()
        if nginx is not None:
            nginx.stop()
        shutil.rmtree(base, ignore_errors=True)

    load_after = os.getloadavg()
    rows = median_rows(bench.runs)
    trees = [name for name, _ in args.engine_tree]
    goals = evaluate(rows, rss, trees, args.workers, args.checksums)
    print_report(rows, rss, goals, labels, trees, args.workers, args.checksums)
    print(
        f"\nload average (1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after, "
        f"on {os.cpu_count()} CPUs"
    )
    result = {
        **machine(),
        "engine_trees": dict(args.engine_tree),
        "quick": args.quick,
        "repeat": args.repeat,
        "warmup": args.warmup,
        "workers": args.workers,
        "part_size": args.part_size,
        "checksums": args.checksums,
        "scratch_fs": str(base.parent),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "medians": rows,
        "rss": rss,
        "goals": goals,
        "runs": bench.runs,
    }
    if bench.failed:
        result["failed"] = [
            {"section": k[0], "workload": k[1], "variant": k[2], "error": v}
            for k, v in bench.failed.items()
        ]
        for k, v in bench.failed.items():
            print(f"- FAILED {' / '.join(k)}: {v[:300]}")
    output = args.output or (None if args.quick else ROOT / "results" / "throughput.json")
    if output is not None:
        output.parent.mkdir(exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {output}", file=sys.stderr)


if __name__ == "__main__":
    main()
