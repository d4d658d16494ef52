"""Finalize reads nothing back: what `methodic serve` reads while it finalizes a parted file.

    python bench/finalize.py [--size-mib 2048] [--part-mib 16] [--repeat 3]
                             [--checksum crc64nvme,sha256] [--dir DIR]

For each algorithm and round: a pending asset of one file in parts, every part presigned bound
to its digest and PUT (from this process, outside the measurement), then the finalize call
(with the file's checksum, derived from the part digests as the engine does), with the
server's /proc/PID/io (``rchar``: bytes its read()-family calls returned, page cache and tmpfs
included; ``read_bytes``: bytes fetched from the block layer, always 0 on tmpfs), its CPU
seconds and the call's wall time measured around it. Before issue 12 finalize re-read and
re-hashed every stored byte (~1.1 s/GB here); a read-back of the file would show as rchar of
at least its size. Writes bench/results/finalize.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from harness import GB, ROOT, MiB, Server, children_of, machine, proc_cpu


def proc_io(pids: list[int]) -> dict[str, int]:
    total = {"rchar": 0, "read_bytes": 0, "syscr": 0}
    for pid in pids:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            key, _, value = line.partition(": ")
            if key in total:
                total[key] += int(value)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=2048)
    parser.add_argument("--part-mib", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--checksum", default="crc64nvme,sha256")
    parser.add_argument(
        "--dir", type=Path, default=None, help="scratch (default: a new directory on /dev/shm)"
    )
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "finalize.json")
    args = parser.parse_args()
    from methodic._checksum import hash_range, whole_file

    size, part = args.size_mib * MiB, args.part_mib * MiB
    base = Path(tempfile.mkdtemp(prefix="methodic-finalize-", dir=args.dir or "/dev/shm"))
    server = Server(base)
    runs: list[dict[str, Any]] = []
    try:
        src = base / "model.safetensors"
        block = os.urandom(16 * MiB)
        with open(src, "wb") as f:
            for i in range(size // len(block)):
                f.write(i.to_bytes(8, "little") + block[8:])
        server.start()
        pids = [server.proc.pid, *children_of(server.proc.pid)]
        call = server.call
        exp = call("POST", "/experiments", {"name": "finalize-bench"})
        run_id = call("PUT", f"/experiments/{exp['id']}/runs/0/0", None)["id"]
        n_parts = -(-size // part)
        lengths = [min(part, size - (n - 1) * part) for n in range(1, n_parts + 1)]
        for algorithm in args.checksum.split(","):
            digests = [
                hash_range(src, (n - 1) * part, lengths[n - 1], algorithm)
                for n in range(1, n_parts + 1)
            ]
            checksum = f"{algorithm}:{whole_file(algorithm, digests, lengths, parted=True)}"
            for rep in range(args.repeat):
                asset_id = f"fin-{algorithm}-{rep}"
                call(
                    "POST",
                    f"/runs/{run_id}/assets",
                    {
                        "asset_id": asset_id,
                        "asset_type": "checkpoint",
                        "checksum_algorithm": algorithm,
                        "components": [
                            {"path": src.name, "size": size, "sha256": None, "part_size": part}
                        ],
                    },
                )
                targets = call(
                    "POST",
                    f"/assets/{asset_id}/presign",
                    {
                        "targets": [
                            {"path": src.name, "part": n, "checksum": digests[n - 1]}
                            for n in range(1, n_parts + 1)
                        ]
                    },
                )["targets"]
                with open(src, "rb") as f, httpx.Client(trust_env=False, timeout=600) as blobs:
                    for t in targets:
                        f.seek((t["part"] - 1) * part)
                        r = blobs.put(t["url"], content=f.read(part), headers=t["headers"])
                        r.raise_for_status()
                io0, cpu0 = proc_io(pids), proc_cpu(pids)
                t0 = time.perf_counter()
                asset = call(
                    "POST", f"/assets/{asset_id}/finalize", {"checksums": {src.name: checksum}}
                )
                wall = time.perf_counter() - t0
                io1, cpu1 = proc_io(pids), proc_cpu(pids)
                if asset["state"] != "finalized":
                    raise RuntimeError(f"asset {asset_id} is {asset['state']}")
                got = asset["components"][0]["checksum"]
                if got != checksum:
                    raise RuntimeError(f"settled checksum {got}, expected {checksum}")
                row = {
                    "algorithm": algorithm,
                    "rep": rep,
                    "bytes": size,
                    "parts": n_parts,
                    "finalize_s": wall,
                    "finalize_s_per_gb": wall / (size / GB),
                    "server_cpu_s": cpu1 - cpu0,
                    **{f"server_{k}": io1[k] - io0[k] for k in io0},
                }
                runs.append(row)
                print(
                    f"{algorithm:<10} rep {rep}: finalize {wall:.3f} s, server read "
                    f"{row['server_rchar']} B (rchar), {row['server_read_bytes']} B (read_bytes), "
                    f"{row['server_syscr']} read calls, {row['server_cpu_s']:.3f} CPU s",
                    file=sys.stderr,
                    flush=True,
                )
                shutil.rmtree(server.data_dir / "blobs", ignore_errors=True)
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)

    medians = {}
    print(f"\n1 file of {size / MiB:.0f} MiB in {n_parts} parts; medians of {args.repeat}")
    print("| algorithm | finalize s | s/GB | server rchar B | read_bytes B | server CPU s |")
    print("|---|---:|---:|---:|---:|---:|")
    for algorithm in args.checksum.split(","):
        rs = [r for r in runs if r["algorithm"] == algorithm]
        m = {
            k: statistics.median(r[k] for r in rs)
            for k in (
                "finalize_s",
                "finalize_s_per_gb",
                "server_rchar",
                "server_read_bytes",
                "server_cpu_s",
            )
        }
        m["server_rchar_max"] = max(r["server_rchar"] for r in rs)
        medians[algorithm] = m
        print(
            f"| {algorithm} | {m['finalize_s']:.3f} | {m['finalize_s_per_gb']:.3f} "
            f"| {m['server_rchar']:.0f} (max {m['server_rchar_max']}) "
            f"| {m['server_read_bytes']:.0f} | {m['server_cpu_s']:.3f} |"
        )
        print(
            f"- {algorithm}: finalize read back {m['server_rchar_max']} bytes at most "
            f"({m['server_rchar_max'] / size:.2e} of the file): "
            f"{'PASS' if m['server_rchar_max'] < size / 100 else 'FAIL'} (no read-back)"
        )
    result = {
        **machine(),
        "scratch": str(base.parent),
        "size": size,
        "part_size": part,
        "repeat": args.repeat,
        "medians": medians,
        "runs": runs,
    }
    args.output.parent.mkdir(exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
